"""Quantizers in each input layout the servers map to token rows (fixtures: conftest.py)."""

from __future__ import annotations

from collections.abc import Callable

import torch

import vqdeploy

DIM = 16
CODEBOOK_SIZE = 64

LAYOUTS: dict[str, Callable[[], torch.nn.Module]] = {
    "plain": lambda: vqdeploy.VectorQuantize(dim=DIM, codebook_size=CODEBOOK_SIZE),
    "heads": lambda: vqdeploy.VectorQuantize(dim=DIM, codebook_size=CODEBOOK_SIZE, heads=2, separate_codebook_per_head=True),
    "channel_first": lambda: vqdeploy.VectorQuantize(dim=DIM, codebook_size=CODEBOOK_SIZE, channel_last=False),
    "image": lambda: vqdeploy.VectorQuantize(dim=DIM, codebook_size=CODEBOOK_SIZE, accept_image_fmap=True),
    "residual": lambda: vqdeploy.ResidualVQ(dim=DIM, codebook_size=CODEBOOK_SIZE, num_quantizers=3),
}
