"""What the exported file holds: the fused NearestCode node and its function, the unfused graph,
ir_version, the ONNX checker (also where vqdeploy is not imported), shape inference, dim names."""

from __future__ import annotations

import inspect
import json
import re
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
from export_cases import CONFIGS, DIM, NUM_QUANTIZERS, make_input
from onnx import TensorProto, defs

from vqdeploy.export import functions
from vqdeploy.export.onnx import IR_VERSION, name_dynamic_dims

# Searches per export: heads with separate codebooks search each head's codebook, residual stages one each.
GRAPH_CASES = {"heads_separate": 4, "residual_projection": NUM_QUANTIZERS, "cosine": 1}
UNFUSED_CASES = ["heads_separate", "residual_projection"]  # an unfused export costs a second more each


def _all_nodes(model: onnx.ModelProto):
    yield from model.graph.node
    for function in model.functions:
        yield from function.node


def _standard_opset(model_or_function) -> int:
    return next(o.version for o in model_or_function.opset_import if o.domain in ("", "ai.onnx"))


@pytest.mark.parametrize("name", list(GRAPH_CASES))
def test_fused_graph_holds_nearest_code_nodes_and_their_function(exports, name):
    model = onnx.load(str(exports(name, "quantize").path))

    nodes = functions.nearest_code_nodes(model)
    assert len(nodes) == GRAPH_CASES[name]
    for node in nodes:
        assert node.domain == "vqdeploy" and node.op_type == "NearestCode"
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attributes == {"plugin_namespace": b"vqdeploy"}
        assert len(node.input) == 2 and len(node.output) == 1

    assert len(model.functions) == 1
    function = model.functions[0]
    assert (function.domain, function.name) == ("vqdeploy", "NearestCode")
    assert list(function.input) == ["x", "codebook"] and list(function.output) == ["indices"]
    assert {n.domain for n in function.node} == {""}, "the body must use standard ops only"
    assert all(defs.has(n.op_type) for n in function.node)
    assert {n.op_type for n in function.node} >= {"MatMul", "ArgMin", "ReduceSum"}
    argmin = next(n for n in function.node if n.op_type == "ArgMin")
    assert {a.name: a.i for a in argmin.attribute} == {"axis": 1, "keepdims": 0, "select_last_index": 0}
    assert [(o.domain, o.version) for o in function.opset_import] == [("", _standard_opset(model))]
    assert any(o.domain == "vqdeploy" for o in model.opset_import)


@pytest.mark.parametrize("name", UNFUSED_CASES)
def test_unfused_graph_has_no_vqdeploy_domain_and_gives_identical_indices(exports, digits, name):
    fused, unfused = exports(name, "quantize"), exports(name, "quantize", fused=False)
    model = onnx.load(str(unfused.path))

    assert not model.functions
    assert not any(n.domain == "vqdeploy" for n in _all_nodes(model))
    assert not any(o.domain == "vqdeploy" for o in model.opset_import)
    assert "ArgMin" in {n.op_type for n in model.graph.node}

    sizes = (7, 1, 1) if fused.config.is_image else (3, 599)
    for data in ("digits", "random"):
        x = make_input(fused.config, data, sizes, digits).numpy()
        fused_vectors, fused_indices = fused.run(x)
        unfused_vectors, unfused_indices = unfused.run(x)
        np.testing.assert_array_equal(unfused_indices, fused_indices)
        np.testing.assert_array_equal(unfused_vectors, fused_vectors)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("name", UNFUSED_CASES)
def test_file_is_ir10_and_passes_the_full_checker(exports, name, fused):
    model = onnx.load(str(exports(name, "quantize", fused=fused).path))
    assert model.ir_version == IR_VERSION == 10
    onnx.checker.check_model(model, full_check=True)


