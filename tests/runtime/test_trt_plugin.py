"""The TensorRT plugin vqdeploy::NearestCode: everything beneath TensorRT runs here; the rest skips.

TensorRT cannot be installed on this project's machines (see shared/device/README.md), so the
tests that need it skip with a reason; the plugin's shape/type logic, its registration contract
with the exported ONNX node and its behaviour without TensorRT are tested on CPU.
"""

from __future__ import annotations

import importlib.util

import pytest

from vqdeploy.errors import BackendNotAvailableError, InputDtypeError, InputShapeError
from vqdeploy.runtime import trt_plugin

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def test_module_imports_without_tensorrt_and_exports_the_contract() -> None:
    assert trt_plugin.PLUGIN_ID == "vqdeploy::NearestCode"
    assert trt_plugin.PLUGIN_VERSION == "1"
    assert callable(trt_plugin.register_nearest_code_plugin)


def test_plugin_id_matches_the_exported_onnx_node() -> None:
    """The parser looks up the node's op type in the namespace of its plugin_namespace attribute."""
    functions = pytest.importorskip("vqdeploy.export.functions", reason="the ONNX export module is absent")
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


def test_type_combination_grammar() -> None:
    assert trt_plugin.supported_type_combinations("FP32|FP16, FP32|FP16, INT64") == [
        ("float32", "float32", "int64"),
        ("float16", "float16", "int64"),
    ]
    with pytest.raises(ValueError, match="either"):
        trt_plugin.supported_type_combinations("FP32|FP16, FP32*FP16, INT64")
    with pytest.raises(ValueError, match="lengths"):
        trt_plugin.supported_type_combinations("FP32|FP16, FP32|FP16|BF16, INT64")


@pytest.mark.parametrize(
    ("version", "aot"),
    [
        ("10.7.0", False),
        ("10.9.0.34", False),
        ("10.10.0.31", True),
        ("10.13.2.6", True),
        ("11.0", True),
        ("9", False),
    ],
)
def test_aot_needs_tensorrt_10_10(version: str, aot: bool) -> None:
    assert trt_plugin.supports_aot(version) is aot


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
def test_without_tensorrt_registration_reports_false_or_raises_with_advice() -> None:
    reason = trt_plugin.plugin_unavailable_reason()
    assert reason is not None and "pip install tensorrt" in reason
    assert trt_plugin.register_nearest_code_plugin() is False
    with pytest.raises(BackendNotAvailableError, match="pip install tensorrt"):
        trt_plugin.register_nearest_code_plugin(required=True)
    with pytest.raises(ImportError):  # BackendNotAvailableError is an ImportError too
        trt_plugin.register_nearest_code_plugin(required=True)


# -- with TensorRT (skipped on this project's machines) ------------------------------------------


@pytest.mark.tensorrt
def test_registration_with_tensorrt() -> None:
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed (pip install tensorrt)")
    pytest.importorskip("tensorrt.plugin", reason="this TensorRT has no tensorrt.plugin (needs >= 10.7)")
    pytest.importorskip("triton", reason="the plugin's kernel needs Triton")
    assert trt_plugin.register_nearest_code_plugin(required=True) is True
    assert trt_plugin.register_nearest_code_plugin() is True  # idempotent
    creator = trt.get_plugin_registry().get_creator(
        trt_plugin.PLUGIN_NAME, trt_plugin.PLUGIN_VERSION, trt_plugin.PLUGIN_NAMESPACE
    )
    assert creator is not None
    import tensorrt.plugin as trtp

    assert hasattr(trtp, "aot_impl") == trt_plugin.supports_aot(trt.__version__)


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.parametrize("prefer_aot", [False, True])
def test_engine_with_the_plugin_matches_float64(prefer_aot: bool) -> None:
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed (pip install tensorrt)")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    import tensorrt.plugin as trtp

    if prefer_aot and not hasattr(trtp, "aot_impl"):
        pytest.skip(f"TensorRT {trt.__version__} has no AOT Python plugins (needs >= 10.10)")
    from vqdeploy.ops.nearest_code import nearest_code_reference, squared_distances64, tie_tolerance

    trt_plugin.register_nearest_code_plugin(required=True)
    rows, codes, dim = 4096, 300, 37
    x = torch.randn(rows, dim, device="cuda")
    codebook = torch.randn(codes, dim, device="cuda")

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = trt_plugin.python_plugin_network_flags(trt, prefer_aot)
    network = builder.create_network(flags)
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

    ref = nearest_code_reference(x, codebook)
    differ = out != ref
    if differ.any():
        gap = squared_distances64(x[differ], codebook, out[differ]) - squared_distances64(
            x[differ], codebook, ref[differ]
        )
        assert bool((gap <= tie_tolerance(x[differ], codebook, ref[differ], out[differ])).all())
