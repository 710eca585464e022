"""GroupedResidualVQ: groups of residual stacks over slices of the feature axis."""

from __future__ import annotations

import pytest
import torch

import vqdeploy
from vqdeploy.compat import vector_quantize_pytorch as compat
from vqdeploy.errors import ConfigError, InputShapeError, UnsupportedOptionError


def _x(digits: torch.Tensor) -> torch.Tensor:
    return digits[:256].reshape(4, 64, 64).clone()


def test_each_group_is_a_residual_vq_on_its_slice(digits):
    grvq = vqdeploy.GroupedResidualVQ(dim=64, groups=2, num_quantizers=3, codebook_size=16).eval()
    x = _x(digits)
    q, idx, losses = grvq(x)
    assert q.shape == x.shape and idx.shape == (2, 3, 4, 64) and losses.shape == (2, 3, 1)
    for g, part in enumerate(x.chunk(2, dim=-1)):
        gq, gidx, _ = grvq.rvqs[g](part)
        assert torch.equal(gidx, idx[g]) and torch.equal(gq, q[..., g * 32 : (g + 1) * 32])
    assert torch.equal(grvq.get_output_from_indices(idx), q)
    assert grvq.get_codes_from_indices(idx).shape == (2, 3, 4, 64, 32)
    assert grvq.codebooks.shape == (2, 3, 16, 32)


def test_compat_layouts_are_the_reference_ones(digits):
    grvq = compat.GroupedResidualVQ(dim=64, groups=4, num_quantizers=2, codebook_size=8).eval()
    q, idx, losses, codes = grvq(_x(digits), return_all_codes=True)
    assert idx.shape == (4, 4, 64, 2) and losses.shape == (4, 2)
    assert isinstance(codes, tuple) and len(codes) == 4 and codes[0].shape == (2, 4, 64, 16)
    assert isinstance(grvq, compat.GroupedResidualVQ) and isinstance(grvq, vqdeploy.GroupedResidualVQ)
    assert grvq.rvqs[0].layers[0].rotation_trick  # 1.32's default reaches the stages
    with pytest.raises(InputShapeError, match="groups"):
        grvq.get_output_from_indices(idx[:2])


def test_quantize_dropout_stops_every_group_at_the_same_stage(digits):
    grvq = vqdeploy.GroupedResidualVQ(dim=64, groups=2, num_quantizers=6, codebook_size=8,
                                      quantize_dropout=True, freeze_codebook=True).train()
    for _ in range(5):
        idx = grvq(_x(digits))[1]
        dropped = (idx == -1).all(dim=(2, 3))  # (groups, stages)
        assert torch.equal(dropped[0], dropped[1])


def test_training_updates_every_group(digits):
    grvq = vqdeploy.GroupedResidualVQ(dim=64, groups=2, num_quantizers=2, codebook_size=8).train()
    before = grvq.codebooks.clone()
    x = _x(digits).requires_grad_()
    q, _, losses = grvq(x)
    (q.sum() + losses.sum()).backward()
    assert x.grad is not None
    moved = (grvq.codebooks - before).abs().amax(dim=(2, 3))
    assert bool((moved > 0).all())
    assert len(grvq.codebook_usage()) == 2 and len(grvq.codebook_usage()[0]) == 2


def test_checkpoint_round_trip(digits, tmp_path):
    grvq = compat.GroupedResidualVQ(dim=64, groups=2, num_quantizers=2, codebook_size=(8, 16)).train()
    grvq(_x(digits))
    path = vqdeploy.save_quantizer(grvq, tmp_path / "grvq.safetensors")
    loaded = vqdeploy.load_quantizer(path)
    assert isinstance(loaded, compat.GroupedResidualVQ)
    grvq.eval()
    assert torch.equal(loaded(_x(digits))[1], grvq(_x(digits))[1])


def test_arguments_are_checked():
    with pytest.raises(ConfigError, match="equal slices"):
        vqdeploy.GroupedResidualVQ(dim=10, groups=3, num_quantizers=2, codebook_size=8)
    with pytest.raises(UnsupportedOptionError, match="accept_image_fmap"):
        compat.GroupedResidualVQ(dim=8, groups=2, num_quantizers=2, codebook_size=8, accept_image_fmap=True)
    with pytest.raises(UnsupportedOptionError, match="beam_size"):
        compat.GroupedResidualVQ(dim=8, groups=2, num_quantizers=2, codebook_size=8, beam_size=2)
    with pytest.raises(UnsupportedOptionError, match="indices"):
        vqdeploy.GroupedResidualVQ(dim=8, groups=2, num_quantizers=2, codebook_size=8)(
            torch.randn(1, 3, 8), indices=[torch.zeros(1, 3, 2, dtype=torch.long)] * 2)
