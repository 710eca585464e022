"""Example models on real data: scikit-learn's handwritten digits (1,797 images of 8x8 pixels).

Two small models, each a conv encoder, a vqdeploy quantizer and a conv decoder:

- `DigitsVQVAE`: a VQ-VAE whose `VectorQuantize(accept_image_fmap=True)` turns each image into a
  4x4 grid of tokens (one of 64 codes each). The package ships it trained
  (`vqdeploy/data/digits_vqvae.safetensors`): `load_pretrained()`.
- `DigitsRVQTokenizer`: the same encoder and decoder around a `ResidualVQ`, so each of the 16
  tokens is a stack of `num_quantizers` codes, coarse to fine, as in neural audio codecs.

Both give ``forward(images) -> (reconstruction, indices)`` in eval mode, with no data-dependent
Python branch, so the whole model exports with `vqdeploy.export_onnx(model, path,
example_input=images)`. Training goes through ``losses(images)``; `fit` is a short loop that the
training scripts under ``models/`` use.

>>> from vqdeploy.examples import load_digits_tensor, load_pretrained
>>> model = load_pretrained()
>>> reconstruction, indices = model(load_digits_tensor()[:2])
>>> tuple(reconstruction.shape), tuple(indices.shape)
((2, 1, 8, 8), (2, 4, 4))
"""

from __future__ import annotations

import importlib.resources
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vqdeploy.errors import BackendNotAvailableError, CheckpointError
from vqdeploy.nn import ResidualVQ, VectorQuantize
from vqdeploy.nn.checkpoint import load_configured, parse_config, read_safetensors_metadata, save_configured

IMAGE_SIZE = 8
GRID = 4  # the encoder halves 8x8 to a 4x4 grid of tokens
FORMAT_KEY = "vqdeploy.example"
CONFIG_KEY = "vqdeploy.example_config"
PRETRAINED = {"digits_vqvae": "digits_vqvae.safetensors"}


