"""Bad inputs, as a hostile user passes them: every one gets the typed error that names it, and no
value reaches the search as something else than what the user passed (docs/design.md section 6)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vqdeploy import VectorQuantize, export_onnx, runtime
from vqdeploy.errors import (
    ConfigError,
    IndexRangeError,
    InputDtypeError,
    InputTypeError,
    NonFiniteInputError,
    UninitializedCodebookError,
    UnsupportedOptionError,
    VQDeployError,
)

BACKENDS = ("ort", "torch")
DIM = 8


# -- 1. no silent wrong token: checks run on what the search sees ------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_values_that_overflow_float32_are_refused(hardening_exports, backend):
    """1e300 is finite in float64 but inf in the float32 search: a token from it would be wrong."""
    _, path, _ = hardening_exports["last"]
    x = np.zeros((2, 5, DIM))
    x[1, 3, 2] = 1e300
    with runtime.load(path, backend=backend) as quantizer, pytest.raises(NonFiniteInputError) as error:
        quantizer.encode(x)
    message = str(error.value)
    assert "float32" in message and "(2, 5, 8)" in message, message


def test_float64_values_that_overflow_float32_are_refused_in_eager():
    vq = VectorQuantize(dim=DIM, codebook_size=16).eval()
    x = torch.zeros(2, 5, DIM, dtype=torch.float64)
    x[0, 1, 0] = -1e300
    with pytest.raises(NonFiniteInputError, match="float32"):
        vq(x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_values_that_overflow_a_float16_export_are_refused(hardening_exports, backend):
    _, path, _ = hardening_exports["half"]
    x = np.zeros((1, 4, DIM), np.float32)
    x[0, 2, 5] = 1e5  # > 65504, float16's largest
    with runtime.load(path, backend=backend) as quantizer, pytest.raises(NonFiniteInputError, match="float16"):
        quantizer.encode(x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_error_names_the_users_input(hardening_exports, backend):
    _, path, _ = hardening_exports["last"]
    x = torch.zeros(3, 700, DIM)
    x[2, 600, 1] = float("nan")
    with runtime.load(path, backend=backend, chunk_size=256) as quantizer, pytest.raises(NonFiniteInputError) as error:
        quantizer.encode(x)
    assert "(3, 700, 8)" in str(error.value) and "1 " in str(error.value), str(error.value)


def test_large_finite_float64_values_still_encode(hardening_exports):
    """Values that fit float32 are not refused, and tokens equal eager's on the same float32 rows."""
    module, path, _ = hardening_exports["last"]
    x = torch.randn(2, 9, DIM, dtype=torch.float64) * 1e30
    with runtime.load(path, backend="ort") as quantizer:
        got = quantizer.encode(x)
    assert torch.equal(got, module(x.float())[1])


# -- 5. wrong types: the typed error, not numpy's or torch's ------------------------------------------
def _bad_arrays():
    base = np.random.default_rng(0).standard_normal((2, 3, DIM)).astype(np.float32)
    yield "negative-stride", base[:, ::-1], InputTypeError
    yield "big-endian", base.astype(">f4"), InputDtypeError
    yield "object", base.astype(object), InputDtypeError
    yield "str", np.full((2, 3, DIM), "a"), InputDtypeError
    yield "datetime", np.zeros((2, 3, DIM), "datetime64[s]"), InputDtypeError
    yield "meta", torch.empty(2, 3, DIM, device="meta"), InputTypeError
    yield "sparse", torch.randn(2, 3, DIM).to_sparse(), InputTypeError
    yield "list", base.tolist(), InputTypeError
    try:
        import ml_dtypes
    except ImportError:
        return
    yield "ml_dtypes.bfloat16", base.astype(ml_dtypes.bfloat16), InputDtypeError


BAD = list(_bad_arrays())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("name", "array", "error"), BAD, ids=[b[0] for b in BAD])
def test_runtime_refuses_arrays_it_cannot_read(hardening_exports, backend, name, array, error):
    _, path, _ = hardening_exports["last"]
    with runtime.load(path, backend=backend) as quantizer, pytest.raises(error):
        quantizer.encode(array)


@pytest.mark.parametrize(("name", "array", "error"), BAD, ids=[b[0] for b in BAD])
def test_eager_refuses_arrays_it_cannot_read(name, array, error):
    vq = VectorQuantize(dim=DIM, codebook_size=16).eval()
    with pytest.raises(VQDeployError):
        vq(array)


def test_eager_modules_name_numpy_input():
    vq = VectorQuantize(dim=DIM, codebook_size=16).eval()
    with pytest.raises(InputTypeError, match="torch.from_numpy"):
        vq(np.zeros((2, 3, DIM), np.float32))
    with pytest.raises(InputTypeError, match="torch.from_numpy"):
        vq.get_output_from_indices(np.zeros((2, 3), np.int64))


