"""Token assertions every test module shares (importable as `token_assertions`: tests/ is on the path),
on the project's one tie rule, `vqdeploy.ops.certify`."""

from __future__ import annotations

import torch

from vqdeploy.ops import certify


def assert_tokens_certified(x: torch.Tensor, codebook: torch.Tensor, tokens: torch.Tensor) -> float:
    """Every token equals the float64 argmin or is a certified float32 tie; returns the % equal."""
    certificate = certify(x, codebook, tokens)
    bad = ~certificate.certified
    assert not bool(bad.any()), f"{int(bad.sum())} tokens are not certified ties"
    return 100.0 * float((certificate.reference == tokens.cpu().reshape(-1)).float().mean())
