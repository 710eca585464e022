"""The TensorRT backend: the parts beneath TensorRT run here; engine tests skip without it."""

from __future__ import annotations

import inspect

import pytest
import torch
from token_assertions import assert_tokens_certified

from vqdeploy import ResidualVQ, VectorQuantize, export_onnx, read_metadata, runtime
from vqdeploy.errors import (
    BackendNotAvailableError,
    ConfigError,
    EngineBuildError,
    EngineRunError,
    ExportError,
    PluginRegistrationError,
    VQDeployError,
)
from vqdeploy.runtime import tensorrt as trt_backend
from vqdeploy.runtime import trt_plugin
from vqdeploy.runtime.tensorrt import (
    EngineCache,
    TensorRTRunner,
    engine_cache_key,
    network_flag_names,
    profile_shapes,
    torch_dtype,
)

TENSORRT_REASON = trt_plugin.tensorrt_unavailable_reason()
PROFILE = ((1, 1, 16), (1, 2, 16), (1, 3, 16))


@pytest.fixture(scope="module")
def encode_path(tmp_path_factory):
    return export_onnx(VectorQuantize(dim=16, codebook_size=32).eval(), tmp_path_factory.mktemp("trt") / "e.onnx", part="encode")


def test_profile_shapes_follow_the_chunk_layout(tmp_path):
    cases = [
        (VectorQuantize(dim=16, codebook_size=32), "encode", [(1, 1, 16), (1, 64, 16), (1, 128, 16)]),
        (VectorQuantize(dim=16, codebook_size=32, accept_image_fmap=True), "encode", [(1, 16, 1, 1), (1, 16, 1, 64), (1, 16, 1, 128)]),
        (VectorQuantize(dim=16, codebook_size=32, channel_last=False), "quantize", [(1, 16, 1), (1, 16, 64), (1, 16, 128)]),
        (VectorQuantize(dim=16, codebook_size=32, heads=2, codebook_dim=8), "decode", [(1, 1, 2), (1, 64, 2), (1, 128, 2)]),
        (ResidualVQ(dim=16, num_quantizers=3, codebook_size=32), "decode", [(3, 1, 1), (3, 1, 64), (3, 1, 128)]),
    ]
    for i, (module, part, expected) in enumerate(cases):
        info = read_metadata(export_onnx(module.eval(), tmp_path / f"{i}.onnx", part=part))
        assert [list(s) for s in profile_shapes(info, 1, 64, 128)] == [list(s) for s in expected]
    with pytest.raises(ConfigError):
        profile_shapes(info, 10, 5, 128)


def test_engine_cache_key_changes_with_everything_that_decides_the_engine(encode_path, tmp_path):
    def key(**changes):
        args = {"tensorrt_version": "10.9", "gpu": "H100 (sm_90)", "plugin": "jit", "profile": PROFILE,
                "vqdeploy_version": "0.1.0", "triton_version": "3.9.0"} | changes
        return engine_cache_key(encode_path, **args)

    base = key()
    assert base == key()
    changes = [
        {"tensorrt_version": "10.10"},
        {"gpu": "H200 (sm_90)"},
        {"plugin": "aot"},  # the AOT PTX is embedded in the engine
        {"plugin": "none"},  # function body: no plugin registered
        {"profile": ((1, 1, 16), (1, 2, 16), (1, 4, 16))},
        {"vqdeploy_version": "0.2.0"},
        {"triton_version": "3.10.0"},
    ]
    keys = {base} | {key(**change) for change in changes}
    assert len(keys) == len(changes) + 1, "every change gives its own key"
    other = tmp_path / "other.onnx"
    other.write_bytes(encode_path.read_bytes() + b"\0")
    assert base != engine_cache_key(other, "10.9", "H100 (sm_90)", "jit", PROFILE, "0.1.0", "3.9.0")
    # Without the plugin no Triton code is in the engine: its version does not split the cache.
    assert key(plugin="none", triton_version="3.9.0") == key(plugin="none", triton_version="9.9")
    # Defaults: the installed versions.
    assert engine_cache_key(encode_path, "10.9", "H100 (sm_90)", "jit", PROFILE) == key(
        vqdeploy_version=trt_backend.package_version("vqdeploy"), triton_version=trt_backend.package_version("triton")
    )
    with pytest.raises(ConfigError, match="plugin"):
        key(plugin="fast")


def test_precision_does_not_decide_the_engine():
    """Both precisions run one exact engine, so precision is not part of the key or the build."""
    assert "precision" not in inspect.signature(engine_cache_key).parameters
    assert "precision" not in inspect.signature(trt_backend.build_engine).parameters
    assert "precision" not in inspect.signature(EngineCache.get_or_build).parameters


@pytest.mark.parametrize(
    ("name", "dtype"),
    [("FLOAT", torch.float32), ("HALF", torch.float16), ("BF16", torch.bfloat16), ("INT32", torch.int32),
     ("INT64", torch.int64), ("INT8", torch.int8), ("UINT8", torch.uint8), ("BOOL", torch.bool),
     ("FP8", torch.float8_e4m3fn)],
)
def test_engine_dtypes_map_to_torch(name: str, dtype: torch.dtype):
    """Each TensorRT type gets its own torch dtype (INT32, BF16, BOOL, UINT8 were read as float32)."""
    assert torch_dtype(name) is dtype


