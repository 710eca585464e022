"""The TensorRT plugin vqdeploy::NearestCode: everything beneath TensorRT runs here; the rest skips.

TensorRT cannot be installed on this project's machines, so the tests that need it skip with a
reason; the plugin's shape/type logic, its version tables, its registration contract with the
exported ONNX node and its behaviour without (or with a broken) TensorRT are tested on CPU.
Checks against TensorRT's own sources are in test_trt_sources.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from vqdeploy.errors import BackendNotAvailableError, ConfigError, InputDtypeError, InputShapeError
from vqdeploy.runtime import trt_plugin

TENSORRT_REASON = trt_plugin.tensorrt_unavailable_reason()
needs_tensorrt = pytest.mark.skipif(TENSORRT_REASON is not None, reason=f"needs TensorRT: {TENSORRT_REASON}")


def test_module_imports_without_tensorrt_and_exports_the_contract() -> None:
    assert trt_plugin.PLUGIN_ID == "vqdeploy::NearestCode"
    assert trt_plugin.PLUGIN_VERSION == "1"
    assert callable(trt_plugin.register_nearest_code_plugin)


def test_plugin_id_matches_the_exported_onnx_node() -> None:
    """The parser looks up the node's op type in the namespace of its plugin_namespace attribute."""
    from vqdeploy.export import functions

    assert trt_plugin.PLUGIN_NAME == functions.OP_TYPE
    assert trt_plugin.PLUGIN_NAMESPACE == functions.PLUGIN_NAMESPACE


@pytest.mark.parametrize(
    ("x_dtype", "codebook_dtype"),
    [("float32", "float32"), ("float16", "float16"), ("float16", "float32"), ("float32", "float16")],
)
def test_check_io_accepts_supported_inputs(x_dtype: str, codebook_dtype: str) -> None:
    trt_plugin.check_io(2, 2, x_dtype, codebook_dtype)


def test_check_io_rejects_bad_ranks_and_dtypes() -> None:
    with pytest.raises(InputShapeError, match="x must have rank 2"):
        trt_plugin.check_io(3, 2, "float32", "float32")
    with pytest.raises(InputShapeError, match="codebook must have rank 2"):
        trt_plugin.check_io(2, 1, "float32", "float32")
    with pytest.raises(InputDtypeError, match="bfloat16"):
        trt_plugin.check_io(2, 2, "bfloat16", "float32")
    with pytest.raises(InputDtypeError, match="int32"):
        trt_plugin.check_io(2, 2, "float32", "int32")


def test_check_runtime_shapes() -> None:
    trt_plugin.check_runtime_shapes((10, 64), (512, 64))
    trt_plugin.check_runtime_shapes((0, 64), (512, 64))
    with pytest.raises(InputShapeError, match="64 features"):
        trt_plugin.check_runtime_shapes((10, 64), (512, 32))
    with pytest.raises(InputShapeError, match="no codes"):
        trt_plugin.check_runtime_shapes((10, 64), (0, 64))


def test_autotune_types_cover_every_accepted_input_and_int64_output() -> None:
    combos = trt_plugin.supported_type_combinations()
    assert sorted(combos) == sorted(
        (x, c, "int64") for x in trt_plugin.INPUT_DTYPES for c in trt_plugin.INPUT_DTYPES
    )
    for x_dtype, codebook_dtype, out in combos:
        trt_plugin.check_io(2, 2, x_dtype, codebook_dtype)
        assert out == trt_plugin.OUTPUT_DTYPE


