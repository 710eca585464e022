"""TensorRT plugin ``vqdeploy::NearestCode`` in Python (``tensorrt.plugin``, TensorRT >= 10.7).

The plugin runs the fused Triton kernel of `vqdeploy.ops.triton_kernels` inside a TensorRT engine:

* ``register``: inputs x[M, D] and codebook[K, D] (each float32 or float16), output int64[M]
  (TensorRT 10 has INT64 tensors). bfloat16 is not offered: the JIT path reads TensorRT's
  buffers through ``__cuda_array_interface__``, which has no bfloat16.
* ``autotune``: x and codebook each FP32 or FP16 (four combinations), output INT64, LINEAR.
* ``impl`` (JIT): wraps TensorRT's buffers as torch tensors (``torch.as_tensor`` reads their
  ``__cuda_array_interface__``) and runs ``mode="exact"`` on TensorRT's stream. The engine then
  needs Python, torch and Triton at run time.
* ``aot_impl`` (TensorRT >= 10.9, where ``tensorrt.plugin`` exports both ``aot_impl`` and
  ``KernelLaunchParams``): PTX of the single-pass exact kernel (float32 FMA dot, code norms in
  the kernel, no workspace) compiled by Triton for the build GPU, embedded in the engine, so that
  the engine runs without Python. TensorRT 11.4's ``tensorrt.plugin`` defines ``aot_impl`` even
  where its bindings lack AOT support, but ``KernelLaunchParams`` only where they have it.

How the ONNX parser finds it: a node of op type ``NearestCode`` with the string attribute
``plugin_namespace="vqdeploy"`` (what `vqdeploy.export` writes) is looked up as plugin
``NearestCode``, version "1", namespace "vqdeploy" -- the id registered here. The parser passes
the plugin only the attributes it *declares* (it walks the creator's field names); this plugin
declares none, so ``plugin_namespace`` does not reach it. (Declaring none is also required: QDP
has no attribute defaults, so a declared attribute missing from a node would break it.) The
parser itself reads one more attribute: an integer ``aot`` on the node (1: AOT, 0: JIT, strictly)
overrides the network's PREFER_AOT/PREFER_JIT_PYTHON_PLUGINS flags. vqdeploy's exports do not
write ``aot``; `vqdeploy.runtime.tensorrt` creates its networks with the flag instead
(`python_plugin_network_flags`), which TensorRT needs whenever both implementations are
registered. Where no plugin is registered, the parser imports the node's model-local function.

This module imports without TensorRT; annotations are real objects (no ``from __future__ import
annotations``) because ``tensorrt.plugin`` validates the decorated functions' annotations.
"""

import importlib
from typing import Any

from vqdeploy.errors import (
    BackendNotAvailableError,
    ConfigError,
    InputDtypeError,
    InputShapeError,
    PluginRegistrationError,
)

PLUGIN_NAMESPACE = "vqdeploy"
PLUGIN_NAME = "NearestCode"
PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"
PLUGIN_VERSION = "1"  # what tensorrt.plugin registers every plugin as

INPUT_DTYPES = ("float32", "float16")
OUTPUT_DTYPE = "int64"
# Independent ('*'): x and codebook are each FP32 or FP16 (the kernel widens both to float32).
AUTOTUNE_IO_TYPES = "FP32*FP16, FP32*FP16, INT64"
AUTOTUNE_LAYOUTS = "LINEAR"
MIN_TENSORRT_VERSION = (10, 0)  # the builder/runtime API the backend is written against
MIN_PLUGIN_VERSION = (10, 7)  # tensorrt.plugin, as this plugin uses it
MIN_AOT_VERSION = (10, 9)  # tensorrt.plugin.aot_impl and KernelLaunchParams (absent in 10.8)
INSTALL_ADVICE = "pip install tensorrt (>= 10.7 for Python plugins, >= 10.9 for the ahead-of-time kernel)"

# AutoTuneCombination type names: "FP32" and "FP16" are special-cased by tensorrt.plugin, the
# others are trt.DataType member names.
_TYPE_NAMES = {
    "FP32": "float32",
    "FP16": "float16",
    "BF16": "bfloat16",
    "FP8": "float8",
    "INT64": "int64",
    "INT32": "int32",
    "INT8": "int8",
    "UINT8": "uint8",
    "BOOL": "bool",
}
# What the decorated functions use; all must exist for the plugin, the second set for AOT.
_JIT_API = ("register", "autotune", "impl", "TensorDesc", "Tensor", "AutoTuneCombination", "from_shape_expr")
_AOT_API = ("aot_impl", "KernelLaunchParams", "SymIntExprs", "SymInt32", "cdiv")

