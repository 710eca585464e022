"""EMA codebook: nearest-code search, exponential-moving-average updates, k-means init, dead codes.

Buffers keep the names of vector-quantize-pytorch (`embed`, `embed_avg`, `cluster_size`,
`initted`, all shaped with a leading codebook axis H) so that its state dicts load unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vqdeploy.ops.nearest_code import nearest_code


def l2norm(t: torch.Tensor) -> torch.Tensor:
    """Unit-normalise the last axis (the same eps as the reference library)."""
    return F.normalize(t, p=2, dim=-1, eps=1e-6)


def laplace_smoothing(counts: torch.Tensor, num_categories: int, eps: float) -> torch.Tensor:
    """(n_k + eps) / (sum n + K eps), along the last axis."""
    return (counts + eps) / (counts.sum(dim=-1, keepdim=True) + num_categories * eps)


def sample_rows(samples: torch.Tensor, num: int) -> torch.Tensor:
    """`num` rows of `samples`, without replacement when there are enough of them."""
    if samples.shape[0] >= num:
        picks = torch.randperm(samples.shape[0], device=samples.device)[:num]
    else:
        picks = torch.randint(0, samples.shape[0], (num,), device=samples.device)
    return samples[picks]


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
    ):
        super().__init__()
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
        self.register_buffer("embed", embed)

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        return l2norm(x) if self.use_cosine_sim else x

    # -- search and lookup ------------------------------------------------------------------
    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """flat (H, M, D) -> indices (H, M): one nearest-code search per codebook."""
        embed = self.embed.detach()
        if self.num_codebooks == 1:  # no stack: it would copy
            return nearest_code(flat[0], embed[0], self.search_mode).unsqueeze(0)
        return torch.stack([nearest_code(flat[h], embed[h], self.search_mode) for h in range(self.num_codebooks)])

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (H, M) -> codes (H, M, D)."""
        embed = self.embed.detach()
        if self.num_codebooks == 1:
            return embed[0].index_select(0, indices[0]).unsqueeze(0)
        return torch.stack([embed[h].index_select(0, indices[h]) for h in range(self.num_codebooks)])

    # -- training -------------------------------------------------------------------------------
    @torch.no_grad()
    def init_with_kmeans_(self, flat: torch.Tensor) -> None:
        """k-means on the first training batch; flat (H, M, D)."""
        for h in range(self.num_codebooks):
            means, counts = kmeans(flat[h], self.codebook_size, self.kmeans_iters, self.use_cosine_sim)
            self.embed_avg[h].copy_(means * counts[:, None])
            self.cluster_size[h].copy_(counts)
        self.refresh_embed_()
        self.initted.fill_(True)

    @torch.no_grad()
    def track_usage_(self, flat: torch.Tensor, indices: torch.Tensor) -> None:
        """Fold one batch's code counts and code sums into the moving averages."""
        for h in range(self.num_codebooks):
            counts = torch.bincount(indices[h], minlength=self.codebook_size).to(flat.dtype)
            sums = torch.zeros(self.codebook_size, self.dim, dtype=flat.dtype, device=flat.device)
            sums.index_add_(0, indices[h], flat[h])
            self.cluster_size[h].lerp_(counts.to(self.cluster_size.dtype), 1.0 - self.decay)
            self.embed_avg[h].lerp_(sums.to(self.embed_avg.dtype), 1.0 - self.decay)

    @torch.no_grad()
    def refresh_embed_(self) -> None:
        """embed = embed_avg / Laplace-smoothed cluster sizes (unit-normalised for cosine)."""
        total = self.cluster_size.sum(dim=-1, keepdim=True)
        smoothed = laplace_smoothing(self.cluster_size, self.codebook_size, self.eps) * total
        embed = self.embed_avg / smoothed[..., None]
        self.embed.copy_(l2norm(embed) if self.use_cosine_sim else embed)

    @torch.no_grad()
    def expire_dead_codes_(self, flat: torch.Tensor) -> None:
        """Replace codes whose EMA cluster size fell under the threshold by vectors of the batch."""
        if self.threshold_ema_dead_code <= 0:
            return
        for h in range(self.num_codebooks):
            dead = (self.cluster_size[h] < self.threshold_ema_dead_code).nonzero().flatten()
            if dead.numel() == 0 or flat.shape[1] == 0:
                continue
            if dead.numel() > flat.shape[1]:  # more dead codes than samples: replace some now, the rest later
                dead = dead[torch.randperm(dead.numel(), device=dead.device)[: flat.shape[1]]]
            samples = sample_rows(self.transform_input(flat[h]), dead.numel()).to(self.embed.dtype)
            self.embed[h, dead] = samples
            self.cluster_size[h, dead] = self.threshold_ema_dead_code
            self.embed_avg[h, dead] = samples * self.threshold_ema_dead_code


@torch.no_grad()
def kmeans(
    samples: torch.Tensor, num_clusters: int, num_iters: int, use_cosine_sim: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on samples (M, D); returns means (K, D) and final cluster counts (K,)."""
    means = sample_rows(samples, num_clusters)
    counts = torch.zeros(num_clusters, dtype=samples.dtype, device=samples.device)
    for _ in range(num_iters):
        buckets = nearest_code(samples, means)
        counts = torch.bincount(buckets, minlength=num_clusters).to(samples.dtype)
        sums = torch.zeros_like(means).index_add_(0, buckets, samples)
        new_means = sums / counts.clamp(min=1)[:, None]
        if use_cosine_sim:
            new_means = l2norm(new_means)
        means = torch.where((counts == 0)[:, None], means, new_means)
    return means, counts
