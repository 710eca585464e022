"""Parity with vector-quantize-pytorch 1.32: converted modules give the same tokens and EMA state."""

from __future__ import annotations

import copy

import pytest
import torch

import vqdeploy
from vqdeploy.errors import UnsupportedOptionError

reference = pytest.importorskip("vector_quantize_pytorch", reason="vector-quantize-pytorch is a test dependency")

VQ_CASES = {
    "plain": dict(codebook_size=64),
    "cosine": dict(codebook_size=64, use_cosine_sim=True),
    "projection": dict(codebook_size=64, codebook_dim=16),
    "multihead_shared": dict(codebook_size=32, heads=4, codebook_dim=16),
    "multihead_separate": dict(codebook_size=32, heads=4, codebook_dim=16, separate_codebook_per_head=True),
}


def _reference_vq(**kwargs):
    return reference.VectorQuantize(dim=64, decay=0.8, rotation_trick=False, **kwargs)


def _batch(digits, n=1024):
    return digits[:n].reshape(8, n // 8, 64).clone()


@pytest.mark.parametrize("case", VQ_CASES)
def test_eval_tokens_and_outputs_identical(case, digits):
    ref = _reference_vq(**VQ_CASES[case]).eval()
    ours = vqdeploy.VectorQuantize.from_vector_quantize_pytorch(ref).eval()
    x = _batch(digits)
    with torch.no_grad():
        ref_q, ref_idx, _ = ref(x)
        q, idx, loss = ours(x)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(q, ref_q, rtol=1e-6, atol=1e-6)
    assert loss.shape == (1,)


@pytest.mark.parametrize("case", VQ_CASES)
def test_one_training_step_matches_ema_state(case, digits):
    ref = _reference_vq(**VQ_CASES[case]).train()
    ours = vqdeploy.VectorQuantize.from_vector_quantize_pytorch(copy.deepcopy(ref)).train()
    x = _batch(digits)
    _, ref_idx, ref_loss = ref(x)
    _, idx, loss = ours(x)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(loss.reshape(()), ref_loss.reshape(()), rtol=1e-5, atol=1e-6)
    for name in ("embed", "embed_avg", "cluster_size"):
        torch.testing.assert_close(
            getattr(ours._codebook, name), getattr(ref._codebook, name), rtol=1e-5, atol=1e-5, msg=name
        )


def test_residual_vq_eval_and_training_step(digits):
    ref = reference.ResidualVQ(dim=64, num_quantizers=4, codebook_size=64, rotation_trick=False)
    ours = vqdeploy.ResidualVQ.from_vector_quantize_pytorch(copy.deepcopy(ref))
    x = _batch(digits)
    with torch.no_grad():
        ref_q, ref_idx, _ = ref.eval()(x)
        q, idx, losses = ours.eval()(x)
    assert torch.equal(idx, ref_idx.permute(2, 0, 1))  # the reference is quantizer-last
    torch.testing.assert_close(q, ref_q, rtol=1e-6, atol=1e-6)
    assert losses.shape == (4, 1)

    ref.train()(x)
    ours.train()(x)
    for stage in range(4):
        for name in ("embed", "embed_avg", "cluster_size"):
            torch.testing.assert_close(
                getattr(ours.layers[stage]._codebook, name),
                getattr(ref.layers[stage]._codebook, name),
                rtol=1e-5,
                atol=1e-5,
                msg=f"stage {stage} {name}",
            )


def test_residual_vq_with_projection(digits):
    ref = reference.ResidualVQ(dim=64, codebook_dim=16, num_quantizers=3, codebook_size=32, rotation_trick=False).eval()
    ours = vqdeploy.ResidualVQ.from_vector_quantize_pytorch(ref).eval()
    x = _batch(digits)
    with torch.no_grad():
        assert torch.equal(ours(x)[1], ref(x)[1].permute(2, 0, 1))


def test_image_feature_map_parity():
    ref = reference.VectorQuantize(dim=16, codebook_size=32, accept_image_fmap=True, rotation_trick=False).eval()
    ours = vqdeploy.VectorQuantize.from_vector_quantize_pytorch(ref).eval()
    x = torch.randn(2, 16, 5, 7)
    with torch.no_grad():
        ref_q, ref_idx, _ = ref(x)
        q, idx, _ = ours(x)
    assert idx.shape == (2, 5, 7)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(q, ref_q)
    torch.testing.assert_close(ours.get_output_from_indices(idx), q)


def test_unsupported_reference_option_is_named():
    ref = reference.VectorQuantize(dim=16, codebook_size=32, affine_param=True, rotation_trick=False)
    with pytest.raises(UnsupportedOptionError, match="affine_param"):
        vqdeploy.VectorQuantize.from_vector_quantize_pytorch(ref)


def test_gradient_only_option_warns_but_converts(digits):
    ref = reference.VectorQuantize(dim=64, codebook_size=32)  # rotation_trick defaults to True there
    with pytest.warns(UserWarning, match="rotation_trick"):
        ours = vqdeploy.VectorQuantize.from_vector_quantize_pytorch(ref)
    x = _batch(digits, 256)
    with torch.no_grad():
        assert torch.equal(ours.eval()(x)[1], ref.eval()(x)[1])
