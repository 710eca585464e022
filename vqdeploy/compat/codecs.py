"""Converters from audio codecs' quantizers to vqdeploy modules: one small function per codec family.

Each takes the codec's own quantizer module (its weights, EMA state and configuration as they are)
and returns the vqdeploy module that computes the same tokens in the codec's token layout:

=====================================================  ======================================================
source class                                           vqdeploy module
=====================================================  ======================================================
``transformers`` ``EncodecResidualVectorQuantizer``    `ResidualVQ` (channel_last=False), tokens (q, b, t)
``encodec`` ``ResidualVectorQuantizer`` / ``…ization`` `ResidualVQ` (channel_last=False), tokens (q, b, t)
``transformers`` ``DacResidualVectorQuantizer``        `FactorizedResidualVQ`, tokens (b, q, t)
``dac`` ``ResidualVectorQuantize``                     `FactorizedResidualVQ`, tokens (b, q, t)
``snac`` ``ResidualVectorQuantize``                    `FactorizedResidualVQ` (strides), a tuple of (b, t_s)
``transformers`` ``MimiSplitResidualVectorQuantizer``  `SplitResidualVQ`, tokens (q, b, t)
=====================================================  ======================================================

The codec packages are not imported here: a module is recognised by its class's module and name,
and read through its attributes, so converting needs only the package that built it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from vqdeploy.errors import UnsupportedOptionError
from vqdeploy.nn.factorized_vq import STACKED, TUPLE, FactorizedResidualVQ
from vqdeploy.nn.residual_vq import ResidualVQ
from vqdeploy.nn.split_vq import SplitResidualVQ

# EnCodec's EuclideanCodebook defaults (encodec 0.1.1), used where the module does not carry them
# (transformers' port keeps the buffers but not the training settings).
ENCODEC_DECAY, ENCODEC_EPS, ENCODEC_DEAD_CODE = 0.99, 1e-5, 2


def _copy_codebook_(stage: nn.Module, embed: torch.Tensor, embed_avg: torch.Tensor, cluster_size: torch.Tensor) -> None:
    codebook = stage._codebook
    with torch.no_grad():
        codebook.embed.copy_(embed.detach().reshape(codebook.embed.shape))
        codebook.embed_avg.copy_(embed_avg.detach().reshape(codebook.embed_avg.shape))
        codebook.cluster_size.copy_(cluster_size.detach().reshape(codebook.cluster_size.shape))
        codebook.initted.fill_(True)


def _linear_from(projection: nn.Module | None, target: nn.Module) -> None:
    """Copy an nn.Linear or a 1x1 nn.Conv1d (bias or not) into `target` (an nn.Linear)."""
    if projection is None or isinstance(projection, nn.Identity):
        return
    weight = projection.weight.detach()
    with torch.no_grad():
        target.weight.copy_(weight.reshape(target.weight.shape))
        bias = getattr(projection, "bias", None)
        target.bias.copy_(bias.detach() if bias is not None else torch.zeros_like(target.bias))


# -- EnCodec -----------------------------------------------------------------------------------------
def from_encodec(module: nn.Module) -> ResidualVQ:
    """EnCodec's residual quantizer (transformers' ``EncodecResidualVectorQuantizer``, or encodec's
    ``ResidualVectorQuantizer`` / ``ResidualVectorQuantization``) -> `ResidualVQ(channel_last=False)`.

    Codebooks, ``embed_avg`` and ``cluster_size`` are copied; EMA settings are read off the codebook
    (encodec's defaults where the module has none). Tokens are (q, b, t), as the codec's ``encode``
    returns them; ``n_q`` (forward) is EnCodec's bandwidth choice of stages.
    """
    rvq = getattr(module, "vq", module)  # encodec's ResidualVectorQuantizer wraps ResidualVectorQuantization
    layers = list(rvq.layers)
    first = layers[0]._codebook if hasattr(layers[0], "_codebook") else layers[0].codebook
    codebook_size, codebook_dim = first.embed.shape
    project_in = getattr(layers[0], "project_in", None)
    dim = project_in.in_features if isinstance(project_in, nn.Linear) else codebook_dim
    if isinstance(project_in, nn.Linear):
        raise UnsupportedOptionError(
            f"cannot convert this EnCodec quantizer: per-stage projections ({dim} -> {codebook_dim}) are not supported "
            "by ResidualVQ (one projection for all stages)"
        )
    converted = ResidualVQ(
        dim=dim, num_quantizers=len(layers), codebook_size=codebook_size, channel_last=False,
        decay=float(getattr(first, "decay", ENCODEC_DECAY)), eps=float(getattr(first, "epsilon", ENCODEC_EPS)),
        threshold_ema_dead_code=float(getattr(first, "threshold_ema_dead_code", ENCODEC_DEAD_CODE)),
        kmeans_init=False, commitment=float(getattr(layers[0], "commitment_weight", 1.0)),
    )
    for stage, layer in zip(converted.layers, layers, strict=True):
        book = layer._codebook if hasattr(layer, "_codebook") else layer.codebook
        if not bool(book.inited):
            raise UnsupportedOptionError(
                "cannot convert this EnCodec quantizer: a codebook was never initialised (inited=False); train it first"
            )
        _copy_codebook_(stage, book.embed, book.embed_avg, book.cluster_size)
    return converted.train(module.training)


# -- DAC and SNAC ------------------------------------------------------------------------------------
def _weight_normed(conv: nn.Module) -> bool:
    return hasattr(conv, "parametrizations") or hasattr(conv, "weight_g")


def _conv_state(conv: nn.Module, prefix: str, weight_norm: bool) -> dict[str, torch.Tensor]:
    """A 1x1 Conv1d's state in the keys of `FactorizedStage` (parametrized weight norm)."""
    state = {f"{prefix}.bias": conv.bias.detach()}
    if hasattr(conv, "parametrizations"):  # torch.nn.utils.parametrizations.weight_norm
        original = conv.parametrizations.weight
        g, v = original.original0.detach(), original.original1.detach()
    elif hasattr(conv, "weight_g"):  # the older torch.nn.utils.weight_norm
        g, v = conv.weight_g.detach(), conv.weight_v.detach()
    else:
        state[f"{prefix}.weight"] = conv.weight.detach()
        return state
    if not weight_norm:
        raise UnsupportedOptionError("cannot convert: some projections are weight-normed and others are not")
    state[f"{prefix}.parametrizations.weight.original0"] = g
    state[f"{prefix}.parametrizations.weight.original1"] = v
    return state


def _factorized(module: nn.Module, strides: list[int], codes_layout: str, dropout: float) -> FactorizedResidualVQ:
    stages = list(module.quantizers)
    weight_norm = _weight_normed(stages[0].in_proj)
    codebook_size = stages[0].codebook.weight.shape[0]
    dims = [stage.codebook.weight.shape[1] for stage in stages]
    converted = FactorizedResidualVQ(
        dim=stages[0].in_proj.in_channels, num_quantizers=len(stages), codebook_size=codebook_size,
        codebook_dim=dims, strides=strides, weight_norm=weight_norm, codes_layout=codes_layout,
        quantizer_dropout=float(dropout),
    )
    state: dict[str, torch.Tensor] = {}
    for i, stage in enumerate(stages):
        state[f"quantizers.{i}.codebook.weight"] = stage.codebook.weight.detach()
        for name in ("in_proj", "out_proj"):
            state.update(_conv_state(getattr(stage, name), f"quantizers.{i}.{name}", weight_norm))
    converted.load_state_dict(state, strict=True)
    return converted.train(module.training)


def from_dac(module: nn.Module) -> FactorizedResidualVQ:
    """DAC's residual quantizer (transformers' ``DacResidualVectorQuantizer`` or descript-audio-codec's
    ``ResidualVectorQuantize``) -> `FactorizedResidualVQ`, tokens (b, q, t) as the codec's."""
    dropout = getattr(module, "quantizer_dropout", 0.0)
    return _factorized(module, [1] * len(module.quantizers), STACKED, float(dropout or 0.0))


def from_snac(module: nn.Module) -> FactorizedResidualVQ:
    """SNAC's ``ResidualVectorQuantize`` -> `FactorizedResidualVQ` with its per-stage strides; tokens
    stay a tuple of (b, t / stride_s) tensors, as SNAC returns them."""
    strides = [int(stage.stride) for stage in module.quantizers]
    return _factorized(module, strides, TUPLE, 0.0)


# -- Mimi --------------------------------------------------------------------------------------------
def _mimi_half(source: nn.Module, target: ResidualVQ) -> None:
    _linear_from(source.input_proj, target.project_in)
    _linear_from(source.output_proj, target.project_out)
    for stage, layer in zip(target.layers, source.layers, strict=True):
        book = layer.codebook
        usage = book.cluster_usage.detach()
        embed = book.embed_sum.detach() / usage.clamp(min=book.epsilon)[:, None]
        _copy_codebook_(stage, embed, book.embed_sum, usage)


def from_mimi(module: nn.Module) -> SplitResidualVQ:
    """transformers' ``MimiSplitResidualVectorQuantizer`` -> `SplitResidualVQ`, tokens (q, b, t).

    Each code is Mimi's ``embed_sum / cluster_usage.clamp(min=epsilon)``; ``embed_sum`` and
    ``cluster_usage`` become the EMA state (``embed_avg``, ``cluster_size``). Mimi's bias-free 1x1
    projections become Linear layers with a zero bias.
    """
    semantic, acoustic = module.semantic_residual_vector_quantizer, module.acoustic_residual_vector_quantizer
    first = semantic.layers[0].codebook
    codebook_size, codebook_dim = first.embed_sum.shape
    dim = semantic.input_proj.in_channels if semantic.input_proj is not None else codebook_dim
    converted = SplitResidualVQ(
        dim=dim, num_quantizers=len(semantic.layers) + len(acoustic.layers), codebook_size=codebook_size,
        codebook_dim=codebook_dim, num_semantic_quantizers=len(semantic.layers), kmeans_init=False,
        eps=float(first.epsilon),
    )
    _mimi_half(semantic, converted.semantic)
    _mimi_half(acoustic, converted.acoustic)
    return converted.train(module.training)


# -- vector-quantize-pytorch -------------------------------------------------------------------------
def from_vector_quantize_pytorch(module: nn.Module) -> nn.Module:
    """vector-quantize-pytorch's ``VectorQuantize`` / ``ResidualVQ`` -> vqdeploy's (see `vqdeploy.nn.convert`)."""
    from vqdeploy.nn.vector_quantize import VectorQuantize

    if type(module).__name__ == "ResidualVQ":
        return ResidualVQ.from_vector_quantize_pytorch(module)
    return VectorQuantize.from_vector_quantize_pytorch(module)


# (module of the class, class name) -> converter. The module is matched by its top-level package
# and the class by name, so each package's own layout of submodules may move without breaking this.
CONVERTERS: dict[tuple[str, str], Callable[[nn.Module], nn.Module]] = {
    ("vector_quantize_pytorch", "VectorQuantize"): from_vector_quantize_pytorch,
    ("vector_quantize_pytorch", "ResidualVQ"): from_vector_quantize_pytorch,
    ("transformers", "EncodecResidualVectorQuantizer"): from_encodec,
    ("encodec", "ResidualVectorQuantizer"): from_encodec,
    ("encodec", "ResidualVectorQuantization"): from_encodec,
    ("transformers", "DacResidualVectorQuantizer"): from_dac,
    ("dac", "ResidualVectorQuantize"): from_dac,
    ("snac", "ResidualVectorQuantize"): from_snac,
    ("transformers", "MimiSplitResidualVectorQuantizer"): from_mimi,
}


def convertible() -> list[str]:
    """The classes `vqdeploy.convert` takes, as "package.ClassName"."""
    return [f"{package}.{name}" for package, name in CONVERTERS]


def find_converter(module: nn.Module) -> Callable[[nn.Module], nn.Module] | None:
    cls = type(module)
    package = cls.__module__.split(".", 1)[0]
    return CONVERTERS.get((package, cls.__name__))
