"""Output conventions (the seed's and vector-quantize-pytorch 1.32's) and the table of 1.32 options.

Two conventions, one implementation:

- ``"seed"`` (the default of `vqdeploy.VectorQuantize` / `ResidualVQ`): the shapes the seed README
  documents. VectorQuantize loss (1,); ResidualVQ indices (quantizer, batch, seq), losses
  (quantizer, 1).
- ``"vector_quantize_pytorch"`` (what `vqdeploy.compat.vector_quantize_pytorch` builds and what
  `from_vector_quantize_pytorch` returns): what 1.32 returns. VectorQuantize loss () (a scalar);
  ResidualVQ indices (batch, seq, quantizer), losses (quantizer,).

Indices given to ``get_codes_from_indices`` / ``get_output_from_indices`` are read in the module's
convention only, with strict shape checks: a tensor in the other layout is refused, never
reinterpreted. Where both layouts have the same shape (batch = seq = quantizers) no check can tell
them apart; the module's convention decides.

`VQ_OPTIONS`, `RVQ_OPTIONS`, `GRVQ_OPTIONS` and the `*_FORWARD` tables list every constructor and
forward argument of 1.32 with its default and what vqdeploy does with it (`Status`). The compat namespace,
the converter and the README's migration table are all read from (and tested against) them.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

from vqdeploy.errors import ConfigError, UnsupportedOptionError

SEED = "seed"
REFERENCE = "vector_quantize_pytorch"
CONVENTIONS = (SEED, REFERENCE)


def check_conventions(conventions: str) -> str:
    """`conventions` if it names a known convention; ConfigError otherwise."""
    if conventions not in CONVENTIONS:
        raise ConfigError(f"conventions must be one of {CONVENTIONS}, got {conventions!r}")
    return conventions


# -- option statuses -----------------------------------------------------------------------------------
NATIVE = "native"  # implemented: eval and training behave as in 1.32
EVAL_ONLY = "eval only"  # a converted module serves it (same eval output); training it is refused by name
INERT = "inert"  # acts only together with another option that is refused or eval only; any value accepted
DISTRIBUTED = "distributed"  # sync_codebook / sync_kmeans: forwarded where the native class has them
REFUSED = "refused"  # refused by name (UnsupportedOptionError) at any value but its default


@dataclass(frozen=True)
class ReferenceOption:
    """One argument of vector-quantize-pytorch 1.32 and what vqdeploy does with it."""

    name: str
    default: Any
    status: str
    why: str = ""

    def is_default(self, value: Any) -> bool:
        if value is self.default:
            return True
        try:
            return bool(value == self.default)
        except Exception:  # tensors, modules, callables: only the identical default counts
            return False


def _options(*rows: tuple) -> dict[str, ReferenceOption]:
    return {row[0]: ReferenceOption(*row) for row in rows}



VQ_OPTIONS = _options(
    ("dim", inspect.Parameter.empty, NATIVE),
    ("codebook_size", inspect.Parameter.empty, NATIVE),
    ("codebook_dim", None, NATIVE),
    ("heads", 1, NATIVE),
    ("separate_codebook_per_head", False, NATIVE),
    ("decay", 0.8, NATIVE),
    ("eps", 1e-5, NATIVE),
    ("freeze_codebook", False, NATIVE),
    ("kmeans_init", False, NATIVE),
    ("kmeans_iters", 10, NATIVE),
    ("sync_kmeans", True, DISTRIBUTED, "k-means over the global batch under torch.distributed (False: rank 0's shard)"),
    ("use_cosine_sim", False, NATIVE),
    ("layernorm_after_project_in", False, NATIVE),
    ("threshold_ema_dead_code", 0, NATIVE),
    ("channel_last", True, NATIVE),
    ("accept_image_fmap", False, NATIVE),
    ("accept_3d_fmap", False, NATIVE, "(batch, dim, depth, height, width) inputs"),
    ("commitment_weight", 1.0, NATIVE, "alias commitment (the seed's name)"),
    ("commitment_use_cross_entropy_loss", False, NATIVE),
    ("orthogonal_reg_weight", 0.0, NATIVE, "the codebook becomes an nn.Parameter (as in 1.32)"),
    ("orthogonal_reg_active_codes_only", False, NATIVE),
    ("orthogonal_reg_max_codes", None, NATIVE),
    ("codebook_diversity_loss_weight", 0.0, NATIVE),
    ("codebook_diversity_temperature", 100.0, NATIVE),
    ("stochastic_sample_codes", False, NATIVE, "Gumbel sampling in training; eval takes the nearest code"),
    ("sample_codebook_temp", 1.0, NATIVE),
    ("straight_through", False, NATIVE, "Gumbel-softmax straight-through (pass rotation_trick=False, as 1.32 asks)"),
    ("rotation_trick", None, NATIVE, "1.32's default (None) means on when dim > 1"),
    ("directional_reparam", False, REFUSED, "DiVeQ: noisy directional gradients and a learnt codebook; "
     "not implemented"),
    ("directional_reparam_variance", 5e-3, INERT, "acts only with directional_reparam=True"),
    ("sync_codebook", None, DISTRIBUTED, "one fused all-reduce of the EMA sums per update; None: on whenever "
     "a process group of more than one rank is initialised"),
    ("sync_affine_param", False, NATIVE, "all-reduces the affine batch statistics under torch.distributed"),
    ("ema_update", None, NATIVE, "False keeps the codebook fixed (dead codes are still replaced)"),
    ("vq_bridge", None, REFUSED, "a module that transforms the codebook before every search; not implemented"),
    ("manual_ema_update", False, NATIVE, "statistics tracked; the caller refreshes with _codebook.update_ema()"),
    ("learnable_codebook", None, NATIVE, "an nn.Parameter codebook learnt by gradient (with ema_update=False)"),
    ("in_place_codebook_optimizer", None, REFUSED, "an optimizer stepped (loss.backward()) inside forward; "
     "not implemented: learn the codebook by gradient with your own optimizer"),
    ("manual_in_place_optimizer_update", False, INERT, "acts only with in_place_codebook_optimizer"),
    ("affine_param", False, NATIVE, "statistics tracked in training only: unlike 1.32, an eval forward does not "
     "update them, so eval output is a fixed function of the input (and exports)"),
    ("affine_param_batch_decay", 0.99, NATIVE),
    ("affine_param_codebook_decay", 0.9, NATIVE),
    ("sync_update_v", 0.0, NATIVE),
    ("return_zeros_for_masked_padding", True, NATIVE),
    ("route_gradients_to_input", True, NATIVE),
)

RVQ_OPTIONS = _options(
    ("dim", inspect.Parameter.empty, NATIVE),
    ("num_quantizers", None, NATIVE),
    ("codebook_size", inspect.Parameter.empty, NATIVE, "an int, or a tuple of one size per stage"),
    ("codebook_dim", None, NATIVE),
    ("shared_codebook", False, NATIVE),
    ("diveq", False, REFUSED, "DiVeQ adds noise to the output even in eval; not implemented"),
    ("heads", 1, REFUSED, "1.32 itself only takes heads=1 here"),
    ("quantize_dropout", False, NATIVE),
    ("quantize_dropout_cutoff_index", 0, NATIVE),
    ("quantize_dropout_multiple_of", 1, NATIVE),
    ("accept_image_fmap", False, REFUSED, "residual quantizers take (batch, seq, dim)"),
    ("implicit_neural_codebook", False, NATIVE, "QINCo: stage s > 0 searches an MLP of its codebook and the "
     "running sum (one codebook per position); eager only: export refuses it by name"),
    ("mlp_kwargs", {}, NATIVE, "dim_hidden, depth, l2norm_output of the QINCo MLPs"),
    ("beam_size", None, REFUSED, "beam search is not implemented; stages are greedy (None and 1 are accepted)"),
    ("eval_beam_size", None, REFUSED, "beam search is not implemented; stages are greedy"),
    ("beam_score_quantizer_weights", None, INERT, "acts only with beam search"),
    ("quant_grad_frac", 0.0, NATIVE, "the fraction of a stage's gradient that reaches the earlier stages"),
    ("return_zeros_for_masked_padding", True, NATIVE),
)

GRVQ_OPTIONS = _options(
    ("dim", inspect.Parameter.empty, NATIVE),
    ("groups", 1, NATIVE, "dim splits into `groups` slices, one ResidualVQ each"),
    ("accept_image_fmap", False, REFUSED, "residual quantizers take (batch, seq, dim)"),
)

VQ_FORWARD = _options(
    ("indices", None, NATIVE, "the cross-entropy mode: returns (codebook-space quantized, cross entropy to these codes)"),
    ("mask", None, NATIVE, "(batch, seq) bool: padded positions neither update the codebook nor count in the loss"),
    ("lens", None, NATIVE, "(batch,) lengths, the same as mask"),
    ("topk", None, NATIVE, "heads=1, as in 1.32"),
    ("sample_codebook_temp", None, NATIVE),
    ("freeze_codebook", None, NATIVE),
    ("return_loss_breakdown", False, NATIVE),
    ("codebook_transform_fn", None, NATIVE, "heads=1"),
    ("ema_update_weight", None, NATIVE),
    ("accum_ema_update", False, NATIVE),
    ("ema_update", None, NATIVE),
)

RVQ_FORWARD = _options(
    ("mask", None, NATIVE),
    ("indices", None, REFUSED, "the cross-entropy-to-given-codes mode is not implemented"),
    ("return_all_codes", False, NATIVE),
    ("sample_codebook_temp", None, NATIVE),
    ("freeze_codebook", False, NATIVE),
    ("beam_size", None, REFUSED, "beam search is not implemented (None and 1 are accepted)"),
    ("rand_quantize_dropout_fixed_seed", None, NATIVE),
)

GRVQ_FORWARD = _options(
    ("indices", None, REFUSED, "the cross-entropy-to-given-codes mode is not implemented"),
    ("return_all_codes", False, NATIVE),
    ("sample_codebook_temp", None, NATIVE),
    ("freeze_codebook", False, NATIVE),
    ("mask", None, NATIVE),
)


def refuse_options(kind: str, table: dict[str, ReferenceOption], given: dict[str, Any], where: str) -> None:
    """UnsupportedOptionError naming every argument in `given` that vqdeploy cannot honour, and why.

    Refused and eval-only options are refused unless at their 1.32 default; inert ones pass.
    `where` says what was being called ("constructor", "forward").
    """
    unknown = [name for name in given if name not in table]
    if unknown:
        raise UnsupportedOptionError(f"{kind} {where} got unknown arguments {', '.join(unknown)}")
    refused = [
        f"{name}={value!r} ({table[name].why})" for name, value in given.items()
        if table[name].status in (REFUSED, EVAL_ONLY) and not table[name].is_default(value)
    ]
    if refused:
        raise UnsupportedOptionError(f"{kind} {where}: not supported by vqdeploy: {'; '.join(refused)}")


def check_forward_options(kind: str, table: dict[str, ReferenceOption], given: dict[str, Any]) -> None:
    """Refuse a non-default forward argument that vqdeploy does not implement."""
    refuse_options(kind, table, {k: v for k, v in given.items() if table[k].status != NATIVE}, "forward")


def eval_only_error(kind: str, options: tuple[str, ...]) -> UnsupportedOptionError:
    return UnsupportedOptionError(
        f"this {kind} was converted from a vector-quantize-pytorch model with {', '.join(options)}: vqdeploy "
        "serves it in eval mode (same tokens and outputs), but does not train with that option yet"
    )


# -- index layouts --------------------------------------------------------------------------------------
def residual_indices_to_seed(conventions: str, indices: torch.Tensor) -> torch.Tensor:
    """ResidualVQ indices in `conventions` -> (quantizer, batch, seq)."""
    return indices.movedim(-1, 0) if conventions == REFERENCE else indices


def residual_indices_from_seed(conventions: str, indices: torch.Tensor) -> torch.Tensor:
    """(quantizer, batch, seq) -> ResidualVQ indices in `conventions`."""
    return indices.movedim(0, -1) if conventions == REFERENCE else indices


def native_accepts(cls: type, name: str) -> bool:
    """Whether `cls.__init__` takes an argument `name` (the distributed options land on another branch)."""
    return name in inspect.signature(cls.__init__).parameters


_STATUS_TEXT = {
    NATIVE: "native",
    EVAL_ONLY: "converts (eval); training refused",
    INERT: "accepted (inert)",
    DISTRIBUTED: "native (torch.distributed)",
    REFUSED: "refused",
}


def migration_table() -> str:
    """The README's migration table (markdown), rendered from the option tables."""
    lines = ["| 1.32 argument | default | vqdeploy | why / note |", "|---|---|---|---|"]
    for where, table in (("VectorQuantize(...)", VQ_OPTIONS), ("ResidualVQ(...)", RVQ_OPTIONS),
                         ("GroupedResidualVQ(...)", GRVQ_OPTIONS), ("VectorQuantize forward", VQ_FORWARD),
                         ("ResidualVQ forward", RVQ_FORWARD), ("GroupedResidualVQ forward", GRVQ_FORWARD)):
        for option in table.values():
            default = "required" if option.default is inspect.Parameter.empty else f"`{option.default!r}`"
            lines.append(f"| {where}: `{option.name}` | {default} | {_STATUS_TEXT[option.status]} | {option.why} |")
    return "\n".join(lines)
