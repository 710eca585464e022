"""vqdeploy with the conventions and defaults of vector-quantize-pytorch 1.32: change one import.

    from vqdeploy.compat.vector_quantize_pytorch import GroupedResidualVQ, ResidualVQ, VectorQuantize

`VectorQuantize(...)`, `ResidualVQ(...)` and `GroupedResidualVQ(...)` take 1.32's arguments (names, positional order,
defaults: `rotation_trick` on when dim > 1, `commitment_weight` with the alias `commitment`) and
return the native `vqdeploy.VectorQuantize` / `vqdeploy.ResidualVQ` configured with
``conventions="vector_quantize_pytorch"``: indices (batch, seq, quantizer), scalar / (quantizer,)
losses, as 1.32 returns them. They are a configuration of the native classes, not a copy:
`isinstance(m, vqdeploy.VectorQuantize)` holds, checkpoints and exports work as for any module,
and `isinstance(m, compat.VectorQuantize)` tells the modules with 1.32's conventions.

Every 1.32 argument is accepted at its default. One that vqdeploy does not implement raises
`UnsupportedOptionError` naming it and why (never `TypeError`); see
`vqdeploy.nn.conventions.VQ_OPTIONS` / `RVQ_OPTIONS` and the README's migration table.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from vqdeploy.errors import ConfigError, UnsupportedOptionError
from vqdeploy.nn import conventions as conv
from vqdeploy.nn.grouped_residual_vq import GroupedResidualVQ as _NativeGroupedResidualVQ
from vqdeploy.nn.residual_vq import ResidualVQ as _NativeResidualVQ
from vqdeploy.nn.vector_quantize import VectorQuantize as _NativeVectorQuantize

__all__ = ["GroupedResidualVQ", "ResidualVQ", "VectorQuantize"]

_EMPTY = inspect.Parameter.empty


def _signature(table: dict[str, conv.ReferenceOption], keyword_only: bool) -> inspect.Signature:
    kind = inspect.Parameter.KEYWORD_ONLY if keyword_only else inspect.Parameter.POSITIONAL_OR_KEYWORD
    return inspect.Signature([inspect.Parameter(o.name, kind, default=o.default) for o in table.values()])


_VQ_SIGNATURE = _signature(conv.VQ_OPTIONS, keyword_only=False)
_RVQ_SIGNATURE = _signature(conv.RVQ_OPTIONS, keyword_only=True)
_NATIVE_VQ = tuple(  # 1.32 names that the native constructor takes as they are
    name for name, option in conv.VQ_OPTIONS.items()
    if option.status == conv.NATIVE and name not in ("commitment_weight", "rotation_trick", "ema_update")
)


def _bind(kind: str, signature: inspect.Signature, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """1.32 arguments by name (defaults filled in); unknown or missing ones raise UnsupportedOptionError/ConfigError."""
    unknown = [name for name in kwargs if name not in signature.parameters]
    if unknown:
        raise UnsupportedOptionError(
            f"{kind} got {', '.join(unknown)}, which is not an argument of vector-quantize-pytorch 1.32's {kind}"
        )
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as error:
        raise ConfigError(f"{kind}: {error}") from None
    bound.apply_defaults()
    return dict(bound.arguments)


def _vq_options_to_native(kind: str, options: dict[str, Any]) -> dict[str, Any]:
    """1.32 VectorQuantize options -> native constructor arguments; refuses what vqdeploy cannot do."""
    sync = {name: options.pop(name) for name in ("sync_codebook", "sync_kmeans") if name in options}
    conv.refuse_options(kind, conv.VQ_OPTIONS, options, "constructor")
    native = {name: options[name] for name in _NATIVE_VQ if name in options}
    native["commitment"] = options.get("commitment_weight", 1.0)
    rotation_trick = options.get("rotation_trick")
    native["rotation_trick"] = bool(options["dim"] > 1 if rotation_trick is None else rotation_trick)
    ema_update = options.get("ema_update")
    native["ema_update"] = True if ema_update is None else bool(ema_update)
    if native.get("learnable_codebook") is None:  # 1.32's None: off (it means "on with DiVeQ / vq_bridge")
        native.pop("learnable_codebook", None)
    for name, value in sync.items():
        if conv.native_accepts(_NativeVectorQuantize, name):
            native[name] = value
        elif not (value is None or value is False or conv.VQ_OPTIONS[name].is_default(value)):
            raise UnsupportedOptionError(
                f"{kind} constructor: {name}={value!r} is not supported by vqdeploy ({conv.VQ_OPTIONS[name].why})"
            )
    return native


def _pop_commitment_alias(kind: str, kwargs: dict[str, Any]) -> None:
    """The seed's `commitment` is 1.32's `commitment_weight`; both given must agree."""
    if "commitment" not in kwargs:
        return
    commitment = kwargs.pop("commitment")
    if "commitment_weight" in kwargs and kwargs["commitment_weight"] != commitment:
        raise ConfigError(
            f"{kind}: commitment={commitment} and its alias commitment_weight={kwargs['commitment_weight']} disagree"
        )
    kwargs["commitment_weight"] = commitment


def build_vector_quantize(*args: Any, **kwargs: Any) -> _NativeVectorQuantize:
    """A native VectorQuantize from 1.32's arguments, with 1.32's conventions."""
    _pop_commitment_alias("VectorQuantize", kwargs)
    options = _bind("VectorQuantize", _VQ_SIGNATURE, args, kwargs)
    native = _vq_options_to_native("VectorQuantize", options)
    return _NativeVectorQuantize(**native, conventions=conv.REFERENCE)


_STAGE_SET_BY_RVQ = ("dim", "codebook_size", "codebook_dim", "accept_image_fmap", "heads")


def build_residual_vq(*args: Any, **kwargs: Any) -> _NativeResidualVQ:
    """A native ResidualVQ from 1.32's arguments, with 1.32's conventions."""
    kind = "ResidualVQ"
    if args:
        raise ConfigError(f"{kind} takes keyword arguments only (as in vector-quantize-pytorch 1.32), got {len(args)} positional")
    _pop_commitment_alias(kind, kwargs)
    own = {name: kwargs.pop(name) for name in list(kwargs) if name in conv.RVQ_OPTIONS}
    for name in kwargs:
        if name not in conv.VQ_OPTIONS or name in _STAGE_SET_BY_RVQ:
            raise UnsupportedOptionError(
                f"{kind} got {name}, which is not an argument of vector-quantize-pytorch 1.32's ResidualVQ "
                "(nor of the VectorQuantize stages it builds)"
            )
    options = _bind(kind, _RVQ_SIGNATURE, (), own)
    return _residual_from_options(kind, options, kwargs, conv.REFERENCE)


def _residual_from_options(kind: str, options: dict[str, Any], stage_kwargs: dict[str, Any], conventions: str) -> Any:
    """Native ResidualVQ arguments from 1.32's (bound) ResidualVQ options and stage kwargs; builds it."""
    for name in ("beam_size", "eval_beam_size"):  # a beam of 1 is the greedy search
        if options.get(name) == 1:
            options[name] = None
    conv.refuse_options(kind, conv.RVQ_OPTIONS, {
        name: value for name, value in options.items() if name not in ("codebook_size", "num_quantizers")
    }, "constructor")
    codebook_size, num_quantizers = options["codebook_size"], options["num_quantizers"]
    if isinstance(codebook_size, list):
        codebook_size = tuple(codebook_size)
    if num_quantizers is None and not isinstance(codebook_size, tuple):
        raise ConfigError(f"{kind} needs num_quantizers (or a tuple codebook_size)")
    stage_dim = options["codebook_dim"] if options["codebook_dim"] is not None else options["dim"]
    stage_kwargs = dict(stage_kwargs)
    if options["implicit_neural_codebook"]:  # 1.32 sets these on the stages itself
        stage_kwargs.update(learnable_codebook=True, ema_update=False)
    stage_kwargs["return_zeros_for_masked_padding"] = options["return_zeros_for_masked_padding"]
    stage = _vq_options_to_native(kind, {"dim": stage_dim, **stage_kwargs})
    for name in ("dim", *_STAGE_SET_BY_RVQ):
        stage.pop(name, None)
    if options["implicit_neural_codebook"]:
        stage.pop("learnable_codebook", None)
        stage.pop("ema_update", None)
    extra: dict[str, Any] = {}
    if options["implicit_neural_codebook"]:
        extra.update(implicit_neural_codebook=True, mlp_kwargs=dict(options["mlp_kwargs"] or {}))
    if options["quant_grad_frac"]:
        extra["quant_grad_frac"] = float(options["quant_grad_frac"])
    if stage.get("return_zeros_for_masked_padding", True) is True:
        stage.pop("return_zeros_for_masked_padding", None)
    return _NativeResidualVQ(
        dim=options["dim"],
        num_quantizers=num_quantizers,
        codebook_size=codebook_size,
        shared_codebook=options["shared_codebook"],
        quantize_dropout=options["quantize_dropout"],
        quantize_dropout_cutoff_index=options["quantize_dropout_cutoff_index"],
        quantize_dropout_multiple_of=options["quantize_dropout_multiple_of"],
        codebook_dim=options["codebook_dim"],
        conventions=conventions,
        **extra,
        **stage,
    )


