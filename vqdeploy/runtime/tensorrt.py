"""TensorRT backend, written against the TensorRT 10.x / 11.x Python API.

TensorRT cannot be installed on the machines this project is tested on, so this layer is kept
thin and split in two:

* `EngineCache` (with `build_engine`) parses the ONNX file with the NearestCode plugin registered,
  builds an engine (TF32 cleared, one optimization profile) and keeps it on disk under a key of
  everything that decides its bytes (`engine_cache_key`). `vqdeploy build` uses only this.
* `TensorRTRunner` opens an engine from that cache and runs it with ``execute_async_v3`` on
  torch's current CUDA stream.

The key, the profile, the network flags and the dtype map are plain functions, tested without
TensorRT. Precision: TensorRT has no tokens-preserving fast search here (the plugin's JIT and AOT
kernels are exact, and TF32 in the fallback function body would change tokens), so
``precision="fast"`` runs the same engine as ``"exact"`` and is not part of the key.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vqdeploy.errors import (
    BackendNotAvailableError,
    ConfigError,
    EngineBuildError,
    EngineRunError,
    UnsupportedOptionError,
)
from vqdeploy.export.metadata import ExportInfo
from vqdeploy.files import atomic_write
from vqdeploy.runtime import trt_plugin
from vqdeploy.runtime.base import chunk_shape
from vqdeploy.runtime.devices import check_device

DEFAULT_MAX_TOKENS = 262144
PRECISIONS = ("exact", "fast")
PLUGIN_CHOICES = ("none", "jit", "aot")  # which NearestCode an engine holds

# trt.DataType member name -> torch dtype of a buffer TensorRT reads or writes. FP8 is E4M3 in
# TensorRT; INT4, FP4 and E8M0 have no torch buffer dtype and are refused.
TORCH_DTYPES: dict[str, torch.dtype] = {
    "FLOAT": torch.float32,
    "HALF": torch.float16,
    "BF16": torch.bfloat16,
    "FP8": torch.float8_e4m3fn,
    "INT8": torch.int8,
    "UINT8": torch.uint8,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "BOOL": torch.bool,
}


def import_tensorrt() -> Any:
    """The tensorrt module, or `BackendNotAvailableError` saying why it cannot be used here."""
    reason = trt_plugin.tensorrt_unavailable_reason()
    if reason is not None:
        raise BackendNotAvailableError(f"the 'trt' backend cannot run: {reason}")
    import tensorrt

    return tensorrt


def torch_dtype(trt_dtype: Any) -> torch.dtype:
    """The torch dtype of a TensorRT tensor type (a ``trt.DataType`` or its member name)."""
    name = trt_dtype if isinstance(trt_dtype, str) else getattr(trt_dtype, "name", str(trt_dtype))
    if name not in TORCH_DTYPES:
        raise EngineRunError(
            f"the engine has a tensor of TensorRT type {name}, which has no torch dtype; "
            f"supported: {', '.join(TORCH_DTYPES)}"
        )
    return TORCH_DTYPES[name]


def default_cache_dir() -> Path:
    """$VQDEPLOY_CACHE/engines, else ~/.cache/vqdeploy/engines."""
    root = os.environ.get("VQDEPLOY_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vqdeploy")
    return Path(root) / "engines"


def profile_shapes(info: ExportInfo, min_tokens: int = 1, opt_tokens: int | None = None, max_tokens: int = DEFAULT_MAX_TOKENS):
    """(min, opt, max) input shapes of the one optimization profile, in tokens per chunk."""
    opt_tokens = opt_tokens if opt_tokens is not None else max_tokens
    if not 1 <= min_tokens <= opt_tokens <= max_tokens:
        raise ConfigError(f"need 1 <= min_tokens <= opt_tokens <= max_tokens, got {min_tokens}, {opt_tokens}, {max_tokens}")
    return tuple(chunk_shape(info, tokens) for tokens in (min_tokens, opt_tokens, max_tokens))


def package_version(name: str) -> str:
    """Installed version of a distribution, "" where it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return ""


