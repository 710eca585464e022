"""A float16 quantizer exports and runs with float16 input; distances and argmin stay float32 in the
graph, so its indices equal eager's on the same float16 input."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.inliner
import pytest
import torch
from export_cases import cpu_session
from onnx import TensorProto

from vqdeploy import ResidualVQ, VectorQuantize, export_onnx


def _half_module(kind: str, digits: torch.Tensor) -> torch.nn.Module:
    torch.manual_seed(3)
    if kind == "VectorQuantize":
        module = VectorQuantize(dim=64, codebook_size=64, kmeans_init=True)
    else:
        module = ResidualVQ(dim=64, num_quantizers=2, codebook_size=32, kmeans_init=True)
    with torch.no_grad():
        module.train()(digits[None, :1792])
    return module.eval().half()


@pytest.fixture(scope="module", params=["VectorQuantize", "ResidualVQ"])
def half_export(request, digits, tmp_path_factory):
    module = _half_module(request.param, digits)
    path = tmp_path_factory.mktemp("fp16") / f"{request.param}.onnx"
    export_onnx(module, path, part="quantize", example_input=torch.randn(2, 3, 64).half())
    return module, path


@pytest.mark.parametrize("sizes", [(1, 1), (7, 7), (1, 1797)], ids=["1", "7", "1000+"])
@pytest.mark.parametrize("data", ["digits", "random"])
def test_float16_indices_equal_eager(half_export, digits, data, sizes):
    module, path = half_export
    count = int(np.prod(sizes))
    tokens = digits[:count] if data == "digits" else torch.randn(count, 64, generator=torch.Generator().manual_seed(9))
    x = tokens.reshape(*sizes, 64).half()
    with torch.no_grad():
        vectors, indices, _ = module(x)

    session = cpu_session(path)
    assert session.get_inputs()[0].type == "tensor(float16)"
    onnx_vectors, onnx_indices = session.run(None, {"x": x.numpy()})

    np.testing.assert_array_equal(onnx_indices, indices.numpy())
    assert onnx_vectors.dtype == np.float16
    if isinstance(module, VectorQuantize):  # codebook rows, exactly
        np.testing.assert_array_equal(onnx_vectors, vectors.numpy())
    else:  # a sum of stage codes in float16
        torch.testing.assert_close(torch.from_numpy(onnx_vectors), vectors, atol=2e-3, rtol=2e-3)


def test_float16_graph_computes_distances_and_argmin_in_float32(half_export):
    _, path = half_export
    model = onnx.load(str(path))
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16

    body = model.functions[0]
    casts = [n for n in body.node if n.op_type == "Cast"]
    assert {n.input[0] for n in casts} == {"x", "codebook"}
    assert all(a.i == TensorProto.FLOAT for n in casts for a in n.attribute if a.name == "to")

    # Walk back from every ArgMin of the inlined graph to the Casts that open the body: every
    # floating tensor on the way (scores, dot products, code norms) is float32.
    inlined = onnx.shape_inference.infer_shapes(onnx.inliner.inline_local_functions(model), strict_mode=True)
    types = {v.name: v.type.tensor_type.elem_type for v in inlined.graph.value_info}
    producers = {out: node for node in inlined.graph.node for out in node.output}
    argmins = [n for n in inlined.graph.node if n.op_type == "ArgMin"]
    assert argmins
    for argmin in argmins:
        pending, seen_ops = [argmin.input[0]], set()
        while pending:
            name = pending.pop()
            node = producers[name]
            seen_ops.add(node.op_type)
            if node.op_type == "Constant":
                continue
            assert types[name] == TensorProto.FLOAT, (name, node.op_type, types[name])
            if node.op_type != "Cast":
                pending.extend(node.input)
        assert {"MatMul", "ReduceSum", "Cast"} <= seen_ops
