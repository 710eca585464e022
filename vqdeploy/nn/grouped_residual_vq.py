"""GroupedResidualVQ: the feature axis cut into `groups` slices, one ResidualVQ stack each.

The layout of vector-quantize-pytorch 1.32 (``rvqs.{g}.layers.{s}...`` state-dict keys, so its
modules convert unchanged). Indices and losses follow the module's conventions:

- ``"seed"``: indices (groups, quantizers, batch, seq), losses (groups, quantizers, 1);
- ``"vector_quantize_pytorch"`` (the compat namespace, converted modules): indices (groups, batch,
  seq, quantizers), losses (groups, quantizers), as 1.32 returns them.

An exported GroupedResidualVQ is one graph whose indices are (groups * quantizers, batch, seq)
(group-major); `vqdeploy.runtime` hands them back in the module's layout.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vqdeploy.checks import (
    check_axis_size,
    check_finite,
    check_floating,
    check_integer,
    check_rank,
    eager_checks_enabled,
)
from vqdeploy.errors import ConfigError, UnsupportedOptionError
from vqdeploy.nn import conventions as conv
from vqdeploy.nn import distributed
from vqdeploy.nn.conventions import SEED, check_conventions
from vqdeploy.nn.eval_mode import eval_forward_indices
from vqdeploy.nn.residual_vq import ResidualVQ
from vqdeploy.spec import CHANNEL_LAST, QuantizerSpec


def grouped_indices_to_flat(conventions: str, indices: torch.Tensor) -> torch.Tensor:
    """GroupedResidualVQ indices in `conventions` -> (groups * quantizers, batch, seq) (the graph's layout)."""
    if conventions == conv.REFERENCE:  # (g, b, n, q) -> (g, q, b, n)
        indices = indices.movedim(-1, 1)
    return indices.reshape(-1, *indices.shape[2:])


def grouped_indices_from_flat(conventions: str, indices: torch.Tensor, groups: int) -> torch.Tensor:
    """(groups * quantizers, batch, seq) -> GroupedResidualVQ indices in `conventions`."""
    indices = indices.reshape(groups, -1, *indices.shape[1:])
    return indices.movedim(1, -1) if conventions == conv.REFERENCE else indices


class GroupedResidualVQ(nn.Module):
    """`groups` ResidualVQ stacks, each on its slice of the feature axis (dim / groups features).

    >>> import torch
    >>> grvq = GroupedResidualVQ(dim=32, groups=2, num_quantizers=4, codebook_size=64)
    >>> quantized, indices, losses = grvq(torch.randn(1, 10, 32))
    >>> tuple(quantized.shape), tuple(indices.shape), tuple(losses.shape)
    ((1, 10, 32), (2, 4, 1, 10), (2, 4, 1))

    Other keyword arguments go to every group's ResidualVQ (and through it to every stage). In
    training with quantize dropout, all groups stop after the same stage (one draw per forward,
    by rank 0 when the codebooks sync), as in 1.32.
    """

    def __init__(self, dim: int, groups: int = 1, conventions: str = SEED, **rvq_kwargs: Any):
        super().__init__()
        conventions = check_conventions(conventions)
        if rvq_kwargs.get("accept_image_fmap"):
            raise UnsupportedOptionError("GroupedResidualVQ does not accept accept_image_fmap=True (residual quantizers "
                                         "take batch, seq, dim)")
        if not isinstance(groups, int) or groups < 1:
            raise ConfigError(f"groups must be a positive integer, got {groups!r}")
        if not isinstance(dim, int) or dim < 1 or dim % groups:
            raise ConfigError(f"dim={dim!r} must split into groups={groups} equal slices")
        self.config: dict[str, Any] = dict(dim=dim, groups=groups, conventions=conventions, **rvq_kwargs)
        self.dim, self.groups, self.conventions = dim, groups, conventions
        self.rvqs = nn.ModuleList(
            ResidualVQ(dim=dim // groups, conventions=conventions, **rvq_kwargs) for _ in range(groups)
        )
        first = self.rvqs[0]
        self.num_quantizers, self.codebook_dim = first.num_quantizers, first.codebook_dim
        self.codebook_size, self.codebook_sizes = first.codebook_size, first.codebook_sizes
        self.has_projections = first.has_projections

    @property
    def codebooks(self) -> torch.Tensor:
        """(groups, num_quantizers, K, D)."""
        return torch.stack([rvq.codebooks for rvq in self.rvqs])

    @property
    def input_layout(self) -> str:
        return self.spec.layout.name

    @property
    def spec(self) -> QuantizerSpec:
        """What this module takes and returns (`vqdeploy.spec`): groups x stages searches per token."""
        return QuantizerSpec(type(self).__name__, CHANNEL_LAST, self.dim, max(self.codebook_sizes),
                             num_quantizers=self.groups * self.num_quantizers, conventions=self.conventions,
                             groups=self.groups, index_bound=min(self.codebook_sizes))

    @property
    def split_dim(self) -> int:
        return -1

    def _check_input(self, x: torch.Tensor) -> None:
        check_floating(x, "x")
        check_rank(x, (3,), "x", CHANNEL_LAST.describe())
        check_axis_size(x, -1, self.dim, "x", "dim")
        if eager_checks_enabled():
            check_finite(x, "x")

    def forward(
        self,
        x: torch.Tensor,
        indices: Any = None,
        return_all_codes: bool = False,
        sample_codebook_temp: float | None = None,
        freeze_codebook: bool = False,
        mask: torch.Tensor | None = None,
    ) -> tuple[Any, ...]:
        """Returns quantized (b, n, dim), indices, commit losses (and, with `return_all_codes`, a tuple
        of each group's codes (q, b, n, codebook_dim), as 1.32). `indices` (the cross-entropy mode)
        is refused (UnsupportedOptionError)."""
        if indices is not None and len(indices) > 0:
            conv.check_forward_options("GroupedResidualVQ", conv.GRVQ_FORWARD, dict(indices=indices))
        self._check_input(x)
        seed = None
        if self.training and self.rvqs[0].quantize_dropout:
            seed = distributed.randrange(0, 10_000, self.rvqs[0].sync_codebook, x.device)
        chunks = x.chunk(self.groups, dim=-1)
        outs = [
            rvq(chunk, mask=mask, return_all_codes=return_all_codes, sample_codebook_temp=sample_codebook_temp,
                freeze_codebook=freeze_codebook, rand_quantize_dropout_fixed_seed=seed)
            for rvq, chunk in zip(self.rvqs, chunks, strict=True)
        ]
        quantized = torch.cat([out[0] for out in outs], dim=-1)
        all_indices = torch.stack([out[1] for out in outs])
        losses = torch.stack([out[2] for out in outs])
        if return_all_codes:
            return quantized, all_indices, losses, tuple(out[3] for out in outs)
        return quantized, all_indices, losses

    def eval_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The indices an eval-mode forward gives for ``x`` (module layout), whatever mode the module is in."""
        return eval_forward_indices(self, x)

    # -- decode -----------------------------------------------------------------------------------
    def _check_indices(self, indices: torch.Tensor) -> None:
        check_integer(indices, "indices")
        layout = "groups, batch, seq, quantizer" if self.conventions != SEED else "groups, quantizer, batch, seq"
        check_rank(indices, (4,), "indices", layout)
        check_axis_size(indices, 0, self.groups, "indices", "groups")

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices in the module's layout -> codes (groups, q, b, n, codebook_dim)."""
        self._check_indices(indices)
        return torch.stack([rvq.get_codes_from_indices(part) for rvq, part in zip(self.rvqs, indices, strict=True)])

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """What forward returns as `quantized` for these indices."""
        self._check_indices(indices)
        return torch.cat([rvq.get_output_from_indices(part) for rvq, part in zip(self.rvqs, indices, strict=True)], dim=-1)

    def codebook_usage(self, dead_below: float | None = None) -> list[list[Any]]:
        """`CodebookUsage` of every stage of every group: [group][stage]."""
        return [rvq.codebook_usage(dead_below) for rvq in self.rvqs]

    # -- conversion -------------------------------------------------------------------------------
    @classmethod
    def from_vector_quantize_pytorch(cls, module: nn.Module) -> GroupedResidualVQ:
        """Convert a trained `vector_quantize_pytorch.GroupedResidualVQ`, weights and EMA state included."""
        from vqdeploy.nn.convert import grouped_residual_vq_config, load_reference_state

        converted = cls(**grouped_residual_vq_config(module))
        load_reference_state(converted, module)
        return converted.train(module.training)
