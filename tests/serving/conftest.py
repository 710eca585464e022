"""Small exports for the serving tests: one per input layout (see serving_cases.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from serving_cases import LAYOUTS

import vqdeploy


@pytest.fixture(scope="session")
def encode_exports(tmp_path_factory) -> Callable[[str], Path]:
    """layout name -> an encode export of a quantizer in that layout (exported once per session)."""
    root = tmp_path_factory.mktemp("serving-exports")
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            torch.manual_seed(7)
            module = LAYOUTS[name]().eval()
            cache[name] = vqdeploy.export_onnx(module, root / f"{name}.onnx", part="encode")
        return cache[name]

    return get
