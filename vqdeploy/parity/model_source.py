"""Loading the user's eager model for whole-model verify from the command line.

A whole-model file carries the weights but not the Python code of the model, so `vqdeploy verify`
needs the model itself. Two ways to name it, as a user has it:

- ``package.module:factory`` or ``path/to/file.py:factory``: the factory is called with no
  arguments and returns the module (with its trained weights loaded), e.g. ``mycodec.build:encoder``.
  A factory that is an nn.Module class is instantiated the same way.
- ``model.pt``: a module saved whole with ``torch.save(module, "model.pt")``. Loading it runs
  pickle (``torch.load(weights_only=False)``): only load files you trust.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

from torch import nn

from vqdeploy.errors import CheckpointError


def load_model_source(source: str | os.PathLike) -> nn.Module:
    """The eager module named by ``source`` (see the module docstring); `CheckpointError` otherwise."""
    text = str(source)
    path = Path(text)
    if path.is_file() and path.suffix in (".pt", ".pth"):
        import torch

        try:
            module = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as error:  # pickle and torch raise many kinds
            raise CheckpointError(f"{path} could not be loaded with torch.load: {error}") from error
        return _module(module, text)
    if ":" not in text:
        raise CheckpointError(
            f"{text!r} names no model: a whole-model file is verified against its eager model, given as "
            "'package.module:factory', 'file.py:factory' or a torch.save'd module (.pt)"
        )
    target, _, attribute = text.rpartition(":")
    if target.endswith(".py"):
        file = Path(target)
        if not file.is_file():
            raise CheckpointError(f"{file} does not exist")
        spec = importlib.util.spec_from_file_location(f"vqdeploy_user_model_{abs(hash(str(file.resolve())))}", file)
        loaded = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(file.resolve().parent))
        try:
            spec.loader.exec_module(loaded)
        finally:
            sys.path.remove(str(file.resolve().parent))
    else:
        try:
            loaded = importlib.import_module(target)
        except ImportError as error:
            raise CheckpointError(f"cannot import {target!r} for the model {text!r}: {error}") from error
    factory = getattr(loaded, attribute, None)
    if factory is None or not callable(factory):
        raise CheckpointError(f"{target} has no callable {attribute!r}")
    return _module(factory(), text)


def _module(value: object, source: str) -> nn.Module:
    if not isinstance(value, nn.Module):
        raise CheckpointError(f"{source} gave a {type(value).__name__}, expected a torch.nn.Module")
    return value.eval()


__all__ = ["load_model_source"]
