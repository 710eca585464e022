"""Checkpoints: safetensors weights plus the constructor config in the file's metadata."""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from vqdeploy.errors import CheckpointError
from vqdeploy.files import atomic_write

FORMAT_KEY = "vqdeploy.format"
FORMAT_VERSION = "1"
CLASS_KEY = "vqdeploy.class"
CONFIG_KEY = "vqdeploy.config"


def _quantizer_classes() -> dict[str, type[nn.Module]]:
    from vqdeploy.nn.grouped_residual_vq import GroupedResidualVQ
    from vqdeploy.nn.residual_vq import ResidualVQ
    from vqdeploy.nn.vector_quantize import VectorQuantize

    return {"VectorQuantize": VectorQuantize, "ResidualVQ": ResidualVQ, "GroupedResidualVQ": GroupedResidualVQ}


def save_configured(module: nn.Module, path: str | os.PathLike, metadata: dict[str, str], overwrite: bool) -> Path:
    """Weights of `module` plus string `metadata` (its config among them) in one safetensors file."""
    from safetensors.torch import save_model  # imported here: `import vqdeploy` works without it (GPU boxes)

    return atomic_write(path, lambda tmp: save_model(module, str(tmp), metadata=metadata), overwrite=overwrite)


def read_safetensors_metadata(path: str | os.PathLike, what: str = "checkpoint") -> dict[str, str]:
    """The string metadata of a safetensors file; CheckpointError when it is missing or not one."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata() or {}
    except Exception as error:  # safetensors raises its own error types for non-safetensors files
        raise CheckpointError(f"{path} is not a safetensors file: {error}") from error


def load_configured(cls: type[nn.Module], config: dict, path: str | os.PathLike) -> nn.Module:
    """Build `cls(**config)`, load the file's weights into it (all of them, exactly), eval mode."""
    from safetensors.torch import load_model

    module = cls(**config)
    missing, unexpected = load_model(module, str(path), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path} does not match its config: missing {missing}, unexpected {unexpected}")
    return module.eval()


def save_quantizer(module: nn.Module, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a VectorQuantize, ResidualVQ or GroupedResidualVQ (weights, EMA state and config) to a .safetensors file."""
    name = type(module).__name__
    if name not in _quantizer_classes():
        raise CheckpointError(f"save_quantizer takes a VectorQuantize, ResidualVQ or GroupedResidualVQ, got {name}")
    metadata = {FORMAT_KEY: FORMAT_VERSION, CLASS_KEY: name, CONFIG_KEY: json.dumps(module.config)}
    return save_configured(module, path, metadata, overwrite)


def read_checkpoint_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a vqdeploy checkpoint; raises CheckpointError for any other file."""
    metadata = read_safetensors_metadata(path)
    if metadata.get(FORMAT_KEY) != FORMAT_VERSION or metadata.get(CLASS_KEY) not in _quantizer_classes():
        raise CheckpointError(f"{path} is a safetensors file but not a vqdeploy quantizer checkpoint")
    return metadata


def load_quantizer(path: str | os.PathLike) -> nn.Module:
    """Rebuild the module saved by `save_quantizer`, in eval mode."""
    metadata = read_checkpoint_metadata(path)
    return load_configured(_quantizer_classes()[metadata[CLASS_KEY]], json.loads(metadata[CONFIG_KEY]), path)
