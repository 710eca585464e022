"""Gradient estimators through the nearest-code search (training only; eval returns the codes)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def straight_through(x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Value `codes`, gradient of the identity to `x`."""
    return x + (codes - x).detach()


def rotation_trick(x: torch.Tensor, codes: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The rotation trick (Fifty et al. 2024, arXiv:2410.06424, section 4.2), along the last axis.

    The value is (a float rounding of) `codes`: x rotated onto the direction of its code and scaled
    to the code's norm, R x * |q| / |x| with R = I - 2 w w^T + 2 q^ u^T, u = x / |x|, q^ = q / |q|,
    w = (u + q^) / |u + q^|. R, u, q^, w and the scale are constants for autograd, so the gradient
    to x is the rotated, rescaled upstream gradient instead of the identity. Norms below `eps` are
    clamped (the same eps as vector-quantize-pytorch 1.32, whose outputs this matches).
    """
    x_norm = x.norm(dim=-1, keepdim=True)
    q_norm = codes.norm(dim=-1, keepdim=True)
    u = (x / x_norm.clamp(min=eps)).detach()
    q_hat = (codes / q_norm.clamp(min=eps)).detach()
    w = F.normalize(u + q_hat, p=2, dim=-1, eps=eps).detach()
    along_w = (x * w).sum(dim=-1, keepdim=True)
    along_u = (x * u).sum(dim=-1, keepdim=True)
    rotated = x - 2 * along_w * w + 2 * along_u * q_hat
    return rotated * (q_norm / x_norm.clamp(min=eps)).detach()
