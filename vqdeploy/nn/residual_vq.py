"""ResidualVQ (SoundStream, Algorithm 1): quantize the input, then the residuals, in sequence."""

from __future__ import annotations

import random
from typing import Any

import torch
from torch import nn

from vqdeploy.checks import (
    check_axis_size,
    check_finite,
    check_floating,
    check_index_range,
    check_integer,
    check_rank,
    check_tensor,
    eager_checks_enabled,
)
from vqdeploy.errors import ConfigError, UninitializedCodebookError, UnsupportedOptionError
from vqdeploy.nn import conventions as conv
from vqdeploy.nn import distributed
from vqdeploy.nn.conventions import SEED, check_conventions
from vqdeploy.nn.vector_quantize import VectorQuantize
from vqdeploy.spec import CHANNEL_LAST, QuantizerSpec

# VectorQuantize options that make no sense per stage of a residual quantizer.
_PER_STAGE_ONLY = ("heads", "separate_codebook_per_head", "accept_image_fmap", "channel_last", "codebook_dim", "dim")


class ResidualVQ(nn.Module):
    """Residual vector quantizer: `num_quantizers` VectorQuantize stages on successive residuals.

    >>> import torch
    >>> rvq = ResidualVQ(dim=256, num_quantizers=8, codebook_size=1024)
    >>> quantized, indices, commit_loss = rvq(torch.randn(1, 1024, 256))
    >>> tuple(quantized.shape), tuple(indices.shape), tuple(commit_loss.shape)
    ((1, 1024, 256), (8, 1, 1024), (8, 1))

    Indices and losses are quantizer-first, as the seed README documents; with
    ``conventions="vector_quantize_pytorch"`` they are 1.32's: indices (b, n, q), losses (q,).
    Other keyword arguments go to every stage's VectorQuantize. Inputs are
    (batch, seq, dim). With `quantize_dropout=True`, training forwards stop after a random stage
    (at least `quantize_dropout_cutoff_index`) and mark later stages with index -1.
    `sync_codebook` / `sync_kmeans` go to every stage (see `VectorQuantize`); when the stages
    sync, rank 0 draws the dropout stop stage for every rank.
    """

    def __init__(
        self,
        dim: int,
        num_quantizers: int,
        codebook_size: int,
        shared_codebook: bool = False,
        quantize_dropout: bool = False,
        quantize_dropout_cutoff_index: int = 0,
        quantize_dropout_multiple_of: int = 1,
        codebook_dim: int | None = None,
        sync_codebook: bool | None = None,
        sync_kmeans: bool = True,
        conventions: str = SEED,
        **vq_kwargs: Any,
    ):
        super().__init__()
        conventions = check_conventions(conventions)
        for key in _PER_STAGE_ONLY:
            if key in vq_kwargs:
                raise UnsupportedOptionError(f"ResidualVQ does not accept {key}= for its stages (inputs are batch, seq, dim)")
        for name, value in (("dim", dim), ("num_quantizers", num_quantizers), ("codebook_size", codebook_size),
                            ("codebook_dim", codebook_dim)):
            if name == "codebook_dim" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not 0 <= quantize_dropout_cutoff_index < num_quantizers:
            raise ConfigError(
                f"quantize_dropout_cutoff_index must lie in [0, {num_quantizers}), got {quantize_dropout_cutoff_index}"
            )
        codebook_dim = codebook_dim if codebook_dim is not None else dim
        self.config: dict[str, Any] = dict(
            dim=dim, num_quantizers=num_quantizers, codebook_size=codebook_size,
            shared_codebook=shared_codebook, quantize_dropout=quantize_dropout,
            quantize_dropout_cutoff_index=quantize_dropout_cutoff_index,
            quantize_dropout_multiple_of=quantize_dropout_multiple_of, codebook_dim=codebook_dim,
            conventions=conventions, **vq_kwargs,
        )
        self.conventions = conventions
        self.dim, self.codebook_dim, self.codebook_size = dim, codebook_dim, codebook_size
        self.num_quantizers = num_quantizers
        self.shared_codebook = shared_codebook
        self.quantize_dropout = quantize_dropout and num_quantizers > 1
        self.quantize_dropout_cutoff_index = quantize_dropout_cutoff_index
        self.quantize_dropout_multiple_of = quantize_dropout_multiple_of

        self.has_projections = codebook_dim != dim
        self.project_in = nn.Linear(dim, codebook_dim) if self.has_projections else nn.Identity()
        self.project_out = nn.Linear(codebook_dim, dim) if self.has_projections else nn.Identity()
        self.layers = nn.ModuleList(
            VectorQuantize(
                dim=codebook_dim, codebook_size=codebook_size, sync_codebook=sync_codebook, sync_kmeans=sync_kmeans,
                conventions=conventions, **vq_kwargs,
            )
            for _ in range(num_quantizers)
        )
        self.sync_codebook = sync_codebook
        if shared_codebook:
            for layer in self.layers[1:]:
                layer._codebook = self.layers[0]._codebook

    @property
    def codebooks(self) -> torch.Tensor:
        """(num_quantizers, K, D)."""
        return torch.stack([layer.codebook for layer in self.layers])

    @property
    def input_layout(self) -> str:
        return self.spec.layout.name

    @property
    def spec(self) -> QuantizerSpec:
        """What this module takes and returns (`vqdeploy.spec`)."""
        return QuantizerSpec(type(self).__name__, CHANNEL_LAST, self.dim, self.codebook_size,
                             num_quantizers=self.num_quantizers, conventions=self.conventions)

    def _dropout_last_stage(self, device: torch.device, seed: int | None = None) -> int:
        """The last stage a training forward runs (quantize dropout), or the last stage."""
        last = self.num_quantizers - 1
        if not (self.training and self.quantize_dropout):
            return last
        if seed is not None:  # rand_quantize_dropout_fixed_seed: the same draw on every rank
            stop = random.Random(seed).randrange(self.quantize_dropout_cutoff_index, self.num_quantizers)
        else:
            stop = distributed.randrange(self.quantize_dropout_cutoff_index, self.num_quantizers, self.sync_codebook, device)
        if self.quantize_dropout_multiple_of != 1:
            multiple = self.quantize_dropout_multiple_of
            stop = min(last, -(-(stop + 1) // multiple) * multiple - 1)
        return stop

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        indices: torch.Tensor | None = None,
        return_all_codes: bool = False,
        sample_codebook_temp: float | None = None,
        freeze_codebook: bool = False,
        beam_size: int | None = None,
        rand_quantize_dropout_fixed_seed: int | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """Returns quantized (b, n, dim), indices, commit losses (and all codes with `return_all_codes`).

        Seed conventions: indices (q, b, n), losses (q, 1). 1.32's: indices (b, n, q), losses (q,).
        All codes are (q, b, n, codebook_dim) in both. `freeze_codebook` leaves the EMA state as it
        is; `rand_quantize_dropout_fixed_seed` fixes the quantize-dropout draw. The other arguments
        are 1.32's and are refused (UnsupportedOptionError) unless at their default.
        """
        if not (mask is None and indices is None and beam_size in (None, 1)):
            conv.check_forward_options("ResidualVQ", conv.RVQ_FORWARD, dict(
                mask=mask, indices=indices, beam_size=None if beam_size == 1 else beam_size,
            ))  # sample_codebook_temp is inert: it acts only with stochastic sampling, which is refused
        check_tensor(x, "x")
        check_floating(x, "x")
        check_rank(x, (3,), "x", "batch, seq, dim")
        check_axis_size(x, -1, self.dim, "x", "dim")
        if eager_checks_enabled():  # the search sees float32: a float64 1e300 would be inf there
            check_finite(x, "x", dtype=torch.float32 if x.dtype == torch.float64 else None, what="the codebook search")

        residual = self.project_in(x)
        if self.has_projections and eager_checks_enabled():
            check_finite(residual, "x after project_in", dtype=torch.float32, what="the codebook search")
        quantized_out = torch.zeros_like(residual)
        last_stage = self._dropout_last_stage(x.device, rand_quantize_dropout_fixed_seed)
        all_indices, all_losses, stage_inputs = [], [], []
        for stage, layer in enumerate(self.layers):
            if stage > last_stage:
                all_indices.append(torch.full(x.shape[:2], -1, dtype=torch.long, device=x.device))
                all_losses.append(torch.zeros(1, device=x.device))
                continue
            stage_inputs.append(residual.detach())
            quantized, stage_indices, loss = layer.quantize_tokens(
                residual, input_requires_grad=x.requires_grad, refresh_embed=not self.shared_codebook,
                freeze_codebook=freeze_codebook or None,
            )
            residual = residual - quantized.detach()
            quantized_out = quantized_out + quantized
            all_indices.append(stage_indices)
            all_losses.append(loss)

        codebook = self.layers[0]._codebook
        if self.training and self.shared_codebook and codebook.begin_training_step():
            # one EMA refresh for the shared codebook, after every stage
            if self.layers[0].ema_update:
                codebook.refresh_embed_()
            rows = torch.cat([codebook.transform_input(t).reshape(1, -1, self.codebook_dim) for t in stage_inputs], dim=1)
            codebook.expire_dead_codes_(rows.float(), segments=len(stage_inputs))

        indices_out = torch.stack(all_indices)
        losses = torch.stack(all_losses)
        outputs: tuple[torch.Tensor, ...] = (
            self.project_out(quantized_out),
            conv.residual_indices_from_seed(self.conventions, indices_out),
            losses if self.conventions == SEED else losses.reshape(-1),
        )
        if return_all_codes:
            outputs = (*outputs, self._codes_from_seed_indices(indices_out))
        return outputs

    def search_rows(self, x: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        """Rows stage s searches when the earlier stages served ``indices`` (q, b, n), float32.

        ``indices`` are (quantizer, batch, seq) whatever the module's conventions.

        Returns (q, b * n, codebook_dim). The residual of stage s is project_in(x) minus this
        module's codes of ``indices[:s]``: with another runtime's indices, the rows that runtime's
        later stages must have searched if its codebooks are this module's. Without ``indices``,
        the module's own tokens. Rows after a dropped stage (index -1) are those of the last
        stage that ran.
        """
        check_tensor(x, "x")
        check_floating(x, "x")
        check_rank(x, (3,), "x", "batch, seq, dim")
        check_axis_size(x, -1, self.dim, "x", "dim")
        with torch.no_grad():
            if indices is None:
                indices = conv.residual_indices_to_seed(self.conventions, self.eval_tokens(x))
            check_integer(indices, "indices")
            if tuple(indices.shape) != (self.num_quantizers, *x.shape[:2]):
                check_axis_size(indices, 0, self.num_quantizers, "indices", "quantizers")
            residual = self.project_in(x).reshape(-1, self.codebook_dim)
            rows = []
            for stage, layer in enumerate(self.layers):
                rows.append(layer._codebook.transform_input(residual).float())
                chosen = indices[stage].reshape(-1).long()
                valid = (chosen >= 0) & (chosen < self.codebook_size)
                codes = layer.codebook.detach()[chosen.clamp(0, self.codebook_size - 1)]
                residual = residual - codes.to(residual.dtype) * valid[:, None]
            return torch.stack(rows)

    def eval_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The indices (q, b, n) an eval-mode forward gives for ``x``, whatever mode the module is in."""
        was_training = self.training
        try:
            with torch.no_grad():
                return self.eval()(x)[1]
        finally:
            self.train(was_training)

    # -- decode -----------------------------------------------------------------------------------
    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices in the module's convention -> codes (q, b, n, codebook_dim); -1 decodes to 0.

        Seed conventions take (q', b, n), 1.32's (b, n, q'). q' must be num_quantizers, or fewer
        (the coarse stages) when the module was built with quantize_dropout; anything else is refused
        (InputShapeError), so indices of the other layout are not reinterpreted.
        """
        check_tensor(indices, "indices")
        check_integer(indices, "indices")
        if self.conventions == SEED:
            check_rank(indices, (3,), "indices", "quantizer, batch, seq (the seed's layout)")
            axis = 0
        else:
            check_rank(indices, (3,), "indices", "batch, seq, quantizer (vector-quantize-pytorch's layout)")
            axis = 2
        given = indices.shape[axis]
        if given > self.num_quantizers or (given < self.num_quantizers and not self.quantize_dropout):
            check_axis_size(indices, axis, self.num_quantizers, "indices", "quantizers")
        return self._codes_from_seed_indices(conv.residual_indices_to_seed(self.conventions, indices))

    def _codes_from_seed_indices(self, indices: torch.Tensor) -> torch.Tensor:
        if eager_checks_enabled():
            check_index_range(indices, self.codebook_size, "indices", allow_dropped=True)
            if not all(bool(layer._codebook.initted) for layer in self.layers):
                raise UninitializedCodebookError(
                    "this ResidualVQ was built with kmeans_init=True and has not seen a training batch: its codebooks "
                    "are all zeros; run a forward pass in training mode (or load trained weights) before decoding"
                )
        codes = []
        for stage, layer in enumerate(self.layers):
            if stage >= indices.shape[0]:
                codes.append(torch.zeros(*indices.shape[1:], self.codebook_dim, device=indices.device))
                continue
            stage_indices = indices[stage].long()
            dropped = stage_indices < 0
            stage_codes = layer.codebook[stage_indices.clamp(min=0)]
            codes.append(stage_codes.masked_fill(dropped[..., None], 0.0))
        return torch.stack(codes)

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """What forward returns as `quantized` for these indices."""
        return self.project_out(self.get_codes_from_indices(indices).sum(dim=0))

    @classmethod
    def from_vector_quantize_pytorch(cls, module: nn.Module) -> ResidualVQ:
        """Convert a trained `vector_quantize_pytorch.ResidualVQ`, weights and EMA state included."""
        from vqdeploy.nn.convert import residual_vq_config

        converted = cls(**residual_vq_config(module))
        converted.load_state_dict(module.state_dict(), strict=True)
        return converted.train(module.training)
