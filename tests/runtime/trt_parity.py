"""The one token check the TensorRT tests use, over the project's public parity helpers.

Every token must equal the float64 argmin or be a certified float32 tie (the rule of
`vqdeploy.ops.nearest_code`, through `nearest_code_reference`, `squared_distances64` and
`tie_tolerance`); no rule of its own is written here.
"""

from __future__ import annotations

import torch

from vqdeploy.ops import nearest_code_reference, squared_distances64, tie_tolerance


def assert_tokens_certified(rows: torch.Tensor, codebook: torch.Tensor, tokens: torch.Tensor) -> None:
    """rows[M, D] and codebook[K, D] as the search sees them; tokens[M] from a backend."""
    rows, codebook, tokens = rows.detach().cpu(), codebook.detach().cpu(), tokens.detach().cpu().long().reshape(-1)
    ref = nearest_code_reference(rows, codebook)
    differ = tokens != ref
    if differ.any():
        gap = squared_distances64(rows[differ], codebook, tokens[differ]) - squared_distances64(
            rows[differ], codebook, ref[differ]
        )
        tau = tie_tolerance(rows[differ], codebook, ref[differ], tokens[differ], precision="float32")
        assert bool((gap <= tau).all()), f"{int((gap > tau).sum())} tokens are neither the argmin nor certified ties"
