"""EMA codebook: nearest-code search, exponential-moving-average updates, k-means init, dead codes.

Buffers keep the names of vector-quantize-pytorch (`embed`, `embed_avg`, `cluster_size`,
`initted`, all shaped with a leading codebook axis H) so that its state dicts load unchanged.
Under torch.distributed the codebook syncs itself (`sync_codebook`; what travels is described in
`vqdeploy.nn.distributed`), so whatever module holds it trains as one process on the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vqdeploy.checks import eager_checks_enabled
from vqdeploy.nn import distributed, reused_outputs
from vqdeploy.ops.custom_op import nearest_code


def l2norm(t: torch.Tensor) -> torch.Tensor:
    """Unit-normalise the last axis (the same eps as the reference library)."""
    return F.normalize(t, p=2, dim=-1, eps=1e-6)


def laplace_smoothing(counts: torch.Tensor, num_categories: int, eps: float) -> torch.Tensor:
    """(n_k + eps) / (sum n + K eps), along the last axis."""
    return (counts + eps) / (counts.sum(dim=-1, keepdim=True) + num_categories * eps)


def sample_row_numbers(total: int, num: int, device: torch.device) -> torch.Tensor:
    """`num` row numbers out of `total`, without replacement when there are enough rows."""
    if total >= num:
        return torch.randperm(total, device=device)[:num]
    return torch.randint(0, total, (num,), device=device)


def sample_rows(samples: torch.Tensor, num: int) -> torch.Tensor:
    """`num` rows of `samples`, without replacement when there are enough of them."""
    return samples[sample_row_numbers(samples.shape[0], num, samples.device)]


@dataclass(frozen=True)
class AffineOptions:
    """Decays of 1.32's affine_param statistics; `sync`: all-reduce the batch statistics."""

    batch_decay: float = 0.99
    codebook_decay: float = 0.9
    sync: bool = False


@dataclass(frozen=True)
class CodebookUsage:
    """Health of a codebook (one value per codebook: heads with separate codebooks have several)."""

    perplexity: list[float]
    dead_codes: list[int]
    codebook_size: int
    dead_below: float


def _reset_sync_state(module: EMACodebook, incompatible_keys: object) -> None:
    module.states_broadcast = False  # a state dict loaded on some ranks only: rank 0's wins again


