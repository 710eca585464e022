"""Shared fixtures: real data (scikit-learn's digits) and small helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.fixture(scope="session")
def digits() -> torch.Tensor:
    """The 1,797 8x8 digit images of scikit-learn as float32 vectors of 64, scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    data = load_digits().data.astype(np.float32) / 16.0
    return torch.from_numpy(data)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
    np.random.seed(0)
