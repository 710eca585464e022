"""ONNX Runtime (CPU EP) runs every exported part at parity with the eager module.

One export per (configuration, part), run at batch/sequence sizes 1, 7 and 1000+, on the digits
and on random data: indices identical, vectors equal (exactly for codebook rows, within 1e-6
where a projection follows).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from export_cases import (
    CONFIGS,
    IMAGE_SHAPES,
    NUM_QUANTIZERS,
    SEQ_SHAPES,
    SHAPE_IDS,
    assert_vectors_match,
    make_input,
)

SHAPE_INDEX = list(range(len(SHAPE_IDS)))


def _shapes(name: str) -> list[tuple[int, ...]]:
    return IMAGE_SHAPES if CONFIGS[name].is_image else SEQ_SHAPES


def _eager(module, x):
    with torch.no_grad():
        vectors, indices, _ = module(x)
    return vectors, indices


@pytest.mark.parametrize("data", ["digits", "random"])
@pytest.mark.parametrize("shape", SHAPE_INDEX, ids=SHAPE_IDS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_quantize_and_encode_match_eager(exports, digits, name, shape, data):
    quantize, encode = exports(name, "quantize"), exports(name, "encode")
    config = quantize.config
    x = make_input(config, data, _shapes(name)[shape], digits)
    vectors, indices = _eager(quantize.module, x)

    onnx_vectors, onnx_indices = quantize.run(x)
    (encoded,) = encode.run(x)

    assert onnx_indices.dtype == np.int64 and encoded.dtype == np.int64
    assert onnx_indices.shape == tuple(indices.shape)
    np.testing.assert_array_equal(onnx_indices, indices.numpy())
    np.testing.assert_array_equal(encoded, indices.numpy())
    assert onnx_vectors.shape == tuple(x.shape) and onnx_vectors.dtype == np.float32
    assert_vectors_match(onnx_vectors, vectors, exact=not config.projects)


@pytest.mark.parametrize("data", ["digits", "random"])
@pytest.mark.parametrize("shape", SHAPE_INDEX, ids=SHAPE_IDS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_decode_matches_eager_and_onnx_roundtrip_equals_eager_quantized(exports, digits, name, shape, data):
    encode, decode = exports(name, "encode"), exports(name, "decode")
    module = decode.module
    x = make_input(decode.config, data, _shapes(name)[shape], digits)
    vectors, indices = _eager(module, x)

    (decoded,) = decode.run(indices)
    with torch.no_grad():
        expected = module.get_output_from_indices(indices)
    exact = not decode.config.projects and not decode.config.is_residual  # a residual sum may round differently
    assert_vectors_match(decoded, expected, exact=exact)

    (onnx_indices,) = encode.run(x)
    (roundtrip,) = decode.run(onnx_indices)
    assert_vectors_match(roundtrip, vectors, exact=exact)


def test_residual_decode_of_dropped_stages_matches_eager(exports):
    """-1 marks a stage that quantize dropout skipped; it decodes to zero, in ONNX as in eager."""
    decode = exports("residual_projection", "decode")
    generator = torch.Generator().manual_seed(5)
    indices = torch.randint(0, 32, (NUM_QUANTIZERS, 7, 9), generator=generator)
    indices[1:, :3] = -1
    indices[2, 5] = -1
    (decoded,) = decode.run(indices)
    with torch.no_grad():
        expected = decode.module.get_output_from_indices(indices)
    assert_vectors_match(decoded, expected, exact=False)