class EMACodebook(nn.Module):
    """H codebooks of K codes of dimension D, learnt by exponential moving averages."""

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        num_codebooks: int = 1,
        decay: float = 0.8,
        eps: float = 1e-5,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        threshold_ema_dead_code: float = 0,
        use_cosine_sim: bool = False,
        sync_codebook: bool | None = None,
        sync_kmeans: bool = True,
        learnable: bool = False,
        affine: AffineOptions | None = None,
    ):
        """`learnable`: `embed` is an nn.Parameter (a codebook learnt by gradient, same state-dict key).
        `affine`: track batch and codebook statistics and search the codebook re-centred on them."""
        super().__init__()
        distributed.check_sync_options(sync_codebook, sync_kmeans)
        self.sync_codebook, self.sync_kmeans = sync_codebook, sync_kmeans
        self.syncing = False  # this training forward's decision, taken by `begin_training_step`
        self.states_broadcast = False
        self.rank_rows: torch.Tensor | None = None  # rows of each rank in this step's statistics
        self.register_load_state_dict_post_hook(_reset_sync_state)
        self.dim, self.codebook_size, self.num_codebooks = dim, codebook_size, num_codebooks
        self.decay, self.eps = decay, eps
        self.kmeans_iters = kmeans_iters
        self.threshold_ema_dead_code = threshold_ema_dead_code
        self.use_cosine_sim = use_cosine_sim
        self.search_mode = "exact"  # "fast" lets CUDA use tensor cores with a float32 re-check (same tokens)

        if kmeans_init:
            embed = torch.zeros(num_codebooks, codebook_size, dim)
        else:
            embed = torch.empty(num_codebooks, codebook_size, dim)
            nn.init.kaiming_uniform_(embed)
            if use_cosine_sim:
                embed = l2norm(embed)
        self.register_buffer("initted", torch.tensor(not kmeans_init))
        self.register_buffer("cluster_size", torch.ones(num_codebooks, codebook_size))
        self.register_buffer("embed_avg", embed.clone())
        self.learnable = learnable
        if learnable:
            self.embed = nn.Parameter(embed)
        else:
            self.register_buffer("embed", embed)
        self.affine = affine
        self._accumulated: tuple[torch.Tensor, torch.Tensor] | None = None  # accum_ema_update's sums
        if affine is not None:
            # 1.32's names; mean 0 / variance 1 until the first training batch: the identity transform
            self.register_buffer("batch_mean", torch.zeros(num_codebooks, 1, dim))
            self.register_buffer("batch_variance", torch.ones(num_codebooks, 1, dim))
            self.register_buffer("codebook_mean_needs_init", torch.tensor(True))
            self.register_buffer("codebook_mean", torch.zeros(num_codebooks, 1, dim))
            self.register_buffer("codebook_variance_needs_init", torch.tensor(True))
            self.register_buffer("codebook_variance", torch.ones(num_codebooks, 1, dim))

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        return l2norm(x) if self.use_cosine_sim else x

    # -- search and lookup ------------------------------------------------------------------
    def search_embed(self, keep_grad: bool = False) -> torch.Tensor:
        """(H, K, D): the codes a search compares rows with: `embed`, or with `affine` the codes
        moved from the codebook's tracked statistics to the batches' (1.32's affine_param)."""
        embed = self.embed if keep_grad else self.embed.detach()
        if self.affine is None:
            return embed
        codebook_std = self.codebook_variance.clamp(min=1e-5).sqrt()
        batch_std = self.batch_variance.clamp(min=1e-5).sqrt()
        return (embed - self.codebook_mean) * (batch_std / codebook_std) + self.batch_mean

    def nearest(self, flat: torch.Tensor, embed: torch.Tensor | None = None) -> torch.Tensor:
        """flat (H, M, D) -> indices (H, M): one nearest-code search per codebook."""
        embed = self.search_embed() if embed is None else embed.detach()
        if self.num_codebooks == 1:  # no stack: it would copy
            return nearest_code(flat[0], embed[0], self.search_mode).unsqueeze(0)
        return torch.stack([nearest_code(flat[h], embed[h], self.search_mode) for h in range(self.num_codebooks)])

    def lookup(self, indices: torch.Tensor, embed: torch.Tensor | None = None) -> torch.Tensor:
        """indices (H, M) -> codes (H, M, D) (of `embed`, default the searched codes, detached).

        Outside autograd and tracing, CPU codes are gathered straight into one output (no stack,
        which would copy them once more) whose memory a dropped earlier output of the same size
        gave back where there is one (`vqdeploy.nn.reused_outputs`)."""
        embed = self.search_embed() if embed is None else embed
        heads, rows = indices.shape
        if (embed.device.type == "cpu" and not (torch.is_grad_enabled() and embed.requires_grad)
                and eager_checks_enabled() and not torch.jit.is_tracing()):
            out = reused_outputs.empty((heads, rows, embed.shape[-1]), embed.dtype)
            for h in range(heads):
                torch.index_select(embed[h if self.num_codebooks > 1 else 0], 0, indices[h], out=out[h])
            return out
        if self.num_codebooks == 1:
            return embed[0].index_select(0, indices[0]).unsqueeze(0)
        return torch.stack([embed[h].index_select(0, indices[h]) for h in range(self.num_codebooks)])

    # -- training -------------------------------------------------------------------------------
    def begin_training_step(self) -> bool:
        """Whether this training forward updates the codebook; containers call it before the updates.

        Decides, at every forward, whether the updates sync (`distributed.sync_active`). A synced
        codebook does not learn under no_grad or inference mode (no collective may run there);
        one that does not sync always learns, as it always did. The first synced step broadcasts
        rank 0's state.
        """
        self.syncing = distributed.sync_active(self.sync_codebook)
        if not self.syncing:
            return True
        if not distributed.collectives_allowed():
            self.syncing = False
            return False
        if not self.states_broadcast:
            with torch.no_grad():
                distributed.broadcast_from_rank0_(list(self.buffers()))
            self.states_broadcast = True
        return True

    @torch.no_grad()
    def init_with_kmeans_(self, flat: torch.Tensor) -> None:
        """k-means on the first training batch (the global one when syncing); flat (H, M, D)."""
        if self.syncing and not self.sync_kmeans:  # rank 0's shard alone, its codebook broadcast
            if torch.distributed.get_rank() == 0:
                self._kmeans_(flat)
            distributed.broadcast_from_rank0_([self.embed_avg, self.cluster_size, self.embed])
        elif self.syncing:
            counts = distributed.rank_row_counts(flat.shape[1], flat.device)
            total = int(counts.sum())

            def initial_means(samples: torch.Tensor) -> torch.Tensor:
                picks = distributed.drawn_by_rank0(
                    lambda: sample_row_numbers(total, self.codebook_size, flat.device), self.codebook_size, flat.device
                )
                return distributed.global_rows(samples, picks, counts)

            self._kmeans_(flat, initial_means, distributed.all_reduce_sum_)
        else:
            self._kmeans_(flat)
        self.initted.fill_(True)

    def _kmeans_(
        self,
        flat: torch.Tensor,
        initial_means: Callable[[torch.Tensor], torch.Tensor] | None = None,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        for h in range(self.num_codebooks):
            means, counts = kmeans(
                flat[h], self.codebook_size, self.kmeans_iters, self.use_cosine_sim, initial_means, reduce
            )
            self.embed_avg[h].copy_(means * counts[:, None])
            self.cluster_size[h].copy_(counts)
        self.refresh_embed_()

    @torch.no_grad()
    def track_usage_(
        self, flat: torch.Tensor, indices: torch.Tensor, weight: torch.Tensor | Callable | None = None,
        accumulate: bool = False,
    ) -> None:
        """Fold one batch's code counts and code sums into the moving averages (summed over ranks when syncing).

        `weight` (1.32's ema_update_weight): a tensor (K,) or (H, K) scaling each code's EMA step, or
        a callable (sums (H, K, D), counts (H, K)) -> such a tensor. `accumulate` (accum_ema_update):
        add the statistics to an accumulator instead; the next update folds them in.
        """
        if self.affine is not None:  # statistics in the codebook's own frame
            codebook_std = self.codebook_variance.clamp(min=1e-5).sqrt()
            batch_std = self.batch_variance.clamp(min=1e-5).sqrt()
            flat = (flat - self.batch_mean) * (codebook_std / batch_std) + self.codebook_mean
        stats_numel = self.num_codebooks * self.codebook_size * (self.dim + 1)
        world = torch.distributed.get_world_size() if self.syncing else 0
        message = torch.zeros(stats_numel + world, dtype=flat.dtype, device=flat.device)
        stats = message[:stats_numel].view(self.num_codebooks, self.codebook_size, self.dim + 1)
        for h in range(self.num_codebooks):
            stats[h, :, : self.dim].index_add_(0, indices[h], flat[h])
            stats[h, :, self.dim] = torch.bincount(indices[h], minlength=self.codebook_size).to(flat.dtype)
        if self.syncing:
            # one collective for every head: [sums | counts | rows of each rank (for dead codes)]
            message[stats_numel + torch.distributed.get_rank()] = flat.shape[1]
            distributed.all_reduce_sum_(message)
            self.rank_rows = distributed.exact_row_counts(message[stats_numel:], flat.shape[1])
        counts, sums = stats[..., self.dim], stats[..., : self.dim]
        if accumulate:
            if self._accumulated is None:
                self._accumulated = (counts.clone(), sums.clone())
            else:
                self._accumulated[0].add_(counts)
                self._accumulated[1].add_(sums)
            return
        if self._accumulated is not None:
            counts, sums = counts + self._accumulated[0], sums + self._accumulated[1]
            self._accumulated = None
        if callable(weight):
            weight = weight(sums, counts)
        if weight is None:
            for h in range(self.num_codebooks):
                self.cluster_size[h].lerp_(counts[h].to(self.cluster_size.dtype), 1.0 - self.decay)
                self.embed_avg[h].lerp_(sums[h].to(self.embed_avg.dtype), 1.0 - self.decay)
            return
        weight = torch.as_tensor(weight, dtype=self.cluster_size.dtype, device=self.cluster_size.device)
        weight = weight.reshape(1, -1) if weight.ndim == 1 else weight
        if tuple(weight.shape) not in ((1, self.codebook_size), (self.num_codebooks, self.codebook_size)):
            from vqdeploy.errors import InputShapeError

            raise InputShapeError(
                f"ema_update_weight must have shape ({self.codebook_size},) or ({self.num_codebooks}, "
                f"{self.codebook_size}), got {tuple(weight.shape)}"
            )
        step = (1.0 - self.decay) * weight
        self.cluster_size.lerp_(counts.to(self.cluster_size.dtype), step)
        self.embed_avg.lerp_(sums.to(self.embed_avg.dtype), step[..., None])

    @torch.no_grad()
    def update_affine_(self, flat: torch.Tensor, training: bool) -> None:
        """Track the batch statistics of `flat` (H, M, D) and, in training, the codebook's (1.32's decays)."""
        affine = self.affine
        if training:
            embed = self.embed.detach()
            first = bool(self.codebook_mean_needs_init)
            self._decayed_("codebook_mean", embed.mean(dim=1, keepdim=True), affine.codebook_decay, first)
            self._decayed_("codebook_variance", embed.var(dim=1, unbiased=False, keepdim=True), affine.codebook_decay, first)
            self.codebook_mean_needs_init.fill_(False)
            self.codebook_variance_needs_init.fill_(False)
            batch_first = first
        else:
            batch_first = False
        if flat.shape[1] == 0:
            return
        if affine.sync and torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            count = torch.tensor(float(flat.shape[1]), device=flat.device, dtype=flat.dtype)
            total = flat.sum(dim=1, keepdim=True)
            distributed.all_reduce_sum_(count)
            distributed.all_reduce_sum_(total)
            mean = total / count
            spread = ((flat - mean) ** 2).sum(dim=1, keepdim=True)
            distributed.all_reduce_sum_(spread)
            variance = spread / count
        else:
            mean, variance = flat.mean(dim=1, keepdim=True), flat.var(dim=1, unbiased=False, keepdim=True)
        self._decayed_("batch_mean", mean, affine.batch_decay, batch_first)
        self._decayed_("batch_variance", variance, affine.batch_decay, batch_first)

    def _decayed_(self, name: str, value: torch.Tensor, decay: float, first: bool) -> None:
        buffer = getattr(self, name)
        if first:
            buffer.copy_(value)
        else:
            buffer.mul_(decay).add_(value.to(buffer.dtype) * (1 - decay))

    def usage(self, dead_below: float | None = None) -> CodebookUsage:
        """Codebook health from the EMA cluster sizes: perplexity and dead codes per codebook.

        A code is dead when its EMA cluster size is below `dead_below` (default: the module's
        threshold_ema_dead_code, or 1.0 when dead codes are not replaced). Perplexity is
        exp(entropy) of the EMA usage distribution: K when every code is used alike, 1 when one is.
        """
        threshold = dead_below if dead_below is not None else (self.threshold_ema_dead_code or 1.0)
        sizes = self.cluster_size.detach().double()
        p = sizes / sizes.sum(dim=-1, keepdim=True).clamp(min=1e-12)
        entropy = -(p * torch.log(p.clamp(min=1e-12))).sum(dim=-1)
        return CodebookUsage(
            perplexity=[float(v) for v in entropy.exp()],
            dead_codes=[int(v) for v in (sizes < threshold).sum(dim=-1)],
            codebook_size=self.codebook_size,
            dead_below=float(threshold),
        )

    def update_ema(self) -> None:
        """1.32's name for `refresh_embed_` (with manual_ema_update, the caller refreshes)."""
        self.refresh_embed_()

    @torch.no_grad()
    def refresh_embed_(self) -> None:
        """embed = embed_avg / Laplace-smoothed cluster sizes (unit-normalised for cosine)."""
        total = self.cluster_size.sum(dim=-1, keepdim=True)
        smoothed = laplace_smoothing(self.cluster_size, self.codebook_size, self.eps) * total
        embed = self.embed_avg / smoothed[..., None]
        self.embed.data.copy_(l2norm(embed) if self.use_cosine_sim else embed)

    @torch.no_grad()
    def expire_dead_codes_(self, flat: torch.Tensor, segments: int = 1) -> None:
        """Replace codes whose EMA cluster size fell under the threshold by vectors of the batch.

        flat (H, M, D); `segments` > 1 when M is several global batches laid end to end (the
        stage inputs of a ResidualVQ with a shared codebook): see `distributed.global_rows`.
        """
        if self.threshold_ema_dead_code <= 0:
            return
        if self.syncing:
            self._expire_dead_codes_synced_(flat, segments)
            return
        for h in range(self.num_codebooks):
            dead = (self.cluster_size[h] < self.threshold_ema_dead_code).nonzero().flatten()
            if dead.numel() == 0 or flat.shape[1] == 0:
                continue
            if dead.numel() > flat.shape[1]:  # more dead codes than samples: replace some now, the rest later
                dead = dead[torch.randperm(dead.numel(), device=dead.device)[: flat.shape[1]]]
            samples = sample_rows(self.transform_input(flat[h]), dead.numel()).to(self.embed.dtype)
            self.embed.data[h, dead] = samples
            self.cluster_size[h, dead] = self.threshold_ema_dead_code
            self.embed_avg[h, dead] = samples * self.threshold_ema_dead_code

    def _expire_dead_codes_synced_(self, flat: torch.Tensor, segments: int) -> None:
        """The same replacement with rows of the global batch, identical on every rank.

        Rank 0 makes the random choices in the order one process on the whole batch makes them.
        """
        deads = [(self.cluster_size[h] < self.threshold_ema_dead_code).nonzero().flatten() for h in range(self.num_codebooks)]
        if all(dead.numel() == 0 for dead in deads):  # cluster sizes are equal on every rank: so is this
            return
        counts, self.rank_rows = self.rank_rows, None  # sent with the statistics of this step
        if counts is None:
            counts = distributed.rank_row_counts(flat.shape[1] // segments, flat.device)
        total = int(counts.sum()) * segments
        if total == 0:
            return
        sizes = [min(dead.numel(), total) for dead in deads]

        def choose() -> torch.Tensor:
            choices = []
            for dead in deads:
                if dead.numel() == 0:
                    continue
                if dead.numel() > total:
                    dead = dead[torch.randperm(dead.numel(), device=dead.device)[:total]]
                choices += [dead, sample_row_numbers(total, dead.numel(), flat.device)]
            return torch.cat(choices)

        chosen = distributed.drawn_by_rank0(choose, 2 * sum(sizes), flat.device)
        dead_codes, picks, start = [], [], 0
        for h, size in enumerate(sizes):
            dead_codes.append(chosen[start : start + size])
            picks.append(chosen[start + size : start + 2 * size] + h * total)  # head h: segments h*S .. h*S + S - 1
            start += 2 * size
        local = self.transform_input(flat).reshape(-1, self.dim)  # (H * M, D), heads end to end
        rows = distributed.global_rows(local, torch.cat(picks), counts).to(self.embed.dtype)
        start = 0
        for h, (dead, size) in enumerate(zip(dead_codes, sizes, strict=True)):
            if size == 0:
                continue
            samples = rows[start : start + size]
            start += size
            self.embed.data[h, dead] = samples
            self.cluster_size[h, dead] = self.threshold_ema_dead_code
            self.embed_avg[h, dead] = samples * self.threshold_ema_dead_code


# Rows widened to float64 at a time by `cluster_statistics` (4 MiB of float64 temporaries at D = 64).
STATISTICS_BLOCK_VALUES = 2**19


def cluster_statistics(samples: torch.Tensor, buckets: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """(K, D + 1) float64: the sum of the rows of each cluster, then its count."""
    stats = torch.zeros(num_clusters, samples.shape[1] + 1, dtype=torch.float64, device=samples.device)
    step = max(1, STATISTICS_BLOCK_VALUES // max(samples.shape[1], 1))
    for start in range(0, samples.shape[0], step):
        stats[:, :-1].index_add_(0, buckets[start : start + step], samples[start : start + step].double())
    stats[:, -1] = torch.bincount(buckets, minlength=num_clusters).double()
    return stats


@torch.no_grad()
def kmeans(
    samples: torch.Tensor,
    num_clusters: int,
    num_iters: int,
    use_cosine_sim: bool,
    initial_means: Callable[[torch.Tensor], torch.Tensor] | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on samples (M, D); returns means (K, D) and final cluster counts (K,).

    Distributed, `initial_means` picks K rows of the global batch and `reduce` sums the
    (K, D + 1) statistics ``[sums | counts]`` over the ranks: k-means on the global batch. The
    statistics are float64, so the means rounded to float32 do not depend on the order of the sums
    (how the batch is split over ranks): Lloyd's iterations amplify a flipped last bit into other
    clusters.
    """
    means = sample_rows(samples, num_clusters) if initial_means is None else initial_means(samples)
    counts = torch.zeros(num_clusters, dtype=samples.dtype, device=samples.device)
    for _ in range(num_iters):
        buckets = nearest_code(samples, means)
        stats = cluster_statistics(samples, buckets, num_clusters)
        if reduce is not None:
            reduce(stats)
        sums, counts = stats[:, :-1], stats[:, -1]
        new_means = (sums / counts.clamp(min=1)[:, None]).to(samples.dtype)
        counts = counts.to(samples.dtype)
        if use_cosine_sim:
            new_means = l2norm(new_means)
        means = torch.where((counts == 0)[:, None], means, new_means)
    return means, counts
