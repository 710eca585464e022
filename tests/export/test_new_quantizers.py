"""GroupedResidualVQ and the 1.32 layouts and codebooks that change inference, exported: one graph
each, token parity with the eager model on ONNX Runtime and the torch backend (`vqdeploy.verify`)."""

from __future__ import annotations

import onnx
import pytest
import torch

import vqdeploy
from vqdeploy import runtime
from vqdeploy.compat import vector_quantize_pytorch as compat


def _trained(module: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    module.train()
    for _ in range(3):
        module(x)
    return module.eval()


def _cases(digits: torch.Tensor) -> dict:
    seq = digits[:512].reshape(8, 64, 64)
    torch.manual_seed(5)
    return {
        "grouped": (_trained(vqdeploy.GroupedResidualVQ(dim=64, groups=2, num_quantizers=3, codebook_size=32), seq),
                    seq),
        "grouped_compat_projection": (
            _trained(compat.GroupedResidualVQ(dim=64, groups=4, num_quantizers=2, codebook_size=16, codebook_dim=8),
                     seq), seq),
        "stage_sizes": (_trained(compat.ResidualVQ(dim=64, codebook_size=(8, 64, 16)), seq), seq),
        "affine": (_trained(compat.VectorQuantize(dim=64, codebook_size=32, affine_param=True), seq * 2 + 1),
                   seq * 2 + 1),
        "video": (_trained(vqdeploy.VectorQuantize(dim=64, codebook_size=32, accept_3d_fmap=True),
                           seq.reshape(2, 4, 8, 8, 64).permute(0, 4, 1, 2, 3).contiguous()),
                  seq.reshape(2, 4, 8, 8, 64).permute(0, 4, 1, 2, 3).contiguous()),
    }


@pytest.mark.slow
@pytest.mark.parametrize("case", ["grouped", "grouped_compat_projection", "stage_sizes", "affine", "video"])
def test_exports_as_one_graph_at_parity_with_eager(case, digits, tmp_path):
    module, x = _cases(digits)[case]
    with torch.no_grad():
        want_q, want_idx, _ = module(x)
    for part in ("quantize", "decode"):
        path = vqdeploy.export_onnx(module, tmp_path / f"{case}_{part}.onnx", part=part)
        proto = onnx.load(str(path))
        searches = sum(node.op_type == "NearestCode" for node in proto.graph.node)
        if part == "quantize":
            expected = getattr(module, "groups", 1) * getattr(module, "num_quantizers", 1)
            assert searches == expected  # every search of every group in the one graph
        for backend in ("ort", "torch") if part == "quantize" else ("ort",):
            report = vqdeploy.verify(module, path, backend=backend, num_samples=256)
            assert report.passed, report.table()
            with runtime.load(path, backend=backend) as quantizer:
                if part == "quantize":
                    vectors, indices = quantizer.quantize(x)
                    assert torch.equal(indices, want_idx)
                    torch.testing.assert_close(vectors, want_q, rtol=1e-5, atol=1e-5)
                else:
                    torch.testing.assert_close(quantizer.decode(want_idx), want_q, rtol=1e-5, atol=1e-5)


def test_grouped_metadata_counts_every_search(digits, tmp_path):
    module = vqdeploy.GroupedResidualVQ(dim=64, groups=2, num_quantizers=3, codebook_size=32).eval()
    info = vqdeploy.read_metadata(vqdeploy.export_onnx(module, tmp_path / "g.onnx", part="encode"))
    assert info.kind == "GroupedResidualVQ" and info.num_quantizers == 6 and info.config["groups"] == 2
    with runtime.load(tmp_path / "g.onnx", backend="ort") as quantizer:
        assert quantizer.encode(digits[:64].reshape(1, 64, 64)).shape == (2, 3, 1, 64)
