"""The computation of each export part, as a module: what the exporter traces and the torch
backend runs. Indices of a bare ResidualVQ are (quantizer, batch, seq) here, whatever the module's
conventions (`vqdeploy.runtime` hands them over in the module's layout)."""

from __future__ import annotations

import torch
from torch import nn

from vqdeploy.nn.conventions import SEED, residual_indices_from_seed, residual_indices_to_seed
from vqdeploy.nn.grouped_residual_vq import (
    GroupedResidualVQ,
    grouped_indices_from_flat,
    grouped_indices_to_flat,
)
from vqdeploy.nn.residual_vq import ResidualVQ


class EncodePart(nn.Module):
    """The graph of one part. A bare ResidualVQ's graph takes and returns indices (q, b, n) whatever
    the module's conventions, a GroupedResidualVQ's (groups * q, b, n); `vqdeploy.runtime` hands
    them over in the module's layout. The codec kinds (FactorizedResidualVQ, SplitResidualVQ) keep
    their own layout: SNAC's tuple of per-stage indices is one graph output per stage. ``n_q``
    bakes in the number of stages used."""

    def __init__(self, quantizer: nn.Module, n_q: int | None = None):
        super().__init__()
        self.quantizer = quantizer
        residual = isinstance(quantizer, ResidualVQ | GroupedResidualVQ)
        self.conventions = getattr(quantizer, "conventions", SEED) if residual else SEED
        self.grouped = isinstance(quantizer, GroupedResidualVQ)
        self.n_q = n_q

    def _run(self, x: torch.Tensor) -> tuple:
        return self.quantizer(x) if self.n_q is None else self.quantizer(x, n_q=self.n_q)

    def to_graph(self, indices: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        if isinstance(indices, tuple | list):  # one output per stage (SNAC)
            return tuple(indices)
        if self.grouped:
            return (grouped_indices_to_flat(self.conventions, indices),)
        return (residual_indices_to_seed(self.conventions, indices),)

    def from_graph(self, indices: torch.Tensor) -> torch.Tensor:
        if self.grouped:
            return grouped_indices_from_flat(self.conventions, indices, self.quantizer.groups)
        return residual_indices_from_seed(self.conventions, indices)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        indices = self.to_graph(self._run(x)[1])
        return indices if len(indices) > 1 else indices[0]


class QuantizePart(EncodePart):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        vectors, indices, _ = self._run(x)[:3]
        return (vectors, *self.to_graph(indices))


class DecodePart(EncodePart):
    def forward(self, indices: torch.Tensor, *later_stages: torch.Tensor) -> torch.Tensor:
        if later_stages:  # SNAC: one input per stage
            return self.quantizer.get_output_from_indices((indices, *later_stages))
        return self.quantizer.get_output_from_indices(self.from_graph(indices))


PART_MODULES = {"encode": EncodePart, "quantize": QuantizePart, "decode": DecodePart}
