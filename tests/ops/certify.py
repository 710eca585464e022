"""The parity check the ops tests share (DESIGN.md section 4), imported as a sibling module."""

from __future__ import annotations

import torch

from vqdeploy.ops import nearest_code_reference, squared_distances64, tie_tolerance


def assert_tokens_certified(x: torch.Tensor, codebook: torch.Tensor, tokens: torch.Tensor) -> float:
    """Every token equals the float64 argmin or is a certified float32 tie; returns the % equal."""
    ref = nearest_code_reference(x, codebook)
    differ = tokens != ref
    if differ.any():
        xd = x[differ]
        gap = squared_distances64(xd, codebook, tokens[differ]) - squared_distances64(
            xd, codebook, ref[differ]
        )
        tau = tie_tolerance(xd, codebook, ref[differ], tokens[differ], precision="float32")
        assert bool((gap <= tau).all()), f"{int((gap > tau).sum())} tokens are not certified ties"
    return 100.0 * float((~differ).float().mean())
