"""Bring modules trained with vector-quantize-pytorch (lucidrains) 1.32 over to vqdeploy.

The state-dict keys are the same (`_codebook.embed` (H, K, D), `_codebook.embed_avg`,
`_codebook.cluster_size`, `_codebook.initted`, `project_in.*`, `project_out.*`, `layers.{i}.…`),
so only the constructor config has to be read off the reference module. Every 1.32 option is read
(see `vqdeploy.nn.conventions.VQ_OPTIONS` / `RVQ_OPTIONS`): native ones are carried over, eval-only
ones convert (same eval output) and are recorded so that a training forward refuses them by name,
refused ones raise `UnsupportedOptionError` naming the option and why. The converted module has
1.32's conventions (indices (b, n, q), scalar losses), so it is a drop-in where the reference was.
"""

from __future__ import annotations

import functools
import sys
import warnings
from typing import Any

import torch
from torch import nn

from vqdeploy.errors import UnsupportedOptionError
from vqdeploy.nn import conventions as conv
from vqdeploy.nn.options import OPTION_NAMES, TrainingOptions


def _attr(module: nn.Module, name: str, default: Any = None) -> Any:
    return getattr(module, name, default)


def _refuse(kind: str, option: str, value: Any, why: str) -> None:
    raise UnsupportedOptionError(f"cannot convert this {kind}: {option}={value!r} is not supported by vqdeploy ({why})")


def _short(value: Any) -> str:
    """repr for numbers and flags; the type name for objects (an optimizer, a module)."""
    return repr(value) if isinstance(value, bool | int | float | str | tuple) else type(value).__name__


def _sampling(codebook: nn.Module) -> tuple[bool, bool]:
    """(stochastic_sample_codes, straight_through) of a 1.32 codebook (a partial of gumbel_sample)."""
    sample = _attr(codebook, "gumbel_sample")
    keywords = sample.keywords if isinstance(sample, functools.partial) else {}
    return bool(keywords.get("stochastic", False)), bool(keywords.get("straight_through", False))


def _sync_kmeans(codebook: nn.Module) -> bool:
    reference = sys.modules.get(type(codebook).__module__)
    batched = getattr(reference, "batched_sample_vectors", None)
    return not bool(_attr(codebook, "use_ddp", False)) or _attr(codebook, "sample_fn") is not batched


def reference_vq_options(module: nn.Module) -> dict[str, Any]:
    """The 1.32 constructor options a reference VectorQuantize was built with, read off the module."""
    codebook = module._codebook
    stochastic, straight = _sampling(codebook)
    project_in = module.project_in
    return dict(
        dim=module.dim,
        codebook_size=module.codebook_size,
        codebook_dim=codebook.embed.shape[-1],
        heads=module.heads,
        separate_codebook_per_head=module.separate_codebook_per_head,
        decay=codebook.decay,
        eps=codebook.eps,
        freeze_codebook=bool(_attr(module, "freeze_codebook", False)),
        kmeans_init=not bool(codebook.initted),
        kmeans_iters=codebook.kmeans_iters,
        sync_kmeans=_sync_kmeans(codebook),
        use_cosine_sim=module.use_cosine_sim,
        layernorm_after_project_in=isinstance(project_in, nn.Sequential)
        and any(isinstance(m, nn.LayerNorm) for m in project_in),
        threshold_ema_dead_code=codebook.threshold_ema_dead_code,
        channel_last=module.channel_last,
        accept_image_fmap=module.accept_image_fmap,
        accept_3d_fmap=bool(_attr(module, "accept_3d_fmap", False)),
        commitment_weight=float(module.commitment_weight) if _attr(module, "has_commitment_loss", True) else 0.0,
        commitment_use_cross_entropy_loss=bool(_attr(module, "commitment_use_cross_entropy_loss", False)),
        orthogonal_reg_weight=float(_attr(module, "orthogonal_reg_weight", 0.0)),
        orthogonal_reg_active_codes_only=bool(_attr(module, "orthogonal_reg_active_codes_only", False)),
        orthogonal_reg_max_codes=_attr(module, "orthogonal_reg_max_codes"),
        codebook_diversity_loss_weight=float(_attr(module, "codebook_diversity_loss_weight", 0.0)),
        codebook_diversity_temperature=float(_attr(module, "codebook_diversity_temperature", 100.0)),
        stochastic_sample_codes=stochastic,
        sample_codebook_temp=float(_attr(codebook, "sample_codebook_temp", 1.0)),
        straight_through=straight,
        rotation_trick=bool(_attr(module, "rotation_trick", False)),
        directional_reparam=bool(_attr(module, "directional_reparam", False)),
        sync_codebook=bool(_attr(codebook, "use_ddp", False)),
        ema_update=bool(_attr(codebook, "ema_update", True)),
        vq_bridge=_attr(codebook, "vq_bridge"),
        manual_ema_update=bool(_attr(codebook, "manual_ema_update", False)),
        learnable_codebook=bool(_attr(module, "learnable_codebook", False)),
        in_place_codebook_optimizer=_attr(module, "in_place_codebook_optimizer"),
        affine_param=bool(_attr(codebook, "affine_param", False)),
        affine_param_batch_decay=float(_attr(codebook, "affine_param_batch_decay", 0.99)),
        affine_param_codebook_decay=float(_attr(codebook, "affine_param_codebook_decay", 0.9)),
        sync_affine_param=bool(_attr(codebook, "sync_affine_param", False)),
        sync_update_v=float(_attr(module, "sync_update_v", 0.0)),
        return_zeros_for_masked_padding=bool(_attr(module, "return_zeros_for_masked_padding", True)),
        route_gradients_to_input=bool(_attr(module, "route_gradients_to_input", True)),
    )


