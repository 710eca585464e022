"""Small exports shared by the hardening tests (one per layout, a float16 one, decode parts)."""

from __future__ import annotations

import pytest
import torch

from vqdeploy import ResidualVQ, VectorQuantize, export_onnx

DIM, CODES = 8, 16


def _module(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "residual":
        return ResidualVQ(dim=DIM, num_quantizers=2, codebook_size=CODES).eval()
    if kind == "half":
        return VectorQuantize(dim=DIM, codebook_size=CODES).eval().half()
    layout = {"last": {}, "first": dict(channel_last=False), "image": dict(accept_image_fmap=True)}[kind]
    return VectorQuantize(dim=DIM, codebook_size=CODES, **layout).eval()


@pytest.fixture(scope="session")
def hardening_exports(tmp_path_factory):
    """kind -> (module, quantize export, decode export)."""
    folder = tmp_path_factory.mktemp("hardening")
    out = {}
    for kind in ("last", "first", "image", "residual", "half"):
        module = _module(kind)
        example = module.spec.example_input("quantize")
        example = example.half() if kind == "half" else example
        quantize = export_onnx(module, folder / f"{kind}_q.onnx", part="quantize", example_input=example)
        decode = export_onnx(module, folder / f"{kind}_d.onnx", part="decode")
        out[kind] = (module, quantize, decode)
    return out