_implementations: tuple[str, ...] = ()  # what is registered in this process: (), ("jit",), ("jit", "aot")


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


def _type_name(name: str, io_types: str) -> str:
    if name not in _TYPE_NAMES:
        raise ConfigError(f"unknown type {name!r} in {io_types!r}; known: {', '.join(_TYPE_NAMES)}")
    return _TYPE_NAMES[name]


def supported_type_combinations(io_types: str = AUTOTUNE_IO_TYPES) -> list[tuple[str, ...]]:
    """The (x, codebook, output) dtypes an AutoTuneCombination type string stands for, in order.

    The semantics of ``tensorrt.plugin.AutoTuneCombination`` (its one-sided combination
    generator): columns split by ','; within one column, options split by '|' (dependent: the
    i-th options of all '|' columns go together, so those columns need equally many options) or
    by '*' (independent: every option with every combination), never both in one column, while
    different columns may mix '|' and '*'. The dependent rows come first (a '*' column at its
    first option), then, column by column, copies of every row so far with that column's
    further options.
    """
    columns = [column.strip() for column in io_types.split(",")]
    dependent_lengths = set()
    for column in columns:
        options = column.split("|")
        if len(options) > 1:
            if "*" in column:
                raise ConfigError(f"type column {column!r} of {io_types!r} mixes '|' and '*'")
            dependent_lengths.add(len(options))
    if len(dependent_lengths) > 1:
        raise ConfigError(f"the '|' columns of {io_types!r} have different numbers of options")
    rows = dependent_lengths.pop() if dependent_lengths else 1
    combinations = [
        [column.split("|")[i] if "|" in column else column.split("*")[0] for column in columns] for i in range(rows)
    ]
    for j, column in enumerate(columns):
        if "*" in column:
            combinations += [
                [*combo[:j], option, *combo[j + 1 :]] for option in column.split("*")[1:] for combo in combinations
            ]
    return [tuple(_type_name(name, io_types) for name in combo) for combo in combinations]


def parse_version(version: str) -> tuple[int, int]:
    """(major, minor) of a TensorRT version string such as '10.13.2.6'."""
    parts = version.split(".")
    return int(parts[0]), int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


def supports_plugins(version: str) -> bool:
    """Whether a TensorRT version is one this plugin is registered on (>= MIN_PLUGIN_VERSION)."""
    return parse_version(version) >= MIN_PLUGIN_VERSION


def supports_aot(version: str) -> bool:
    """Whether a TensorRT version has ``tensorrt.plugin.aot_impl`` (>= MIN_AOT_VERSION)."""
    return parse_version(version) >= MIN_AOT_VERSION


def _guarded_import(name: str) -> tuple[Any, str | None]:
    """(module, None), or (None, why): a broken install raises more than ImportError."""
    try:
        return importlib.import_module(name), None
    except Exception as exc:  # noqa: BLE001 -- OSError (no libnvinfer), AttributeError, RuntimeError...
        return None, f"{type(exc).__name__}: {exc}"


def tensorrt_unavailable_reason() -> str | None:
    """Why the 'trt' backend cannot run here (None when ``import tensorrt`` works and is >= 10.0).

    Detects by importing, not by ``find_spec``: a package that is present but cannot load
    (a stub wheel, missing libnvinfer) is reported here instead of failing later.
    """
    trt, error = _guarded_import("tensorrt")
    if trt is None:
        return f"TensorRT cannot be imported ({error}): {INSTALL_ADVICE}, and a CUDA GPU"
    version = str(getattr(trt, "__version__", "0"))
    try:
        too_old = parse_version(version) < MIN_TENSORRT_VERSION
    except ValueError:
        return f"TensorRT reports an unreadable version {version!r}: {INSTALL_ADVICE}"
    if too_old:
        return f"TensorRT {version} is older than {'.'.join(map(str, MIN_TENSORRT_VERSION))}: {INSTALL_ADVICE}"
    return None


