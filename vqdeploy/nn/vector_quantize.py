"""VectorQuantize with the API of vector-quantize-pytorch (the seed) and an EMA codebook."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
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
from vqdeploy.errors import ConfigError, UninitializedCodebookError
from vqdeploy.nn import conventions as conv
from vqdeploy.nn.codebook import EMACodebook
from vqdeploy.nn.conventions import SEED, check_conventions
from vqdeploy.nn.gradients import rotation_trick as rotate_to
from vqdeploy.nn.gradients import straight_through
from vqdeploy.spec import Layout, QuantizerSpec, layout_for


class VectorQuantize(nn.Module):
    """Vector quantizer with an exponential-moving-average codebook.

    >>> import torch
    >>> vq = VectorQuantize(dim=256, codebook_size=512, decay=0.8, commitment=1.0)
    >>> quantized, indices, commit_loss = vq(torch.randn(1, 1024, 256))
    >>> tuple(quantized.shape), tuple(indices.shape), tuple(commit_loss.shape)
    ((1, 1024, 256), (1, 1024), (1,))

    Inputs are (batch, seq, dim), or (batch, dim) for one token, or (batch, dim, seq) with
    ``channel_last=False``, or (batch, dim, height, width) with ``accept_image_fmap=True``.
    Indices come back as (batch, seq) (with a trailing heads axis when ``heads > 1``).

    Under torch.distributed, ``sync_codebook`` (None: on whenever a process group of more than one
    rank is initialised, checked at every training forward) makes W ranks train the codebook as one
    process on the whole batch; ``sync_kmeans=False`` initialises it by k-means on rank 0's shard
    alone. See `vqdeploy.nn.distributed`.

    Options of vector-quantize-pytorch 1.32 that vqdeploy implements: ``rotation_trick`` (the
    rotation-trick gradient instead of straight-through; off here, on in 1.32 and in
    `vqdeploy.compat.vector_quantize_pytorch`), ``freeze_codebook`` (training leaves the EMA state
    alone), ``ema_update=False`` (the codebook stays fixed; dead codes are still replaced),
    ``layernorm_after_project_in``. ``conventions`` is ``"seed"`` (loss (1,)) or
    ``"vector_quantize_pytorch"`` (loss ()). ``eval_only_options`` is set by the converter: options
    of the module it came from that vqdeploy serves but does not train (a training forward refuses
    them by name).
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        decay: float = 0.8,
        commitment: float | None = None,
        eps: float = 1e-5,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        threshold_ema_dead_code: float = 0,
        use_cosine_sim: bool = False,
        codebook_dim: int | None = None,
        heads: int = 1,
        separate_codebook_per_head: bool = False,
        accept_image_fmap: bool = False,
        channel_last: bool = True,
        commitment_weight: float | None = None,
        sync_codebook: bool | None = None,
        sync_kmeans: bool = True,
        rotation_trick: bool = False,
        freeze_codebook: bool = False,
        ema_update: bool = True,
        layernorm_after_project_in: bool = False,
        eval_only_options: Sequence[str] = (),
        conventions: str = SEED,
    ):
        super().__init__()
        conventions = check_conventions(conventions)
        if commitment is not None and commitment_weight is not None and commitment != commitment_weight:
            raise ConfigError(
                f"commitment={commitment} and its alias commitment_weight={commitment_weight} disagree; pass one"
            )
        commitment = 1.0 if commitment is None and commitment_weight is None else (
            commitment if commitment is not None else commitment_weight
        )
        sizes = (("dim", dim), ("codebook_size", codebook_size), ("heads", heads), ("codebook_dim", codebook_dim))
        for name, value in sizes:
            if name == "codebook_dim" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not 0.0 <= decay <= 1.0:
            raise ConfigError(f"decay must lie in [0, 1], got {decay}")

        codebook_dim = codebook_dim if codebook_dim is not None else dim
        self.config: dict[str, Any] = dict(
            dim=dim, codebook_size=codebook_size, decay=decay, commitment=commitment, eps=eps,
            kmeans_init=kmeans_init, kmeans_iters=kmeans_iters,
            threshold_ema_dead_code=threshold_ema_dead_code, use_cosine_sim=use_cosine_sim,
            codebook_dim=codebook_dim, heads=heads, separate_codebook_per_head=separate_codebook_per_head,
            accept_image_fmap=accept_image_fmap, channel_last=channel_last,
            rotation_trick=rotation_trick, freeze_codebook=freeze_codebook, ema_update=ema_update,
            layernorm_after_project_in=layernorm_after_project_in, eval_only_options=list(eval_only_options),
            conventions=conventions,
        )
        self.rotation_trick, self.freeze_codebook, self.ema_update = rotation_trick, freeze_codebook, ema_update
        self.eval_only_options, self.conventions = tuple(eval_only_options), conventions
        self.dim, self.codebook_size, self.codebook_dim = dim, codebook_size, codebook_dim
        self.heads, self.separate_codebook_per_head = heads, separate_codebook_per_head
        self.commitment = commitment
        self.use_cosine_sim = use_cosine_sim
        self.accept_image_fmap, self.channel_last = accept_image_fmap, channel_last

        inner_dim = codebook_dim * heads
        self.has_projections = inner_dim != dim
        self.project_in = nn.Linear(dim, inner_dim) if self.has_projections else nn.Identity()
        if self.has_projections and layernorm_after_project_in:  # keys project_in.0 / .1, as in 1.32
            self.project_in = nn.Sequential(self.project_in, nn.LayerNorm(inner_dim))
        self.project_out = nn.Linear(inner_dim, dim) if self.has_projections else nn.Identity()
        self._codebook = EMACodebook(
            dim=codebook_dim,
            codebook_size=codebook_size,
            num_codebooks=heads if separate_codebook_per_head else 1,
            decay=decay,
            eps=eps,
            kmeans_init=kmeans_init,
            kmeans_iters=kmeans_iters,
            threshold_ema_dead_code=threshold_ema_dead_code,
            use_cosine_sim=use_cosine_sim,
            sync_codebook=sync_codebook,
            sync_kmeans=sync_kmeans,
        )

    # -- public properties ------------------------------------------------------------------
    @property
    def codebook(self) -> torch.Tensor:
        """(K, D), or (heads, K, D) with separate codebooks per head."""
        embed = self._codebook.embed
        return embed if self.separate_codebook_per_head else embed[0]

    @property
    def layout(self) -> Layout:
        """How inputs are laid out (`vqdeploy.spec`): channel last, channel first or image."""
        return layout_for(self.channel_last, self.accept_image_fmap)

    @property
    def input_layout(self) -> str:
        return self.layout.name

    @property
    def spec(self) -> QuantizerSpec:
        """What this module takes and returns (`vqdeploy.spec`)."""
        return QuantizerSpec(type(self).__name__, self.layout, self.dim, self.codebook_size, heads=self.heads)

    # -- layouts ------------------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> None:
        layout = self.layout
        check_tensor(x, "x")
        check_floating(x, "x")
        check_rank(x, layout.ranks, "x", layout.expected())
        check_axis_size(x, 1 if x.ndim == 2 and not layout.image else layout.feature_axis, self.dim, "x", "dim")
        if eager_checks_enabled():  # the search sees float32: a float64 1e300 would be inf there
            check_finite(x, "x", dtype=torch.float32 if x.dtype == torch.float64 else None, what="the codebook search")

    def _to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Any accepted input layout -> (batch, tokens, dim)."""
        return self.layout.to_tokens(x)

    def _from_tokens(self, t: torch.Tensor, like_shape: torch.Size) -> torch.Tensor:
        """(batch, tokens, ...) -> the layout the input came in (inverse of `_to_tokens`)."""
        return self.layout.from_tokens(t, like_shape)

    def _index_shape(self, like_shape: torch.Size) -> tuple[int, ...]:
        """Shape of the indices for an input of `like_shape` (before the trailing heads axis)."""
        return self.layout.index_shape(like_shape)

    def _split_heads(self, tokens: torch.Tensor) -> torch.Tensor:
        """(b, n, heads * d) -> (H, b * n * heads / H, d) rows for the codebook(s)."""
        b, n, _ = tokens.shape
        per_head = tokens.reshape(b, n, self.heads, self.codebook_dim)
        if self.separate_codebook_per_head:
            return per_head.permute(2, 0, 1, 3).reshape(self.heads, b * n, self.codebook_dim)
        return per_head.reshape(1, b * n * self.heads, self.codebook_dim)

    def _merge_heads(self, rows: torch.Tensor, b: int, n: int) -> torch.Tensor:
        """Inverse of `_split_heads`: (H, M, ...) -> (b, n, heads, ...)."""
        tail = rows.shape[2:]
        if self.separate_codebook_per_head:
            return rows.reshape(self.heads, b, n, *tail).permute(1, 2, 0, *range(3, 3 + len(tail)))
        return rows.reshape(b, n, self.heads, *tail)

    # -- forward ---------------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        indices: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        lens: torch.Tensor | None = None,
        topk: int | None = None,
        sample_codebook_temp: float | None = None,
        freeze_codebook: bool | None = None,
        return_loss_breakdown: bool = False,
        codebook_transform_fn: Any = None,
        ema_update_weight: Any = None,
        accum_ema_update: bool = False,
        ema_update: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (quantized, indices, commit_loss).

        commit_loss has shape (1,) with the seed's conventions, () (a scalar) with 1.32's.
        `freeze_codebook` and `ema_update` override the constructor's for this call; the other
        arguments are 1.32's and are refused (UnsupportedOptionError) unless at their default.
        """
        if not (indices is None and mask is None and lens is None and topk is None and codebook_transform_fn is None
                and ema_update_weight is None and not return_loss_breakdown and not accum_ema_update):
            conv.check_forward_options("VectorQuantize", conv.VQ_FORWARD, dict(
                indices=indices, mask=mask, lens=lens, topk=topk, return_loss_breakdown=return_loss_breakdown,
                codebook_transform_fn=codebook_transform_fn, ema_update_weight=ema_update_weight,
                accum_ema_update=accum_ema_update,
            ))  # sample_codebook_temp is inert: it acts only with stochastic sampling, which is refused
        self._check_input(x)
        tokens = self._to_tokens(x)
        quantized, indices, loss = self.quantize_tokens(
            tokens, input_requires_grad=x.requires_grad, freeze_codebook=freeze_codebook, ema_update=ema_update
        )
        indices = indices.reshape(*self._index_shape(x.shape), *indices.shape[2:])
        if self.conventions != SEED:
            loss = loss.reshape(())
        return self._from_tokens(quantized, x.shape), indices, loss

    def quantize_tokens(
        self,
        tokens: torch.Tensor,
        input_requires_grad: bool | None = None,
        refresh_embed: bool = True,
        freeze_codebook: bool | None = None,
        ema_update: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(b, n, dim) -> quantized (b, n, dim), indices (b, n[, heads]), loss (1,). No input checks."""
        codebook = self._codebook
        if self.training and self.eval_only_options:
            raise conv.eval_only_error("VectorQuantize", self.eval_only_options)
        freeze_codebook = self.freeze_codebook if freeze_codebook is None else freeze_codebook
        ema_update = self.ema_update if ema_update is None else ema_update
        if not self.training and eager_checks_enabled() and not bool(codebook.initted):
            raise UninitializedCodebookError(
                "this VectorQuantize was built with kmeans_init=True and has not seen a training batch; "
                "run a forward pass in training mode first"
            )
        b, n, _ = tokens.shape
        dtype = tokens.dtype
        rows = self._rows(tokens)
        if self.has_projections and eager_checks_enabled():  # project_in may overflow what came in finite
            check_finite(rows, "x after project_in", what="the codebook search")

        learns = self.training and codebook.begin_training_step()
        if learns and not bool(codebook.initted):
            codebook.init_with_kmeans_(rows.detach())

        indices = codebook.nearest(rows)
        codes = codebook.lookup(indices).to(rows.dtype)

        loss = torch.zeros(1, device=tokens.device)
        if self.training:
            if self.commitment > 0:
                loss = (F.mse_loss(codes.detach(), rows) * self.commitment).reshape(1)
            if learns:
                track = rows.detach()
                # 1.32: a frozen codebook is not touched; without EMA updates only dead codes are replaced
                if not freeze_codebook and (ema_update or codebook.threshold_ema_dead_code > 0):
                    codebook.track_usage_(track, indices)
                    if refresh_embed and ema_update:  # a shared ResidualVQ codebook refreshes once, after all stages
                        codebook.refresh_embed_()
                    codebook.expire_dead_codes_(track)  # 1.32 replaces dead codes after every stage, shared or not
            requires_grad = tokens.requires_grad if input_requires_grad is None else input_requires_grad
            if requires_grad:
                codes = rotate_to(rows, codes) if self.rotation_trick else straight_through(rows, codes)

        quantized = self._merge_heads(codes, b, n).reshape(b, n, self.heads * self.codebook_dim)
        quantized = self.project_out(quantized.to(dtype))
        indices = self._merge_heads(indices, b, n)
        indices = indices if self.heads > 1 else indices.squeeze(-1)
        return quantized, indices, loss

    def _rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """(b, n, dim) tokens -> (H, M, codebook_dim) float32 rows the codebook search sees."""
        return self._codebook.transform_input(self._split_heads(self.project_in(tokens))).float()

    def search_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The rows each codebook search sees for input ``x`` (any accepted layout), in float32.

        Shape (H, M, codebook_dim): H = heads with separate codebooks (else 1); row m of search h
        belongs to the token of index position m in the flattened (batch, tokens[, heads]) order
        of the indices forward returns, for head h (separate codebooks) or for every head.
        """
        self._check_input(x)
        with torch.no_grad():
            return self._rows(self._to_tokens(x))

    # -- decode -----------------------------------------------------------------------------------
    def _check_indices(self, indices: torch.Tensor) -> None:
        check_tensor(indices, "indices")
        check_integer(indices, "indices")
        if eager_checks_enabled() and not bool(self._codebook.initted):
            raise UninitializedCodebookError(
                "this VectorQuantize was built with kmeans_init=True and has not seen a training batch: its codebook "
                "is all zeros; run a forward pass in training mode (or load trained weights) before decoding"
            )
        if eager_checks_enabled():
            check_index_range(indices, self.codebook_size, "indices")
        if self.heads > 1:
            check_axis_size(indices, -1, self.heads, "indices", "heads (trailing axis)")

    def _codes_channel_last(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (..., [heads]) -> codes (..., heads * codebook_dim), channel last."""
        embed = self._codebook.embed
        if self.heads == 1:
            return embed[0][indices.long()]
        per_head = [embed[h if self.separate_codebook_per_head else 0][indices[..., h].long()] for h in range(self.heads)]
        return torch.cat(per_head, dim=-1)

    def _channel_first_if_needed(self, t: torch.Tensor) -> torch.Tensor:
        if (self.accept_image_fmap or not self.channel_last) and t.ndim > 2:
            return t.movedim(-1, 1)
        return t

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Codebook vectors for `indices` (before project_out), in the module's input layout."""
        self._check_indices(indices)
        return self._channel_first_if_needed(self._codes_channel_last(indices))

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """What forward returns as `quantized` for these indices (after project_out)."""
        self._check_indices(indices)
        return self._channel_first_if_needed(self.project_out(self._codes_channel_last(indices)))

    # -- conversion -------------------------------------------------------------------------------
    @classmethod
    def from_vector_quantize_pytorch(cls, module: nn.Module) -> VectorQuantize:
        """Convert a trained `vector_quantize_pytorch.VectorQuantize`, weights and EMA state included."""
        from vqdeploy.nn.convert import vector_quantize_config

        converted = cls(**vector_quantize_config(module))
        converted.load_state_dict(module.state_dict(), strict=True)
        return converted.train(module.training)