_GRVQ_SIGNATURE = _signature(conv.GRVQ_OPTIONS, keyword_only=True)


def build_grouped_residual_vq(*args: Any, **kwargs: Any) -> _NativeGroupedResidualVQ:
    """A native GroupedResidualVQ from 1.32's arguments, with 1.32's conventions."""
    kind = "GroupedResidualVQ"
    if args:
        raise ConfigError(f"{kind} takes keyword arguments only (as in vector-quantize-pytorch 1.32), got {len(args)} positional")
    own = {name: kwargs.pop(name) for name in list(kwargs) if name in conv.GRVQ_OPTIONS}
    options = _bind(kind, _GRVQ_SIGNATURE, (), own)
    conv.refuse_options(kind, conv.GRVQ_OPTIONS, {k: v for k, v in options.items() if k in ("accept_image_fmap",)},
                        "constructor")
    groups, dim = options["groups"], options["dim"]
    if not isinstance(groups, int) or groups < 1 or dim % groups:
        raise ConfigError(f"{kind}: dim={dim} must split into groups={groups} equal slices")
    group = build_residual_vq(dim=dim // groups, **kwargs)  # 1.32's arguments, translated once
    native = {k: v for k, v in group.config.items() if k not in ("dim", "conventions")}
    return _NativeGroupedResidualVQ(dim=dim, groups=groups, conventions=conv.REFERENCE, **native)


class _ReferenceView(type):
    """A class-like name: calling it builds the native module with 1.32's conventions."""

    _native: type[nn.Module]
    _build: Any

    def __call__(cls, *args: Any, **kwargs: Any) -> nn.Module:
        return cls._build(*args, **kwargs)

    def __instancecheck__(cls, instance: Any) -> bool:
        return isinstance(instance, cls._native) and getattr(instance, "conventions", None) == conv.REFERENCE

    def __subclasscheck__(cls, subclass: type) -> bool:
        return False


class VectorQuantize(metaclass=_ReferenceView):
    """`vector_quantize_pytorch.VectorQuantize(...)` -> `vqdeploy.VectorQuantize` with 1.32's conventions."""

    _native = _NativeVectorQuantize
    _build = staticmethod(build_vector_quantize)
    __signature__ = _VQ_SIGNATURE
    from_vector_quantize_pytorch = _NativeVectorQuantize.from_vector_quantize_pytorch


class ResidualVQ(metaclass=_ReferenceView):
    """`vector_quantize_pytorch.ResidualVQ(...)` -> `vqdeploy.ResidualVQ` with 1.32's conventions."""

    _native = _NativeResidualVQ
    _build = staticmethod(build_residual_vq)
    __signature__ = _RVQ_SIGNATURE
    from_vector_quantize_pytorch = _NativeResidualVQ.from_vector_quantize_pytorch


class GroupedResidualVQ(metaclass=_ReferenceView):
    """`vector_quantize_pytorch.GroupedResidualVQ(...)` -> `vqdeploy.GroupedResidualVQ` with 1.32's conventions."""

    _native = _NativeGroupedResidualVQ
    _build = staticmethod(build_grouped_residual_vq)
    __signature__ = _GRVQ_SIGNATURE
    from_vector_quantize_pytorch = _NativeGroupedResidualVQ.from_vector_quantize_pytorch
