"""The torch backend's encode graph: indices only, the same as the eager module's forward."""

from __future__ import annotations

import pytest
import torch

from vqdeploy import export_onnx, runtime
from vqdeploy.nn import VectorQuantize
from vqdeploy.runtime.torch_backend import _EncodeIndices

MODULES = {
    "plain": (lambda: VectorQuantize(dim=32, codebook_size=300), (3, 700, 32)),
    "cosine": (lambda: VectorQuantize(dim=16, codebook_size=64, use_cosine_sim=True), (2, 90, 16)),
    "heads_separate": (lambda: VectorQuantize(dim=32, codebook_size=64, heads=4, codebook_dim=8,
                                              separate_codebook_per_head=True), (2, 50, 32)),
    "heads_shared": (lambda: VectorQuantize(dim=32, codebook_size=64, heads=2), (2, 50, 32)),
    "channel_first": (lambda: VectorQuantize(dim=24, codebook_size=64, channel_last=False, codebook_dim=8), (3, 24, 41)),
    "image": (lambda: VectorQuantize(dim=16, codebook_size=64, accept_image_fmap=True), (2, 16, 5, 9)),
}


@pytest.mark.parametrize("name", sorted(MODULES))
@pytest.mark.parametrize("chunk_size", [None, 29])
def test_encode_equals_the_eager_forward(tmp_path, name, chunk_size):
    build, shape = MODULES[name]
    torch.manual_seed(0)
    module = build().eval()
    path = tmp_path / f"{name}.onnx"
    export_onnx(module, path, part="encode")
    x = torch.randn(*shape)
    with torch.no_grad():
        _, want, _ = module(x)
    with runtime.load(path, backend="torch", chunk_size=chunk_size) as quantizer:
        assert isinstance(quantizer._runner.graph, _EncodeIndices)
        got = quantizer.encode(x)
        assert torch.equal(got, want)
        assert torch.equal(torch.from_numpy(quantizer.encode(x.numpy())), want)
