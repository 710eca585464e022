"""The ONNX face of the NearestCode op: the node, its schema, and its model-local function.

A fused export holds one node ``vqdeploy::NearestCode(x[M, D], codebook[K, D]) -> int64[M]``
with the string attribute ``plugin_namespace="vqdeploy"`` per search. The model carries a
model-local FunctionProto of the same name and domain whose body uses standard ops only:

    scores  = ReduceSum(c * c, axis 1) - 2 * MatMul(x, c^T)      (float32, as every vqdeploy path)
    indices = ArgMin(scores, axis=1, keepdims=0, select_last_index=0)   (ties -> lowest index)

so ONNX Runtime inlines it and runs anywhere, and TensorRT's ONNX parser maps the node to the
registered plugin (falling back to the body where none is registered). An unfused export is the
same graph with this function inlined: one body, written once, here.
"""

from __future__ import annotations

import math

import onnx
from onnx import TensorProto, defs, helper

from vqdeploy.ops.contract import OVERFLOW_SCALE, UNDERFLOW_UNIT

DOMAIN = "vqdeploy"
OP_TYPE = "NearestCode"
PLUGIN_NAMESPACE = "vqdeploy"
FUNCTION_VERSION = 1
MIN_OPSET = 18
_FLOAT_TYPES = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]


def _infer_nearest_code(ctx) -> None:
    """Type and shape of NearestCode's output: int64[M], M the first axis of x.

    A registered schema takes precedence over the model-local function in ONNX shape inference,
    so without this the output would be untyped in any process that imported vqdeploy.
    """
    rows = None
    x_type = ctx.get_input_type(0)
    if x_type is not None and x_type.tensor_type.HasField("shape") and len(x_type.tensor_type.shape.dim) >= 1:
        rows = x_type.tensor_type.shape.dim[0]
    output = helper.make_tensor_type_proto(TensorProto.INT64, shape=None)
    dim = output.tensor_type.shape.dim.add()
    if rows is not None:
        dim.CopyFrom(rows)
    ctx.set_output_type(0, output)


def register_schema() -> None:
    """Register the NearestCode schema in this process, so the exporter and checker know its signature."""
    if defs.has(OP_TYPE, DOMAIN):
        return
    schema = defs.OpSchema(
        OP_TYPE,
        DOMAIN,
        FUNCTION_VERSION,
        doc="Index of the nearest code (squared L2, ties to the lowest index) for every row of x.",
        inputs=[
            defs.OpSchema.FormalParameter("x", "T1", "rows to quantize, [M, D]"),
            defs.OpSchema.FormalParameter("codebook", "T2", "codes, [K, D]"),
        ],
        outputs=[defs.OpSchema.FormalParameter("indices", "tensor(int64)", "[M]")],
        # Two type variables: a float16 module searches float32 rows (widened before the op, as in
        # eager) against its float16 codebook; the body casts both to float32.
        type_constraints=[
            ("T1", _FLOAT_TYPES, "float rows"),
            ("T2", _FLOAT_TYPES, "float codes"),
        ],
        attributes=[
            defs.OpSchema.Attribute(
                "plugin_namespace", defs.OpSchema.AttrType.STRING, "TensorRT plugin namespace", required=False
            )
        ],
    )
    schema.set_type_and_shape_inference_function(_infer_nearest_code)
    defs.register_schema(schema)


