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

from vqdeploy.errors import NotAVQDeployModelError, UnsupportedOptionError
from vqdeploy.export.metadata import STATE_PREFIX, ExportInfo
from vqdeploy.nn import GroupedResidualVQ, ResidualVQ, SplitResidualVQ, VectorQuantize
from vqdeploy.nn.parts import PART_MODULES
from vqdeploy.ops import cpu_kernels
from vqdeploy.runtime.base import VIEW_CHUNK_TOKENS
from vqdeploy.runtime.devices import check_device
from vqdeploy.spec import RESIDUAL_KINDS

_KINDS = {"VectorQuantize": VectorQuantize, "ResidualVQ": ResidualVQ, "GroupedResidualVQ": GroupedResidualVQ,
          "SplitResidualVQ": SplitResidualVQ}


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
    if info.kind in RESIDUAL_KINDS and info.config.get("shared_codebook"):
        embeds = [k for k in embeds if k.endswith("layers.0._codebook.embed")]  # one tensor serves every stage
    stages = getattr(module, "layers", None)
    if stages is not None and info.num_quantizers < len(stages):  # n_q baked in: later stages are not in the file
        unused = {id(layer) for layer in list(stages)[info.num_quantizers :]}
        names = {name for name, sub in module.named_modules() if id(sub) in unused}
        embeds = [k for k in embeds if k.removesuffix("._codebook.embed") not in names]
    needed = set(embeds)
    if info.part != "decode":
        needed |= {k for k in module.state_dict() if k.startswith("project_in.") or ".project_in." in k}
    if info.part != "encode":
        needed |= {k for k in module.state_dict() if k.startswith("project_out.") or ".project_out." in k}
    absent = sorted(needed & set(missing))
    if absent or unexpected:
        raise NotAVQDeployModelError(
            f"the file's initializers do not match its metadata: missing {absent}, unexpected {unexpected}"
        )
    for sub in module.modules():
        if isinstance(sub, VectorQuantize):
            sub.mark_initialized_()  # export refuses uninitialised codebooks
    return module.eval()


class _EncodeIndices(nn.Module):
    """The encode graph of a bare VectorQuantize: the indices alone, as its forward returns them.

    The full forward also gathers the codes and applies project_out for the quantized vectors an
    encode throws away (at D = 32 that took as long as the search). Inputs come checked and
    chunked by `vqdeploy.runtime.base.Quantizer`, so the module's own input checks are not run again.
    """

    def __init__(self, quantizer: VectorQuantize):
        super().__init__()
        self.quantizer = quantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantizer.eval_indices(x)


class TorchRunner:
    """Runs the part's computation with vqdeploy's own modules."""

    name = "torch"
    materializes_scores = False  # the nearest-code op tiles its own search

    def __init__(self, path: str | os.PathLike | bytes, info: ExportInfo, *, device: str = "cpu", precision: str = "exact"):
        check_device(device)
        if isinstance(path, bytes | bytearray | memoryview):
            model = onnx.load_model_from_string(bytes(path))
        else:
            model = onnx.load(str(path))
        self.quantizer = rebuild_quantizer(model, info).to(device)
        for sub in self.quantizer.modules():
            if isinstance(sub, VectorQuantize):
                sub.set_search_mode(precision)
        stages = getattr(self.quantizer, "num_quantizers", 1)
        n_q = info.num_quantizers if info.num_quantizers < stages else None  # an export with n_q baked in
        self.view_chunk_tokens = None
        if info.part == "encode" and isinstance(self.quantizer, VectorQuantize):
            self.graph = _EncodeIndices(self.quantizer).eval()
            vq = self.quantizer
            if not vq.has_projections and not vq._codebook.use_cosine_sim and vq.heads == 1:
                self.view_chunk_tokens = VIEW_CHUNK_TOKENS  # the search reads the chunk as it comes
        else:
            self.graph = PART_MODULES[info.part](self.quantizer, n_q).eval()
        self.device = device
        # On CPU the op's compiled search flags every row holding a NaN or an infinity (its norm bound
        # is not finite) and its exact re-solve refuses them (`vqdeploy.ops.contract.exact_nearest`):
        # the Quantizer then skips its own pass over the input and checks it only to word the error.
        self.search_detects_non_finite = device == "cpu" and cpu_kernels.available()
        self.float_dtype = next(p.dtype for p in self.quantizer.state_dict().values() if p.is_floating_point())

    @torch.inference_mode()
    def infer(self, feed: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        (value,) = feed.values()
        outputs = self.graph(value.to(self.device))
        return list(outputs) if isinstance(outputs, tuple) else [outputs]

    def close(self) -> None:
        self.graph = None