def engine_cache_key(
    onnx_path: str | os.PathLike,
    tensorrt_version: str,
    gpu: str,
    plugin: str,
    profile,
    vqdeploy_version: str | None = None,
    triton_version: str | None = None,
) -> str:
    """sha256 over everything that decides an engine's bytes.

    The ONNX bytes, the TensorRT version, the GPU, which NearestCode the engine holds (``plugin``:
    "none" for the function body, "jit", or "aot" whose PTX Triton compiled into the engine), the
    profile, vqdeploy's version (it writes the plugin and the build settings) and, with a plugin,
    Triton's (it compiles the kernel). The versions default to the installed ones.
    """
    if plugin not in PLUGIN_CHOICES:
        raise ConfigError(f"plugin must be one of {', '.join(PLUGIN_CHOICES)}, got {plugin!r}")
    vqdeploy_version = package_version("vqdeploy") if vqdeploy_version is None else vqdeploy_version
    if plugin == "none":
        triton_version = ""
    elif triton_version is None:
        triton_version = package_version("triton")
    digest = hashlib.sha256(Path(onnx_path).read_bytes())
    for part in (tensorrt_version, gpu, plugin, repr(tuple(map(tuple, profile))), vqdeploy_version, triton_version):
        digest.update(b"\0" + str(part).encode())
    return digest.hexdigest()[:32]


def network_flag_names(tensorrt_version: str, plugin: str) -> list[str]:
    """Names of the NetworkDefinitionCreationFlag members a vqdeploy network is created with.

    STRONGLY_TYPED on TensorRT 10 (11 deprecates it: every network is strongly typed there);
    PREFER_AOT/PREFER_JIT_PYTHON_PLUGINS with the plugin, which TensorRT needs to pick an
    implementation once both are registered (from 10.9 on).
    """
    names = ["STRONGLY_TYPED"] if trt_plugin.parse_version(tensorrt_version) < (11, 0) else []
    if plugin == "aot":
        names.append("PREFER_AOT_PYTHON_PLUGINS")
    elif plugin == "jit":
        names.append("PREFER_JIT_PYTHON_PLUGINS")
    return names


def _network_flags(trt: Any, plugin: str) -> int:
    flags = 0
    for name in network_flag_names(trt.__version__, plugin):
        member = getattr(trt.NetworkDefinitionCreationFlag, name, None)  # absent before 10.9 (PREFER_*)
        if member is not None:
            flags |= 1 << int(member)
    return flags


def build_engine(
    onnx_path: str | os.PathLike, input_name: str, profile, prefer_aot: bool = False, log_level: str = "WARNING"
) -> tuple[bytes, str]:
    """(serialized engine, plugin implementation in it) for the file, NearestCode mapped to the plugin.

    prefer_aot picks the plugin's ahead-of-time (PTX) implementation where this TensorRT has it,
    so the engine runs without Python; otherwise the JIT implementation launches the Triton
    kernel. Without the plugin (no tensorrt.plugin or Triton) the parser falls back to the node's
    function body: still correct, tokens then at certified-tie parity.
    """
    trt = import_tensorrt()
    trt_plugin.register_nearest_code_plugin()
    plugin = trt_plugin.implementation_for(prefer_aot)
    logger = trt.Logger(getattr(trt.Logger, log_level))
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt, plugin))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT {trt.__version__} could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    # TF32 stays off in both precisions: in the projections or the fallback function body it changes
    # tokens; the plugin's own search is exact.
    tf32 = getattr(trt.BuilderFlag, "TF32", None)
    if tf32 is not None:
        config.clear_flag(tf32)
    optimization_profile = builder.create_optimization_profile()
    optimization_profile.set_shape(input_name, *profile)
    config.add_optimization_profile(optimization_profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"TensorRT {trt.__version__} failed to build an engine for {onnx_path} (see its log above)")
    return bytes(serialized), plugin


def gpu_identity(device: str) -> str:
    """The GPU an engine is built for: its name and compute capability."""
    index = check_device(device, cuda_only="TensorRT engines are built and")
    major, minor = torch.cuda.get_device_capability(index)
    return f"{torch.cuda.get_device_name(index)} (sm_{major}{minor})"


@dataclass(frozen=True)
class CachedEngine:
    """An engine file in the cache and what decided it."""

    path: Path
    key: str
    plugin: str  # "none", "jit" or "aot"
    profile: tuple
    built: bool  # False when it was already in the cache


