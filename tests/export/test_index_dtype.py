"""export_onnx(..., index_dtype="int32"): int32 indices out, the eager tokens, in ONNX Runtime.

(The default int64 exports are checked against eager by the other export tests.)"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from vqdeploy import ResidualVQ, VectorQuantize, export_onnx, read_metadata, runtime
from vqdeploy.errors import UnsupportedOptionError

CASES = [
    ("vq-encode", lambda: VectorQuantize(dim=8, codebook_size=16), "encode", (2, 7, 8), True),
    ("vq-encode-unfused", lambda: VectorQuantize(dim=8, codebook_size=16), "encode", (2, 7, 8), False),
    ("rvq-quantize", lambda: ResidualVQ(dim=8, num_quantizers=3, codebook_size=16), "quantize", (2, 7, 8), True),
    ("image-heads", lambda: VectorQuantize(dim=8, codebook_size=16, accept_image_fmap=True, heads=2,
                                           separate_codebook_per_head=True), "quantize", (2, 8, 3, 5), True),
]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "make", "part", "shape", "fused"), CASES, ids=[c[0] for c in CASES])
def test_int32_indices_give_the_eager_tokens(tmp_path, name, make, part, shape, fused: bool) -> None:
    module = make().eval()
    x = torch.randn(*shape)
    path = export_onnx(module, tmp_path / "narrow.onnx", part=part, fused=fused, index_dtype="int32")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    outputs = dict(zip(names, session.run(None, {"x": x.numpy()}), strict=True))
    assert outputs["indices"].dtype == np.int32
    eager = module(x)
    assert np.array_equal(outputs["indices"], eager[1].numpy())
    if "vectors" in outputs:
        assert np.allclose(outputs["vectors"], eager[0].detach().numpy(), rtol=1e-6, atol=1e-6)
    # The file says so itself; its metadata and graph names are those of an int64 export.
    proto = onnx.load(str(path))
    index_output = next(o for o in proto.graph.output if o.name == "indices")
    assert index_output.type.tensor_type.elem_type == onnx.TensorProto.INT32
    info = read_metadata(path)
    assert info.outputs == names and info.part == part
    with runtime.load(path, backend="ort") as quantizer:
        assert torch.equal(quantizer.encode(x), eager[1])


def test_index_dtype_is_refused_where_it_does_not_apply(tmp_path) -> None:
    module = VectorQuantize(dim=8, codebook_size=16).eval()
    with pytest.raises(UnsupportedOptionError, match="index_dtype must be one of"):
        export_onnx(module, tmp_path / "a.onnx", part="encode", index_dtype="uint8")
    with pytest.raises(UnsupportedOptionError, match="encode or quantize"):
        export_onnx(module, tmp_path / "b.onnx", part="decode", index_dtype="int32")
    model = nn.Sequential(nn.Linear(8, 8), module)
    with pytest.raises(UnsupportedOptionError, match="bare quantizer"):
        export_onnx(model, tmp_path / "c.onnx", example_input=torch.randn(2, 3, 8), index_dtype="int32")
    assert not list(tmp_path.iterdir())
