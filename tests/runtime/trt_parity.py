"""The token check the TensorRT tests use: the project's one tie rule, `vqdeploy.ops.certify`."""

from __future__ import annotations

import torch

from vqdeploy.ops import certify


def assert_tokens_certified(rows: torch.Tensor, codebook: torch.Tensor, tokens: torch.Tensor) -> None:
    """rows[M, D] and codebook[K, D] as the search sees them; tokens[M] from a backend."""
    bad = ~certify(rows, codebook, tokens).certified
    assert not bool(bad.any()), f"{int(bad.sum())} tokens are neither the argmin nor certified ties"