# 1.32 options that vqdeploy serves but does not train, and their value when inactive.
_EVAL_ONLY_INACTIVE = {
    name: option.default for name, option in conv.VQ_OPTIONS.items() if option.status == conv.EVAL_ONLY
}


def _native_vq_config(
    options: dict[str, Any], kind: str, ignore: tuple[str, ...] = ()
) -> tuple[dict[str, Any], list[str]]:
    """Native VectorQuantize config and the eval-only options (as "name=value") for 1.32 options."""
    for name, value in options.items():
        option = conv.VQ_OPTIONS[name]
        if option.status == conv.REFUSED and not option.is_default(value):
            _refuse(kind, name, value, option.why)
    eval_only = [
        f"{name}={_short(options[name])}" for name, inactive in _EVAL_ONLY_INACTIVE.items()
        if name not in ignore and options[name] != inactive and options[name] is not None
    ]
    config = {name: options[name] for name in (
        "dim", "codebook_size", "decay", "eps", "kmeans_init", "kmeans_iters", "threshold_ema_dead_code",
        "use_cosine_sim", "codebook_dim", "heads", "separate_codebook_per_head", "accept_image_fmap",
        "channel_last", "rotation_trick", "freeze_codebook", "ema_update", "layernorm_after_project_in",
    )}
    config["commitment"] = options["commitment_weight"]
    if options["accept_3d_fmap"]:
        config["accept_3d_fmap"] = True
    training = TrainingOptions(**{name: options[name] for name in OPTION_NAMES if name in options})
    config.update(training.non_default())
    for name in ("sync_codebook", "sync_kmeans"):  # vqdeploy.nn.distributed
        config[name] = options[name]
    return config, eval_only


def _warn_eval_only(kind: str, eval_only: list[str]) -> None:
    if eval_only:
        warnings.warn(
            f"{kind} options {', '.join(eval_only)} are served as they are (the same eval tokens and outputs), but "
            "vqdeploy does not train with them yet: a training forward of the converted module raises "
            "UnsupportedOptionError",
            UserWarning,
            stacklevel=4,
        )


def vector_quantize_config(module: nn.Module) -> dict[str, Any]:
    """Constructor arguments of `vqdeploy.VectorQuantize` equivalent to a reference module."""
    config, eval_only = _native_vq_config(reference_vq_options(module), "VectorQuantize")
    _warn_eval_only("VectorQuantize", eval_only)
    return dict(config, eval_only_options=eval_only, conventions=conv.REFERENCE)


