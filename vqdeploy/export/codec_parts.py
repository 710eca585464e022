"""Export of the codec kinds (FactorizedResidualVQ, SplitResidualVQ) and of ``n_q``: inputs, axes, names.

Both kinds are channel-first, (batch, dim, time). Graph indices keep the module's layout: DAC's
(batch, quantizer, time), Mimi's (quantizer, batch, time), and SNAC's tuple as one output per stage
(``indices_0``...; decode takes one input per stage). With per-stage strides (SNAC) the time axis
is ``lcm(strides) * blocks``, so that every stage's pooled time is an integer, and the decode
input of stage s has ``lcm / stride_s * blocks`` steps.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn
from torch.export import Dim

from vqdeploy.errors import ConfigError, UnsupportedOptionError
from vqdeploy.export.metadata import ExportInfo
from vqdeploy.nn.factorized_vq import TUPLE, FactorizedResidualVQ
from vqdeploy.nn.residual_vq import ResidualVQ
from vqdeploy.nn.split_vq import SplitResidualVQ

BATCH, SEQ = 2, 3


def is_codec_kind(module: nn.Module) -> bool:
    return isinstance(module, FactorizedResidualVQ | SplitResidualVQ)


def check_n_q(model: nn.Module, part: str, n_q: int | None) -> None:
    """``n_q`` applies to the encode and quantize parts of a residual quantizer, within its stages."""
    if n_q is None:
        return
    if not isinstance(model, ResidualVQ | FactorizedResidualVQ | SplitResidualVQ):
        raise UnsupportedOptionError(f"n_q applies to a bare residual quantizer, not to a {type(model).__name__}")
    if part == "decode":
        raise UnsupportedOptionError("n_q applies to the encode and quantize parts; a decode export takes the stages it is given")
    low = model.num_semantic_quantizers if isinstance(model, SplitResidualVQ) else 1
    if isinstance(n_q, bool) or not isinstance(n_q, int) or not low <= n_q <= model.num_quantizers:
        raise ConfigError(f"n_q must be an integer in [{low}, {model.num_quantizers}], got {n_q!r}")


def with_stages_used(info: ExportInfo, n_q: int) -> ExportInfo:
    """The metadata of an export that uses the first n_q stages: num_quantizers says n_q."""
    quantizers = [dict(q, stages_used=n_q) for q in info.quantizers]
    return dataclasses.replace(info, num_quantizers=n_q, quantizers=quantizers)


def _time_step(module: nn.Module) -> int:
    return math.lcm(*module.strides) if isinstance(module, FactorizedResidualVQ) else 1


def output_names(module: nn.Module, part: str) -> list[str]:
    stages = [f"indices_{s}" for s in range(module.num_quantizers)]
    is_tuple = isinstance(module, FactorizedResidualVQ) and module.codes_layout == TUPLE
    indices = stages if is_tuple else ["indices"]
    return {"encode": indices, "quantize": ["vectors", *indices], "decode": ["vectors"]}[part]


def export_spec(
    module: nn.Module, part: str, example_input: Any = None
) -> tuple[Any, Any, list[str], list[str], dict[int, str]]:
    """(example, dynamic_shapes, input names, output names, axis names of the first input)."""
    step = _time_step(module)
    blocks = Dim("blocks", min=1)
    seq = blocks * step if step > 1 else Dim.DYNAMIC
    batch = Dim.DYNAMIC
    is_tuple = isinstance(module, FactorizedResidualVQ) and module.codes_layout == TUPLE
    if part != "decode":
        example = torch.randn(BATCH, module.dim, SEQ * step) if example_input is None else example_input
        return example, {"x": {0: batch, 2: seq}}, ["x"], output_names(module, part), {0: "batch", 2: "seq"}
    size = module.codebook_size
    if is_tuple:
        example = tuple(torch.randint(0, size, (BATCH, SEQ * step // s)) for s in module.strides)
        stage_seq = [blocks * (step // s) if step // s > 1 else blocks for s in module.strides]
        dynamic = {"indices": {0: batch, 1: stage_seq[0]}, "later_stages": tuple({0: batch, 1: d} for d in stage_seq[1:])}
        names = [f"indices_{s}" for s in range(module.num_quantizers)]
        return example if example_input is None else example_input, dynamic, names, ["vectors"], {0: "batch"}
    if isinstance(module, FactorizedResidualVQ):  # DAC: (b, q, t)
        example = torch.randint(0, size, (BATCH, module.num_quantizers, SEQ))
        return (example if example_input is None else example_input), {"indices": {0: batch, 2: seq}}, ["indices"], \
            ["vectors"], {0: "batch", 2: "seq"}
    example = torch.randint(0, size, (module.num_quantizers, BATCH, SEQ))  # Mimi: (q, b, t)
    return (example if example_input is None else example_input), {"indices": {1: batch, 2: seq}}, ["indices"], \
        ["vectors"], {1: "batch", 2: "seq"}
