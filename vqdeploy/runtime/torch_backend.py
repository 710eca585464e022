"""Plain-torch backend: rebuilds the quantizer from the export's metadata and initializers.

Needs neither ONNX Runtime nor TensorRT. CPU runs the tiled nearest-code search of
`vqdeploy.ops.cpu_kernels` (or the blocked torch one without numba), CUDA the fused Triton kernel
(when triton is installed).
"""

from __future__ import annotations

import os

import onnx
import torch
from onnx import numpy_helper
from torch import nn

from vqdeploy.errors import DeviceNotAvailableError, NotAVQDeployModelError, UnsupportedOptionError
from vqdeploy.export.metadata import STATE_PREFIX, ExportInfo
from vqdeploy.export.onnx import PART_MODULES
from vqdeploy.nn import ResidualVQ, VectorQuantize

_KINDS = {"VectorQuantize": VectorQuantize, "ResidualVQ": ResidualVQ}


def rebuild_quantizer(model: onnx.ModelProto, info: ExportInfo) -> nn.Module:
    """The eval-mode quantizer whose codebooks and projections are the file's initializers."""
    if info.kind not in _KINDS:
        raise UnsupportedOptionError(
            f"the torch backend runs bare-quantizer exports; this file holds kind {info.kind!r} (use backend='ort')"
        )
    module = _KINDS[info.kind](**info.config)
    state = {
        init.name.removeprefix(STATE_PREFIX): torch.from_numpy(numpy_helper.to_array(init).copy())
        for init in model.graph.initializer
        if init.name.startswith(STATE_PREFIX)
    }
    float_dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    if len(float_dtypes) == 1:  # a float16 export runs in float16, as its graph does (inputs cast to it)
        module = module.to(float_dtypes.pop())
    missing, unexpected = module.load_state_dict(state, strict=False)
    embeds = [k for k in module.state_dict() if k.endswith("_codebook.embed")]
    if info.kind == "ResidualVQ" and info.config.get("shared_codebook"):
        embeds = embeds[:1]  # one tensor serves every stage
    needed = set(embeds)
    if info.part != "decode":
        needed |= {k for k in module.state_dict() if k.startswith("project_in.")}
    if info.part != "encode":
        needed |= {k for k in module.state_dict() if k.startswith("project_out.")}
    absent = sorted(needed & set(missing))
    if absent or unexpected:
        raise NotAVQDeployModelError(
            f"the file's initializers do not match its metadata: missing {absent}, unexpected {unexpected}"
        )
    for sub in module.modules():
        if isinstance(sub, VectorQuantize):
            sub._codebook.initted.fill_(True)  # export refuses uninitialised codebooks
    return module.eval()


class TorchRunner:
    """Runs the part's computation with vqdeploy's own modules."""

    name = "torch"
    materializes_scores = False  # the nearest-code op tiles its own search

    def __init__(self, path: str | os.PathLike | bytes, info: ExportInfo, device: str = "cpu", precision: str = "exact"):
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise DeviceNotAvailableError("device='cuda' was asked for, but torch sees no CUDA device")
        if isinstance(path, bytes | bytearray | memoryview):
            model = onnx.load_model_from_string(bytes(path))
        else:
            model = onnx.load(str(path))
        self.quantizer = rebuild_quantizer(model, info).to(device)
        for sub in self.quantizer.modules():
            if isinstance(sub, VectorQuantize):
                sub._codebook.search_mode = "exact" if precision == "exact" else "fast"
        self.graph = PART_MODULES[info.part](self.quantizer).eval()
        self.device = device
        self.float_dtype = next(p.dtype for p in self.quantizer.state_dict().values() if p.is_floating_point())

    @torch.inference_mode()
    def infer(self, feed: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        (value,) = feed.values()
        outputs = self.graph(value.to(self.device))
        return list(outputs) if isinstance(outputs, tuple) else [outputs]

    def close(self) -> None:
        self.graph = None
