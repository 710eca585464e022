"""Training-only pieces of VectorQuantize: distances with gradients, Gumbel sampling, extra losses.

The formulas are vector-quantize-pytorch 1.32's (so a converted module trains the same): the
distance a training loss sees is the negative Euclidean distance ``-sqrt(max(|x|^2 + |c|^2 -
2 x.c, 1e-8))`` or, for cosine codebooks, the dot product of unit vectors. The eval search never
comes through here: it is the exact nearest-code op.
"""

from __future__ import annotations

from collections import namedtuple

import torch
import torch.nn.functional as F

LossBreakdown = namedtuple("LossBreakdown", ["commitment", "codebook_diversity", "orthogonal_reg", "inplace_optimize"])


def negative_distances(rows: torch.Tensor, embed: torch.Tensor, cosine: bool) -> torch.Tensor:
    """rows (H, M, d), embed (H, K, d) -> (H, M, K); higher is nearer. Differentiable in both."""
    if cosine:
        return torch.einsum("hmd,hkd->hmk", rows, embed)
    rows2 = rows.pow(2).sum(-1, keepdim=True)
    embed2 = embed.pow(2).sum(-1)[:, None, :]
    cross = torch.einsum("hmd,hkd->hmk", rows, embed) * -2
    return (rows2 + embed2 + cross).clamp(min=1e-8).sqrt().neg()


def negative_distances_per_row(rows: torch.Tensor, codebooks: torch.Tensor, cosine: bool) -> torch.Tensor:
    """rows (H, M, d), codebooks (H, M, K, d) (one codebook per row) -> (H, M, K)."""
    if cosine:
        return torch.einsum("hmd,hmkd->hmk", rows, F.normalize(codebooks, dim=-1, eps=1e-6))
    return -F.pairwise_distance(rows[:, :, None, :], codebooks)


def gumbel_noise(t: torch.Tensor) -> torch.Tensor:
    noise = torch.zeros_like(t).uniform_(0, 1)
    return -torch.log((-torch.log(noise.clamp(min=1e-20))).clamp(min=1e-20))


def sample_codes(
    logits: torch.Tensor, temperature: float, stochastic: bool, straight_through: bool, training: bool, topk: int | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Indices (argmax, Gumbel-perturbed when stochastic in training; top-k when asked) and, for the
    straight-through estimator, the zero-valued soft correction ``softmax - softmax.detach()``."""
    sampling = logits / temperature + gumbel_noise(logits) if training and stochastic and temperature > 0 else logits
    indices = sampling.topk(topk, dim=-1).indices if topk is not None else sampling.argmax(dim=-1)
    if not straight_through or temperature <= 0 or not training:
        return indices, None
    soft = (logits / temperature).softmax(dim=-1)
    return indices, soft - soft.detach()


def orthogonal_loss(codebook: torch.Tensor) -> torch.Tensor:
    """Eq. (2) of Shin et al. 2021 (arXiv:2112.00384) on codebook (H, K, d): the mean squared error
    of the cosine Gram matrix to the identity.

    1.32 computes ``sum(G^2) / (H K^2) - 1 / K``, which is the same value (and gradient) while every
    code has norm >= 1e-6 (a unit diagonal), but goes negative for a zero code (G_ii = 0), so a
    zero code lowers the loss. vqdeploy keeps the diagonal's error: a zero codebook costs 1 / K.
    """
    h, n = codebook.shape[:2]
    normed = F.normalize(codebook, p=2, dim=-1, eps=1e-6)
    cosine = torch.einsum("hid,hjd->hij", normed, normed)
    eye = torch.eye(n, dtype=cosine.dtype, device=cosine.device)
    return (cosine - eye).square().sum() / (h * n**2)


def diversity_loss(logits: torch.Tensor, temperature: float, seq: int) -> torch.Tensor:
    """Negative entropy of the code distribution averaged over all but the sequence axis.

    logits (H, M, K) with M = (batch, seq, heads-shared...) rows in batch-major order; 1.32 averages
    the softmax over every axis but the sequence one, then takes the mean entropy over positions.
    """
    prob = (logits * temperature).softmax(dim=-1)
    h, m, k = prob.shape
    batch = m // seq if seq else 1
    per_position = prob.reshape(h, batch, seq, -1, k).mean(dim=(0, 1, 3))  # (seq, K)
    entropy = (-per_position * torch.log(per_position.clamp(min=1e-5))).sum(dim=-1)
    return -entropy.mean()
