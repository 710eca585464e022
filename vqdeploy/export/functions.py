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

import onnx
from onnx import TensorProto, defs, helper

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
