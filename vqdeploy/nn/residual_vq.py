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
from vqdeploy.nn.eval_mode import eval_forward_indices
from vqdeploy.nn.implicit_codebook import ImplicitCodebookMLP, frac_gradient
from vqdeploy.nn.vector_quantize import ForwardCall, VectorQuantize
from vqdeploy.spec import QuantizerSpec, layout_for

# VectorQuantize options that make no sense per stage of a residual quantizer.
_PER_STAGE_ONLY = ("heads", "separate_codebook_per_head", "accept_image_fmap", "codebook_dim", "dim")


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
    (batch, seq, dim), or (batch, dim, seq) with ``channel_last=False`` (EnCodec's and Mimi's
    layout; quantized comes back in the same layout). ``n_q`` (forward, `eval_tokens`) runs the
    first n_q stages only: indices and losses then hold n_q stages. With `quantize_dropout=True`, training forwards stop after a random stage
    (at least `quantize_dropout_cutoff_index`) and mark later stages with index -1.
    `sync_codebook` / `sync_kmeans` go to every stage (see `VectorQuantize`); when the stages
    sync, rank 0 draws the dropout stop stage for every rank.
    """

    def __init__(
        self,
        dim: int,
        num_quantizers: int | None,
        codebook_size: int | tuple[int, ...],
        shared_codebook: bool = False,
        quantize_dropout: bool = False,
        quantize_dropout_cutoff_index: int = 0,
        quantize_dropout_multiple_of: int = 1,
        codebook_dim: int | None = None,
        sync_codebook: bool | None = None,
        sync_kmeans: bool = True,
        conventions: str = SEED,
        implicit_neural_codebook: bool = False,
        mlp_kwargs: dict[str, Any] | None = None,
        quant_grad_frac: float = 0.0,
        channel_last: bool = True,
        **vq_kwargs: Any,
    ):
        """`codebook_size` is one size, or a tuple of one size per stage (then `num_quantizers` may be
        None). `implicit_neural_codebook` (QINCo, Huijben et al. 2024): stage s > 0 searches
        MLP_s(codebook_s, running sum), one codebook per position, learnt by gradient (`mlp_kwargs`:
        dim_hidden, depth, l2norm_output). `quant_grad_frac`: the fraction of a stage's gradient
        that reaches the earlier stages through the residual (0: none, as the seed)."""
        super().__init__()
        conventions = check_conventions(conventions)
        for key in _PER_STAGE_ONLY:
            if key in vq_kwargs:
                raise UnsupportedOptionError(f"ResidualVQ does not accept {key}= for its stages (inputs are batch, seq, dim)")
        sizes = tuple(codebook_size) if isinstance(codebook_size, tuple | list) else None
        if sizes is not None:
            if num_quantizers is not None and num_quantizers != len(sizes):
                raise ConfigError(f"num_quantizers={num_quantizers} but codebook_size has {len(sizes)} sizes")
            num_quantizers = len(sizes)
        if not isinstance(num_quantizers, int) or num_quantizers < 1:
            raise ConfigError(f"num_quantizers must be a positive integer, got {num_quantizers!r}")
        for name, value in (("dim", dim), ("num_quantizers", num_quantizers), ("codebook_dim", codebook_dim),
                            *(("codebook_size", size) for size in (sizes or (codebook_size,)))):
            if name == "codebook_dim" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not 0 <= quantize_dropout_cutoff_index < num_quantizers:
            raise ConfigError(
                f"quantize_dropout_cutoff_index must lie in [0, {num_quantizers}), got {quantize_dropout_cutoff_index}"
            )
        sizes = sizes if sizes is not None else (codebook_size,) * num_quantizers
        if shared_codebook and len(set(sizes)) > 1:
            raise ConfigError(f"shared_codebook needs one codebook size for every stage, got {sizes}")
        if implicit_neural_codebook:  # 1.32: the stages' codebooks are learnt by gradient
            vq_kwargs.update(learnable_codebook=True, ema_update=False)
        codebook_dim = codebook_dim if codebook_dim is not None else dim
        self.config: dict[str, Any] = dict(
            dim=dim, num_quantizers=num_quantizers, codebook_size=codebook_size if len(set(sizes)) == 1 and not
            isinstance(codebook_size, tuple | list) else list(sizes),
            shared_codebook=shared_codebook, quantize_dropout=quantize_dropout,
            quantize_dropout_cutoff_index=quantize_dropout_cutoff_index,
            quantize_dropout_multiple_of=quantize_dropout_multiple_of, codebook_dim=codebook_dim,
            conventions=conventions, **vq_kwargs,
        )
        if implicit_neural_codebook:  # new options enter the config only when set
            self.config.update(implicit_neural_codebook=True, mlp_kwargs=dict(mlp_kwargs or {}))
            for name in ("learnable_codebook", "ema_update"):
                self.config.pop(name)
        if quant_grad_frac:
            self.config["quant_grad_frac"] = quant_grad_frac
        if not channel_last:  # recorded only when set, so that earlier configs read the same
            self.config["channel_last"] = False
        self.channel_last = bool(channel_last)
        self.conventions = conventions
        self.codebook_sizes = sizes
        self.uniform_codebook_size = len(set(sizes)) == 1
        self.implicit_neural_codebook, self.quant_grad_frac = implicit_neural_codebook, quant_grad_frac
        self.dim, self.codebook_dim, self.codebook_size = dim, codebook_dim, sizes[0]
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
                dim=codebook_dim, codebook_size=size, sync_codebook=sync_codebook, sync_kmeans=sync_kmeans,
                conventions=conventions, **vq_kwargs,
            )
            for size in sizes
        )
        if implicit_neural_codebook:  # keys mlps.{s-1}.* as in 1.32
            cosine = self.layers[0].use_cosine_sim
            self.mlps = nn.ModuleList(
                ImplicitCodebookMLP(codebook_dim, **{"l2norm_output": cosine, **(mlp_kwargs or {})})
                for _ in range(num_quantizers - 1)
            )
        self.sync_codebook = sync_codebook
        if shared_codebook:
            for layer in self.layers[1:]:
                layer._codebook = self.layers[0]._codebook

    @property
    def codebooks(self) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """(num_quantizers, K, D); a tuple of (K_s, D) when the stages' sizes differ (as 1.32)."""
        if not self.uniform_codebook_size:
            return tuple(layer.codebook for layer in self.layers)
        return torch.stack([layer.codebook for layer in self.layers])

    @property
    def input_layout(self) -> str:
        return self.spec.layout.name

    @property
    def spec(self) -> QuantizerSpec:
        """What this module takes and returns (`vqdeploy.spec`)."""
        return QuantizerSpec(type(self).__name__, layout_for(self.channel_last, image=False), self.dim, max(self.codebook_sizes),
                             num_quantizers=self.num_quantizers, conventions=self.conventions,
                             index_bound=min(self.codebook_sizes))

    def _check_x(self, x: torch.Tensor) -> torch.Tensor:
        """Check x and return it (batch, seq, dim), whatever the module's layout."""
        check_floating(x, "x")
        if self.channel_last:
            check_rank(x, (3,), "x", self.spec.layout.describe())
            check_axis_size(x, -1, self.dim, "x", "dim")
            return x
        check_rank(x, (3,), "x", f"{self.spec.layout.describe()} (channel_last=False)")
        check_axis_size(x, 1, self.dim, "x", "dim")
        return x.transpose(1, 2)

    def _stages_used(self, n_q: int | None) -> int:
        if n_q is None:
            return self.num_quantizers
        if isinstance(n_q, bool) or not isinstance(n_q, int) or not 1 <= n_q <= self.num_quantizers:
            raise ConfigError(f"n_q must be an integer in [1, {self.num_quantizers}] (the stages to use), got {n_q!r}")
        return n_q

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
        n_q: int | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """Returns quantized (b, n, dim), indices, commit losses (and all codes with `return_all_codes`).

        ``n_q`` runs the first n_q stages only (EnCodec's bandwidth, DAC's n_quantizers): indices,
        losses and all codes then hold n_q stages; quantized sums those stages.

        Seed conventions: indices (q, b, n), losses (q, 1). 1.32's: indices (b, n, q), losses (q,).
        All codes are (q, b, n, codebook_dim) in both. `freeze_codebook` leaves the EMA state as it
        is; `rand_quantize_dropout_fixed_seed` fixes the quantize-dropout draw; `mask` (batch, seq)
        marks the positions that count (padded ones: zeros, or the input with
        return_zeros_for_masked_padding=False, and index -1 at every stage); `sample_codebook_temp`
        goes to every stage. `indices` and `beam_size` > 1 are refused (UnsupportedOptionError).
        """
        if not (indices is None and beam_size in (None, 1)):
            conv.check_forward_options("ResidualVQ", conv.RVQ_FORWARD, dict(
                indices=indices, beam_size=None if beam_size == 1 else beam_size,
            ))
        used = self._stages_used(n_q)
        check_tensor(x, "x")
        x = self._check_x(x)
        if eager_checks_enabled():  # the search sees float32: a float64 1e300 would be inf there
            check_finite(x, "x", dtype=torch.float32 if x.dtype == torch.float64 else None, what="the codebook search")
        if mask is not None:
            mask = self.layers[0]._forward_mask(x, mask, None)
        special = mask is not None or sample_codebook_temp is not None or self.implicit_neural_codebook

        residual = self.project_in(x)
        if self.has_projections and eager_checks_enabled():
            check_finite(residual, "x after project_in", dtype=torch.float32, what="the codebook search")
        quantized_out = torch.zeros_like(residual)
        last_stage = self._dropout_last_stage(x.device, rand_quantize_dropout_fixed_seed)
        all_indices, all_losses, stage_inputs = [], [], []
        for stage, layer in enumerate(self.layers[:used]):
            if stage > last_stage:
                all_indices.append(torch.full(x.shape[:2], -1, dtype=torch.long, device=x.device))
                all_losses.append(torch.zeros(1, device=x.device))
                continue
            stage_inputs.append(residual.detach())
            if special:
                quantized, stage_indices, loss = self._stage_call(
                    stage, residual, quantized_out, mask, sample_codebook_temp, freeze_codebook or None, x.requires_grad
                )
            else:
                quantized, stage_indices, loss = layer.quantize_tokens(
                    residual, input_requires_grad=x.requires_grad, refresh_embed=not self.shared_codebook,
                    freeze_codebook=freeze_codebook or None,
                )
            if self.quant_grad_frac:
                residual = residual - frac_gradient(quantized, self.quant_grad_frac)
            else:
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
        quantized_out = self.project_out(quantized_out)
        if mask is not None:
            fill = torch.zeros_like(quantized_out) if self.layers[0].options.return_zeros_for_masked_padding else x
            quantized_out = torch.where(mask[..., None], quantized_out, fill)
            indices_out = indices_out.masked_fill(~mask[None], -1)
        outputs: tuple[torch.Tensor, ...] = (
            quantized_out if self.channel_last else quantized_out.transpose(1, 2),
            conv.residual_indices_from_seed(self.conventions, indices_out),
            losses if self.conventions == SEED else losses.reshape(-1),
        )
        if return_all_codes:
            outputs = (*outputs, self._codes_from_seed_indices(indices_out)[:used])
        return outputs

    def _stage_call(
        self, stage: int, residual: torch.Tensor, quantized_out: torch.Tensor, mask: torch.Tensor | None,
        temperature: float | None, freeze_codebook: bool | None, input_requires_grad: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One stage through `VectorQuantize.quantize_call` (masks, temperature, implicit codebooks)."""
        transform = None
        if self.implicit_neural_codebook and stage > 0:
            mlp = self.mlps[stage - 1]

            def transform(codes: torch.Tensor) -> torch.Tensor:
                return mlp(codes, condition=quantized_out)

        call = ForwardCall(mask=mask, sample_codebook_temp=temperature, freeze_codebook=freeze_codebook,
                           codebook_transform_fn=transform)
        result = self.layers[stage].quantize_call(residual, call, input_requires_grad, refresh_embed=not self.shared_codebook)
        return result.quantized, result.indices, result.loss.reshape(1)

    def search_rows(self, x: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        """Rows stage s searches when the earlier stages served ``indices`` (q, b, n), float32.

        ``indices`` are (quantizer, batch, seq) whatever the module's conventions; x is in the
        module's layout.

        Returns (q, b * n, codebook_dim). The residual of stage s is project_in(x) minus this
        module's codes of ``indices[:s]``: with another runtime's indices, the rows that runtime's
        later stages must have searched if its codebooks are this module's. Without ``indices``,
        the module's own tokens. Rows after a dropped stage (index -1) are those of the last
        stage that ran.
        """
        check_tensor(x, "x")
        with torch.no_grad():
            if indices is None:
                indices = conv.residual_indices_to_seed(self.conventions, self.eval_tokens(x))
            x = self._check_x(x)
            check_integer(indices, "indices")
            if tuple(indices.shape) != (self.num_quantizers, *x.shape[:2]):
                check_axis_size(indices, 0, self.num_quantizers, "indices", "quantizers")
            residual = self.project_in(x).reshape(-1, self.codebook_dim)
            rows = []
            for stage, layer in enumerate(self.layers):
                rows.append(layer._codebook.transform_input(residual).float())
                chosen = indices[stage].reshape(-1).long()
                valid = (chosen >= 0) & (chosen < layer.codebook_size)
                codes = layer.codebook.detach()[chosen.clamp(0, layer.codebook_size - 1)]
                residual = residual - codes.to(residual.dtype) * valid[:, None]
            return torch.stack(rows)

    def eval_tokens(self, x: torch.Tensor, n_q: int | None = None) -> torch.Tensor:
        """The indices an eval-mode forward gives for ``x``, whatever mode the module is in."""
        return eval_forward_indices(self, x, n_q=n_q)

    def codebook_usage(self, dead_below: float | None = None) -> list[Any]:
        """`CodebookUsage` (perplexity, dead codes, from the EMA cluster sizes) of every stage."""
        return [layer.codebook_usage(dead_below) for layer in self.layers]

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
            if self.uniform_codebook_size:
                check_index_range(indices, self.codebook_size, "indices", allow_dropped=True)
            else:
                for stage in range(min(indices.shape[0], self.num_quantizers)):
                    check_index_range(indices[stage], self.codebook_sizes[stage], f"indices of stage {stage}",
                                      allow_dropped=True)
            if not all(layer.initialized for layer in self.layers):
                raise UninitializedCodebookError(
                    "this ResidualVQ was built with kmeans_init=True and has not seen a training batch: its codebooks "
                    "are all zeros; run a forward pass in training mode (or load trained weights) before decoding"
                )
        codes = []
        running = None
        for stage, layer in enumerate(self.layers):
            if stage >= indices.shape[0]:
                codes.append(torch.zeros(*indices.shape[1:], self.codebook_dim, device=indices.device))
                continue
            stage_indices = indices[stage].long()
            dropped = stage_indices < 0
            if self.implicit_neural_codebook and stage > 0:  # codes of the MLP of the codebook and the running sum
                per_position = self.mlps[stage - 1](layer.codebook, condition=running)  # (b, n, K, d)
                picked = stage_indices.clamp(min=0)[..., None, None].expand(*stage_indices.shape, 1, self.codebook_dim)
                stage_codes = per_position.gather(-2, picked).squeeze(-2)
            else:
                stage_codes = layer.codebook[stage_indices.clamp(min=0)]
            stage_codes = stage_codes.masked_fill(dropped[..., None], 0.0)
            if self.implicit_neural_codebook:
                running = stage_codes if running is None else running + stage_codes
            codes.append(stage_codes)
        return torch.stack(codes)

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """What forward returns as `quantized` for these indices (in the module's layout)."""
        out = self.project_out(self.get_codes_from_indices(indices).sum(dim=0))
        return out if self.channel_last else out.transpose(-1, -2)

    @classmethod
    def from_vector_quantize_pytorch(cls, module: nn.Module) -> ResidualVQ:
        """Convert a trained `vector_quantize_pytorch.ResidualVQ`, weights and EMA state included."""
        from vqdeploy.nn.convert import load_reference_state, residual_vq_config

        converted = cls(**residual_vq_config(module))
        load_reference_state(converted, module)
        return converted.train(module.training)