def test_type_combination_grammar_as_tensorrt_reads_it() -> None:
    """'|' ties columns row by row, '*' multiplies; different columns may mix the two (as in
    TensorRT's own docstring example "FP32*FP16,FP32|FP16,FP32|FP16"); one column may not."""
    grammar = trt_plugin.supported_type_combinations
    assert grammar("FP32|FP16, FP32|FP16, INT64") == [
        ("float32", "float32", "int64"),
        ("float16", "float16", "int64"),
    ]
    assert grammar("FP32*FP16, FP32|FP16, FP32|FP16") == [
        ("float32", "float32", "float32"),
        ("float32", "float16", "float16"),
        ("float16", "float32", "float32"),
        ("float16", "float16", "float16"),
    ]
    assert grammar("FP32*FP16, FP32*FP16, INT64") == [
        ("float32", "float32", "int64"),
        ("float16", "float32", "int64"),
        ("float32", "float16", "int64"),
        ("float16", "float16", "int64"),
    ]
    with pytest.raises(ConfigError, match="mixes"):
        grammar("FP32|FP16*BF16, FP32, INT64")
    with pytest.raises(ConfigError, match="different numbers"):
        grammar("FP32|FP16, FP32|FP16|BF16, INT64")
    with pytest.raises(ValueError, match="unknown type"):
        grammar("FP32, FLOAT64, INT64")


@pytest.mark.parametrize(
    ("version", "plugins", "aot"),
    [
        ("9.3.0", False, False),
        ("10.6.0", False, False),
        ("10.7.0", True, False),
        ("10.8.0.43", True, False),
        ("10.9.0.34", True, True),
        ("10.13.2.6", True, True),
        ("11.0", True, True),
        ("11.4.0.106", True, True),
    ],
)
def test_version_table(version: str, plugins: bool, aot: bool) -> None:
    """Python plugins from 10.7 (enforced), AOT from 10.9 (the 10.8 bindings lack aot_impl)."""
    assert trt_plugin.supports_plugins(version) is plugins
    assert trt_plugin.supports_aot(version) is aot


@pytest.mark.parametrize(
    ("prefer_aot", "implementations", "expected"),
    [
        (False, (), "none"),
        (True, (), "none"),
        (False, ("jit",), "jit"),
        (True, ("jit",), "jit"),
        (False, ("jit", "aot"), "jit"),
        (True, ("jit", "aot"), "aot"),
    ],
)
def test_implementation_for(prefer_aot: bool, implementations: tuple[str, ...], expected: str) -> None:
    assert trt_plugin.implementation_for(prefer_aot, implementations) == expected


@pytest.mark.skipif(TENSORRT_REASON is None, reason="TensorRT is importable here")
def test_without_tensorrt_registration_reports_false_or_raises_with_advice() -> None:
    reason = trt_plugin.plugin_unavailable_reason()
    assert reason is not None and "pip install tensorrt" in reason
    assert trt_plugin.register_nearest_code_plugin() is False
    assert trt_plugin.registered_implementations() == ()
    with pytest.raises(BackendNotAvailableError, match="pip install tensorrt"):
        trt_plugin.register_nearest_code_plugin(required=True)
    with pytest.raises(ImportError):  # BackendNotAvailableError is an ImportError too
        trt_plugin.register_nearest_code_plugin(required=True)


BROKEN_TENSORRT = """raise OSError("libnvinfer.so.10: cannot open shared object file: No such file or directory")\n"""