def test_eager_residual_names_numpy_input(hardening_exports):
    module, _, _ = hardening_exports["residual"]
    with pytest.raises(InputTypeError, match="torch.from_numpy"):
        module(np.zeros((2, 3, DIM), np.float32))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.uint64, np.int16])
def test_decode_takes_any_integer_dtype(hardening_exports, backend, dtype):
    module, _, decode = hardening_exports["last"]
    indices = np.array([[0, 3, 15], [2, 1, 0]], dtype=dtype)
    with runtime.load(decode, backend=backend) as quantizer:
        got = quantizer.decode(indices)
    assert np.allclose(got, module.get_output_from_indices(torch.from_numpy(indices.astype(np.int64))).numpy())


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64])
def test_decode_unsigned_torch_out_of_range(hardening_exports, dtype):
    _, _, decode = hardening_exports["last"]
    indices = torch.tensor([[0, 16]]).to(dtype)
    with runtime.load(decode, backend="ort") as quantizer, pytest.raises(IndexRangeError):
        quantizer.decode(indices)


def test_load_refuses_unknown_options_and_bad_chunk_sizes(hardening_exports):
    _, path, _ = hardening_exports["last"]
    with pytest.raises(UnsupportedOptionError, match="no_such_option"):
        runtime.load(path, backend="ort", no_such_option=1)
    for bad in (0, -3, True, 2.5, "64"):
        with pytest.raises(UnsupportedOptionError, match="chunk_size"):
            runtime.load(path, backend="ort", chunk_size=bad)


def test_export_refuses_an_int_example_input(hardening_exports):
    module, _, _ = hardening_exports["last"]
    with pytest.raises(UnsupportedOptionError, match="example_input"):
        export_onnx(module, "unused.onnx", part="encode", example_input=3)


# -- 6. zero-size batches ------------------------------------------------------------------------------
ZERO = {"first": (0, DIM, 5), "image": (0, DIM, 3, 4), "last": (0, 5, DIM), "residual": (0, 5, DIM)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(ZERO))
def test_zero_size_batch_encodes_and_decodes_like_eager(hardening_exports, backend, kind):
    module, path, decode = hardening_exports[kind]
    x = torch.zeros(ZERO[kind])
    expected_vectors, expected_indices = module(x)[:2]
    with runtime.load(path, backend=backend) as quantizer:
        vectors, indices = quantizer.quantize(x)
    assert vectors.shape == expected_vectors.shape and indices.shape == expected_indices.shape
    with runtime.load(decode, backend=backend) as quantizer:
        decoded = quantizer.decode(expected_indices)
    assert decoded.shape == module.get_output_from_indices(expected_indices).shape


# -- 2. layouts without copies: views of every layout give eager's tokens -------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_layouts_give_eager_tokens(hardening_exports, backend):
    cases = {
        "last": [np.asfortranarray(np.random.default_rng(1).standard_normal((4, 300, DIM), np.float32)),
                 torch.randn(4, DIM, 300).transpose(1, 2)],
        "first": [torch.randn(4, 300, DIM).transpose(1, 2)],
        "image": [torch.randn(3, DIM, 20, 30).transpose(2, 3), torch.randn(3, DIM, 20, 30)
                  .to(memory_format=torch.channels_last), torch.randn(3, DIM, 40, 30)[:, :, ::2]],
    }
    for kind, inputs in cases.items():
        module, path, _ = hardening_exports[kind]
        with runtime.load(path, backend=backend, chunk_size=256) as quantizer:
            for x in inputs:
                tensor = torch.from_numpy(x) if isinstance(x, np.ndarray) else x
                vectors, indices = quantizer.quantize(x)
                expected_vectors, expected_indices = module(tensor.contiguous())[:2]
                got = torch.from_numpy(indices) if isinstance(indices, np.ndarray) else indices
                assert torch.equal(got, expected_indices), (kind, x.shape)
                got_vectors = torch.from_numpy(vectors) if isinstance(vectors, np.ndarray) else vectors
                assert torch.allclose(got_vectors, expected_vectors, atol=1e-6), (kind, x.shape)



