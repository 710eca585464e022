"""transformers' codec convolutions (EnCodec, Mimi) keep stride, kernel size and padding as tensor
buffers; `fix_padding` makes them Python ints so that torch.export can trace a fixed frame."""

from __future__ import annotations

import math

import torch
from torch import nn


def fix_padding(encoder: nn.Module) -> None:
    """Make each EncodecConv1d's / MimiConv1d's padding arithmetic plain Python for a fixed frame.

    transformers keeps stride, kernel size and padding as tensor buffers and computes the padding
    of every call from them, which torch.export cannot trace (a data-dependent guard in
    ``_pad1d``). The same formula on Python ints gives the same padding for a fixed input length:
    that is what exporting with a fixed frame means for this encoder.
    """
    for module in encoder.modules():
        if not hasattr(module, "padding_total") or not hasattr(module, "_get_extra_padding_for_conv1d"):
            continue
        stride, kernel, total = (int(module._buffers.pop(name)) for name in ("stride", "kernel_size", "padding_total"))
        module.stride, module.kernel_size, module.padding_total = stride, kernel, total

        def extra_padding(hidden_states: torch.Tensor, stride=stride, kernel=kernel, total=total) -> int:
            length = hidden_states.shape[-1]
            frames = math.ceil((length - kernel + total) / stride + 1) - 1
            return frames * stride + kernel - total - length

        module._get_extra_padding_for_conv1d = extra_padding
