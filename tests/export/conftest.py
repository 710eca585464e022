"""Shared exports for the ONNX export tests.

Every configuration is built once (k-means initialised on scikit-learn's digits, so the codebooks
are real), and every (configuration, part, fused) is exported once per session, lazily, and run
at several shapes: an export costs about a second, a run a few milliseconds.

(tests/conftest.py's `_memoize_torchlib_ops` halves the export time for every test.)
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from export_cases import CONFIGS, Exported, cpu_session, to_layout
from torch import nn

from vqdeploy import export_onnx


@pytest.fixture(scope="session")
def quantizers(digits: torch.Tensor) -> Callable[[str], nn.Module]:
    """name -> the configuration's module, k-means initialised on the digits, in eval mode (built once)."""
    cache: dict[str, nn.Module] = {}

    def get(name: str) -> nn.Module:
        if name not in cache:
            config = CONFIGS[name]
            torch.manual_seed(1234)
            module = config.build().train()
            sizes = (7, 16, 16) if config.is_image else (1, 1792)
            with torch.no_grad():
                module(to_layout(config, digits[:1792], sizes))
            cache[name] = module.eval()
        return cache[name]

    return get


@pytest.fixture(scope="session")
def exports(quantizers, tmp_path_factory) -> Callable[..., Exported]:
    """(name, part, fused=True) -> the export of that configuration and part, with an ORT session."""
    cache: dict[tuple[str, str, bool], Exported] = {}
    root = tmp_path_factory.mktemp("exports")

    def get(name: str, part: str, fused: bool = True) -> Exported:
        key = (name, part, fused)
        if key not in cache:
            module = quantizers(name)
            path = export_onnx(module, root / f"{name}-{part}-{'fused' if fused else 'unfused'}.onnx", part=part, fused=fused)
            cache[key] = Exported(CONFIGS[name], module, part, fused, path, cpu_session(path))
        return cache[key]

    return get
