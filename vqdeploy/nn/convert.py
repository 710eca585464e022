"""Bring modules trained with vector-quantize-pytorch (lucidrains) over to vqdeploy.

The state-dict keys are the same (`_codebook.embed` (H, K, D), `_codebook.embed_avg`,
`_codebook.cluster_size`, `_codebook.initted`, `project_in.*`, `project_out.*`, `layers.{i}.…`),
so only the constructor config has to be read off the reference module. Options that change what
inference computes are refused with an error naming them; options that only change training
gradients (the rotation trick, say) are accepted with a warning, because eval output is the same.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from vqdeploy.errors import UnsupportedOptionError


def _attr(module: nn.Module, name: str, default: Any = None) -> Any:
    return getattr(module, name, default)


def _refuse(kind: str, option: str, why: str) -> None:
    raise UnsupportedOptionError(f"cannot convert this {kind}: option {option} is not supported by vqdeploy ({why})")


def _check_vector_quantize(module: nn.Module, kind: str = "VectorQuantize") -> None:
    codebook = module._codebook
    if _attr(module, "accept_3d_fmap", False):
        _refuse(kind, "accept_3d_fmap=True", "3-d feature maps")
    if _attr(module, "learnable_codebook", False) or _attr(codebook, "learnable_codebook", False):
        _refuse(kind, "learnable_codebook=True", "vqdeploy codebooks are learnt by EMA")
    if not _attr(codebook, "ema_update", True):
        _refuse(kind, "ema_update=False", "vqdeploy codebooks are learnt by EMA")
    if _attr(codebook, "affine_param", False):
        _refuse(kind, "affine_param=True", "it changes the codes used at inference")
    if _attr(codebook, "vq_bridge", None) is not None:
        _refuse(kind, "vq_bridge", "it transforms the codebook at inference")
    if _attr(module, "commitment_use_cross_entropy_loss", False):
        _refuse(kind, "commitment_use_cross_entropy_loss=True", "only the MSE commitment loss is implemented")
    if _attr(module, "in_place_codebook_optimizer", None) is not None:
        _refuse(kind, "in_place_codebook_optimizer", "vqdeploy codebooks are learnt by EMA")
    if _attr(module, "directional_reparam", False):
        _refuse(kind, "directional_reparam=True", "only straight-through gradients are implemented")
    if isinstance(module.project_in, nn.Sequential):
        _refuse(kind, "layernorm_after_project_in=True", "project_in is a single Linear in vqdeploy")
    gradient_only = [
        name for name, active in (
            ("rotation_trick=True", _attr(module, "rotation_trick", False)),
            ("orthogonal_reg_weight>0", _attr(module, "orthogonal_reg_weight", 0) > 0),
            ("codebook_diversity_loss_weight>0", _attr(module, "codebook_diversity_loss_weight", 0) > 0),
            ("sync_update_v>0", _attr(module, "sync_update_v", 0) > 0),
        ) if active
    ]
    if gradient_only:
        warnings.warn(
            f"{kind} options {', '.join(gradient_only)} only change training gradients; vqdeploy keeps the weights "
            "and gives the same eval output, but trains on with straight-through gradients and the commitment loss",
            UserWarning,
            stacklevel=4,
        )


def vector_quantize_config(module: nn.Module) -> dict[str, Any]:
    """Constructor arguments of `vqdeploy.VectorQuantize` equivalent to a reference module."""
    _check_vector_quantize(module)
    codebook = module._codebook
    return dict(
        dim=module.dim,
        codebook_size=module.codebook_size,
        decay=codebook.decay,
        commitment=float(module.commitment_weight),
        eps=codebook.eps,
        kmeans_init=not bool(codebook.initted),
        kmeans_iters=codebook.kmeans_iters,
        threshold_ema_dead_code=codebook.threshold_ema_dead_code,
        use_cosine_sim=module.use_cosine_sim,
        codebook_dim=codebook.embed.shape[-1],
        heads=module.heads,
        separate_codebook_per_head=module.separate_codebook_per_head,
        accept_image_fmap=module.accept_image_fmap,
        channel_last=module.channel_last,
    )


def residual_vq_config(module: nn.Module) -> dict[str, Any]:
    """Constructor arguments of `vqdeploy.ResidualVQ` equivalent to a reference module."""
    kind = "ResidualVQ"
    if _attr(module, "implicit_neural_codebook", False):
        _refuse(kind, "implicit_neural_codebook=True", "QINCo codebooks are not implemented")
    if _attr(module, "diveq", False):
        _refuse(kind, "diveq=True", "only EMA codebooks are implemented")
    if _attr(module, "beam_size", None) is not None or _attr(module, "eval_beam_size", None) is not None:
        _refuse(kind, "beam_size", "beam search is not implemented; stages are greedy")
    if not _attr(module, "uniform_codebook_size", True):
        _refuse(kind, f"codebook_size={module.codebook_sizes}", "every stage must have the same codebook size")
    if _attr(module, "accept_image_fmap", False):
        _refuse(kind, "accept_image_fmap=True", "residual quantizers take (batch, seq, dim)")
    if _attr(module, "quant_grad_frac", 0.0) != 0.0:
        _refuse(kind, "quant_grad_frac", "stages are trained on detached residuals")
    first = module.layers[0]
    for layer in module.layers:
        _check_vector_quantize(layer, kind)
    stage = vector_quantize_config(first)
    for key in ("dim", "codebook_size", "codebook_dim", "heads", "separate_codebook_per_head", "accept_image_fmap", "channel_last"):
        stage.pop(key)
    return dict(
        dim=module.project_in.in_features if module.has_projections else first.dim,
        num_quantizers=module.num_quantizers,
        codebook_size=module.codebook_size,
        shared_codebook=module.shared_codebook,
        quantize_dropout=bool(module.quantize_dropout),
        quantize_dropout_cutoff_index=module.quantize_dropout_cutoff_index,
        quantize_dropout_multiple_of=module.quantize_dropout_multiple_of,
        codebook_dim=module.codebook_dim,
        **stage,
    )