class EngineCache:
    """Builds TensorRT engines for exports and keeps them on disk (``cache_dir``, default
    ``$VQDEPLOY_CACHE/engines`` or ``~/.cache/vqdeploy/engines``), one file per `engine_cache_key`."""

    def __init__(self, cache_dir: str | os.PathLike | None = None):
        self.directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()

    def get_or_build(
        self,
        path: str | os.PathLike,
        info: ExportInfo,
        *,
        device: str = "cuda",
        min_tokens: int = 1,
        opt_tokens: int | None = None,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        prefer_aot: bool = False,
    ) -> CachedEngine:
        """The cached engine for this export, profile and GPU, built first where it is missing.

        prefer_aot asks for the AOT kernel; where this TensorRT has none the engine gets the JIT
        one, and `CachedEngine.plugin` (part of the key) says which it holds.
        """
        trt = import_tensorrt()
        profile = profile_shapes(info, min_tokens, opt_tokens, max_tokens)
        gpu = gpu_identity(device)
        trt_plugin.register_nearest_code_plugin()  # decides the plugin part of the key
        plugin = trt_plugin.implementation_for(prefer_aot)
        key = engine_cache_key(path, trt.__version__, gpu, plugin, profile)
        engine_path = self.directory / f"{key}.engine"
        if engine_path.exists():
            return CachedEngine(engine_path, key, plugin, profile, built=False)
        with torch.cuda.device(torch.device(device)):
            blob, built_plugin = build_engine(path, info.inputs[0], profile, prefer_aot=prefer_aot)
        if built_plugin != plugin:  # registration cannot change between the two calls above
            raise EngineBuildError(f"engine for {path} was built with plugin {built_plugin!r}, keyed as {plugin!r}")
        atomic_write(engine_path, lambda tmp: tmp.write_bytes(blob), overwrite=True)
        return CachedEngine(engine_path, key, plugin, profile, built=True)


class TensorRTRunner:
    """Runs a cached (or freshly built, through `EngineCache`) engine on torch's current stream.

    The signature every runner shares, ``(path, info, *, device, precision, **options)``; options
    here: min_tokens, opt_tokens, max_tokens (the profile), cache_dir, prefer_aot.
    """

    name = "trt"
    materializes_scores = True

    def __init__(
        self,
        path: str | os.PathLike,
        info: ExportInfo,
        *,
        device: str = "cuda",
        precision: str = "exact",
        min_tokens: int = 1,
        opt_tokens: int | None = None,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        cache_dir: str | os.PathLike | None = None,
        prefer_aot: bool = False,
    ):
        if precision not in PRECISIONS:
            raise UnsupportedOptionError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        trt = import_tensorrt()
        engine = EngineCache(cache_dir).get_or_build(
            path, info, device=device, min_tokens=min_tokens, opt_tokens=opt_tokens, max_tokens=max_tokens,
            prefer_aot=prefer_aot,
        )
        self.device = device
        self.precision = precision  # both precisions run the same exact engine (module docstring)
        self.max_tokens = max_tokens
        self.engine_path = engine.path
        self.plugin = engine.plugin
        if engine.plugin != "none":  # deserialising needs the plugin creator too
            trt_plugin.register_nearest_code_plugin(required=True)
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self._runtime.deserialize_cuda_engine(engine.path.read_bytes())
        if self.engine is None:
            raise EngineRunError(f"TensorRT could not deserialize {engine.path}; delete the file to rebuild it")
        self.input_name = info.inputs[0]
        self.output_names = list(info.outputs)
        self.float_dtype = torch_dtype(self.engine.get_tensor_dtype(self.input_name))
        if not self.float_dtype.is_floating_point:  # decode: the float dtype is that of the vectors out
            self.float_dtype = torch_dtype(self.engine.get_tensor_dtype(self.output_names[0]))
        self._output_dtypes = [torch_dtype(self.engine.get_tensor_dtype(name)) for name in self.output_names]

    def infer(self, feed: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Run the engine on one feed (graph layout); outputs in the engine's own dtypes."""
        context = self.engine.create_execution_context()  # one per call: callers may use several threads
        value = feed[self.input_name].to(self.device).contiguous()
        context.set_input_shape(self.input_name, tuple(value.shape))
        context.set_tensor_address(self.input_name, value.data_ptr())
        outputs = []
        for name, dtype in zip(self.output_names, self._output_dtypes, strict=True):
            out = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtype, device=self.device)
            context.set_tensor_address(name, out.data_ptr())
            outputs.append(out)
        stream = torch.cuda.current_stream(torch.device(self.device))
        if not context.execute_async_v3(stream.cuda_stream):
            raise EngineRunError(f"TensorRT execute_async_v3 failed for {self.engine_path}")
        stream.synchronize()
        return outputs

    def close(self) -> None:
        """Release the engine (the file stays in the cache)."""
        self.engine = None
