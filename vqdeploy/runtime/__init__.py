"""One Quantizer API over ONNX Runtime, TensorRT and plain torch.

>>> import tempfile, pathlib, numpy as np, vqdeploy
>>> from vqdeploy import runtime
>>> vq = vqdeploy.VectorQuantize(dim=8, codebook_size=16).eval()
>>> path = vqdeploy.export_onnx(vq, pathlib.Path(tempfile.mkdtemp()) / "vq.onnx", part="encode")
>>> with runtime.load(path, backend="ort") as quantizer:
...     quantizer.encode(np.zeros((2, 5, 8), np.float32)).shape
(2, 5)
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from typing import Any

from vqdeploy.checks import check_positive_int
from vqdeploy.errors import BackendNotAvailableError, UnsupportedOptionError
from vqdeploy.export.metadata import ExportInfo, read_metadata
from vqdeploy.runtime.base import Quantizer, Runner, default_chunk_size
from vqdeploy.runtime.devices import check_device

PRECISIONS = ("exact", "fast")


def _ort(path, info: ExportInfo, device: str, precision: str, **options: Any) -> Runner:
    from vqdeploy.runtime.onnxrt import OnnxRuntimeRunner

    return OnnxRuntimeRunner(path, info, device=device, precision=precision, **options)


def _trt(path, info: ExportInfo, device: str, precision: str, **options: Any) -> Runner:
    if isinstance(path, bytes):
        raise UnsupportedOptionError("the trt backend builds its engine from a file path; save the bytes to a .onnx file first")
    from vqdeploy.runtime.tensorrt import TensorRTRunner

    return TensorRTRunner(path, info, device=device, precision=precision, **options)


def _torch(path, info: ExportInfo, device: str, precision: str, **options: Any) -> Runner:
    from vqdeploy.runtime.torch_backend import TorchRunner

    if options:
        raise UnsupportedOptionError(f"the torch backend takes no options, got {sorted(options)}")
    return TorchRunner(path, info, device=device, precision=precision)


# name -> (loader, python module the backend needs, what to pip install)
BACKENDS: dict[str, tuple[Callable[..., Runner], str, str]] = {
    "ort": (_ort, "onnxruntime", "onnxruntime (or onnxruntime-gpu for CUDA)"),
    "trt": (_trt, "tensorrt", "tensorrt (10 or later, from NVIDIA's index)"),
    "torch": (_torch, "torch", "torch"),
}


def _tensorrt_importable() -> bool:
    from vqdeploy.runtime.trt_plugin import tensorrt_unavailable_reason

    return tensorrt_unavailable_reason() is None


# Options `load` passes on to each backend (anything else is refused by name).
BACKEND_OPTIONS: dict[str, tuple[str, ...]] = {
    "ort": ("intra_op_num_threads", "inter_op_num_threads", "allow_spinning", "recheck"),
    "trt": ("min_tokens", "opt_tokens", "max_tokens", "cache_dir", "prefer_aot"),
    "torch": (),
}


def _check_options(backend: str, options: dict[str, Any]) -> None:
    unknown = sorted(set(options) - set(BACKEND_OPTIONS[backend]))
    if unknown:
        accepted = ", ".join(BACKEND_OPTIONS[backend]) or "none"
        raise UnsupportedOptionError(f"the {backend} backend does not take option(s) {', '.join(unknown)}; "
                                     f"it takes: {accepted}")


# Backends detected by importing: a TensorRT install can be present yet unable to load.
_PROBES: dict[str, Callable[[], bool]] = {"trt": _tensorrt_importable}


def is_available(backend: str) -> bool:
    """Whether the package a backend needs is importable (hardware is checked when loading)."""
    if backend in _PROBES:
        return _PROBES[backend]()
    return importlib.util.find_spec(BACKENDS[backend][1]) is not None


def available_backends() -> list[str]:
    return [name for name in BACKENDS if is_available(name)]


def resolve_backend(backend: str, device: str) -> str:
    """'auto' -> trt when importable on CUDA, else ort, else torch."""
    if backend != "auto":
        if backend not in BACKENDS:
            raise UnsupportedOptionError(f"unknown backend {backend!r}; choose from auto, {', '.join(BACKENDS)}")
        if not is_available(backend):
            raise BackendNotAvailableError(f"backend {backend!r} is not installed: pip install {BACKENDS[backend][2]}")
        return backend
    if device.startswith("cuda") and is_available("trt"):
        return "trt"
    return "ort" if is_available("ort") else "torch"


def load(
    path: str | os.PathLike | bytes,
    *,
    backend: str = "auto",
    device: str = "cpu",
    precision: str = "exact",
    chunk_size: int | None = None,
    **options: Any,
) -> Quantizer:
    """Open a vqdeploy ONNX export on a backend; returns a `Quantizer`.

    path: the .onnx file, or its content as bytes (so a model can travel to workers through an
    object store; the ort and torch backends take bytes, trt needs a file).

    backend: "auto", "ort", "trt" or "torch". precision: "exact" (default: tokens at parity with the
    eager model; TF32 off) or "fast" (tensor cores where the backend has a parity-preserving path).
    chunk_size: tokens per backend call (default: a chunk's N x K scores near 8 MiB on ort, its vectors
    near 4 MiB on torch, whose search tiles itself; trt: the engine's max_tokens). Other options
    go to the backend (ort: intra_op_num_threads, inter_op_num_threads, allow_spinning=False to stop
    its idle workers spinning between calls; trt: min_tokens, opt_tokens,
    max_tokens, cache_dir, prefer_aot). Only the torch backend on CUDA has a "fast" search (Triton,
    tensor cores plus a float32 re-check); ONNX Runtime and TensorRT keep TF32 off in both precisions,
    since TF32 there would change tokens.

    A whole-model file (exported from a model that contains quantizers) opens as a `WholeModel`
    (``run(inputs)`` -> named outputs, ``encode(x)`` -> its tokens output) on "ort", or on "torch"
    given the module it was exported from: ``load(path, backend="torch", model=module)`` runs that
    module with the file's weights (`vqdeploy.runtime.whole_model`). ``search_outputs=True`` also
    returns every search's rows and tokens (what verify reads).
    """
    if precision not in PRECISIONS:
        raise UnsupportedOptionError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if chunk_size is not None:
        check_positive_int(chunk_size, "chunk_size", UnsupportedOptionError)
    check_device(device)
    if isinstance(path, bytearray | memoryview):
        path = bytes(path)
    info = read_metadata(path)
    if info.kind == "model" and backend == "auto":  # whole models run on ort (the graph) or torch (the module)
        backend = "ort" if is_available("ort") and "model" not in options else "torch"
    name = resolve_backend(backend, device)
    if isinstance(path, bytes) and backend == "auto" and name == "trt":
        name = resolve_backend("ort" if is_available("ort") else "torch", device)
    if info.kind == "model":
        from vqdeploy.runtime.whole_model import load_model

        return load_model(path, info, name, device, precision, **options)
    for option in ("model", "search_outputs"):
        if option in options:
            raise UnsupportedOptionError(f"{option}= applies to whole-model files; this file holds a bare {info.kind}")
    _check_options(name, options)
    runner = BACKENDS[name][0](path, info, device, precision, **options)
    try:
        return Quantizer(info, runner, chunk_size=chunk_size)
    except BaseException:
        runner.close()
        raise


__all__ = ["BACKENDS", "Quantizer", "available_backends", "default_chunk_size", "load", "resolve_backend"]
