"""TensorRT plugin ``vqdeploy::NearestCode`` in Python (``tensorrt.plugin``, TensorRT >= 10.7).

The plugin runs the fused Triton kernel of `vqdeploy.ops.triton_kernels` inside a TensorRT engine:

* ``register``: inputs x[M, D] and codebook[K, D] (each float32 or float16), output int64[M]
  (TensorRT 10 has INT64 tensors). bfloat16 is not offered: the JIT path reads TensorRT's
  buffers through ``__cuda_array_interface__``, which has no bfloat16.
* ``autotune``: x and codebook each FP32 or FP16 (four combinations), output INT64, LINEAR.
* ``impl`` (JIT): wraps TensorRT's buffers as torch tensors (``torch.as_tensor`` reads their
  ``__cuda_array_interface__``) and runs ``mode="exact"`` on TensorRT's stream. The engine then
  needs Python, torch and Triton at run time.
* ``aot_impl`` (TensorRT >= 10.10, where ``tensorrt.plugin.aot_impl`` exists): PTX of the
  single-pass exact kernel (float32 FMA dot, code norms in the kernel, no workspace) compiled by
  Triton for the build GPU, embedded in the engine, so that the engine runs without Python.

How the ONNX parser finds it: a node of op type ``NearestCode`` with the string attribute
``plugin_namespace="vqdeploy"`` (what `vqdeploy.export` writes) is looked up as plugin
``NearestCode``, version "1", namespace "vqdeploy" -- the id registered here. The parser then
passes only the attributes the plugin *declares* (it walks the creator's field names and warns
about declared fields the node lacks); this plugin declares none, so ``plugin_namespace``, an
``aot`` flag or any other attribute on the node is ignored. (Declaring none is also required:
QDP has no attribute defaults, so a declared attribute missing from a node would break it.)
Where no plugin is registered, the parser imports the node's model-local function instead.

With both implementations registered, TensorRT needs a preference: create the network with
`python_plugin_network_flags` (PREFER_JIT/AOT_PYTHON_PLUGINS) or set the node's ``aot`` attribute.

This module imports without TensorRT; annotations are real objects (no ``from __future__ import
annotations``) because ``tensorrt.plugin`` validates the decorated functions' annotations.
"""

import importlib
import importlib.util
import itertools
from typing import Any

from vqdeploy.errors import BackendNotAvailableError, InputDtypeError, InputShapeError

PLUGIN_NAMESPACE = "vqdeploy"
PLUGIN_NAME = "NearestCode"
PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"
PLUGIN_VERSION = "1"  # what tensorrt.plugin registers every plugin as

INPUT_DTYPES = ("float32", "float16")
OUTPUT_DTYPE = "int64"
# Independent ('*'): x and codebook are each FP32 or FP16 (the kernel widens both to float32).
AUTOTUNE_IO_TYPES = "FP32*FP16, FP32*FP16, INT64"
AUTOTUNE_LAYOUTS = "LINEAR"
MIN_PLUGIN_VERSION = (10, 7)  # tensorrt.plugin
MIN_AOT_VERSION = (10, 10)  # tensorrt.plugin.aot_impl
INSTALL_ADVICE = "pip install tensorrt (>= 10.7 for Python plugins, >= 10.10 for the ahead-of-time kernel)"

_TYPE_NAMES = {"FP32": "float32", "FP16": "float16", "INT64": "int64", "INT32": "int32", "BF16": "bfloat16"}
_registered = False


# -- plain logic (tested without TensorRT) ------------------------------------------------------


def check_io(x_rank: int, codebook_rank: int, x_dtype: str, codebook_dtype: str) -> None:
    """Raise a typed error unless x[M, D] and codebook[K, D] have rank 2 and supported dtypes."""
    for name, rank in (("x", x_rank), ("codebook", codebook_rank)):
        if rank != 2:
            raise InputShapeError(f"{PLUGIN_ID}: {name} must have rank 2, got rank {rank}")
    for name, dtype in (("x", x_dtype), ("codebook", codebook_dtype)):
        if dtype not in INPUT_DTYPES:
            raise InputDtypeError(f"{PLUGIN_ID}: {name} must be one of {INPUT_DTYPES}, got {dtype}")


def check_runtime_shapes(x_shape: tuple[int, ...], codebook_shape: tuple[int, ...]) -> None:
    """At enqueue, when shapes are concrete: the feature sizes must agree and K must be > 0."""
    if x_shape[1] != codebook_shape[1]:
        raise InputShapeError(
            f"{PLUGIN_ID}: x has {x_shape[1]} features per row but the codebook has {codebook_shape[1]}"
        )
    if codebook_shape[0] == 0:
        raise InputShapeError(f"{PLUGIN_ID}: the codebook has no codes")


def supported_type_combinations(io_types: str = AUTOTUNE_IO_TYPES) -> list[tuple[str, ...]]:
    """The (x, codebook, output) dtypes an AutoTuneCombination type string stands for.

    Same grammar as ``tensorrt.plugin.AutoTuneCombination``: columns split by ',', a column's
    options by '|' (dependent: the i-th options go together) or '*' (independent: any option).
    """
    columns = [column.strip() for column in io_types.split(",")]
    if any("|" in c for c in columns) and any("*" in c for c in columns):
        raise ValueError(f"use either '|' or '*' in {io_types!r}, not both")
    options = [[_TYPE_NAMES[t.strip()] for t in c.replace("*", "|").split("|")] for c in columns]
    if any("*" in c for c in columns):
        return list(itertools.product(*options))
    width = max(len(o) for o in options)
    if any(len(o) not in (1, width) for o in options):
        raise ValueError(f"dependent type lists of different lengths in {io_types!r}")
    return [tuple(o[i] if len(o) > 1 else o[0] for o in options) for i in range(width)]


