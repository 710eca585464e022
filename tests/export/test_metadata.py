"""read_metadata: what a vqdeploy export says about itself, and refusal of any other ONNX file."""

from __future__ import annotations

import onnx
import pytest
from export_cases import CODEBOOK_SIZE, CONFIGS, DIM, NUM_QUANTIZERS
from onnx import TensorProto, helper

from vqdeploy import read_metadata
from vqdeploy.errors import NotAVQDeployModelError, VQDeployError
from vqdeploy.export import ExportInfo

EXPECTED = {
    # name: kind, num_quantizers, codebook_dim, heads, metric, input_layout
    "plain": ("VectorQuantize", 1, DIM, 1, "l2", "b n d"),
    "cosine": ("VectorQuantize", 1, DIM, 1, "cosine", "b n d"),
    "projection": ("VectorQuantize", 1, 16, 1, "l2", "b n d"),
    "heads_shared": ("VectorQuantize", 1, 16, 4, "l2", "b n d"),
    "heads_separate": ("VectorQuantize", 1, 16, 4, "l2", "b n d"),
    "image": ("VectorQuantize", 1, DIM, 1, "l2", "b d h w"),
    "channel_first": ("VectorQuantize", 1, DIM, 1, "l2", "b d n"),
    "residual": ("ResidualVQ", NUM_QUANTIZERS, DIM, 1, "l2", "b n d"),
    "residual_projection": ("ResidualVQ", NUM_QUANTIZERS, 16, 1, "l2", "b n d"),
}
assert set(EXPECTED) == set(CONFIGS)


@pytest.mark.parametrize("part", ["encode", "decode", "quantize"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_metadata_describes_the_quantizer_and_part(exports, name, part):
    exported = exports(name, part)
    info = read_metadata(exported.path)
    kind, num_quantizers, codebook_dim, heads, metric, layout = EXPECTED[name]

    assert isinstance(info, ExportInfo)
    assert info.part == part
    assert info.kind == kind
    assert info.num_quantizers == num_quantizers
    assert info.codebook_size == CODEBOOK_SIZE
    assert info.dim == DIM
    assert info.codebook_dim == codebook_dim
    assert info.heads == heads
    assert info.metric == metric
    assert info.input_layout == layout
    assert info.index_dtype == "int64"
    assert info.fused is True
    session = exported.session
    assert info.inputs == [i.name for i in session.get_inputs()]
    assert info.outputs == [o.name for o in session.get_outputs()]
    # the graph agrees with the metadata: int64 indices wherever they appear
    typed = {v.name: v.type for v in (*session.get_inputs(), *session.get_outputs())}
    assert typed["indices"] == "tensor(int64)"


def test_metadata_of_a_proto_equals_metadata_of_its_file(exports):
    exported = exports("heads_separate", "quantize")
    assert read_metadata(onnx.load(str(exported.path))) == read_metadata(exported.path)


def test_unfused_export_says_so(exports):
    assert read_metadata(exports("heads_separate", "quantize", fused=False).path).fused is False


def _plain_onnx_model() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "plain", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    helper.set_model_props(model, {"author": "someone else"})
    onnx.checker.check_model(model, full_check=True)
    return model


def test_plain_onnx_file_is_not_a_vqdeploy_model(tmp_path):
    path = tmp_path / "relu.onnx"
    onnx.save(_plain_onnx_model(), str(path))
    with pytest.raises(NotAVQDeployModelError, match="not a vqdeploy export"):
        read_metadata(path)
    with pytest.raises(NotAVQDeployModelError):
        read_metadata(_plain_onnx_model())


def test_missing_or_garbage_files_are_not_vqdeploy_models(tmp_path):
    with pytest.raises(NotAVQDeployModelError, match="does not exist"):
        read_metadata(tmp_path / "absent.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\xff\x00 this is not protobuf \x13\x37" * 10)
    with pytest.raises(VQDeployError):
        read_metadata(garbage)


def test_partial_metadata_names_the_missing_keys(exports):
    model = onnx.load(str(exports("plain", "encode").path))
    kept = [p for p in model.metadata_props if p.key != "vqdeploy.codebook_size"]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    with pytest.raises(NotAVQDeployModelError, match="codebook_size"):
        read_metadata(model)