@pytest.mark.parametrize("name", ["INT4", "FP4", "E8M0", "DOUBLE"])
def test_engine_dtypes_without_a_torch_buffer_are_refused(name: str):
    with pytest.raises(EngineRunError, match=name):
        torch_dtype(name)


@pytest.mark.parametrize(
    ("version", "plugin", "names"),
    [
        ("10.8.0.43", "none", ["STRONGLY_TYPED"]),
        ("10.8.0.43", "jit", ["STRONGLY_TYPED", "PREFER_JIT_PYTHON_PLUGINS"]),  # absent in 10.8: getattr skips
        ("10.13.2.6", "jit", ["STRONGLY_TYPED", "PREFER_JIT_PYTHON_PLUGINS"]),
        ("10.13.2.6", "aot", ["STRONGLY_TYPED", "PREFER_AOT_PYTHON_PLUGINS"]),
        ("11.4.0.106", "aot", ["PREFER_AOT_PYTHON_PLUGINS"]),  # strongly typed always; the flag is deprecated
        ("11.4.0.106", "none", []),
    ],
)
def test_network_flag_names(version: str, plugin: str, names: list[str]):
    assert network_flag_names(version, plugin) == names


def test_error_classes_say_what_happened():
    for error in (EngineBuildError, EngineRunError, PluginRegistrationError):
        assert issubclass(error, VQDeployError) and issubclass(error, RuntimeError)
        assert not issubclass(error, ExportError), "a TensorRT failure is not an export failure"


def test_one_runner_signature():
    """(path, info, *, device, precision, **options) like the other runners: options keyword-only."""
    parameters = list(inspect.signature(TensorRTRunner).parameters.values())
    assert [p.name for p in parameters[:2]] == ["path", "info"]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in parameters[2:])
    assert [p.name for p in parameters[2:4]] == ["device", "precision"]


def test_auto_resolves_without_tensorrt():
    assert runtime.resolve_backend("auto", "cpu") == "ort"
    if not runtime.is_available("trt"):
        assert runtime.resolve_backend("auto", "cuda") == "ort"


@pytest.mark.skipif(TENSORRT_REASON is None, reason="TensorRT is importable here")
def test_builder_without_tensorrt_names_what_to_install(encode_path, tmp_path):
    info = read_metadata(encode_path)
    with pytest.raises(BackendNotAvailableError, match="pip install tensorrt"):
        EngineCache(tmp_path).get_or_build(encode_path, info)
    with pytest.raises(BackendNotAvailableError, match="pip install tensorrt"):
        TensorRTRunner(encode_path, info, device="cuda", cache_dir=tmp_path)
    assert not list(tmp_path.iterdir()), "nothing is written before TensorRT is found"


# -- with TensorRT and a GPU (skipped on this project's machines) -----------------------------------


def _search_rows(module: VectorQuantize, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows and codebook the search sees, for a single-head euclidean quantizer without projection."""
    return x.reshape(-1, module.dim), module.codebook.detach()


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.skipif(TENSORRT_REASON is not None, reason=f"needs TensorRT: {TENSORRT_REASON}")
@pytest.mark.parametrize("prefer_aot", [False, True])
def test_trt_engine_matches_eager(tmp_path, prefer_aot: bool):
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA device")
    module = VectorQuantize(dim=16, codebook_size=32).eval()
    path = export_onnx(module, tmp_path / "m.onnx", part="encode")
    x = torch.randn(2, 300, 16)
    cache = tmp_path / "cache"
    with runtime.load(path, backend="trt", device="cuda", cache_dir=cache, max_tokens=4096, prefer_aot=prefer_aot) as q:
        tokens = q.encode(x.cuda()).cpu()
    assert_tokens_certified(*_search_rows(module, x), tokens)
    engines = list(cache.glob("*.engine"))
    assert len(engines) == 1, "the engine is cached on disk"
    info = read_metadata(path)
    again = EngineCache(cache).get_or_build(path, info, max_tokens=4096, prefer_aot=prefer_aot)
    assert not again.built and again.path == engines[0], "the builder finds the runner's engine"


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.skipif(TENSORRT_REASON is not None, reason=f"needs TensorRT: {TENSORRT_REASON}")
def test_int32_indices_engine_writes_int32(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA device")
    module = VectorQuantize(dim=16, codebook_size=32).eval()
    path = export_onnx(module, tmp_path / "m32.onnx", part="encode", index_dtype="int32")
    runner = TensorRTRunner(path, read_metadata(path), device="cuda", cache_dir=tmp_path / "cache", max_tokens=1024)
    x = torch.randn(1, 700, 16)
    (tokens,) = runner.infer({"x": x.cuda()})
    assert tokens.dtype == torch.int32
    assert_tokens_certified(*_search_rows(module, x), tokens)


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.skipif(TENSORRT_REASON is not None, reason=f"needs TensorRT: {TENSORRT_REASON}")
def test_polygraphy_runs_the_engine_vqdeploy_builds(tmp_path):
    """Polygraphy's TensorRT runner over vqdeploy's engine (its own loader cannot set PREFER_*)."""
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA device")
    from vqdeploy.parity.polygraphy_adapter import compare_with_polygraphy

    module = VectorQuantize(dim=16, codebook_size=32).eval()
    path = export_onnx(module, tmp_path / "p.onnx", part="encode")
    passed, stages = compare_with_polygraphy(module, path, [torch.randn(2, 50, 16)], include_tensorrt=True)
    assert passed and sum(s.violations for s in stages) == 0