def _strip_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy without value_info and with unknown output shapes: shape inference must find them itself."""
    stripped = onnx.ModelProto()
    stripped.CopyFrom(model)
    del stripped.graph.value_info[:]
    for output in stripped.graph.output:
        output.type.tensor_type.ClearField("shape")
    return stripped


def _output_dims(model: onnx.ModelProto) -> dict[str, list[int | str]]:
    return {o.name: _dims(o) for o in model.graph.output}


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim]


_FRESH_CHECK = "\n".join(
    [
        "import json, sys",
        "import onnx",
        *(inspect.getsource(helper) for helper in (_strip_shapes, _output_dims, _dims)),
        textwrap.dedent(
            """
            model = onnx.load(sys.argv[1])
            onnx.checker.check_model(model, full_check=True)
            as_written = onnx.shape_inference.infer_shapes(model, strict_mode=True)
            rederived = onnx.shape_inference.infer_shapes(_strip_shapes(model), strict_mode=True, data_prop=True)
            print(json.dumps({
                "vqdeploy_imported": any(m.startswith("vqdeploy") for m in sys.modules),
                "schema_registered": onnx.defs.has("NearestCode", "vqdeploy"),
                "as_written": _output_dims(as_written),
                "rederived": _output_dims(rederived),
            }))
            """
        ),
    ]
)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_checker_and_shape_inference_pass_in_a_fresh_process_without_vqdeploy(exports, fused):
    """Without the in-process schema, the checker and inference rely on the model-local function alone."""
    path = exports("heads_separate", "quantize", fused=fused).path
    result = subprocess.run(
        [sys.executable, "-c", _FRESH_CHECK, str(path)], capture_output=True, text=True, timeout=120, cwd=path.parent
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["vqdeploy_imported"] is False and report["schema_registered"] is False
    assert report["as_written"] == {"vectors": ["batch", "seq", DIM], "indices": ["batch", "seq", 4]}
    for outputs in (report["as_written"], report["rederived"]):
        assert outputs["vectors"][-1] == DIM
        assert outputs["indices"][-1] == 4


@pytest.mark.parametrize(
    "name, fused",
    [(name, True) for name in GRAPH_CASES] + [(name, False) for name in UNFUSED_CASES],
    ids=[f"{name}-fused" for name in GRAPH_CASES] + [f"{name}-unfused" for name in UNFUSED_CASES],
)
def test_strict_shape_inference_gives_concrete_feature_dims(exports, name, fused):
    exported = exports(name, "quantize", fused=fused)
    written = onnx.load(str(exported.path))
    as_written = onnx.shape_inference.infer_shapes(written, strict_mode=True)
    assert _output_dims(as_written) == _output_dims(written)

    # Re-derived from nothing but the input shapes (in this process the NearestCode schema is registered,
    # so its inference function types the node's output; reshape targets need data propagation).
    model = _strip_shapes(written)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    outputs = {o.name: o.type.tensor_type for o in inferred.graph.output}

    vectors = outputs["vectors"]
    assert vectors.elem_type == TensorProto.FLOAT
    channel_axis = 1 if exported.config.is_image or not exported.config.channel_last else -1
    assert vectors.shape.dim[channel_axis].HasField("dim_value"), vectors.shape
    assert vectors.shape.dim[channel_axis].dim_value == DIM
    assert outputs["indices"].elem_type == TensorProto.INT64
    if exported.config.is_residual:
        assert outputs["indices"].shape.dim[0].dim_value == NUM_QUANTIZERS
    if exported.config.heads > 1:
        assert outputs["indices"].shape.dim[-1].dim_value == exported.config.heads
    if fused:  # the NearestCode outputs are typed too, through the function body
        searched = {n.output[0] for n in functions.nearest_code_nodes(model)}
        typed = {v.name: v.type.tensor_type for v in inferred.graph.value_info if v.name in searched}
        assert set(typed) == searched
        assert all(t.elem_type == TensorProto.INT64 and len(t.shape.dim) == 1 for t in typed.values())


# -- dynamic dim names ----------------------------------------------------------------------------

EXPECTED_DIMS = {
    # (config, part): {value name: dims}
    ("plain", "quantize"): {"x": ["batch", "seq", DIM], "vectors": ["batch", "seq", DIM], "indices": ["batch", "seq"]},
    ("plain", "decode"): {"indices": ["batch", "seq"], "vectors": ["batch", "seq", DIM]},
    ("heads_shared", "encode"): {"x": ["batch", "seq", DIM], "indices": ["batch", "seq", 4]},
    ("heads_separate", "decode"): {"indices": ["batch", "seq", 4], "vectors": ["batch", "seq", DIM]},
    ("image", "quantize"): {
        "x": ["batch", DIM, "height", "width"],
        "vectors": ["batch", DIM, "height", "width"],
        "indices": ["batch", "height", "width"],
    },
    ("image", "decode"): {"indices": ["batch", "height", "width"], "vectors": ["batch", DIM, "height", "width"]},
    ("channel_first", "quantize"): {"x": ["batch", DIM, "seq"], "vectors": ["batch", DIM, "seq"], "indices": ["batch", "seq"]},
    ("channel_first", "decode"): {"indices": ["batch", "seq"], "vectors": ["batch", DIM, "seq"]},
    ("residual", "quantize"): {
        "x": ["batch", "seq", DIM],
        "vectors": ["batch", "seq", DIM],
        "indices": [NUM_QUANTIZERS, "batch", "seq"],
    },
    ("residual_projection", "decode"): {"indices": [NUM_QUANTIZERS, "batch", "seq"], "vectors": ["batch", "seq", DIM]},
}


@pytest.mark.parametrize("case", list(EXPECTED_DIMS), ids=["-".join(c) for c in EXPECTED_DIMS])
def test_dynamic_dims_have_meaningful_names(exports, case):
    model = onnx.load(str(exports(*case).path))
    actual = {v.name: _dims(v) for v in (*model.graph.input, *model.graph.output)}
    assert actual == EXPECTED_DIMS[case]


_NAMES = {"batch", "seq", "height", "width"}


@pytest.mark.parametrize("part", ["encode", "decode", "quantize"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_no_exporter_symbol_is_left_anywhere(exports, name, part):
    """Inputs, outputs and value_info (expressions like "batch*seq" included) use only the axis names."""
    model = onnx.load(str(exports(name, part).path))
    assert model.ir_version == IR_VERSION
    values = (*model.graph.input, *model.graph.output, *model.graph.value_info)
    params = {d.dim_param for v in values for d in v.type.tensor_type.shape.dim if d.dim_param}
    symbols = {s for p in params for s in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", p)}
    assert symbols <= _NAMES, params
    assert symbols, "expected dynamic axes"


def test_the_same_axis_keeps_one_name_through_the_graph(exports):
    """A value_info shaped by batch * seq rows is written with the same names as the input."""
    model = onnx.load(str(exports("heads_separate", "quantize").path))
    params = {d.dim_param for v in model.graph.value_info for d in v.type.tensor_type.shape.dim if d.dim_param}
    assert any("batch" in p and "seq" in p for p in params), params


def test_name_dynamic_dims_renames_whole_symbols_only():
    from onnx import helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["s27", "s7", 4, "2*s9"])
    y = helper.make_tensor_value_info("y", TensorProto.INT64, ["s7", "s27"])
    inner = helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["s27*s7", "s277", "s7 + 1"])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y], value_info=[inner])
    model = name_dynamic_dims(helper.make_model(graph), {0: "batch", 1: "seq", 3: "width", 9: "absent"})

    assert _dims(model.graph.input[0]) == ["batch", "seq", 4, "2*s9"]  # an expression on an axis is left alone
    assert _dims(model.graph.output[0]) == ["seq", "batch"]
    assert _dims(model.graph.value_info[0]) == ["batch*seq", "s277", "seq + 1"]  # s277 is another symbol