def load_digits_tensor(with_labels: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as float32 images (1797, 1, 8, 8) in [0, 1] (and labels (1797,) if asked)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise BackendNotAvailableError("the digits data set comes with scikit-learn: pip install scikit-learn") from error
    digits = load_digits()
    images = torch.from_numpy((digits.images / 16.0).astype(np.float32)).unsqueeze(1)
    if with_labels:
        return images, torch.from_numpy(digits.target.astype(np.int64))
    return images


def split_digits(images: torch.Tensor, test_fraction: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed (train, test) split of the images."""
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))
    num_test = int(round(images.shape[0] * test_fraction))
    return images[order[num_test:]], images[order[:num_test]]


def _encoder(hidden: int, dim: int) -> nn.Sequential:
    """(b, 1, 8, 8) -> (b, dim, 4, 4)."""
    return nn.Sequential(
        nn.Conv2d(1, hidden, 3, padding=1),
        nn.GELU(),
        nn.Conv2d(hidden, hidden, 4, stride=2, padding=1),
        nn.GELU(),
        nn.Conv2d(hidden, dim, 1),
    )


def _decoder(hidden: int, dim: int) -> nn.Sequential:
    """(b, dim, 4, 4) -> (b, 1, 8, 8) in [0, 1]."""
    return nn.Sequential(
        nn.Conv2d(dim, hidden, 3, padding=1),
        nn.GELU(),
        nn.ConvTranspose2d(hidden, hidden, 4, stride=2, padding=1),
        nn.GELU(),
        nn.Conv2d(hidden, 1, 3, padding=1),
        nn.Sigmoid(),
    )


class DigitsVQVAE(nn.Module):
    """VQ-VAE for 8x8 digits: encoder -> VectorQuantize over a 4x4 grid -> decoder.

    Eval ``forward(images (b, 1, 8, 8)) -> (reconstruction (b, 1, 8, 8), indices (b, 4, 4))``.
    """

    def __init__(self, dim: int = 16, codebook_size: int = 64, hidden: int = 32, decay: float = 0.9,
                 commitment: float = 0.25, threshold_ema_dead_code: float = 1.0):
        super().__init__()
        self.config: dict[str, Any] = dict(dim=dim, codebook_size=codebook_size, hidden=hidden, decay=decay,
                                           commitment=commitment, threshold_ema_dead_code=threshold_ema_dead_code)
        self.encoder = _encoder(hidden, dim)
        self.vq = VectorQuantize(dim=dim, codebook_size=codebook_size, decay=decay, commitment=commitment,
                                 kmeans_init=True, threshold_ema_dead_code=threshold_ema_dead_code,
                                 accept_image_fmap=True)
        self.decoder = _decoder(hidden, dim)

    @property
    def quantizer(self) -> VectorQuantize:
        return self.vq

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """What the quantizer sees: (b, dim, 4, 4)."""
        return self.encoder(images)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        quantized, indices, _ = self.vq(self.encoder(images))
        return self.decoder(quantized), indices

    def losses(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"loss", "reconstruction", "commitment"} for one batch (EMA codebook updates in train mode)."""
        quantized, _, commit = self.vq(self.encoder(images))
        reconstruction = F.mse_loss(self.decoder(quantized), images)
        commitment = commit.sum()
        return {"loss": reconstruction + commitment, "reconstruction": reconstruction, "commitment": commitment}

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.vq(self.encoder(images))[1]

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.vq.get_output_from_indices(indices))


class DigitsRVQTokenizer(nn.Module):
    """Residual-VQ tokenizer for 8x8 digits: encoder -> ResidualVQ over 16 tokens -> decoder.

    Eval ``forward(images (b, 1, 8, 8)) -> (reconstruction, indices (num_quantizers, b, 16))``;
    ``decode(indices[:q])`` rebuilds from the first q stages only (coarse to fine).
    """

    def __init__(self, dim: int = 16, codebook_size: int = 32, num_quantizers: int = 4, hidden: int = 32,
                 decay: float = 0.9, commitment: float = 0.25, threshold_ema_dead_code: float = 1.0):
        super().__init__()
        self.config: dict[str, Any] = dict(dim=dim, codebook_size=codebook_size, num_quantizers=num_quantizers,
                                           hidden=hidden, decay=decay, commitment=commitment,
                                           threshold_ema_dead_code=threshold_ema_dead_code)
        self.dim = dim
        self.encoder = _encoder(hidden, dim)
        self.rvq = ResidualVQ(dim=dim, num_quantizers=num_quantizers, codebook_size=codebook_size, decay=decay,
                              commitment=commitment, kmeans_init=True,
                              threshold_ema_dead_code=threshold_ema_dead_code)
        self.decoder = _decoder(hidden, dim)

    @property
    def quantizer(self) -> ResidualVQ:
        return self.rvq

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """What the quantizer sees: tokens (b, 16, dim)."""
        return self.encoder(images).flatten(2).transpose(1, 2)

    def _to_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.transpose(1, 2).reshape(tokens.shape[0], self.dim, GRID, GRID)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        quantized, indices, _ = self.rvq(self.features(images))
        return self.decoder(self._to_grid(quantized)), indices

    def losses(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        quantized, _, commit = self.rvq(self.features(images))
        reconstruction = F.mse_loss(self.decoder(self._to_grid(quantized)), images)
        commitment = commit.sum()
        return {"loss": reconstruction + commitment, "reconstruction": reconstruction, "commitment": commitment}

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.rvq(self.features(images))[1]

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        return self.decoder(self._to_grid(self.rvq.get_output_from_indices(indices)))


EXAMPLES: dict[str, type[nn.Module]] = {"DigitsVQVAE": DigitsVQVAE, "DigitsRVQTokenizer": DigitsRVQTokenizer}


def codebook_health(model: nn.Module) -> dict[str, list[float]]:
    """Perplexity and dead codes of every codebook of the model's quantizer (`codebook_usage`), by name."""
    quantizer = model.quantizer if hasattr(model, "quantizer") else model
    usages = quantizer.codebook_usage()
    usages = usages if isinstance(usages, list) else [usages]
    names = [f"stage {s}" for s in range(len(usages))] if len(usages) > 1 else ["codebook"]
    return {name: [usage.perplexity[0], float(usage.dead_codes[0])] for name, usage in zip(names, usages, strict=True)}


def fit(model: nn.Module, images: torch.Tensor, steps: int = 1500, batch_size: int = 128, lr: float = 3e-3,
        seed: int = 0, progress: bool = True, health: list[tuple[int, dict[str, list[float]]]] | None = None,
        health_every: int = 25) -> list[float]:
    """Train `model` on `images` with Adam for `steps` batches; returns the loss of every step.

    With a `health` list, (step, `codebook_health(model)`) is appended every `health_every` steps:
    perplexity and dead-code count of each codebook as training goes (the scripts plot them)."""
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    model.train()
    history = []
    bar = tqdm(range(steps), desc=f"training {type(model).__name__}", unit="step", disable=not progress)
    for step in bar:
        batch = images[torch.randint(0, images.shape[0], (batch_size,), generator=generator)]
        losses = model.losses(batch)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()
        schedule.step()
        history.append(losses["loss"].item())
        if health is not None and (step % health_every == 0 or step == steps - 1):
            health.append((step, codebook_health(model)))
        if step % 20 == 0:
            bar.set_postfix(recon=f"{losses['reconstruction'].item():.4f}", commit=f"{losses['commitment'].item():.4f}")
    return history


def save_example(model: nn.Module, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write an example model (weights, EMA state and config) to one .safetensors file."""
    name = type(model).__name__
    if name not in EXAMPLES:
        raise CheckpointError(f"save_example takes one of {', '.join(EXAMPLES)}, got {name}")
    return save_configured(model, path, {FORMAT_KEY: name, CONFIG_KEY: json.dumps(model.config)}, overwrite)


def load_example(path: str | os.PathLike) -> nn.Module:
    """Rebuild an example model saved by `save_example`, in eval mode."""
    metadata = read_safetensors_metadata(path, "example checkpoint")
    name = metadata.get(FORMAT_KEY)
    if name not in EXAMPLES:
        raise CheckpointError(f"{path} is not a vqdeploy example-model checkpoint (no {FORMAT_KEY} metadata)")
    return load_configured(EXAMPLES[name], parse_config(metadata.get(CONFIG_KEY, ""), path), path)


def pretrained_path(name: str = "digits_vqvae"):
    """The shipped checkpoint `name` as an importlib.resources Traversable."""
    if name not in PRETRAINED:
        raise CheckpointError(f"no shipped model {name!r}; shipped: {', '.join(PRETRAINED)}")
    return importlib.resources.files("vqdeploy") / "data" / PRETRAINED[name]


def load_pretrained(name: str = "digits_vqvae") -> nn.Module:
    """The trained example model shipped with the package (eval mode)."""
    resource = pretrained_path(name)
    if not resource.is_file():
        raise CheckpointError(f"the shipped model {PRETRAINED[name]} is missing from this install of vqdeploy")
    with importlib.resources.as_file(resource) as path:
        return load_example(path)


__all__ = [
    "DigitsRVQTokenizer",
    "DigitsVQVAE",
    "fit",
    "load_digits_tensor",
    "load_example",
    "load_pretrained",
    "save_example",
    "split_digits",
]