def test_a_broken_tensorrt_install_is_skipped_not_raised(tmp_path) -> None:
    """A tensorrt package that find_spec sees but that cannot load (a stub wheel, no libnvinfer):
    detection reports it, registration returns False, `auto` picks ONNX Runtime, `trt` names why."""
    package = tmp_path / "site" / "tensorrt"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(BROKEN_TENSORRT)
    script = textwrap.dedent(
        """
        import importlib.util
        from vqdeploy import runtime
        from vqdeploy.errors import BackendNotAvailableError
        from vqdeploy.runtime import tensorrt, trt_plugin

        assert importlib.util.find_spec("tensorrt") is not None  # what find_spec-only detection saw
        reason = trt_plugin.tensorrt_unavailable_reason()
        assert reason is not None and "OSError" in reason and "libnvinfer" in reason, reason
        assert trt_plugin.register_nearest_code_plugin() is False
        assert not runtime.is_available("trt")
        assert runtime.resolve_backend("auto", "cuda") == "ort"
        try:
            tensorrt.import_tensorrt()
        except BackendNotAvailableError as error:
            assert "libnvinfer" in str(error)
        else:
            raise SystemExit("import_tensorrt accepted a broken install")
        print("ok")
        """
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


# -- with TensorRT (skipped on this project's machines) ------------------------------------------


@pytest.mark.tensorrt
@needs_tensorrt
def test_registration_with_tensorrt() -> None:
    import tensorrt as trt

    if trt_plugin.plugin_unavailable_reason() is not None:
        pytest.skip(trt_plugin.plugin_unavailable_reason())
    import tensorrt.plugin as trtp

    assert trt_plugin.register_nearest_code_plugin(required=True) is True
    assert trt_plugin.register_nearest_code_plugin() is True  # idempotent
    creator = trt.get_plugin_registry().get_creator(
        trt_plugin.PLUGIN_NAME, trt_plugin.PLUGIN_VERSION, trt_plugin.PLUGIN_NAMESPACE
    )
    assert creator is not None
    with_aot = trt_plugin.aot_unavailable_reason(trt, trtp) is None
    assert trt_plugin.registered_implementations() == (("jit", "aot") if with_aot else ("jit",))
    assert with_aot == (trt_plugin.supports_aot(trt.__version__) and hasattr(trtp, "KernelLaunchParams"))


@pytest.mark.tensorrt
@needs_tensorrt
def test_registration_retries_after_a_half_failed_one() -> None:
    """A definition left behind by an earlier attempt (register done, impl never attached) must
    not make the next attempt fail with "already has a definition"."""
    if trt_plugin.plugin_unavailable_reason() is not None:
        pytest.skip(trt_plugin.plugin_unavailable_reason())
    script = textwrap.dedent(
        """
        import tensorrt as trt
        import tensorrt.plugin as trtp
        from vqdeploy.runtime import trt_plugin

        @trtp.register(trt_plugin.PLUGIN_ID)  # what a failed attempt leaves: a definition, no impl
        def desc(x: trtp.TensorDesc, codebook: trtp.TensorDesc) -> trtp.TensorDesc:
            return trtp.from_shape_expr((x.shape_expr[0],), dtype=trt.int64)

        assert trt_plugin.register_nearest_code_plugin(required=True)
        assert trtp.op.vqdeploy.NearestCode.impl_func is not None
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


@pytest.mark.tensorrt
@pytest.mark.gpu
@needs_tensorrt
@pytest.mark.parametrize("prefer_aot", [False, True])
def test_engine_with_the_plugin_matches_float64(prefer_aot: bool) -> None:
    import tensorrt as trt
    import torch
    from token_assertions import assert_tokens_certified

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    trt_plugin.register_nearest_code_plugin(required=True)
    if prefer_aot and "aot" not in trt_plugin.registered_implementations():
        pytest.skip(f"TensorRT {trt.__version__} has no AOT Python plugins (needs >= 10.9)")
    import tensorrt.plugin as trtp

    rows, codes, dim = 4096, 300, 37
    x = torch.randn(rows, dim, device="cuda")
    codebook = torch.randn(codes, dim, device="cuda")

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(trt_plugin.python_plugin_network_flags(trt, prefer_aot))
    x_in = network.add_input("x", trt.float32, (rows, dim))
    c_in = network.add_input("codebook", trt.float32, (codes, dim))
    layer = network.add_plugin(trtp.op.vqdeploy.NearestCode(x_in, c_in), aot=prefer_aot)
    layer.get_output(0).name = "indices"
    network.mark_output(layer.get_output(0))
    config = builder.create_builder_config()
    engine = trt.Runtime(logger).deserialize_cuda_engine(builder.build_serialized_network(network, config))
    context = engine.create_execution_context()
    out = torch.empty(rows, dtype=torch.int64, device="cuda")
    for name, tensor in (("x", x), ("codebook", codebook), ("indices", out)):
        context.set_tensor_address(name, tensor.data_ptr())
    stream = torch.cuda.Stream()
    assert context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    assert_tokens_certified(x, codebook, out)