def plugin_unavailable_reason() -> str | None:
    """Why the plugin cannot be registered here (None when it can)."""
    reason = tensorrt_unavailable_reason()
    if reason is not None:
        return reason
    import tensorrt as trt

    if not supports_plugins(trt.__version__):
        return f"TensorRT {trt.__version__} is older than {'.'.join(map(str, MIN_PLUGIN_VERSION))}: {INSTALL_ADVICE}"
    trtp, error = _guarded_import("tensorrt.plugin")
    if trtp is None:
        return f"this TensorRT has no usable tensorrt.plugin module ({error}): {INSTALL_ADVICE}"
    missing = [name for name in _JIT_API if not hasattr(trtp, name)]
    if missing:
        return f"tensorrt.plugin of TensorRT {trt.__version__} lacks {', '.join(missing)}: {INSTALL_ADVICE}"
    triton, error = _guarded_import("triton")
    if triton is None:
        return f"the plugin's kernel needs Triton, which cannot be imported ({error}): pip install triton"
    return None


def aot_unavailable_reason(trt: Any, trtp: Any) -> str | None:
    """Why the AOT implementation cannot be registered with this TensorRT (None when it can)."""
    if not supports_aot(trt.__version__):
        return f"TensorRT {trt.__version__} has no AOT Python plugins (needs >= {'.'.join(map(str, MIN_AOT_VERSION))})"
    missing = [name for name in _AOT_API if not hasattr(trtp, name)]
    if missing:
        return f"tensorrt.plugin of TensorRT {trt.__version__} lacks {', '.join(missing)} (no AOT support in these bindings)"
    return None


# -- registration --------------------------------------------------------------------------------


def register_nearest_code_plugin(required: bool = False) -> bool:
    """Register ``vqdeploy::NearestCode`` with TensorRT; True when it is registered (now or before).

    Where TensorRT (>= 10.7) or Triton is missing this returns False, and TensorRT's ONNX parser
    then falls back to the node's model-local function (standard ops): tokens stay correct. With
    ``required=True`` it raises `BackendNotAvailableError` (naming the package to install) instead.
    Where TensorRT rejects the definition it raises `PluginRegistrationError`; a later call
    retries, reusing a definition the failed call left behind.
    """
    global _implementations
    if _implementations:
        return True
    reason = plugin_unavailable_reason()
    if reason is not None:
        if required:
            raise BackendNotAvailableError(f"cannot register the TensorRT plugin {PLUGIN_ID}: {reason}")
        return False
    import tensorrt as trt
    import tensorrt.plugin as trtp

    with_aot = aot_unavailable_reason(trt, trtp) is None
    try:
        _register(trt, trtp, with_aot)
    except Exception as exc:
        raise PluginRegistrationError(
            f"TensorRT {trt.__version__} rejected the definition of {PLUGIN_ID}: {type(exc).__name__}: {exc}"
        ) from exc
    _implementations = ("jit", "aot") if with_aot else ("jit",)
    return True


def registered_implementations() -> tuple[str, ...]:
    """The implementations registered in this process: (), ("jit",) or ("jit", "aot")."""
    return _implementations


def implementation_for(prefer_aot: bool, implementations: tuple[str, ...] | None = None) -> str:
    """Which implementation an engine gets: "aot" (when asked for and registered), "jit" or "none"."""
    implementations = registered_implementations() if implementations is None else implementations
    if not implementations:
        return "none"
    return "aot" if prefer_aot and "aot" in implementations else "jit"


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


def _is_defined(trtp: Any) -> bool:
    """Whether tensorrt.plugin already holds a definition of the plugin (an earlier attempt's)."""
    namespace = getattr(trtp.op, PLUGIN_NAMESPACE, None)
    return namespace is not None and hasattr(namespace, PLUGIN_NAME)


def _register(trt: Any, trtp: Any, with_aot: bool) -> None:
    """Define the decorated functions; their annotations must be real tensorrt.plugin classes.

    ``trtp.register`` refuses a second definition of one id, while ``autotune``/``impl``/
    ``aot_impl`` only (re)attach functions to it: so a retry after a failure part-way skips the
    first and repeats the rest.
    """
    dtype_names = {trt.float32: "float32", trt.float16: "float16"}

    if not _is_defined(trtp):

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

    if not with_aot:  # the annotations below name AOT-only classes: never evaluate them without
        return

    @trtp.aot_impl(PLUGIN_ID)
    def nearest_code_aot_impl(
        x: trtp.TensorDesc, codebook: trtp.TensorDesc, outputs: tuple[trtp.TensorDesc], tactic: int
    ) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]:
        import torch

        from vqdeploy.ops.triton_aot import compile_exact_ptx

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
