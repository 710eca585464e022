"""Training options of VectorQuantize, grouped in one value instead of two dozen arguments.

`TrainingOptions` holds every option that changes how a quantizer *learns* (sampling, gradients,
extra losses, how the codebook is updated) and `affine_param`, the one that also changes what an
eval forward computes (a codebook re-centred on the batch statistics it has tracked). Every
field at its default means "as the seed": a module built without options traces the same eval
graph as before they existed, and its ``config`` (checkpoints, export metadata) does not mention
them.

    VectorQuantize(dim=64, codebook_size=512, training=TrainingOptions(orthogonal_reg_weight=0.1))
    VectorQuantize(dim=64, codebook_size=512, orthogonal_reg_weight=0.1)   # the same, by field name

The field names are vector-quantize-pytorch 1.32's argument names.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from vqdeploy.errors import ConfigError


@dataclass(frozen=True)
class TrainingOptions:
    """How a VectorQuantize trains (see each field); all defaults: the seed's EMA training."""

    # sampling: Gumbel noise on the (negative) distances in training; eval always takes the nearest code
    stochastic_sample_codes: bool = False
    sample_codebook_temp: float = 1.0
    straight_through: bool = False  # Gumbel-softmax straight-through gradient to the distances
    # gradients
    route_gradients_to_input: bool = True  # False: no straight-through / rotation gradient to the input
    learnable_codebook: bool = False  # the codebook is an nn.Parameter learnt by gradient (needs ema_update=False)
    sync_update_v: float = 0.0  # the synchronous update rule (Huh et al. 2023, eq. 21) for a learnable codebook
    # losses
    commitment_use_cross_entropy_loss: bool = False
    orthogonal_reg_weight: float = 0.0
    orthogonal_reg_active_codes_only: bool = False
    orthogonal_reg_max_codes: int | None = None
    codebook_diversity_loss_weight: float = 0.0
    codebook_diversity_temperature: float = 100.0
    # codebook updates
    manual_ema_update: bool = False  # statistics are tracked; the caller refreshes with `_codebook.update_ema()`
    # padded batches
    return_zeros_for_masked_padding: bool = True  # masked positions: zeros (else the input) in the output
    # affine re-parameterisation of the codebook (Huh et al. 2023): codes follow the batch statistics
    affine_param: bool = False
    affine_param_batch_decay: float = 0.99
    affine_param_codebook_decay: float = 0.9
    sync_affine_param: bool = False

    def __post_init__(self) -> None:
        if self.sample_codebook_temp < 0:
            raise ConfigError(f"sample_codebook_temp must be >= 0, got {self.sample_codebook_temp}")
        if not 0.0 <= self.sync_update_v <= 1.0:
            raise ConfigError(f"sync_update_v must lie in [0, 1], got {self.sync_update_v}")
        if self.sync_update_v > 0 and not self.learnable_codebook:
            raise ConfigError("sync_update_v > 0 acts on a learnable codebook: pass learnable_codebook=True")
        if self.straight_through and self.learnable_codebook:
            raise ConfigError("straight_through (Gumbel) and learnable_codebook cannot be combined (as in 1.32)")
        for name in ("orthogonal_reg_weight", "codebook_diversity_loss_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.orthogonal_reg_max_codes is not None and self.orthogonal_reg_max_codes < 1:
            raise ConfigError(f"orthogonal_reg_max_codes must be a positive integer, got {self.orthogonal_reg_max_codes}")

    @property
    def needs_distances(self) -> bool:
        """Whether a training forward needs the full (rows x codes) distance matrix."""
        return (self.stochastic_sample_codes or self.straight_through or self.commitment_use_cross_entropy_loss
                or self.codebook_diversity_loss_weight > 0)

    def non_default(self) -> dict[str, Any]:
        """The fields not at their default (what a module's ``config`` records)."""
        defaults = TrainingOptions()
        return {k: v for k, v in asdict(self).items() if v != getattr(defaults, k)}


OPTION_NAMES = tuple(f.name for f in fields(TrainingOptions))


def training_options(given: TrainingOptions | None, overrides: dict[str, Any], kind: str) -> TrainingOptions:
    """`given` (or the defaults) with `overrides` (field names) applied; unknown names raise ConfigError."""
    unknown = [name for name in overrides if name not in OPTION_NAMES]
    if unknown:
        raise ConfigError(f"{kind} got unknown arguments {', '.join(unknown)}")
    base = given if given is not None else TrainingOptions()
    if not isinstance(base, TrainingOptions):
        raise ConfigError(f"{kind}: training must be a TrainingOptions, got {type(base).__name__}")
    return replace(base, **overrides) if overrides else base