def residual_vq_config(module: nn.Module) -> dict[str, Any]:
    """Constructor arguments of `vqdeploy.ResidualVQ` equivalent to a reference module."""
    kind = "ResidualVQ"
    for name, value in (
        ("diveq", bool(_attr(module, "diveq", False))),
        ("beam_size", _attr(module, "beam_size")),
        ("eval_beam_size", _attr(module, "eval_beam_size")),
        ("accept_image_fmap", bool(_attr(module, "accept_image_fmap", False))),
    ):
        if value and not (name.endswith("beam_size") and value == 1):
            _refuse(kind, name, value, conv.RVQ_OPTIONS[name].why)

    # Settings 1.32's ResidualVQ itself gives its stages: not the user's options.
    shared = bool(module.shared_codebook)
    implicit = bool(_attr(module, "implicit_neural_codebook", False))
    ignore = ("manual_ema_update",) if shared else ()
    stage_configs, eval_only = [], []
    for layer in module.layers:
        config, layer_eval_only = _native_vq_config(reference_vq_options(layer), kind, ignore)
        stage_configs.append(config)
        eval_only += [option for option in layer_eval_only if option not in eval_only]
    _warn_eval_only(kind, eval_only)

    stage = stage_configs[0]
    for key in ("dim", "codebook_size", "codebook_dim", "heads", "separate_codebook_per_head", "accept_image_fmap",
                "channel_last", "layernorm_after_project_in"):
        stage.pop(key)
    if shared:
        stage.pop("manual_ema_update", None)
    extra: dict[str, Any] = {}
    if implicit:  # the MLPs' sizes are read off the first one
        mlp = module.mlps[0]
        extra.update(implicit_neural_codebook=True, mlp_kwargs=dict(
            dim_hidden=mlp.layers[0][0].out_features if len(mlp.layers) else None, depth=len(mlp.layers),
            l2norm_output=bool(mlp.l2norm_output),
        ))
        for name in ("learnable_codebook", "ema_update"):
            stage.pop(name, None)
    quant_grad_frac = float(_attr(module, "quant_grad_frac", 0.0))
    if quant_grad_frac:
        extra["quant_grad_frac"] = quant_grad_frac
    sizes = tuple(int(size) for size in module.codebook_sizes)
    return dict(
        dim=module.project_in.in_features if module.has_projections else module.layers[0].dim,
        num_quantizers=module.num_quantizers,
        codebook_size=sizes[0] if len(set(sizes)) == 1 else sizes,
        shared_codebook=shared,
        quantize_dropout=bool(module.quantize_dropout),
        quantize_dropout_cutoff_index=module.quantize_dropout_cutoff_index,
        quantize_dropout_multiple_of=module.quantize_dropout_multiple_of,
        codebook_dim=module.codebook_dim,
        conventions=conv.REFERENCE,
        eval_only_options=eval_only,
        **extra,
        **stage,
    )


def grouped_residual_vq_config(module: nn.Module) -> dict[str, Any]:
    """Constructor arguments of `vqdeploy.GroupedResidualVQ` equivalent to a reference module."""
    if bool(_attr(module, "accept_image_fmap", False)):
        _refuse("GroupedResidualVQ", "accept_image_fmap", True, conv.GRVQ_OPTIONS["accept_image_fmap"].why)
    group = residual_vq_config(module.rvqs[0])
    group.pop("dim")
    group.pop("conventions")
    return dict(dim=module.dim, groups=module.groups, conventions=conv.REFERENCE, **group)


def load_reference_state(converted: nn.Module, module: nn.Module) -> None:
    """Load a reference module's state into its conversion, strictly.

    1.32's affine_param registers its batch statistics only once it has seen a batch; before that
    the converted module keeps its own (the identity transform), and nothing else may be missing.
    """
    state = dict(module.state_dict())
    own = converted.state_dict()
    for key, value in own.items():
        if key not in state and key.rsplit(".", 1)[-1] in ("batch_mean", "batch_variance"):
            state[key] = value
    for key in [k for k in state if k.endswith("_needs_init")]:
        state[key] = torch.as_tensor(state[key]).to(torch.bool)
    converted.load_state_dict(state, strict=True)
