"""Shared exports for the ONNX export tests.

Every configuration is built once (k-means initialised on scikit-learn's digits, so the codebooks
are real), and every (configuration, part, fused) is exported once per session, lazily, and run
at several shapes: an export costs about a second, a run a few milliseconds.

Half of that second is the exporter rebuilding onnxscript's torchlib op list, which parses the
source of ~500 functions on every call though the list never changes within a process; the
session fixture `_memoize_torchlib_ops` caches that pure function (the exporter itself, and so
what is tested, is unchanged).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import pytest
import torch
from export_cases import CONFIGS, Exported, cpu_session, to_layout
from torch import nn

from vqdeploy import export_onnx


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