def parse_version(version: str) -> tuple[int, int]:
    """(major, minor) of a TensorRT version string such as '10.13.2.6'."""
    parts = version.split(".")
    return int(parts[0]), int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


def supports_aot(version: str) -> bool:
    """Whether a TensorRT version has ``tensorrt.plugin.aot_impl``."""
    return parse_version(version) >= MIN_AOT_VERSION


def plugin_unavailable_reason() -> str | None:
    """Why the plugin cannot be registered here (None when it can)."""
    if importlib.util.find_spec("tensorrt") is None:
        return f"TensorRT is not installed: {INSTALL_ADVICE}"
    try:
        importlib.import_module("tensorrt.plugin")
    except ImportError as exc:
        return f"this TensorRT has no tensorrt.plugin module ({exc}): {INSTALL_ADVICE}"
    if importlib.util.find_spec("triton") is None:
        return "the plugin's kernel needs Triton: pip install triton"
    return None


# -- registration --------------------------------------------------------------------------------


def register_nearest_code_plugin(required: bool = False) -> bool:
    """Register ``vqdeploy::NearestCode`` with TensorRT; True when it is registered (now or before).

    Where TensorRT (>= 10.7) or Triton is missing this returns False, and TensorRT's ONNX parser
    then falls back to the node's model-local function (standard ops): tokens stay correct. With
    ``required=True`` it raises `BackendNotAvailableError` (naming the package to install) instead.
    """
    global _registered
    if _registered:
        return True
    reason = plugin_unavailable_reason()
    if reason is not None:
        if required:
            raise BackendNotAvailableError(f"cannot register the TensorRT plugin {PLUGIN_ID}: {reason}")
        return False
    import tensorrt as trt
    import tensorrt.plugin as trtp

    _register(trt, trtp)
    _registered = True
    return True


def python_plugin_network_flags(trt: Any, prefer_aot: bool) -> int:
    """Network-creation flag bits choosing between the AOT and the JIT implementation (0 if n/a)."""
    name = "PREFER_AOT_PYTHON_PLUGINS" if prefer_aot else "PREFER_JIT_PYTHON_PLUGINS"
    flag = getattr(trt.NetworkDefinitionCreationFlag, name, None)
    return 0 if flag is None else 1 << int(flag)


def _run_jit(x: Any, codebook: Any, out: Any, stream: int) -> None:
    """JIT body: TensorRT's buffers as torch tensors, the exact kernel on TensorRT's stream."""
    import torch

    from vqdeploy.ops.triton_kernels import launch_on_stream

    x_t = torch.as_tensor(x, device="cuda")
    codebook_t = torch.as_tensor(codebook, device="cuda")
    out_t = torch.as_tensor(out, device="cuda")
    check_runtime_shapes(tuple(x_t.shape), tuple(codebook_t.shape))
    launch_on_stream(x_t, codebook_t, out_t, stream, mode="exact")


def _register(trt: Any, trtp: Any) -> None:
    """Define the decorated functions; their annotations must be real tensorrt.plugin classes."""
    dtype_names = {trt.float32: "float32", trt.float16: "float16"}

    @trtp.register(PLUGIN_ID)
    def nearest_code_desc(x: trtp.TensorDesc, codebook: trtp.TensorDesc) -> trtp.TensorDesc:
        check_io(
            x.ndim,
            codebook.ndim,
            dtype_names.get(x.dtype, str(x.dtype)),
            dtype_names.get(codebook.dtype, str(codebook.dtype)),
        )
        return trtp.from_shape_expr((x.shape_expr[0],), dtype=trt.int64)

    @trtp.autotune(PLUGIN_ID)
    def nearest_code_autotune(
        x: trtp.TensorDesc, codebook: trtp.TensorDesc, outputs: tuple[trtp.TensorDesc]
    ) -> list[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination(AUTOTUNE_IO_TYPES, AUTOTUNE_LAYOUTS)]

    @trtp.impl(PLUGIN_ID)
    def nearest_code_impl(
        x: trtp.Tensor, codebook: trtp.Tensor, outputs: tuple[trtp.Tensor], stream: int
    ) -> None:
        _run_jit(x, codebook, outputs[0], stream)

    if not hasattr(trtp, "aot_impl"):
        return

    @trtp.aot_impl(PLUGIN_ID)
    def nearest_code_aot_impl(
        x: trtp.TensorDesc, codebook: trtp.TensorDesc, outputs: tuple[trtp.TensorDesc], tactic: int
    ) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymExprs]:
        import torch

        from vqdeploy.ops.triton_kernels import compile_exact_ptx

        torch_dtypes = {trt.float32: torch.float32, trt.float16: torch.float16}
        kernel = compile_exact_ptx(torch_dtypes[x.dtype], torch_dtypes[codebook.dtype])
        rows, dim, codes = x.shape_expr[0], x.shape_expr[1], codebook.shape_expr[0]
        launch = trtp.KernelLaunchParams()
        launch.grid_x = trtp.cdiv(rows, kernel.block_m)
        launch.block_x = kernel.block_x
        launch.shared_mem = kernel.shared_mem
        # Kernel arguments: inputs (x, codebook), these scalars (M, K, D), then the output.
        scalars = trtp.SymIntExprs.from_tuple([trtp.SymInt32(rows), trtp.SymInt32(codes), trtp.SymInt32(dim)])
        return kernel.name.encode(), kernel.ptx.encode(), launch, scalars
