"""VectorQuantize with the API of vector-quantize-pytorch (the seed) and an EMA codebook."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
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
from vqdeploy.errors import (
    ConfigError,
    InputDtypeError,
    InputShapeError,
    NonFiniteInputError,
    UninitializedCodebookError,
    UnsupportedOptionError,
)
from vqdeploy.nn import conventions as conv
from vqdeploy.nn.codebook import AffineOptions, CodebookUsage, EMACodebook
from vqdeploy.nn.conventions import SEED, check_conventions
from vqdeploy.nn.gradients import rotation_trick as rotate_to
from vqdeploy.nn.gradients import straight_through
from vqdeploy.nn.losses import (
    LossBreakdown,
    diversity_loss,
    negative_distances,
    negative_distances_per_row,
    orthogonal_loss,
    sample_codes,
)
from vqdeploy.nn.options import TrainingOptions
from vqdeploy.nn.options import training_options as _resolve_options
from vqdeploy.ops.custom_op import MODES
from vqdeploy.spec import Layout, QuantizerSpec, layout_for


@dataclass(frozen=True)
class ForwardCall:
    """The per-call arguments of a forward (1.32's names); all defaults: the plain forward."""

    mask: torch.Tensor | None = None
    topk: int | None = None
    sample_codebook_temp: float | None = None
    freeze_codebook: bool | None = None
    codebook_transform_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
    ema_update_weight: torch.Tensor | Callable | None = None
    accum_ema_update: bool = False
    ema_update: bool | None = None

    @property
    def plain(self) -> bool:
        """Whether only freeze_codebook / ema_update are set (the seed's forward)."""
        return (self.mask is None and self.topk is None and self.sample_codebook_temp is None
                and self.codebook_transform_fn is None and self.ema_update_weight is None and not self.accum_ema_update)


@dataclass
class QuantizeResult:
    """What `VectorQuantize.quantize_call` returns, on (b, n, ...) tokens."""

    quantized: torch.Tensor
    indices: torch.Tensor
    loss: torch.Tensor
    breakdown: LossBreakdown


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
        accept_3d_fmap: bool = False,
        training_options: TrainingOptions | None = None,
        **options: Any,
    ):
        super().__init__()
        conventions = check_conventions(conventions)
        opts = _resolve_options(training_options, options, "VectorQuantize")
        if opts.learnable_codebook and ema_update:
            raise ConfigError("learnable_codebook=True learns the codebook by gradient: pass ema_update=False too")
        if opts.learnable_codebook and use_cosine_sim:
            raise ConfigError("learnable_codebook is not compatible with use_cosine_sim (as in 1.32)")
        if opts.straight_through and rotation_trick:
            raise ConfigError("straight_through and rotation_trick are two gradient estimators: pick one")
        if opts.affine_param and use_cosine_sim:
            raise ConfigError("affine_param takes a Euclidean codebook (use_cosine_sim=False), as in 1.32")
        if opts.orthogonal_reg_active_codes_only and heads > 1 and separate_codebook_per_head:
            raise ConfigError("orthogonal_reg_active_codes_only does not take separate codebooks per head (as in 1.32)")
        if accept_3d_fmap and accept_image_fmap:
            raise ConfigError("accept_image_fmap and accept_3d_fmap are two input layouts: pick one")
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
        if accept_3d_fmap:  # new options enter the config only when set: older configs stay as they were
            self.config["accept_3d_fmap"] = True
        self.config.update(opts.non_default())
        self.options = opts
        self._seed_training = opts == TrainingOptions()
        self.accept_3d_fmap = accept_3d_fmap
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
            learnable=opts.learnable_codebook or opts.orthogonal_reg_weight > 0,
            affine=AffineOptions(opts.affine_param_batch_decay, opts.affine_param_codebook_decay, opts.sync_affine_param)
            if opts.affine_param else None,
        )

    # -- public properties ------------------------------------------------------------------
    @property
    def codebook(self) -> torch.Tensor:
        """(K, D), or (heads, K, D) with separate codebooks per head."""
        embed = self._codebook.embed
        return embed if self.separate_codebook_per_head else embed[0]

    @property
    def commitment_weight(self) -> float:
        """The weight on the commitment loss (`commitment`), by 1.32's attribute name."""
        return self.commitment

    @property
    def effective_codebook(self) -> torch.Tensor:
        """The codes the search compares with, detached: `codebook`, or with affine_param the codebook
        moved to the tracked batch statistics. Shape as `codebook`."""
        embed = self._codebook.search_embed()
        return embed if self.separate_codebook_per_head else embed[0]

    @property
    def has_affine_codebook(self) -> bool:
        """Whether the searched codes are the codebook moved to tracked batch statistics (affine_param)."""
        return self._codebook.affine is not None

    @property
    def layout(self) -> Layout:
        """How inputs are laid out (`vqdeploy.spec`): channel last, channel first, image or volume."""
        return layout_for(self.channel_last, self.accept_image_fmap, self.accept_3d_fmap)

    @property
    def input_layout(self) -> str:
        return self.layout.name

    @property
    def initialized(self) -> bool:
        """False while a k-means initialised codebook has not seen its first training batch."""
        return bool(self._codebook.initted)

    def mark_initialized_(self) -> None:
        """Declare the codebook initialised (its codes were loaded from an export or elsewhere)."""
        self._codebook.initted.fill_(True)

    def set_search_mode(self, mode: str) -> None:
        """How eval forwards search the codebook: "exact" (default) or "fast" (on CUDA, tensor-core
        candidates and the same exact re-check: the same tokens). `vqdeploy.runtime` sets it from
        its precision."""
        if mode not in MODES:
            raise UnsupportedOptionError(f"search mode must be one of {', '.join(MODES)}, got {mode!r}")
        self._codebook.search_mode = mode

    @property
    def spec(self) -> QuantizerSpec:
        """What this module takes and returns (`vqdeploy.spec`)."""
        return QuantizerSpec(type(self).__name__, self.layout, self.dim, self.codebook_size, heads=self.heads)

    # -- layouts ------------------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor, finite: bool = True) -> None:
        layout = self.layout
        check_tensor(x, "x")
        check_floating(x, "x")
        check_rank(x, layout.ranks, "x", layout.expected())
        check_axis_size(x, 1 if x.ndim == 2 and not layout.image else layout.feature_axis, self.dim, "x", "dim")
        if finite and eager_checks_enabled():
            self._check_finite(x)

    def _check_finite(self, x: torch.Tensor) -> None:
        # the search sees float32: a float64 1e300 would be inf there
        check_finite(x, "x", dtype=torch.float32 if x.dtype == torch.float64 else None, what="the codebook search")

    def _search_checks_finite(self, x: torch.Tensor) -> bool:
        """Whether this forward can leave the NaN/Inf check of x to the search: in eval on CPU the
        op flags and refuses every non-finite row itself (`vqdeploy.ops.contract.exact_nearest`),
        so x is read once, not twice; the error is then worded on x by the check, run after it."""
        return not self.training and x.device.type == "cpu" and eager_checks_enabled()

    def _to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Any accepted input layout -> (batch, tokens, dim)."""
        return self.layout.to_tokens(x)

    def _from_tokens(self, t: torch.Tensor, like_shape: torch.Size) -> torch.Tensor:
        """(batch, tokens, ...) -> the layout the input came in (inverse of `_to_tokens`)."""
        return self.layout.from_tokens(t, like_shape)

    def _from_tokens_any(self, t: torch.Tensor, like_shape: torch.Size, extra: int) -> torch.Tensor:
        """(batch, tokens, *extra axes, d) -> the input layout, extra axes after the spatial ones (1.32)."""
        if not extra:
            return self._from_tokens(t, like_shape)
        tail = t.shape[2:-1]
        if self.accept_image_fmap or self.accept_3d_fmap:
            return t.movedim(-1, 1).reshape(like_shape[0], t.shape[-1], *like_shape[2:], *tail)
        if len(like_shape) == 2:
            return t.squeeze(1)
        return t if self.channel_last else t.movedim(-1, 1)

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
        codebook_transform_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        ema_update_weight: torch.Tensor | Callable | None = None,
        accum_ema_update: bool = False,
        ema_update: bool | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """Returns (quantized, indices, commit_loss), and the `LossBreakdown` with `return_loss_breakdown`.

        commit_loss has shape (1,) with the seed's conventions, () (a scalar) with 1.32's; with
        `topk` it is one loss per token and code (batch, seq, k) (eval: the weighted distance).
        `mask` (batch, seq) of bool, or `lens` (batch,) of lengths, marks the positions that count:
        padded ones neither update the codebook nor count in the loss, and come back as zeros
        (or the input, with return_zeros_for_masked_padding=False) with index -1. `topk` returns
        the k nearest codes (quantized (..., k, dim), indices (..., k)) and leaves the codebook
        alone. `freeze_codebook`, `ema_update` and `sample_codebook_temp` override the module's
        for this call; `ema_update_weight` scales each code's EMA step ((K,), (H, K) or a callable
        (sums, counts) -> weight); `accum_ema_update` accumulates the statistics until the next
        update; `codebook_transform_fn` maps the codebook (H, K, d) to one codebook per position
        (H, batch, seq, K, d) (ResidualVQ's implicit neural codebooks).

        Given `indices` (the codes the input should take, as forward returns them; -1 is ignored),
        forward is 1.32's cross-entropy mode: it returns (quantized, ce_loss), the cross entropy of
        the negative distances to the given codes, and quantized as 1.32 returns it there: in
        codebook space (before project_out), heads not merged, (batch, tokens, [k,] codebook_dim).
        A training forward updates the codebook as usual.
        """
        self._check_input(x, finite=False)
        call = ForwardCall(
            mask=self._forward_mask(x, mask, lens), topk=self._check_topk(topk), sample_codebook_temp=sample_codebook_temp,
            freeze_codebook=freeze_codebook, codebook_transform_fn=codebook_transform_fn,
            ema_update_weight=ema_update_weight, accum_ema_update=accum_ema_update, ema_update=ema_update,
        )
        # The plain eval forward searches with the op, which refuses NaN/Inf rows itself on CPU.
        search_checks = indices is None and call.plain and not return_loss_breakdown and self._search_checks_finite(x)
        if not search_checks:
            if eager_checks_enabled():
                self._check_finite(x)
            return self._forward_checked(x, call, return_loss_breakdown, indices)
        try:
            return self._forward_checked(x, call, return_loss_breakdown, indices)
        except NonFiniteInputError:
            self._check_finite(x)  # names x; if x is finite, its rows went bad after project_in
            raise

    def _forward_checked(
        self, x: torch.Tensor, call: ForwardCall, return_loss_breakdown: bool, indices: torch.Tensor | None
    ) -> tuple[torch.Tensor, ...]:
        """`forward` on a checked x (its values too, unless the search checks them)."""
        freeze_codebook, ema_update = call.freeze_codebook, call.ema_update
        tokens = self._to_tokens(x)
        if indices is not None:
            target = self._cross_entropy_target(indices, tokens.shape[0], tokens.shape[1])
            result = self.quantize_call(tokens, call, input_requires_grad=x.requires_grad, ce_target=target)
            return result.quantized, result.loss
        if call.plain and not return_loss_breakdown:  # the seed's path, one graph for eval and export
            quantized, indices, loss = self.quantize_tokens(
                tokens, input_requires_grad=x.requires_grad, freeze_codebook=freeze_codebook, ema_update=ema_update
            )
            indices = indices.reshape(*self._index_shape(x.shape), *indices.shape[2:])
            if self.conventions != SEED:
                loss = loss.reshape(())
            return self._from_tokens(quantized, x.shape), indices, loss
        result = self.quantize_call(tokens, call, input_requires_grad=x.requires_grad)
        index_shape = self._index_shape(x.shape)
        indices = result.indices.reshape(*index_shape, *result.indices.shape[2:])
        loss = result.loss
        if call.topk is not None and loss.ndim > 0:
            loss = loss.reshape(*index_shape, call.topk)
        elif loss.ndim == 0 and self.conventions == SEED:
            loss = loss.reshape(1)
        quantized = self._from_tokens_any(result.quantized, x.shape, extra=1 if call.topk is not None else 0)
        outputs: tuple[torch.Tensor, ...] = (quantized, indices, loss)
        return (*outputs, result.breakdown) if return_loss_breakdown else outputs

    def _forward_mask(self, x: torch.Tensor, mask: torch.Tensor | None, lens: torch.Tensor | None) -> torch.Tensor | None:
        """The (batch, seq) bool mask of a padded batch (from `mask` or `lens`), checked."""
        if mask is None and lens is None:
            return None
        if mask is not None and lens is not None:
            raise UnsupportedOptionError("pass mask or lens, not both")
        if self.accept_image_fmap or self.accept_3d_fmap or x.ndim == 2:
            raise UnsupportedOptionError("mask / lens apply to sequence inputs (batch, seq, dim), not to feature maps "
                                         "or one token per row (as in vector-quantize-pytorch)")
        seq = x.shape[1] if self.channel_last else x.shape[2]
        if lens is not None:
            check_integer(lens, "lens")
            check_rank(lens, (1,), "lens", "batch")
            check_axis_size(lens, 0, x.shape[0], "lens", "batch")
            mask = torch.arange(seq, device=lens.device)[None, :] < lens[:, None]
        if mask.dtype != torch.bool:
            raise InputDtypeError(f"mask must be a bool tensor (batch, seq), got dtype {str(mask.dtype).removeprefix('torch.')}")
        if tuple(mask.shape) != (x.shape[0], seq):
            raise InputShapeError(f"mask must have shape (batch, seq) = {(x.shape[0], seq)}, got {tuple(mask.shape)}")
        return mask.to(x.device)

    def _cross_entropy_target(self, indices: torch.Tensor, b: int, n: int) -> torch.Tensor:
        """Given codes (batch, tokens[, heads]) (or the forward's index layout) -> (H, M) over the search rows."""
        check_tensor(indices, "indices")
        check_integer(indices, "indices")
        if indices.ndim < 1 or indices.shape[0] != b or indices.numel() != b * n * self.heads:
            raise InputShapeError(
                f"indices must hold one code per token{' and head' if self.heads > 1 else ''} "
                f"({b} x {n}{f' x {self.heads}' if self.heads > 1 else ''}), got shape {tuple(indices.shape)}"
            )
        if eager_checks_enabled() and bool(((indices < -1) | (indices >= self.codebook_size)).any()):
            raise InputShapeError(f"indices must lie in [-1, {self.codebook_size}) (-1: ignored), got "
                                  f"{int(indices.min())}..{int(indices.max())}")
        target = indices.reshape(b, n, self.heads).long()
        if self.separate_codebook_per_head:
            return target.permute(2, 0, 1).reshape(self.heads, b * n)
        return target.reshape(1, b * n * self.heads)

    def _cross_entropy_codes(self, codes: torch.Tensor, b: int, n: int) -> torch.Tensor:
        """Search-row codes (H, M, [k,] d) -> 1.32's quantize of the cross-entropy mode."""
        tail = codes.shape[2:]
        if self.heads == 1:
            return codes.reshape(b, n, *tail)
        if self.separate_codebook_per_head:
            return codes.reshape(self.heads, b, n, *tail)
        per_token = codes.reshape(b, n, self.heads, *tail).movedim(2, 1)  # 1.32: '1 (b h) n d'
        return per_token.reshape(1, b * self.heads, n, *tail)

    def _check_topk(self, topk: int | None) -> int | None:
        if topk is None:
            return None
        if self.heads > 1:
            raise UnsupportedOptionError("topk takes single-head quantizers (heads=1), as in vector-quantize-pytorch 1.32")
        if isinstance(topk, bool) or int(topk) != topk or topk < 1:
            raise ConfigError(f"topk must be a positive integer, got {topk!r}")
        if self.training and self.options.commitment_use_cross_entropy_loss:
            raise UnsupportedOptionError("topk does not train with commitment_use_cross_entropy_loss (as in 1.32)")
        return min(int(topk), self.codebook_size)

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
        if self.training and not self._seed_training:
            result = self.quantize_call(
                tokens, ForwardCall(freeze_codebook=freeze_codebook, ema_update=ema_update), input_requires_grad,
                refresh_embed,
            )
            return result.quantized, result.indices, result.loss.reshape(1)
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

    def _row_keep(self, mask: torch.Tensor | None, b: int, n: int) -> torch.Tensor | None:
        """(batch, seq) mask -> (M,) bool over the rows of every search (heads laid out as `_split_heads`)."""
        if mask is None:
            return None
        keep = mask.reshape(b * n)
        if self.heads > 1 and not self.separate_codebook_per_head:
            keep = keep[:, None].expand(b * n, self.heads).reshape(-1)
        return keep

    def quantize_call(
        self, tokens: torch.Tensor, call: ForwardCall, input_requires_grad: bool | None = None, refresh_embed: bool = True,
        ce_target: torch.Tensor | None = None,
    ) -> QuantizeResult:
        """The general forward on (b, n, dim) tokens: every training option, masks, top-k, transformed codebooks.

        With `ce_target` ((H, M) codes over the search rows), the cross-entropy mode: the result's
        quantized is the codes in 1.32's layout of that mode and its loss the cross entropy.
        """
        codebook, opts = self._codebook, self.options
        if self.training and self.eval_only_options:
            raise conv.eval_only_error("VectorQuantize", self.eval_only_options)
        if not self.training and eager_checks_enabled() and not bool(codebook.initted):
            raise UninitializedCodebookError(
                "this VectorQuantize was built with kmeans_init=True and has not seen a training batch; "
                "run a forward pass in training mode first"
            )
        freeze = self.freeze_codebook if call.freeze_codebook is None else call.freeze_codebook
        ema_update = self.ema_update if call.ema_update is None else call.ema_update
        topk, transform = call.topk, call.codebook_transform_fn
        if transform is not None and self.heads > 1:
            raise UnsupportedOptionError("codebook_transform_fn takes single-head quantizers (heads=1)")
        b, n, _ = tokens.shape
        dtype, device = tokens.dtype, tokens.device
        rows = self._rows(tokens)  # (H, M, d)
        keep = self._row_keep(call.mask, b, n)
        valid_rows = rows.detach() if keep is None else rows.detach()[:, keep]

        learns = self.training and codebook.begin_training_step()
        if learns and not bool(codebook.initted):
            codebook.init_with_kmeans_(valid_rows)
        if learns and codebook.affine is not None:
            codebook.update_affine_(valid_rows, training=True)

        embed = codebook.search_embed(keep_grad=self.training and codebook.learnable).to(rows.dtype)
        temperature = opts.sample_codebook_temp if call.sample_codebook_temp is None else call.sample_codebook_temp
        sampled = self.training and opts.stochastic_sample_codes and temperature > 0
        transformed = None
        if transform is not None:
            heads_, num_codes, d = embed.shape
            transformed = transform(embed).reshape(heads_, b * n, num_codes, d)
        need_logits = (topk is not None or transformed is not None or sampled or ce_target is not None
                       or (self.training and opts.needs_distances))
        logits = soft = None
        if need_logits:
            if transformed is None:
                logits = negative_distances(rows, embed, self.use_cosine_sim)
            else:
                logits = negative_distances_per_row(rows, transformed, self.use_cosine_sim)
        if sampled or topk is not None or transformed is not None:
            indices, soft = sample_codes(logits, temperature, opts.stochastic_sample_codes, opts.straight_through,
                                         self.training, topk)
            if topk is not None and not sampled and transformed is None:
                # the first of the k is the exact nearest code (the plain forward's), not a float32 near-tie flip
                nearest = codebook.nearest(rows, embed)[..., None]
                indices = torch.where(indices == nearest, indices[..., :1].expand_as(indices), indices)
                indices = torch.cat([nearest, indices[..., 1:]], dim=-1)
        else:
            indices = codebook.nearest(rows, embed)
            if self.training and opts.straight_through and temperature > 0:
                soft = (logits / temperature).softmax(dim=-1)
                soft = soft - soft.detach()

        heads_, m, d = rows.shape
        if transformed is not None:
            gather = indices[..., None] if topk is not None else indices[..., None, None]
            codes = transformed.gather(2, gather.expand(*gather.shape[:3], d) if topk is not None
                                       else gather.expand(heads_, m, 1, d))
            codes = codes if topk is not None else codes.squeeze(2)
        elif topk is not None:
            codes = embed[0].index_select(0, indices.reshape(-1)).reshape(heads_, m, topk, d)
        else:
            codes = codebook.lookup(indices, embed)
        if soft is not None and topk is None:
            codes = codes + torch.einsum("hmk,hkd->hmd", soft, embed)  # value 0: the Gumbel straight-through gradient
        x_rows = rows[:, :, None, :].expand(heads_, m, topk, d) if topk is not None else rows

        zero = torch.zeros((), device=device)
        commit = diversity = ortho = zero
        loss = zero
        commit_codes = codes
        if self.training:
            commit_codes = codes if (opts.learnable_codebook and not freeze) else codes.detach()
            requires_grad = tokens.requires_grad if input_requires_grad is None else input_requires_grad
            if requires_grad and opts.route_gradients_to_input:
                codes = rotate_to(x_rows, codes) if self.rotation_trick else straight_through(x_rows, codes)
            if opts.sync_update_v > 0:
                codes = codes + opts.sync_update_v * (codes - codes.detach())

        # codebook updates (1.32 updates before its regularisers read the codebook)
        if learns and not freeze and topk is None and (ema_update or codebook.threshold_ema_dead_code > 0):
            track_indices = indices.detach() if keep is None else indices.detach()[:, keep]
            codebook.track_usage_(valid_rows, track_indices, call.ema_update_weight, call.accum_ema_update)
            if not call.accum_ema_update:
                if refresh_embed and ema_update and not opts.manual_ema_update:
                    codebook.refresh_embed_()
                codebook.expire_dead_codes_(valid_rows)

        if ce_target is not None:  # 1.32 returns here: codebook-space codes and the cross entropy to the given codes
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ce_target.reshape(-1), ignore_index=-1)
            zero_ = torch.zeros((), device=device)
            return QuantizeResult(self._cross_entropy_codes(codes.to(dtype), b, n), ce_target, ce,
                                  LossBreakdown(zero_, zero_, zero_, zero_))

        if topk is not None and not self.training:
            per = F.mse_loss(codes, x_rows, reduction="none").mean(dim=-1)  # (1, M, k)
            if keep is not None:
                per = per * keep[None, :, None]
            loss = per * self.commitment if self.commitment > 0 else per
        if self.training:
            if opts.codebook_diversity_loss_weight > 0:
                diversity = diversity_loss(logits, opts.codebook_diversity_temperature, n)
                loss = loss + diversity * opts.codebook_diversity_loss_weight
            if self.commitment > 0:
                if opts.commitment_use_cross_entropy_loss:
                    target = indices if keep is None else indices.masked_fill(~keep[None], -1)
                    commit = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-1)
                elif topk is not None:
                    commit = F.mse_loss(commit_codes, x_rows, reduction="none").mean(dim=-1)
                    if keep is not None:
                        commit = commit * keep[None, :, None]
                elif keep is not None:
                    commit = F.mse_loss(commit_codes[:, keep], rows[:, keep])
                else:
                    commit = F.mse_loss(commit_codes, rows)
                loss = loss + commit * self.commitment
            if opts.orthogonal_reg_weight > 0:
                ortho = orthogonal_loss(self._regularised_codes(indices, keep))
                loss = loss + ortho * opts.orthogonal_reg_weight

        if topk is not None:
            quantized = codes.reshape(b, n, topk, self.codebook_dim)
            indices = indices.reshape(b, n, topk)
            loss = loss.reshape(b * n, topk) if loss.ndim > 0 else loss
        else:
            quantized = self._merge_heads(codes, b, n).reshape(b, n, self.heads * self.codebook_dim)
            indices = self._merge_heads(indices, b, n)
            indices = indices if self.heads > 1 else indices.squeeze(-1)
        quantized = self.project_out(quantized.to(dtype))
        if call.mask is not None:
            padded = ~call.mask
            fill = torch.zeros_like(tokens) if opts.return_zeros_for_masked_padding else tokens
            if topk is not None:
                fill = fill[:, :, None, :].expand_as(quantized)
                quantized = torch.where(padded[:, :, None, None], fill, quantized)
                indices = indices.masked_fill(padded[:, :, None], -1)
            else:
                quantized = torch.where(padded[:, :, None], fill.to(quantized.dtype), quantized)
                indices = indices.masked_fill(padded[:, :, None] if indices.ndim == 3 else padded, -1)
        breakdown = LossBreakdown(commit, diversity, ortho, zero)
        return QuantizeResult(quantized, indices, loss, breakdown)

    def _regularised_codes(self, indices: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """The codes the orthogonal regulariser sees: all, the batch's, at most orthogonal_reg_max_codes."""
        opts, codebook = self.options, self._codebook.embed
        if opts.orthogonal_reg_active_codes_only:
            used = indices if keep is None else indices[:, keep]
            codebook = codebook[:, torch.unique(used)]
        limit = opts.orthogonal_reg_max_codes
        if limit is not None and codebook.shape[-2] > limit:
            codebook = codebook[:, torch.randperm(codebook.shape[-2], device=codebook.device)[:limit]]
        return codebook

    # -- manual updates (1.32's API) ------------------------------------------------------------------
    @torch.no_grad()
    def update_ema_indices(self, x: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Fold the batch `x` with its `indices` (as forward returned them) into the EMA codebook.

        With forward(..., ema_update=False) or manual_ema_update, the update then happens here:
        the same statistics, refresh (unless manual_ema_update) and dead-code replacement as a
        training forward. Indices -1 count as code 0 unless masked out (as in 1.32).
        """
        self._check_input(x)
        check_integer(indices, "indices")
        mask = self._forward_mask(x, mask, None)
        tokens = self._to_tokens(x)
        b, n, _ = tokens.shape
        rows = self._rows(tokens)
        flat = indices.reshape(b, n, self.heads).long().clamp(min=0)
        if self.separate_codebook_per_head:
            flat = flat.permute(2, 0, 1).reshape(self.heads, b * n)
        else:
            flat = flat.reshape(1, -1)
        keep = self._row_keep(mask, b, n)
        if keep is not None:
            rows, flat = rows[:, keep], flat[:, keep]
        codebook = self._codebook
        if not codebook.begin_training_step():
            return
        codebook.track_usage_(rows, flat)
        if self.ema_update and not self.options.manual_ema_update:
            codebook.refresh_embed_()
        if self.training:
            codebook.expire_dead_codes_(rows)

    update_indices = update_ema_indices

    @torch.no_grad()
    def expire_codes_(self, x: torch.Tensor) -> None:
        """Replace dead codes by rows of `x` (b, n, codebook_dim · heads), in training (1.32's API)."""
        if not self.training:
            return
        b = x.shape[0]
        rows = self._codebook.transform_input(self._split_heads(x.reshape(b, -1, x.shape[-1]))).float()
        self._codebook.expire_dead_codes_(rows)

    def codebook_usage(self, dead_below: float | None = None) -> CodebookUsage:
        """Perplexity and dead-code count of the codebook(s), from the EMA cluster sizes (see `EMACodebook.usage`)."""
        return self._codebook.usage(dead_below)

    def _rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """(b, n, dim) tokens -> (H, M, codebook_dim) float32 rows the codebook search sees."""
        return self._codebook.transform_input(self._split_heads(self.project_in(tokens))).float()

    def eval_indices(self, x: torch.Tensor) -> torch.Tensor:
        """The indices an eval forward returns for ``x``, without the quantized vectors and losses it
        also computes (the runtime's encode: at D = 32 gathering codes and project_out took as long
        as the search). ``x`` is not checked again: the caller (`vqdeploy.runtime`) checked it; the rows
        after project_in are (a finite input can overflow there)."""
        tokens = self._to_tokens(x)
        b, n, _ = tokens.shape
        rows = self._rows(tokens)
        if self.has_projections and eager_checks_enabled():  # project_in may overflow what came in finite
            check_finite(rows, "x after project_in", what="the codebook search")
        indices = self._merge_heads(self._codebook.nearest(rows), b, n)
        indices = indices if self.heads > 1 else indices.squeeze(-1)
        return indices.reshape(*self._index_shape(x.shape), *indices.shape[2:])

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
        codebook = self._codebook
        embed = codebook.embed if codebook.affine is None else codebook.search_embed()  # the codes forward returns
        if self.heads == 1:
            return embed[0][indices.long()]
        per_head = [embed[h if self.separate_codebook_per_head else 0][indices[..., h].long()] for h in range(self.heads)]
        return torch.cat(per_head, dim=-1)

    def _channel_first_if_needed(self, t: torch.Tensor) -> torch.Tensor:
        if (self.accept_image_fmap or self.accept_3d_fmap or not self.channel_last) and t.ndim > 2:
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
        from vqdeploy.nn.convert import load_reference_state, vector_quantize_config

        converted = cls(**vector_quantize_config(module))
        load_reference_state(converted, module)
        return converted.train(module.training)
