"""ResidualVQ: residual stages, dropout, shared codebook, decode, export, bad input."""

from __future__ import annotations

import pytest
import torch

from vqdeploy import ResidualVQ
from vqdeploy.errors import InputShapeError, UnsupportedOptionError


def test_stages_quantize_successive_residuals():
    rvq = ResidualVQ(dim=8, num_quantizers=3, codebook_size=16).eval()
    x = torch.randn(2, 11, 8)
    quantized, indices, losses = rvq(x)
    residual, total = x, torch.zeros_like(x)
    for stage, layer in enumerate(rvq.layers):
        q, idx, _ = layer(residual)
        assert torch.equal(idx, indices[stage])
        residual, total = residual - q, total + q
    torch.testing.assert_close(quantized, total)
    torch.testing.assert_close(rvq.get_output_from_indices(indices), quantized)
    assert losses.shape == (3, 1)


def test_more_stages_lower_the_error(digits):
    rvq = ResidualVQ(dim=64, num_quantizers=4, codebook_size=32, kmeans_init=True).train()
    for _ in range(20):
        rvq(digits[torch.randint(0, len(digits), (512,))][None])
    rvq.eval()
    _, indices, _ = rvq(digits[None])
    def coarse(k):  # the first k + 1 stages; later ones marked dropped (-1 decodes to 0)
        return torch.cat([indices[: k + 1], torch.full_like(indices[k + 1 :], -1)])

    errors = [(rvq.get_output_from_indices(coarse(k)) - digits[None]).pow(2).mean().item() for k in range(4)]
    assert errors == sorted(errors, reverse=True), errors


def test_quantize_dropout_only_in_training():
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=8, num_quantizers=6, codebook_size=16, quantize_dropout=True)
    x = torch.randn(2, 5, 8)
    dropped = [(rvq.train()(x)[1] == -1).any().item() for _ in range(20)]
    assert any(dropped)
    assert not (rvq.eval()(x)[1] == -1).any()
    indices = rvq.train()(x)[1]
    assert rvq.get_output_from_indices(indices).shape == (2, 5, 8)


def test_shared_codebook_is_one_tensor():
    rvq = ResidualVQ(dim=8, num_quantizers=3, codebook_size=16, shared_codebook=True).train()
    rvq(torch.randn(2, 5, 8))
    assert rvq.layers[0]._codebook is rvq.layers[2]._codebook
    assert torch.equal(rvq.codebooks[0], rvq.codebooks[2])


def test_torch_export_of_eval_module():
    rvq = ResidualVQ(dim=16, num_quantizers=3, codebook_size=32, codebook_dim=8).eval()
    x = torch.randn(2, 9, 16)
    program = torch.export.export(rvq, (x,))
    assert sum("nearest_code" in str(n.target) for n in program.graph.nodes) == 3
    assert torch.equal(program.module()(x)[1], rvq(x)[1])


def test_bad_inputs():
    rvq = ResidualVQ(dim=8, num_quantizers=2, codebook_size=16).eval()
    with pytest.raises(InputShapeError):
        rvq(torch.randn(2, 8))
    with pytest.raises(InputShapeError):
        rvq(torch.randn(2, 5, 9))
    with pytest.raises(InputShapeError):
        rvq.get_output_from_indices(torch.zeros(3, 1, 5, dtype=torch.long))
    with pytest.raises(UnsupportedOptionError, match="heads"):
        ResidualVQ(dim=8, num_quantizers=2, codebook_size=16, heads=2)
