"""TensorRT backend, written against the TensorRT 10.x / 11.x Python API.

TensorRT cannot be installed on the machines this project is tested on, so this layer is kept
thin: parse the ONNX file with the NearestCode plugin registered, build a strongly typed engine
(TF32 cleared) with one optimization profile, cache it on disk, and run it on
torch's CUDA stream. The cache key and the profile are plain functions, tested without TensorRT.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from vqdeploy.errors import BackendNotAvailableError, DeviceNotAvailableError, ExportError
from vqdeploy.export.metadata import ExportInfo
from vqdeploy.files import atomic_write
from vqdeploy.runtime.base import chunk_shape

DEFAULT_MAX_TOKENS = 262144


def import_tensorrt():
    try:
        import tensorrt
    except ImportError as error:
        raise BackendNotAvailableError(
            "the 'trt' backend needs TensorRT 10 or later: pip install tensorrt (NVIDIA's index), and a CUDA GPU"
        ) from error
    return tensorrt


def default_cache_dir() -> Path:
    root = os.environ.get("VQDEPLOY_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vqdeploy")
    return Path(root) / "engines"


def profile_shapes(info: ExportInfo, min_tokens: int = 1, opt_tokens: int | None = None, max_tokens: int = DEFAULT_MAX_TOKENS):
    """(min, opt, max) input shapes of the one optimization profile, in tokens per chunk."""
    opt_tokens = opt_tokens if opt_tokens is not None else max_tokens
    if not 1 <= min_tokens <= opt_tokens <= max_tokens:
        raise ValueError(f"need 1 <= min_tokens <= opt_tokens <= max_tokens, got {min_tokens}, {opt_tokens}, {max_tokens}")
    return tuple(chunk_shape(info, tokens) for tokens in (min_tokens, opt_tokens, max_tokens))


def engine_cache_key(onnx_path: str | os.PathLike, trt_version: str, gpu_name: str, precision: str, profile) -> str:
    """sha256 over the ONNX bytes, TensorRT version, GPU name, precision and profile."""
    digest = hashlib.sha256(Path(onnx_path).read_bytes())
    for part in (trt_version, gpu_name, precision, repr(profile)):
        digest.update(b"\0" + part.encode())
    return digest.hexdigest()[:32]


def build_engine(
    onnx_path: str | os.PathLike, info: ExportInfo, precision: str, profile, log_level: str = "WARNING", prefer_aot: bool = False
) -> bytes:
    """Serialized engine for the file, NearestCode mapped to the vqdeploy plugin.

    prefer_aot picks the plugin's ahead-of-time (PTX) implementation, so the engine runs without
    Python; the default JIT implementation launches the Triton kernel (exact or fast modes).
    """
    trt = import_tensorrt()
    from vqdeploy.runtime.trt_plugin import python_plugin_network_flags, register_nearest_code_plugin

    # Without the plugin the parser falls back to the NearestCode function body: still correct.
    has_plugin = register_nearest_code_plugin()
    logger = trt.Logger(getattr(trt.Logger, log_level))
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    if has_plugin:
        flags |= python_plugin_network_flags(trt, prefer_aot=prefer_aot)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    # TF32 stays off in both precisions: in the projections or the fallback function body it changes
    # tokens (DESIGN.md section 4); the plugin's own search is exact.
    config.clear_flag(trt.BuilderFlag.TF32)
    optimization_profile = builder.create_optimization_profile()
    optimization_profile.set_shape(info.inputs[0], *profile)
    config.add_optimization_profile(optimization_profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build an engine for {onnx_path}")
    return bytes(serialized)


class TensorRTRunner:
    """Runs a cached (or freshly built) engine with execute_async_v3 on torch's current stream."""

    name = "trt"
    materializes_scores = True

    def __init__(
        self,
        path: str | os.PathLike,
        info: ExportInfo,
        device: str = "cuda",
        precision: str = "exact",
        min_tokens: int = 1,
        opt_tokens: int | None = None,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        cache_dir: str | os.PathLike | None = None,
        prefer_aot: bool = False,
    ):
        trt = import_tensorrt()
        if not device.startswith("cuda") or not torch.cuda.is_available():
            raise DeviceNotAvailableError(f"the 'trt' backend runs on a CUDA device; got device={device!r}")
        self.device = device
        self.max_tokens = max_tokens
        profile = profile_shapes(info, min_tokens, opt_tokens, max_tokens)
        variant = f"{precision}{'-aot' if prefer_aot else ''}"
        key = engine_cache_key(path, trt.__version__, torch.cuda.get_device_name(torch.device(device)), variant, profile)
        engine_path = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        engine_path = engine_path / f"{key}.engine"
        if not engine_path.exists():
            blob = build_engine(path, info, precision, profile, prefer_aot=prefer_aot)
            atomic_write(engine_path, lambda tmp: tmp.write_bytes(blob), overwrite=True)
        self.engine_path = engine_path
        from vqdeploy.runtime.trt_plugin import register_nearest_code_plugin

        register_nearest_code_plugin()  # deserialising needs the plugin creator too
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self._runtime.deserialize_cuda_engine(engine_path.read_bytes())
        self.input_name = info.inputs[0]
        self.output_names = list(info.outputs)
        self.float_dtype = torch.float16 if self.engine.get_tensor_dtype(self.input_name) == trt.DataType.HALF else torch.float32
        self._trt = trt

    def infer(self, feed: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        trt = self._trt
        context = self.engine.create_execution_context()  # one per call: callers may use several threads
        value = feed[self.input_name].to(self.device).contiguous()
        context.set_input_shape(self.input_name, tuple(value.shape))
        context.set_tensor_address(self.input_name, value.data_ptr())
        outputs = []
        for name in self.output_names:
            dtype = {trt.DataType.INT64: torch.int64, trt.DataType.HALF: torch.float16}.get(
                self.engine.get_tensor_dtype(name), torch.float32
            )
            out = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtype, device=self.device)
            context.set_tensor_address(name, out.data_ptr())
            outputs.append(out)
        stream = torch.cuda.current_stream(torch.device(self.device))
        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        stream.synchronize()
        return outputs

    def close(self) -> None:
        self.engine = None
