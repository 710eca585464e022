"""Shared fixtures: real data (scikit-learn's digits) and small helpers."""

from __future__ import annotations

import functools
from collections.abc import Iterator

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


# Half of an export's second is the exporter rebuilding onnxscript's torchlib op list, which parses
# the source of ~500 functions on every call though the list never changes within a process; this
# caches that pure function (the exporter itself, and so what is tested, is unchanged).
@pytest.fixture(scope="session", autouse=True)
def _memoize_torchlib_ops() -> Iterator[None]:
    try:
        from onnxscript._framework_apis import torch_2_5
    except ImportError:  # another onnxscript layout: run uncached
        yield
        return
    original = getattr(torch_2_5, "get_torchlib_ops", None)
    if original is None:
        yield
        return
    torch_2_5.get_torchlib_ops = functools.cache(original)
    try:
        yield
    finally:
        torch_2_5.get_torchlib_ops = original
