"""FactorizedResidualVQ: the residual quantizer of DAC and SNAC (factorized, L2-normalised codes).

Each stage projects the model-space residual (batch, dim, time) to a small code space with a 1x1
convolution (weight-normed by default), searches the L2-normalised codebook with the L2-normalised
rows, looks up the *raw* (unnormalised) code row, rounds ``z_e + (z_q - z_e)`` as the codecs do
(the straight-through form, which is not z_q in float32), projects back to model space and
subtracts that from the residual. SNAC stages also average-pool time by a per-stage stride before
the search and repeat their output back (``strides``). The state-dict keys are those of the codecs
(``quantizers.{i}.in_proj``, ``.out_proj``, ``.codebook.weight``), so their weights load as they are.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

from vqdeploy.checks import (
    check_axis_size,
    check_finite,
    check_floating,
    check_index_range,
    check_integer,
    check_rank,
    eager_checks_enabled,
)
from vqdeploy.errors import ConfigError, InputShapeError
from vqdeploy.nn.eval_mode import eval_forward_indices
from vqdeploy.ops import nearest_code
from vqdeploy.spec import CodecChannelFirst

STACKED = "stacked"  # DAC: indices (batch, quantizer, time)
TUPLE = "tuple"  # SNAC: one (batch, time_s) tensor per stage
LAYOUTS = (STACKED, TUPLE)


def _conv(in_dim: int, out_dim: int, weight_norm: bool) -> nn.Conv1d:
    conv = nn.Conv1d(in_dim, out_dim, kernel_size=1)
    return parametrizations.weight_norm(conv) if weight_norm else conv


class FactorizedStage(nn.Module):
    """One stage: in_proj -> normalised search -> raw code -> straight-through rounding -> out_proj."""

    def __init__(self, dim: int, codebook_size: int, codebook_dim: int, stride: int = 1, weight_norm: bool = True):
        super().__init__()
        self.dim, self.codebook_size, self.codebook_dim, self.stride = dim, codebook_size, codebook_dim, stride
        self.in_proj = _conv(dim, codebook_dim, weight_norm)
        self.out_proj = _conv(codebook_dim, dim, weight_norm)
        self.codebook = nn.Embedding(codebook_size, codebook_dim)

    def pool(self, z: torch.Tensor) -> torch.Tensor:
        return F.avg_pool1d(z, self.stride, self.stride) if self.stride > 1 else z

    def search_rows(self, z: torch.Tensor) -> torch.Tensor:
        """(b, dim, t) residual -> the (b * t_s, codebook_dim) normalised rows the search sees."""
        z_e = self.in_proj(self.pool(z))
        return F.normalize(z_e.permute(0, 2, 1).reshape(-1, self.codebook_dim))

    def search_codebook(self) -> torch.Tensor:
        """The (K, codebook_dim) normalised codebook the search sees."""
        return F.normalize(self.codebook.weight)

    def nearest(self, rows: torch.Tensor) -> torch.Tensor:
        """The stage's search: (M, codebook_dim) normalised rows -> (M,) nearest normalised codes (float32)."""
        return nearest_code(rows.float().detach(), self.search_codebook().float().detach())

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(b, dim, t) -> out (b, dim, t), indices (b, t_s), commitment loss, codebook loss."""
        z_e = self.in_proj(self.pool(z))
        b = z_e.shape[0]
        rows = F.normalize(z_e.permute(0, 2, 1).reshape(-1, self.codebook_dim))
        indices = self.nearest(rows).reshape(b, -1)
        z_q = F.embedding(indices, self.codebook.weight).transpose(1, 2)
        if self.training:
            commitment = F.mse_loss(z_e, z_q.detach())
            codebook = F.mse_loss(z_q, z_e.detach())
        else:
            commitment = codebook = torch.zeros((), device=z.device)
        z_q = z_e + (z_q - z_e).detach()  # the codecs' rounding: not z_q itself in float32
        out = self.out_proj(z_q)
        if self.stride > 1:
            out = out.repeat_interleave(self.stride, dim=-1)
        return out, indices, commitment, codebook

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """(b, t_s) -> (b, dim, t_s * stride): out_proj of the raw code rows, repeated."""
        out = self.out_proj(F.embedding(indices, self.codebook.weight).transpose(1, 2))
        return out.repeat_interleave(self.stride, dim=-1) if self.stride > 1 else out


class FactorizedResidualVQ(CodecChannelFirst, nn.Module):
    """Residual VQ with per-stage factorized codes (DAC, SNAC). Inputs and outputs are (b, dim, t).

    >>> import torch
    >>> rvq = FactorizedResidualVQ(dim=32, num_quantizers=3, codebook_size=64, codebook_dim=8)
    >>> quantized, indices, loss = rvq(torch.randn(2, 32, 10))
    >>> tuple(quantized.shape), tuple(indices.shape), tuple(loss.shape)
    ((2, 32, 10), (2, 3, 10), (3,))

    ``codebook_dim`` is one int or one per stage; ``strides`` (SNAC) pools each stage's time axis
    (t must be a multiple of every stride). ``codes_layout="stacked"`` returns indices
    (b, q, t) as DAC does; ``"tuple"`` returns a tuple of (b, t / stride_s) tensors as SNAC does.
    The loss is per stage: ``commitment_weight * commitment + codebook_weight * codebook`` (DAC's
    two losses, which train the encoder and the codebook by gradient). ``quantizer_dropout`` is
    DAC's: in training that fraction of the batch uses a random number of stages.
    """

    def __init__(
        self,
        dim: int,
        num_quantizers: int,
        codebook_size: int,
        codebook_dim: int | list[int] | tuple[int, ...] = 8,
        strides: list[int] | tuple[int, ...] | None = None,
        weight_norm: bool = True,
        codes_layout: str = STACKED,
        quantizer_dropout: float = 0.0,
        commitment_weight: float = 0.25,
        codebook_weight: float = 1.0,
    ):
        super().__init__()
        if not isinstance(num_quantizers, int) or num_quantizers < 1:
            raise ConfigError(f"num_quantizers must be a positive integer, got {num_quantizers!r}")
        dims = [codebook_dim] * num_quantizers if isinstance(codebook_dim, int) else list(codebook_dim)
        strides = [1] * num_quantizers if strides is None else list(strides)
        if len(dims) != num_quantizers or len(strides) != num_quantizers:
            raise ConfigError(
                f"codebook_dim and strides need one value per stage ({num_quantizers}), got {dims} and {strides}"
            )
        if any(not isinstance(s, int) or s < 1 for s in strides):
            raise ConfigError(f"strides must be positive integers, got {strides}")
        if codes_layout not in LAYOUTS:
            raise ConfigError(f"codes_layout must be one of {', '.join(LAYOUTS)}, got {codes_layout!r}")
        if not 0.0 <= quantizer_dropout <= 1.0:
            raise ConfigError(f"quantizer_dropout must lie in [0, 1], got {quantizer_dropout!r}")
        self.dim, self.num_quantizers, self.codebook_size = dim, num_quantizers, codebook_size
        self.codebook_dims, self.strides = dims, strides
        self.codebook_dim = max(dims)
        self.codes_layout = codes_layout
        self.quantizer_dropout = float(quantizer_dropout)
        self.commitment_weight, self.codebook_weight = float(commitment_weight), float(codebook_weight)
        self.heads = 1
        self.config: dict[str, Any] = dict(
            dim=dim, num_quantizers=num_quantizers, codebook_size=codebook_size, codebook_dim=dims,
            strides=strides, weight_norm=weight_norm, codes_layout=codes_layout,
            quantizer_dropout=self.quantizer_dropout, commitment_weight=self.commitment_weight,
            codebook_weight=self.codebook_weight, use_cosine_sim=True,
        )
        self.quantizers = nn.ModuleList(
            FactorizedStage(dim, codebook_size, d, s, weight_norm) for d, s in zip(dims, strides, strict=True)
        )

    @property
    def codebooks(self) -> list[torch.Tensor]:
        """The raw (K, codebook_dim_s) codebook of every stage."""
        return [stage.codebook.weight for stage in self.quantizers]

    def _stages_used(self, n_q: int | None) -> int:
        if n_q is None:
            return self.num_quantizers
        if isinstance(n_q, bool) or not isinstance(n_q, int) or not 1 <= n_q <= self.num_quantizers:
            raise ConfigError(f"n_q must be an integer in [1, {self.num_quantizers}] (the stages to use), got {n_q!r}")
        return n_q

    def _check_x(self, x: torch.Tensor) -> None:
        check_floating(x, "x")
        check_rank(x, (3,), "x", "batch, dim, time")
        check_axis_size(x, 1, self.dim, "x", "dim")
        step = max(self.strides)
        if any(x.shape[-1] % s for s in self.strides):
            raise InputShapeError(f"x has {x.shape[-1]} time steps; this quantizer's strides {self.strides} need a multiple of each ({step})")
        if eager_checks_enabled():
            check_finite(x, "x")

    def _layout(self, indices: list[torch.Tensor]) -> torch.Tensor | tuple[torch.Tensor, ...]:
        return torch.stack(indices, dim=1) if self.codes_layout == STACKED else tuple(indices)

    def forward(self, x: torch.Tensor, n_q: int | None = None) -> tuple[Any, ...]:
        """(b, dim, t) -> quantized (b, dim, t), indices (module's layout), loss (n_q,).

        ``n_q`` uses the first n_q stages (DAC's ``n_quantizers``); in training, DAC's quantizer
        dropout masks the later stages of part of the batch.
        """
        self._check_x(x)
        used = self._stages_used(n_q)
        b = x.shape[0]
        if self.training and self.quantizer_dropout > 0:
            per_item = torch.full((b,), float(self.num_quantizers + 1))
            drawn = torch.randint(1, self.num_quantizers + 1, (b,))
            count = int(b * self.quantizer_dropout)
            per_item[:count] = drawn[:count].float()
            per_item = per_item.to(x.device)
        else:
            per_item = None
        quantized: torch.Tensor | float = 0.0
        residual = x
        all_indices, losses = [], []
        for i, stage in enumerate(self.quantizers[:used]):
            out, indices, commitment, codebook = stage(residual)
            if per_item is not None:
                keep = (torch.full((b,), i, device=x.device) < per_item).to(out.dtype)
                quantized = quantized + out * keep[:, None, None]
                commitment, codebook = (commitment * keep).mean(), (codebook * keep).mean()
            else:
                quantized = quantized + out
            residual = residual - out
            all_indices.append(indices)
            losses.append(self.commitment_weight * commitment + self.codebook_weight * codebook)
        return quantized, self._layout(all_indices), torch.stack(losses).reshape(-1)

    def encode(self, x: torch.Tensor, n_q: int | None = None) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The indices of an eval forward, in the module's layout, whatever mode the module is in."""
        return eval_forward_indices(self, x, n_q=n_q)

    def stage_indices(self, indices: torch.Tensor | tuple[torch.Tensor, ...] | list[torch.Tensor]) -> list[torch.Tensor]:
        """Indices in the module's layout -> one (b, t_s) tensor per stage given."""
        if isinstance(indices, torch.Tensor):
            check_integer(indices, "indices")
            check_rank(indices, (3,), "indices", "batch, quantizer, time (DAC's layout)")
            if indices.shape[1] > self.num_quantizers:
                check_axis_size(indices, 1, self.num_quantizers, "indices", "quantizers")
            return list(indices.unbind(1))
        stages = list(indices)
        if not 1 <= len(stages) <= self.num_quantizers:
            raise InputShapeError(f"indices hold {len(stages)} stages; this quantizer has {self.num_quantizers}")
        for s, t in enumerate(stages):
            check_integer(t, f"indices[{s}]")
            check_rank(t, (2,), f"indices[{s}]", "batch, time of that stage")
        return stages

    def get_output_from_indices(self, indices: torch.Tensor | tuple[torch.Tensor, ...] | list[torch.Tensor]) -> torch.Tensor:
        """Decode (DAC's / SNAC's ``from_codes``): the sum of every given stage's out_proj(code), (b, dim, t)."""
        stages = self.stage_indices(indices)
        if eager_checks_enabled():
            for s, t in enumerate(stages):
                check_index_range(t, self.codebook_size, f"indices[{s}]")
        out: torch.Tensor | float = 0.0
        for stage, t in zip(self.quantizers, stages, strict=False):
            out = out + stage.decode(t.long())
        return out

    def search_rows(self, x: torch.Tensor, indices: Any = None) -> list[torch.Tensor]:
        """The normalised rows each stage searches when the earlier stages served ``indices`` (module
        layout; the module's own tokens without it): one (b * t_s, codebook_dim_s) float32 tensor per
        stage. The residual follows the codec's arithmetic (straight-through rounding included)."""
        self._check_x(x)
        with torch.no_grad():
            stages = self.stage_indices(self.encode(x) if indices is None else indices)
            residual, rows = x, []
            for stage, chosen in zip(self.quantizers, stages, strict=False):
                z_e = stage.in_proj(stage.pool(residual))
                rows.append(F.normalize(z_e.permute(0, 2, 1).reshape(-1, stage.codebook_dim)).float())
                z_q = F.embedding(chosen.long().reshape(z_e.shape[0], -1), stage.codebook.weight).transpose(1, 2)
                out = stage.out_proj(z_e + (z_q - z_e))
                residual = residual - (out.repeat_interleave(stage.stride, dim=-1) if stage.stride > 1 else out)
            return rows
