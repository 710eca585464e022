"""VectorQuantize: gradients, losses, learning on real data, export-cleanliness, layouts, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vqdeploy import VectorQuantize
from vqdeploy.errors import (
    ConfigError,
    IndexRangeError,
    InputDtypeError,
    InputShapeError,
    NonFiniteInputError,
    UninitializedCodebookError,
    VQDeployError,
)
from vqdeploy.ops import nearest_code_reference


def test_straight_through_gradient_reaches_input():
    vq = VectorQuantize(dim=8, codebook_size=16).train()
    x = torch.randn(2, 10, 8, requires_grad=True)
    quantized, _, loss = vq(x)
    quantized.sum().backward()
    assert x.grad is not None
    torch.testing.assert_close(x.grad, torch.ones_like(x))  # identity gradient through the quantizer


def test_commitment_loss_equals_hand_computation():
    vq = VectorQuantize(dim=8, codebook_size=16, commitment=0.25).train()
    codebook_before = vq.codebook.clone()
    x = torch.randn(3, 5, 8)
    _, indices, loss = vq(x)
    expected = 0.25 * ((codebook_before[indices] - x) ** 2).mean()
    torch.testing.assert_close(loss, expected.reshape(1))


def test_commitment_weight_alias():
    assert VectorQuantize(dim=4, codebook_size=4, commitment_weight=0.5).commitment == 0.5
    with pytest.raises(ConfigError):
        VectorQuantize(dim=4, codebook_size=4, commitment=1.0, commitment_weight=0.5)


def test_eval_is_deterministic_and_changes_no_buffer(digits):
    vq = VectorQuantize(dim=64, codebook_size=32).eval()
    state = {k: v.clone() for k, v in vq.state_dict().items()}
    x = digits[:300].reshape(3, 100, 64)
    first = vq(x)
    second = vq(x)
    assert torch.equal(first[1], second[1]) and torch.equal(first[0], second[0])
    for key, value in vq.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_eval_indices_are_the_float64_argmin(digits):
    vq = VectorQuantize(dim=64, codebook_size=128).eval()
    _, indices, _ = vq(digits[None])
    assert torch.equal(indices[0], nearest_code_reference(digits, vq.codebook))


def _usage(vq, data):
    with torch.no_grad():
        return vq.eval()(data[None])[1].unique().numel()


def test_ema_learning_lowers_quantization_error(digits):
    torch.manual_seed(0)
    vq = VectorQuantize(dim=64, codebook_size=32, decay=0.9, kmeans_init=False)
    mse_before = F.mse_loss(vq.eval()(digits[None])[0][0], digits).item()
    vq.train()
    for _ in range(300):
        batch = digits[torch.randint(0, len(digits), (256,))]
        vq(batch[None])
    mse_after = F.mse_loss(vq.eval()(digits[None])[0][0], digits).item()
    assert mse_after < 0.25 * mse_before, (mse_before, mse_after)


def test_kmeans_init_runs_on_first_training_batch(digits):
    vq = VectorQuantize(dim=64, codebook_size=16, kmeans_init=True, kmeans_iters=5)
    assert not bool(vq._codebook.initted)
    vq.train()(digits[None, :512])
    assert bool(vq._codebook.initted)
    assert vq.codebook.abs().sum() > 0


def test_dead_code_expiry_raises_codes_in_use(digits):
    def train(threshold):
        torch.manual_seed(1)
        vq = VectorQuantize(dim=64, codebook_size=64, decay=0.8, threshold_ema_dead_code=threshold)
        with torch.no_grad():  # start with codes far from the data, so most stay unused
            vq._codebook.embed.mul_(5.0)
            vq._codebook.embed_avg.copy_(vq._codebook.embed)
        vq.train()
        for _ in range(50):
            vq(digits[torch.randint(0, len(digits), (256,))][None])
        return _usage(vq, digits)

    without, with_expiry = train(0), train(2)
    assert with_expiry > without, (without, with_expiry)


@pytest.mark.parametrize(
    "kwargs, shape",
    [
        (dict(), (2, 7, 16)),
        (dict(codebook_dim=4), (2, 7, 16)),
        (dict(heads=2, codebook_dim=8, separate_codebook_per_head=True), (2, 7, 16)),
        (dict(use_cosine_sim=True), (2, 7, 16)),
        (dict(accept_image_fmap=True), (2, 16, 3, 5)),
        (dict(channel_last=False), (2, 16, 7)),
    ],
)
def test_torch_export_of_eval_module(kwargs, shape):
    vq = VectorQuantize(dim=16, codebook_size=32, **kwargs).eval()
    x = torch.randn(*shape)
    program = torch.export.export(vq, (x,))
    nodes = [n for n in program.graph.nodes if "nearest_code" in str(n.target)]
    assert nodes, "the nearest-code search must be one custom-op node"
    out = program.module()(x)
    expected = vq(x)
    assert torch.equal(out[1], expected[1])
    torch.testing.assert_close(out[0], expected[0])


def test_layouts_and_decode_roundtrip():
    for kwargs, x in (
        (dict(), torch.randn(3, 16)),  # one token per batch row
        (dict(channel_last=False), torch.randn(2, 16, 9)),
        (dict(heads=4, codebook_dim=4), torch.randn(2, 9, 16)),
        (dict(accept_image_fmap=True, codebook_dim=8), torch.randn(2, 16, 3, 4)),
    ):
        vq = VectorQuantize(dim=16, codebook_size=32, **kwargs).eval()
        quantized, indices, _ = vq(x)
        assert quantized.shape == x.shape
        torch.testing.assert_close(vq.get_output_from_indices(indices), quantized)


def test_float16_input_gives_float16_output():
    vq = VectorQuantize(dim=16, codebook_size=32).eval()
    x = torch.randn(2, 5, 16)
    quantized, indices, _ = vq(x.half())
    assert quantized.dtype == torch.float16
    assert torch.equal(indices, nearest_code_reference(x.half().float().reshape(-1, 16), vq.codebook).reshape(2, 5))


def test_bad_inputs_raise_typed_errors():
    vq = VectorQuantize(dim=16, codebook_size=32).eval()
    with pytest.raises(InputShapeError, match="dim = 16"):
        vq(torch.randn(2, 5, 15))
    with pytest.raises(InputShapeError, match="rank"):
        vq(torch.randn(2, 5, 3, 16))
    with pytest.raises(InputDtypeError, match="int64"):
        vq(torch.ones(2, 5, 16, dtype=torch.long))
    bad = torch.randn(2, 5, 16)
    bad[1, 2, 3] = float("nan")
    with pytest.raises(NonFiniteInputError, match="1 NaN/Inf"):
        vq(bad)
    bad[1, 2, 3] = float("inf")
    with pytest.raises(NonFiniteInputError):
        vq(bad)
    with pytest.raises(IndexRangeError, match=r"\[0, 32\)"):
        vq.get_output_from_indices(torch.tensor([[0, 32]]))
    with pytest.raises(InputDtypeError):
        vq.get_output_from_indices(torch.tensor([[0.0, 1.0]]))
    with pytest.raises(ConfigError):
        VectorQuantize(dim=0, codebook_size=4)
    assert issubclass(InputShapeError, VQDeployError) and issubclass(InputShapeError, ValueError)


def test_uninitialised_kmeans_codebook_in_eval_raises():
    vq = VectorQuantize(dim=8, codebook_size=4, kmeans_init=True).eval()
    with pytest.raises(UninitializedCodebookError, match="kmeans_init"):
        vq(torch.randn(1, 3, 8))
