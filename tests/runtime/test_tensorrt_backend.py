"""The TensorRT backend: the parts beneath TensorRT run here; engine tests skip without it."""

from __future__ import annotations

import pytest
import torch

from vqdeploy import ResidualVQ, VectorQuantize, export_onnx, read_metadata, runtime
from vqdeploy.runtime.tensorrt import engine_cache_key, profile_shapes


@pytest.fixture(scope="module")
def encode_path(tmp_path_factory):
    return export_onnx(VectorQuantize(dim=16, codebook_size=32).eval(), tmp_path_factory.mktemp("trt") / "e.onnx", part="encode")


def test_profile_shapes_follow_the_chunk_layout(tmp_path):
    cases = [
        (VectorQuantize(dim=16, codebook_size=32), "encode", [(1, 1, 16), (1, 64, 16), (1, 128, 16)]),
        (VectorQuantize(dim=16, codebook_size=32, accept_image_fmap=True), "encode", [(1, 16, 1, 1), (1, 16, 1, 64), (1, 16, 1, 128)]),
        (VectorQuantize(dim=16, codebook_size=32, channel_last=False), "quantize", [(1, 16, 1), (1, 16, 64), (1, 16, 128)]),
        (VectorQuantize(dim=16, codebook_size=32, heads=2, codebook_dim=8), "decode", [(1, 1, 2), (1, 64, 2), (1, 128, 2)]),
        (ResidualVQ(dim=16, num_quantizers=3, codebook_size=32), "decode", [(3, 1, 1), (3, 1, 64), (3, 1, 128)]),
    ]
    for i, (module, part, expected) in enumerate(cases):
        info = read_metadata(export_onnx(module.eval(), tmp_path / f"{i}.onnx", part=part))
        assert [list(s) for s in profile_shapes(info, 1, 64, 128)] == [list(s) for s in expected]
    with pytest.raises(ValueError):
        profile_shapes(info, 10, 5, 128)


def test_engine_cache_key_changes_with_every_input(encode_path, tmp_path):
    base = engine_cache_key(encode_path, "10.9", "H100", "exact", ((1,), (2,), (3,)))
    assert base == engine_cache_key(encode_path, "10.9", "H100", "exact", ((1,), (2,), (3,)))
    assert base != engine_cache_key(encode_path, "10.10", "H100", "exact", ((1,), (2,), (3,)))
    assert base != engine_cache_key(encode_path, "10.9", "H200", "exact", ((1,), (2,), (3,)))
    assert base != engine_cache_key(encode_path, "10.9", "H100", "fast", ((1,), (2,), (3,)))
    assert base != engine_cache_key(encode_path, "10.9", "H100", "exact", ((1,), (2,), (4,)))
    other = tmp_path / "other.onnx"
    other.write_bytes(encode_path.read_bytes() + b"\0")
    assert base != engine_cache_key(other, "10.9", "H100", "exact", ((1,), (2,), (3,)))


def test_auto_resolves_without_tensorrt():
    assert runtime.resolve_backend("auto", "cpu") == "ort"
    if not runtime.is_available("trt"):
        assert runtime.resolve_backend("auto", "cuda") == "ort"


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_trt_engine_matches_eager(encode_path, tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (it cannot be on this project's machines)")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA device")
    module = VectorQuantize(dim=16, codebook_size=32).eval()
    path = export_onnx(module, tmp_path / "m.onnx", part="encode")
    x = torch.randn(2, 300, 16)
    with runtime.load(path, backend="trt", device="cuda", cache_dir=tmp_path / "cache", max_tokens=4096) as quantizer:
        assert torch.equal(quantizer.encode(x.cuda()).cpu(), module(x)[1])
    assert list((tmp_path / "cache").glob("*.engine")), "the engine is cached on disk"
