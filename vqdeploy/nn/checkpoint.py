"""Checkpoints: safetensors weights plus the constructor config in the file's metadata."""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from vqdeploy.errors import CheckpointConfigError, CheckpointError, CheckpointValuesError, OutputWriteError
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

    def write(tmp: Path) -> None:
        try:
            save_model(module, str(tmp), metadata=metadata)
        except OSError:
            raise
        except Exception as error:  # safetensors reports I/O failures (a full disk) as its own error type
            raise OutputWriteError(f"writing {path} failed: {error}; {path} was left as it was") from error

    return atomic_write(path, write, overwrite=overwrite)


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


def parse_config(text: str, path: str | os.PathLike) -> dict:
    """The stored constructor config: a JSON object, or `CheckpointConfigError`."""
    try:
        config = json.loads(text)
    except (TypeError, ValueError) as error:
        raise CheckpointConfigError(f"{path}: the stored config is not valid JSON ({error})") from error
    if not isinstance(config, dict) or not all(isinstance(key, str) for key in config):
        raise CheckpointConfigError(f"{path}: the stored config must be a JSON object, got {type(config).__name__}")
    return config


def _stored_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}


def load_configured(cls: type[nn.Module], config: dict, path: str | os.PathLike) -> nn.Module:
    """Build `cls(**config)`, load the file's weights into it (all of them, exactly), eval mode.

    The config is tried on the meta device first (nothing allocated) and its state's shapes compared
    with the stored ones, so a tampered config (an unknown key, dim=2**40, a codebook_size the
    weights do not have) is refused by `CheckpointConfigError` before any allocation; weights with
    NaN or Inf give `CheckpointValuesError`.
    """
    import torch
    from safetensors.torch import load_model

    from vqdeploy.checks import blocks
    from vqdeploy.errors import VQDeployError

    try:
        with torch.device("meta"):
            skeleton = cls(**config)
    except (TypeError, ValueError, VQDeployError) as error:
        raise CheckpointConfigError(f"{path}: the stored config does not build a {cls.__name__}: {error}") from error
    state = skeleton.state_dict(keep_vars=True)
    expected = {key: tuple(value.shape) for key, value in state.items()}
    stored = _stored_shapes(path)
    aliases: dict[int, list[str]] = {}  # a shared tensor (a ResidualVQ's shared codebook) is stored once
    for key, value in state.items():
        aliases.setdefault(id(value), []).append(key)
    missing = [names[0] for names in aliases.values() if not any(name in stored for name in names)]
    unexpected = sorted(set(stored) - set(expected))
    if missing or unexpected:
        raise CheckpointConfigError(f"{path} does not match its config: missing {missing}, unexpected {unexpected}")
    wrong = [f"{key}: config means {expected[key]}, file holds {stored[key]}" for key in stored
             if expected[key] != stored[key]]
    if wrong:
        raise CheckpointConfigError(f"{path}: the stored config disagrees with the weights ({'; '.join(wrong[:3])})")
    module = cls(**config)
    missing, unexpected = load_model(module, str(path), strict=False)
    if missing or unexpected:
        raise CheckpointConfigError(f"{path} does not match its config: missing {missing}, unexpected {unexpected}")
    for key, value in module.state_dict().items():
        if value.is_floating_point() and any(not bool(torch.isfinite(b).all()) for b in blocks(value)):
            raise CheckpointValuesError(f"{path}: the weight {key} holds NaN or infinite values; the file is damaged")
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
    config = parse_config(metadata.get(CONFIG_KEY, ""), path)
    return load_configured(_quantizer_classes()[metadata[CLASS_KEY]], config, path)
