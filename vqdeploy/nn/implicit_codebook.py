"""Implicit neural codebooks (QINCo, Huijben et al. 2024, arXiv:2401.14732) for ResidualVQ.

Stage s > 0 of a ResidualVQ with ``implicit_neural_codebook=True`` does not search its codebook
C_s but MLP_s(C_s, running sum): every code is concatenated with the sum of the codes chosen so
far at that position, mapped back to the code dimension and refined by residual blocks. Each
position therefore searches a codebook of its own. The module layout (``proj_in``, ``layers.{i}``
of Linear-SiLU-Linear) and the state-dict keys are vector-quantize-pytorch 1.32's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def frac_gradient(t: torch.Tensor, frac: float) -> torch.Tensor:
    """Value `t`; a fraction `frac` of its gradient (0: none)."""
    detached = t.detach()
    if frac <= 0:
        return detached
    return frac * t + (1.0 - frac) * detached


class ImplicitCodebookMLP(nn.Module):
    """codes (K, d) or (H, K, d) and a condition (b, n, d) -> per-position codebooks (b, n, K, d) / (H, b, n, K, d)."""

    def __init__(self, dim: int, dim_hidden: int | None = None, depth: int = 4, l2norm_output: bool = False):
        super().__init__()
        dim_hidden = dim_hidden if dim_hidden is not None else dim
        self.proj_in = nn.Linear(2 * dim, dim)
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, dim_hidden), nn.SiLU(), nn.Linear(dim_hidden, dim)) for _ in range(depth)
        )
        self.l2norm_output = l2norm_output

    def forward(self, codes: torch.Tensor, *, condition: torch.Tensor) -> torch.Tensor:
        one_headed = codes.ndim == 2
        if condition.ndim == 2:  # (batch, dim): one position
            condition = condition[:, None]
        if one_headed:
            codes = codes[None]
        heads, num_codes, dim = codes.shape
        batch, seq = condition.shape[0], condition.shape[1]
        codes = codes[:, None, None].expand(heads, batch, seq, num_codes, dim)
        condition = condition[None, :, :, None].expand(heads, batch, seq, num_codes, dim)
        x = self.proj_in(torch.cat((condition, codes), dim=-1))
        for layer in self.layers:
            x = layer(x) + x
        if self.l2norm_output:
            x = F.normalize(x, dim=-1)
        return x[0] if one_headed else x