READ_ONLY = """
import json, sys, numpy as np
from vqdeploy import runtime
path, backend, data = sys.argv[1:]
x = np.load(data, mmap_mode="r")  # a read-only memory map, as a corpus on disk is read
assert not x.flags.writeable
with runtime.load(path, backend=backend) as quantizer:
    print(json.dumps(quantizer.encode(x).tolist()))
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_read_only_array_encodes_without_a_warning(hardening_exports, backend, tmp_path):
    """torch warns (once a process) on a view of a read-only array; vqdeploy only reads its input, so
    a user encoding a memory map sees no warning. A fresh process with warnings as errors."""
    import subprocess
    import sys

    module, path, _ = hardening_exports["last"]
    x = np.random.default_rng(3).standard_normal((2, 50, DIM)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    result = subprocess.run([sys.executable, "-W", "error", "-c", READ_ONLY, str(path), backend, str(tmp_path / "x.npy")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "Warning" not in result.stderr, result.stderr[-3000:]
    assert json.loads(result.stdout) == module(torch.from_numpy(x))[1].tolist()


def test_an_image_read_row_by_row_copies_every_tile_exactly():
    """_TokenView.copy_into (an image whose height and width merge into no view): every tile, a
    partial first row, whole rows and a partial last row, cast on the way, equals the flat view."""
    from vqdeploy.runtime.base import _TokenView

    x = torch.randn(2, 3, 5, 4).transpose(2, 3)  # (2, 3, 4, 5): width 5, strides that merge no view
    flat = x.reshape(2, 3, 20)
    view = _TokenView(x, 2, 20, True, width=5)
    for t0 in range(20):
        for t1 in range(t0 + 1, 21):
            out = torch.full((2, 3, t1 - t0), float("nan"), dtype=torch.float64)
            view.copy_into(out, 0, 2, t0, t1)
            assert torch.equal(out, flat[:, :, t0:t1].double()), (t0, t1)


# -- 10. eager modules: uninitialised codebooks, bad sizes --------------------------------------------
def test_eager_decode_on_an_uninitialised_codebook_is_refused():
    vq = VectorQuantize(dim=DIM, codebook_size=16, kmeans_init=True).eval()
    with pytest.raises(UninitializedCodebookError):
        vq.get_output_from_indices(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(UninitializedCodebookError):
        vq.get_codes_from_indices(torch.zeros(2, 3, dtype=torch.long))


def test_eager_residual_decode_on_an_uninitialised_codebook_is_refused():
    from vqdeploy import ResidualVQ

    rvq = ResidualVQ(dim=DIM, num_quantizers=2, codebook_size=16, kmeans_init=True).eval()
    with pytest.raises(UninitializedCodebookError):
        rvq.get_output_from_indices(torch.zeros(2, 1, 3, dtype=torch.long))


@pytest.mark.parametrize("config", [dict(codebook_dim=0), dict(codebook_size=True), dict(dim=True),
                                    dict(codebook_dim=-2), dict(heads=False), dict(codebook_size=2.0)])
def test_eager_sizes_must_be_positive_integers(config):
    kwargs = dict(dim=DIM, codebook_size=16) | config
    with pytest.raises(ConfigError):
        VectorQuantize(**kwargs)


def test_residual_sizes_must_be_positive_integers():
    from vqdeploy import ResidualVQ

    for config in (dict(codebook_dim=0), dict(codebook_size=True), dict(num_quantizers=True)):
        with pytest.raises(ConfigError):
            ResidualVQ(**(dict(dim=DIM, num_quantizers=2, codebook_size=16) | config))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["VectorQuantize", "ResidualVQ"])
def test_a_projection_that_overflows_float32_is_refused(backend, kind, tmp_path):
    """A finite input that project_in takes beyond float32 would reach the search as inf: eager
    refuses it, and so must both backends (ort through its re-check of the flagged row)."""
    from vqdeploy import ResidualVQ

    torch.manual_seed(0)
    extra = dict(num_quantizers=2) if kind == "ResidualVQ" else {}
    module = (ResidualVQ if kind == "ResidualVQ" else VectorQuantize)(dim=DIM, codebook_size=16, codebook_dim=4, **extra).eval()
    path = export_onnx(module, tmp_path / "projected.onnx", part="encode")
    weight = module.project_in.weight
    x = torch.zeros(1, 5, DIM)
    x[0, 2] = 3e38 * torch.sign(weight[0]).detach()  # every product of the first output row adds up: inf
    with torch.no_grad(), pytest.raises(NonFiniteInputError, match="project_in"):
        module(x)
    with runtime.load(path, backend=backend) as quantizer, pytest.raises(NonFiniteInputError, match="project_in"):
        quantizer.encode(x.numpy())


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_torch_backend_leaves_the_finite_check_to_its_search(hardening_exports, backend, monkeypatch):
    """On CPU the torch backend's search flags and refuses NaN/Inf rows itself, so a finite input is
    read once (by the search), not twice; the error still names the user's input (tests above)."""
    import vqdeploy.runtime.base as base

    calls = []
    monkeypatch.setattr(base, "check_finite", lambda *a, **k: calls.append(a[1]))  # counts the passes, checks nothing
    _, path, _ = hardening_exports["last"]
    with runtime.load(path, backend=backend) as quantizer:
        quantizer.encode(np.random.default_rng(0).standard_normal((2, 300, DIM)).astype(np.float32))
    assert len(calls) == (0 if backend == "torch" else 1), calls
