"""runtime.load: every CPU backend at token parity with eager, layouts, chunking, threads, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from vqdeploy import ResidualVQ, VectorQuantize, export_onnx, runtime
from vqdeploy.errors import (
    BackendNotAvailableError,
    DeviceNotAvailableError,
    IndexRangeError,
    InputDtypeError,
    InputShapeError,
    InputTypeError,
    NonFiniteInputError,
    NotAVQDeployModelError,
    UnsupportedOptionError,
)

CPU_BACKENDS = ["ort", "torch"]

QUANTIZERS = {
    "plain": (lambda: VectorQuantize(dim=64, codebook_size=128), (4, 50, 64)),
    "cosine": (lambda: VectorQuantize(dim=64, codebook_size=128, use_cosine_sim=True), (4, 50, 64)),
    "heads": (lambda: VectorQuantize(dim=64, codebook_size=64, heads=4, codebook_dim=8, separate_codebook_per_head=True), (4, 50, 64)),
    "channel_first": (lambda: VectorQuantize(dim=64, codebook_size=64, channel_last=False, codebook_dim=16), (4, 64, 50)),
    "image": (lambda: VectorQuantize(dim=64, codebook_size=64, accept_image_fmap=True), (2, 64, 5, 9)),
    "residual": (lambda: ResidualVQ(dim=64, num_quantizers=3, codebook_size=64, codebook_dim=32), (4, 50, 64)),
}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """One quantize export and one decode export per quantizer, trained a little on digits."""
    from sklearn.datasets import load_digits

    digits = torch.from_numpy(load_digits().data.astype(np.float32) / 16.0)
    torch.manual_seed(0)
    out = {}
    for name, (make, _) in QUANTIZERS.items():
        module = make().train()
        if not isinstance(module, VectorQuantize) or module.input_layout == "b n d":
            for _ in range(5):
                module(digits[torch.randint(0, len(digits), (256,))][None])
        module.eval()
        folder = tmp_path_factory.mktemp(name)
        out[name] = (
            module,
            export_onnx(module, folder / "quantize.onnx", part="quantize"),
            export_onnx(module, folder / "decode.onnx", part="decode"),
        )
    return out


def _inputs(name, digits):
    """Real data (digits laid out in the quantizer's input shape) and random data, several sizes."""
    shape = QUANTIZERS[name][1]
    yield torch.randn(*shape)
    yield torch.randn(1, *shape[1:])
    tokens = digits[: shape[0] * int(np.prod(shape[2:] if name in ("channel_first", "image") else shape[1:2]))]
    if name == "channel_first":
        yield tokens.reshape(shape[0], -1, 64).transpose(1, 2).contiguous()
    elif name == "image":
        yield tokens.reshape(shape[0], shape[2], shape[3], 64).permute(0, 3, 1, 2).contiguous()
    else:
        yield tokens.reshape(shape[0], -1, 64)
    if name not in ("image", "residual", "channel_first"):
        yield torch.randn(7, 64)  # one token per row


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", QUANTIZERS)
def test_tokens_identical_to_eager(exports, digits, name, backend):
    module, quantize_path, decode_path = exports[name]
    with runtime.load(quantize_path, backend=backend) as quantizer, runtime.load(decode_path, backend=backend) as decoder:
        assert quantizer.backend == backend
        for x in _inputs(name, digits):
            with torch.no_grad():
                vectors, indices, _ = module(x)
            got_vectors, got_indices = quantizer.quantize(x.numpy())
            assert isinstance(got_indices, np.ndarray) and isinstance(got_vectors, np.ndarray)
            np.testing.assert_array_equal(got_indices, indices.numpy())
            np.testing.assert_allclose(got_vectors, vectors.numpy(), rtol=1e-6, atol=1e-6)
            torch_indices = quantizer.encode(x)
            assert isinstance(torch_indices, torch.Tensor) and torch.equal(torch_indices, indices)
            decoded = decoder.decode(indices)
            assert isinstance(decoded, torch.Tensor)
            torch.testing.assert_close(decoded, vectors, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [7, 120])
@pytest.mark.parametrize("name", ["channel_first", "image", "heads", "residual"])
def test_tiles_across_and_within_batch_items(exports, name, chunk_size):
    """Small chunks cut an item's tokens; larger ones take several batch items per call."""
    module, quantize_path, decode_path = exports[name]
    x = torch.randn(*QUANTIZERS[name][1])
    with torch.no_grad():
        vectors, indices, _ = module(x)
    with runtime.load(quantize_path, chunk_size=chunk_size) as quantizer, runtime.load(decode_path, chunk_size=chunk_size) as decoder:
        got_vectors, got_indices = quantizer.quantize(x)
        assert torch.equal(got_indices, indices)
        torch.testing.assert_close(got_vectors, vectors, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(decoder.decode(indices), vectors, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_chunked_equals_unchunked(exports, backend):
    module, path, _ = exports["plain"]
    x = torch.randn(3, 1000, 64)
    with runtime.load(path, backend=backend, chunk_size=1_000_000) as whole, runtime.load(path, backend=backend, chunk_size=37) as chunked:
        assert torch.equal(whole.encode(x), chunked.encode(x))
        assert torch.equal(whole.quantize(x)[0], chunked.quantize(x)[0])


def test_threads_share_one_quantizer(exports):
    module, path, _ = exports["residual"]
    batches = [torch.randn(2, 100 + 13 * i, 64) for i in range(16)]
    with torch.no_grad():
        expected = [module(b)[1] for b in batches]
    with runtime.load(path, backend="ort", chunk_size=64) as quantizer, ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(quantizer.encode, batches))
    for got, want in zip(results, expected, strict=True):
        assert torch.equal(got, want)


def test_bad_inputs_leave_quantizer_usable(exports):
    module, path, decode_path = exports["plain"]
    with runtime.load(path, backend="ort") as quantizer:
        with pytest.raises(InputShapeError, match="dim = 64"):
            quantizer.encode(np.zeros((2, 3, 63), np.float32))
        with pytest.raises(InputShapeError, match="rank"):
            quantizer.encode(np.zeros((2, 3, 4, 64), np.float32))
        with pytest.raises(InputDtypeError):
            quantizer.encode(np.zeros((2, 3, 64), np.int32))
        bad = np.zeros((2, 3, 64), np.float32)
        bad[0, 1, 2] = np.nan
        with pytest.raises(NonFiniteInputError):
            quantizer.encode(bad)
        with pytest.raises(UnsupportedOptionError, match="part"):
            quantizer.decode(np.zeros((2, 3), np.int64))
        with pytest.raises(InputTypeError, match="numpy array or a torch tensor"):
            quantizer.encode([[0.0] * 64])
        x = torch.randn(2, 3, 64)
        assert torch.equal(quantizer.encode(x), module(x)[1])  # still usable
    with runtime.load(decode_path, backend="ort") as decoder:
        with pytest.raises(IndexRangeError, match=r"\[0, 128\)"):
            decoder.decode(np.array([[0, 128]]))
        with pytest.raises(InputDtypeError):
            decoder.decode(np.zeros((1, 2), np.float32))


def test_float64_numpy_is_accepted(exports):
    module, path, _ = exports["plain"]
    x = np.random.default_rng(0).standard_normal((2, 9, 64))
    with runtime.load(path) as quantizer:
        np.testing.assert_array_equal(quantizer.encode(x), module(torch.from_numpy(x).float())[1].numpy())


def test_load_errors(exports, tmp_path):
    _, path, _ = exports["plain"]
    with pytest.raises(UnsupportedOptionError, match="unknown backend"):
        runtime.load(path, backend="tensorflow")
    with pytest.raises(UnsupportedOptionError, match="precision"):
        runtime.load(path, precision="sloppy")
    for bad in (0, -4, 2.5, True):  # 0 used to mean "the default" without a word
        with pytest.raises(UnsupportedOptionError, match="chunk_size"):
            runtime.load(path, chunk_size=bad)
    with runtime.load(path, chunk_size=np.int64(300)) as quantizer:
        assert quantizer.chunk_size == 300
    with pytest.raises(DeviceNotAvailableError):
        runtime.load(path, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceNotAvailableError, match="CUDA"):
            runtime.load(path, device="cuda")
    if not runtime.is_available("trt"):
        with pytest.raises(BackendNotAvailableError, match="pip install tensorrt"):
            runtime.load(path, backend="trt")
    with pytest.raises(NotAVQDeployModelError, match="does not exist"):
        runtime.load(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00not onnx at all")
    with pytest.raises(NotAVQDeployModelError):
        runtime.load(junk)


def test_auto_picks_ort_on_cpu(exports):
    _, path, _ = exports["plain"]
    with runtime.load(path) as quantizer:
        assert quantizer.backend == "ort" and quantizer.device == "cpu"


MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    import numpy as np, torch
    from vqdeploy import VectorQuantize, export_onnx, runtime

    backend, path = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    vq = VectorQuantize(dim=32, codebook_size=256).eval()
    export_onnx(vq, path, part="encode")
    quantizer = runtime.load(path, backend=backend)
    quantizer.encode(np.random.default_rng(0).standard_normal((1, 4096, 32), dtype=np.float32))  # warm up
    x = np.random.default_rng(1).standard_normal((1, 4_000_000, 32), dtype=np.float32)  # 488 MiB
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    indices = quantizer.encode(x)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    output_mib = indices.nbytes / 2**20
    print(json.dumps({"growth_mib": (after - before) / 1024, "output_mib": output_mib}))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_encode_memory_is_bounded(backend, tmp_path):
    """Peak RSS growth of a 4M-vector encode, beyond its own output, stays <= 64 MiB."""
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, backend, str(tmp_path / "m.onnx")],
        capture_output=True, text=True, check=True, timeout=300,
    )
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["growth_mib"] - figures["output_mib"] <= 64, figures


@pytest.mark.parametrize("name", QUANTIZERS)
def test_ort_output_shapes_resolve_before_running(exports, name):
    """The CUDA path binds torch-allocated outputs: their shapes must be known from the inputs alone."""
    from vqdeploy.runtime.base import chunk_shape
    from vqdeploy.runtime.onnxrt import OnnxRuntimeRunner

    _, quantize_path, decode_path = exports[name]
    for path in (quantize_path, decode_path):
        runner = OnnxRuntimeRunner(path)
        quantizer = runtime.load(path)
        meta = runner.session.get_inputs()[0]
        shape = chunk_shape(quantizer.info, 37)
        feed = {meta.name: torch.randint(0, 4, shape) if meta.type == "tensor(int64)" else torch.randn(shape)}
        assert runner._output_shapes(feed) == [tuple(o.shape) for o in runner.infer(feed)]


def test_default_chunk_follows_what_the_backend_holds(exports):
    """ORT holds a chunk's N x K scores; the torch backend's search tiles itself, so its chunk is
    bounded by the chunk's vectors instead (and a user's chunk_size always wins)."""
    from vqdeploy.runtime.base import CHUNK_SCORE_BUDGET, CHUNK_VECTOR_BUDGET, MIN_CHUNK

    _, quantize_path, _ = exports["plain"]  # dim 64, 128 codes
    with runtime.load(quantize_path, backend="ort") as ort, runtime.load(quantize_path, backend="torch") as eager:
        assert ort.chunk_size == max(MIN_CHUNK, CHUNK_SCORE_BUDGET // 128)
        assert eager.chunk_size == max(MIN_CHUNK, CHUNK_VECTOR_BUDGET // 64)
    with runtime.load(quantize_path, backend="torch", chunk_size=99) as chosen:
        assert chosen.chunk_size == 99


def test_ort_spinning_can_be_turned_off(exports):
    module, quantize_path, _ = exports["plain"]
    x = torch.randn(3, 40, 64)
    with runtime.load(quantize_path, backend="ort", allow_spinning=False) as quiet, runtime.load(quantize_path) as default:
        options = quiet._runner.session.get_session_options()
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
        assert torch.equal(quiet.encode(x), default.encode(x))
        assert torch.equal(quiet.encode(x), module(x)[1])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_load_from_bytes_gives_the_tokens_of_the_file(exports, backend):
    """A model that travels as bytes (an object store) runs as the file does."""
    for name in ("plain", "residual"):
        _, path, _ = exports[name]
        x = np.random.default_rng(1).standard_normal(QUANTIZERS[name][1]).astype(np.float32)
        with runtime.load(path, backend=backend) as from_file, runtime.load(path.read_bytes(), backend=backend) as from_bytes:
            assert from_bytes.info == from_file.info
            np.testing.assert_array_equal(from_bytes.encode(x), from_file.encode(x))


def test_load_from_bytes_that_are_not_onnx():
    with pytest.raises(NotAVQDeployModelError, match="bytes given are not an ONNX file"):
        runtime.load(b"not a model", backend="ort")
