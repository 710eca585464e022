"""The indices of an eval-mode forward, whatever mode a module is in (the quantizers' ``eval_tokens``
/ ``encode``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def eval_forward_indices(module: nn.Module, x: torch.Tensor, **kwargs: Any) -> Any:
    """``module(x, **kwargs)[1]`` in eval mode under ``torch.no_grad()``; the module's mode is restored."""
    was_training = module.training
    try:
        with torch.no_grad():
            return module.eval()(x, **kwargs)[1]
    finally:
        module.train(was_training)
