"""`vqdeploy.convert(module)`: one entry point that turns a foreign quantizer into a vqdeploy module."""

from __future__ import annotations

from torch import nn

from vqdeploy.compat.codecs import convertible, find_converter
from vqdeploy.errors import NotConvertibleError


def convert(module: nn.Module) -> nn.Module:
    """The vqdeploy module equivalent to ``module``: weights, EMA state and token layout kept.

    Dispatches on the class: vector-quantize-pytorch's ``VectorQuantize`` / ``ResidualVQ``, EnCodec's
    (encodec, transformers), DAC's (descript-audio-codec, transformers), SNAC's and transformers'
    Mimi quantizer (see `vqdeploy.compat.codecs`). A vqdeploy module comes back as it is. Any other
    class raises `NotConvertibleError` naming it and listing what converts.

    >>> import vqdeploy, torch
    >>> vqdeploy.convert(torch.nn.Linear(2, 2))
    Traceback (most recent call last):
    ...
    vqdeploy.errors.NotConvertibleError: vqdeploy.convert has no converter for torch.nn.modules.linear.Linear; ...
    """
    from vqdeploy.nn import FactorizedResidualVQ, ResidualVQ, SplitResidualVQ, VectorQuantize

    if isinstance(module, VectorQuantize | ResidualVQ | FactorizedResidualVQ | SplitResidualVQ):
        return module
    converter = find_converter(module) if isinstance(module, nn.Module) else None
    if converter is None:
        cls = type(module)
        raise NotConvertibleError(
            f"vqdeploy.convert has no converter for {cls.__module__}.{cls.__qualname__}; "
            f"it converts: {', '.join(convertible())}"
        )
    return converter(module)
