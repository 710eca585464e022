"""SplitResidualVQ: Mimi's split residual quantizer (semantic stages + acoustic stages, side by side).

Both halves quantize the *same* input (batch, dim, time), each through its own projection into
the code space and its own EMA-codebook `ResidualVQ`; their outputs add up. Indices are
(quantizer, batch, time), semantic stages first, as Mimi's ``encode`` returns them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vqdeploy.checks import check_axis_size, check_integer, check_rank
from vqdeploy.errors import ConfigError
from vqdeploy.nn.eval_mode import eval_forward_indices
from vqdeploy.nn.residual_vq import ResidualVQ
from vqdeploy.spec import CodecChannelFirst


class SplitResidualVQ(CodecChannelFirst, nn.Module):
    """A semantic ResidualVQ and an acoustic ResidualVQ on the same (b, dim, t) input.

    >>> import torch
    >>> vq = SplitResidualVQ(dim=32, num_quantizers=4, codebook_size=64, codebook_dim=16)
    >>> quantized, indices, loss = vq(torch.randn(2, 32, 10))
    >>> tuple(quantized.shape), tuple(indices.shape), tuple(loss.shape)
    ((2, 32, 10), (4, 2, 10), (4, 1))

    ``num_semantic_quantizers`` stages (Mimi: 1) form the semantic half, the rest the acoustic
    half; ``n_q`` (forward, at least the semantic stages) keeps the first n_q stages. Other keyword
    arguments go to both halves' ResidualVQ (EMA decay, k-means init...), so both train as ResidualVQ.
    """

    def __init__(
        self,
        dim: int,
        num_quantizers: int,
        codebook_size: int,
        codebook_dim: int | None = None,
        num_semantic_quantizers: int = 1,
        **rvq_kwargs: Any,
    ):
        super().__init__()
        if not isinstance(num_semantic_quantizers, int) or not 1 <= num_semantic_quantizers < num_quantizers:
            raise ConfigError(
                f"num_semantic_quantizers must lie in [1, num_quantizers={num_quantizers}), got {num_semantic_quantizers!r}"
            )
        codebook_dim = dim if codebook_dim is None else codebook_dim
        self.dim, self.num_quantizers, self.codebook_size, self.codebook_dim = dim, num_quantizers, codebook_size, codebook_dim
        self.num_semantic_quantizers = num_semantic_quantizers
        self.heads = 1
        self.config: dict[str, Any] = dict(
            dim=dim, num_quantizers=num_quantizers, codebook_size=codebook_size, codebook_dim=codebook_dim,
            num_semantic_quantizers=num_semantic_quantizers, **rvq_kwargs,
        )
        common = dict(dim=dim, codebook_size=codebook_size, codebook_dim=codebook_dim, channel_last=False, **rvq_kwargs)
        self.semantic = ResidualVQ(num_quantizers=num_semantic_quantizers, **common)
        self.acoustic = ResidualVQ(num_quantizers=num_quantizers - num_semantic_quantizers, **common)

    @property
    def layers(self) -> list[nn.Module]:
        """Every stage's VectorQuantize, semantic first."""
        return [*self.semantic.layers, *self.acoustic.layers]

    def _split(self, n_q: int | None) -> tuple[int, int]:
        n_q = self.num_quantizers if n_q is None else n_q
        if isinstance(n_q, bool) or not isinstance(n_q, int) or not self.num_semantic_quantizers <= n_q <= self.num_quantizers:
            raise ConfigError(
                f"n_q must be an integer in [{self.num_semantic_quantizers}, {self.num_quantizers}] "
                f"(the semantic stages and up to every acoustic one), got {n_q!r}"
            )
        return self.num_semantic_quantizers, n_q - self.num_semantic_quantizers

    def forward(self, x: torch.Tensor, n_q: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(b, dim, t) -> quantized (b, dim, t), indices (n_q, b, t), losses (n_q, 1)."""
        semantic_q, acoustic_q = self._split(n_q)
        quantized, indices, losses = self.semantic(x)
        if acoustic_q:
            acoustic, acoustic_indices, acoustic_losses = self.acoustic(x, n_q=acoustic_q)
            quantized = quantized + acoustic
            indices = torch.cat([indices, acoustic_indices])
            losses = torch.cat([losses, acoustic_losses])
        return quantized, indices, losses

    def encode(self, x: torch.Tensor, n_q: int | None = None) -> torch.Tensor:
        """The indices (n_q, b, t) of an eval forward, whatever mode the module is in."""
        return eval_forward_indices(self, x, n_q=n_q)

    eval_tokens = encode

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Decode indices (q', b, t), q' >= the semantic stages, to (b, dim, t) (Mimi's ``decode``)."""
        check_integer(indices, "indices")
        check_rank(indices, (3,), "indices", "quantizer, batch, time")
        if not self.num_semantic_quantizers <= indices.shape[0] <= self.num_quantizers:
            check_axis_size(indices, 0, self.num_quantizers, "indices", "quantizers")
        semantic = indices[: self.num_semantic_quantizers]
        out = self.semantic.get_output_from_indices(semantic)
        acoustic = indices[self.num_semantic_quantizers :]
        if acoustic.shape[0]:
            codes = self.acoustic._codes_from_seed_indices(acoustic)[: acoustic.shape[0]].sum(dim=0)
            out = out + self.acoustic.project_out(codes).transpose(-1, -2)
        return out

    def search_rows(self, x: torch.Tensor, indices: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The rows each stage searches (one (b * t, codebook_dim) tensor per stage) when the
        earlier stages of its half served ``indices`` (q, b, t); the module's own tokens without it."""
        indices = self.encode(x) if indices is None else indices
        s = self.num_semantic_quantizers
        rows = list(self.semantic.search_rows(x, indices[:s]))
        rows += list(self.acoustic.search_rows(x, indices[s:]))
        return rows
