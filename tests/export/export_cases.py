"""Configurations, inputs and helpers shared by the ONNX export tests (fixtures: conftest.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from vqdeploy import ResidualVQ, VectorQuantize

DIM = 64  # the digits are 64-dim vectors
CODEBOOK_SIZE = 32
NUM_QUANTIZERS = 3


@dataclass(frozen=True)
class Config:
    """One quantizer configuration under test."""

    name: str
    cls: type[nn.Module]
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def is_residual(self) -> bool:
        return self.cls is ResidualVQ

    @property
    def is_image(self) -> bool:
        return bool(self.kwargs.get("accept_image_fmap"))

    @property
    def channel_last(self) -> bool:
        return self.kwargs.get("channel_last", True)

    @property
    def heads(self) -> int:
        return self.kwargs.get("heads", 1)

    @property
    def projects(self) -> bool:
        """Whether a Linear follows the codebook lookup (then vectors match within 1e-6, not exactly)."""
        return self.kwargs.get("codebook_dim", DIM) * self.heads != DIM

    def build(self) -> nn.Module:
        return self.cls(dim=DIM, codebook_size=CODEBOOK_SIZE, kmeans_init=True, **self.kwargs)


CONFIGS = {
    c.name: c
    for c in [
        Config("plain", VectorQuantize),
        Config("cosine", VectorQuantize, dict(use_cosine_sim=True)),
        Config("projection", VectorQuantize, dict(codebook_dim=16)),
        Config("heads_shared", VectorQuantize, dict(heads=4, codebook_dim=16)),
        Config("heads_separate", VectorQuantize, dict(heads=4, codebook_dim=16, separate_codebook_per_head=True)),
        Config("image", VectorQuantize, dict(accept_image_fmap=True)),
        Config("channel_first", VectorQuantize, dict(channel_last=False)),
        Config("residual", ResidualVQ, dict(num_quantizers=NUM_QUANTIZERS)),
        Config("residual_projection", ResidualVQ, dict(num_quantizers=NUM_QUANTIZERS, codebook_dim=16)),
    ]
}

# Sizes of the dynamic axes: (batch, seq) or (batch, height, width); 1, 7 and 1000+ on each.
SEQ_SHAPES = [(1, 1), (7, 7), (1, 1797), (1797, 1)]
IMAGE_SHAPES = [(1, 1, 1), (7, 7, 7), (1, 3, 599), (1797, 1, 1)]
SHAPE_IDS = ["1", "7", "1000+ seq", "1000+ batch"]


def to_layout(config: Config, tokens: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    """Token rows (prod(sizes), DIM) -> the configuration's input layout with those axis sizes."""
    if config.is_image:
        batch, height, width = sizes
        return tokens.reshape(batch, height, width, DIM).permute(0, 3, 1, 2).contiguous()
    x = tokens.reshape(*sizes, DIM)
    return x if config.channel_last else x.transpose(1, 2).contiguous()


def make_input(config: Config, data: str, sizes: tuple[int, ...], digits: torch.Tensor) -> torch.Tensor:
    """Real (digits) or random (standard normal, seeded by shape) input with axis sizes `sizes`."""
    count = int(np.prod(sizes))
    if data == "digits":
        tokens = digits[:count]
    else:
        generator = torch.Generator().manual_seed(count * 31 + len(sizes))
        tokens = torch.randn(count, DIM, generator=generator)
    return to_layout(config, tokens, sizes)


@dataclass
class Exported:
    config: Config
    module: nn.Module
    part: str
    fused: bool
    path: Path
    session: ort.InferenceSession

    def run(self, array: np.ndarray | torch.Tensor) -> list[np.ndarray]:
        array = array.numpy() if isinstance(array, torch.Tensor) else array
        return self.session.run(None, {self.session.get_inputs()[0].name: array})


def cpu_session(path: Path | str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1  # small inputs; no spinning thread pool competing with the exporter
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def assert_vectors_match(actual: np.ndarray, expected: torch.Tensor, exact: bool) -> None:
    """Codebook rows are exact; a projection after the lookup may differ by float32 rounding (<= 1e-6)."""
    tolerance = 0.0 if exact else 1e-6
    torch.testing.assert_close(torch.from_numpy(actual), expected, atol=tolerance, rtol=tolerance)