def nearest_code_function(opset: int) -> onnx.FunctionProto:
    """The model-local function NearestCode in standard ops of `opset` (the model's own opset)."""
    nodes = [
        helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["codebook"], ["cf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["cf", "cf"], ["c_sq"]),
        helper.make_node("Constant", [], ["axis1"], value=helper.make_tensor("axis1", TensorProto.INT64, [1], [1])),
        helper.make_node("ReduceSum", ["c_sq", "axis1"], ["c_norm"], keepdims=0),
        helper.make_node("Transpose", ["cf"], ["cf_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["xf", "cf_t"], ["dots"]),
        helper.make_node("Constant", [], ["minus_two"], value=helper.make_tensor("minus_two", TensorProto.FLOAT, [], [-2.0])),
        helper.make_node("Mul", ["dots", "minus_two"], ["dots_m2"]),  # exact: scaling by a power of two
        helper.make_node("Add", ["dots_m2", "c_norm"], ["scores"]),
        helper.make_node("ArgMin", ["scores"], ["indices"], axis=1, keepdims=0, select_last_index=0),
    ]
    return helper.make_function(
        DOMAIN,
        OP_TYPE,
        inputs=["x", "codebook"],
        outputs=["indices"],
        nodes=nodes,
        opset_imports=[helper.make_opsetid("", opset)],
        attributes=["plugin_namespace"],
    )


RECHECK_SUFFIX = "__recheck"


def nearest_code_recheck_function(opset: int, dim: int) -> onnx.FunctionProto:
    """NearestCode with a second output, ``recheck`` (bool[M]): the rows whose float32 margin does
    not prove the token to be the exact argmin (`vqdeploy.ops.contract.recheck_rows`'s test,
    evaluated in float32 with room for its own rounding). vqdeploy's ONNX Runtime runner swaps this
    body in at load time and re-solves the flagged rows; exported files keep the one-output body.

    The token is TopK(2)'s first index: where the row is not flagged the minimum is strict, so it
    is ArgMin's token; where it is flagged the runner replaces it anyway.
    """
    u = 2.0**-24
    gamma = (dim + 3) * u / (1 - (dim + 3) * u)
    # bound (3) of vqdeploy.ops.contract: 2 gamma_{D+3} ||c|| (||c|| + ||x||) per code, with room for
    # the threshold's own float32 evaluation
    factor = 2.0 * gamma * (1.0 + (dim + 16) * 2.0**-22)
    const = lambda name, value, dtype=TensorProto.FLOAT, dims=(): helper.make_node(  # noqa: E731
        "Constant", [], [name], value=helper.make_tensor(name, dtype, list(dims), [value] if not dims else value)
    )
    nodes = [
        helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["codebook"], ["cf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["cf", "cf"], ["c_sq"]),
        const("axis1", [1], TensorProto.INT64, (1,)),
        helper.make_node("ReduceSum", ["c_sq", "axis1"], ["c_norm"], keepdims=0),
        helper.make_node("Transpose", ["cf"], ["cf_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["xf", "cf_t"], ["dots"]),
        const("minus_two", -2.0),
        helper.make_node("Mul", ["dots", "minus_two"], ["dots_m2"]),
        helper.make_node("Add", ["dots_m2", "c_norm"], ["scores"]),
        const("two", [2], TensorProto.INT64, (1,)),
        helper.make_node("TopK", ["scores", "two"], ["best2", "best2_index"], axis=1, largest=0, sorted=1),
        const("zero", 0, TensorProto.INT64),
        const("one", 1, TensorProto.INT64),
        helper.make_node("Gather", ["best2_index", "zero"], ["indices"], axis=1),
        helper.make_node("Gather", ["best2", "zero"], ["best"], axis=1),
        helper.make_node("Gather", ["best2", "one"], ["second"], axis=1),
        helper.make_node("Sub", ["second", "best"], ["margin"]),
        helper.make_node("Mul", ["xf", "xf"], ["x_sq"]),
        helper.make_node("ReduceSum", ["x_sq", "axis1"], ["x_norm_sq"], keepdims=0),
        const("underflow_sq", dim * UNDERFLOW_UNIT),  # what underflow can take from a sum of squares
        helper.make_node("Add", ["x_norm_sq", "underflow_sq"], ["x_norm_sq_up"]),
        helper.make_node("Add", ["c_norm", "underflow_sq"], ["c_norm_up"]),
        helper.make_node("Sqrt", ["x_norm_sq_up"], ["x_norm"]),
        helper.make_node("Sqrt", ["c_norm_up"], ["c_len"]),
        helper.make_node("Gather", ["c_len", "indices"], ["best_len"], axis=0),
        helper.make_node("ReduceMax", ["c_len"], ["max_len"], keepdims=0),
        helper.make_node("Add", ["x_norm", "best_len"], ["a"]),
        helper.make_node("Add", ["x_norm", "max_len"], ["b"]),
        helper.make_node("Mul", ["a", "best_len"], ["a_sq"]),
        helper.make_node("Mul", ["b", "max_len"], ["b_sq"]),
        helper.make_node("Add", ["a_sq", "b_sq"], ["ab"]),
        const("factor", factor),
        helper.make_node("Mul", ["ab", "factor"], ["relative"]),
        # (3a) for both codes: 2^-124 (2 (D + 1) + sqrt(D) (a + b)), rounded up
        helper.make_node("Add", ["a", "b"], ["a_plus_b"]),
        const("underflow_per_norm", math.sqrt(dim) * UNDERFLOW_UNIT * (1.0 + 2.0**-20)),
        helper.make_node("Mul", ["a_plus_b", "underflow_per_norm"], ["underflow_norms"]),
        const("underflow_fixed", 2.0 * (dim + 1) * UNDERFLOW_UNIT * (1.0 + 2.0**-20)),
        helper.make_node("Add", ["underflow_norms", "underflow_fixed"], ["underflow"]),
        helper.make_node("Add", ["relative", "underflow"], ["threshold"]),
        helper.make_node("Greater", ["margin", "threshold"], ["above"]),  # NaN: not proven
        # a score may overflow float32 where (||x|| + ||c_max||)^2 >= 2^126: nothing is proven there
        helper.make_node("Mul", ["b", "b"], ["scale"]),
        const("overflow", OVERFLOW_SCALE),
        helper.make_node("Less", ["scale", "overflow"], ["in_range"]),
        helper.make_node("And", ["above", "in_range"], ["proven"]),
        helper.make_node("Not", ["proven"], ["recheck"]),
    ]
    return helper.make_function(
        DOMAIN,
        OP_TYPE,
        inputs=["x", "codebook"],
        outputs=["indices", "recheck"],
        nodes=nodes,
        opset_imports=[helper.make_opsetid("", opset)],
        attributes=["plugin_namespace"],
    )


def with_recheck_outputs(model: onnx.ModelProto, dim: int) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of a fused export whose NearestCode nodes also output their ``recheck`` rows, each
    added as a graph output (names returned in node order). Unfused files come back unchanged."""
    nodes = nearest_code_nodes(model)
    if not nodes:
        return model, []
    model = onnx.ModelProto.FromString(model.SerializeToString())
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    del model.functions[:]
    model.functions.append(nearest_code_recheck_function(opset, dim))
    names = []
    for node in nearest_code_nodes(model):
        name = node.output[0] + RECHECK_SUFFIX
        del node.output[1:]
        node.output.append(name)
        model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.BOOL, None))
        names.append(name)
    return model, names


def nearest_code_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Every NearestCode node of the main graph."""
    return [n for n in model.graph.node if n.domain == DOMAIN and n.op_type == OP_TYPE]


def attach_function(model: onnx.ModelProto) -> None:
    """Give `model` the NearestCode function, with the model's own standard opset."""
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    del model.functions[:]
    model.functions.append(nearest_code_function(opset))
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, FUNCTION_VERSION))


def inline_function(model: onnx.ModelProto) -> onnx.ModelProto:
    """The unfused graph: every NearestCode node replaced by its body in standard ops."""
    import onnx.inliner

    inlined = onnx.inliner.inline_local_functions(model)
    kept = [o for o in inlined.opset_import if o.domain != DOMAIN]
    del inlined.opset_import[:]
    inlined.opset_import.extend(kept)
    return inlined
