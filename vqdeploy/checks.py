"""Input checks shared by every public entry point (docs/design.md section 6).

They accept torch tensors and numpy arrays alike, and raise the typed errors of
`vqdeploy.errors` with a message that names what was expected and what came.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from vqdeploy.errors import (
    IndexRangeError,
    InputDtypeError,
    InputShapeError,
    NonFiniteInputError,
)

_FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")


def _dtype_name(x) -> str:
    return str(x.dtype).removeprefix("torch.")


def check_floating(x, name: str = "x") -> None:
    """Raise `InputDtypeError` unless `x` holds floating-point values."""
    ok = x.is_floating_point() if isinstance(x, torch.Tensor) else np.issubdtype(x.dtype, np.floating)
    if not ok:
        raise InputDtypeError(
            f"{name} must be a floating-point tensor ({', '.join(_FLOAT_NAMES)}), got dtype {_dtype_name(x)}"
        )


def check_integer(x, name: str = "indices") -> None:
    """Raise `InputDtypeError` unless `x` holds integers."""
    if isinstance(x, torch.Tensor):
        ok = not x.is_floating_point() and not x.is_complex() and x.dtype != torch.bool
    else:
        ok = np.issubdtype(x.dtype, np.integer)
    if not ok:
        raise InputDtypeError(f"{name} must be an integer tensor (int32 or int64), got dtype {_dtype_name(x)}")


def check_rank(x, ranks: Sequence[int], name: str, layout: str) -> None:
    """Raise `InputShapeError` unless `x.ndim` is one of `ranks`; `layout` says what is expected."""
    if x.ndim not in ranks:
        raise InputShapeError(
            f"{name} must have rank {' or '.join(map(str, ranks))} ({layout}), got shape {tuple(x.shape)}"
        )


def check_axis_size(x, axis: int, expected: int, name: str, what: str) -> None:
    """Raise `InputShapeError` unless `x.shape[axis] == expected`; `what` names the axis."""
    if x.shape[axis] != expected:
        raise InputShapeError(
            f"{name} must have {what} = {expected} along axis {axis}, got {x.shape[axis]} (shape {tuple(x.shape)})"
        )


def check_finite(x, name: str = "x") -> None:
    """Raise `NonFiniteInputError` if `x` holds NaN or infinity.

    One reduction first (NaN and Inf propagate through a sum), so the common case allocates
    nothing of x's size; only a non-finite sum (a bad value, or an overflow) triggers the
    element-wise count.
    """
    is_tensor = isinstance(x, torch.Tensor)
    total = x.sum() if is_tensor else np.sum(x)
    if bool(torch.isfinite(total)) if is_tensor else bool(np.isfinite(total)):
        return
    count = int((~torch.isfinite(x)).sum()) if is_tensor else int((~np.isfinite(x)).sum())
    if count:
        raise NonFiniteInputError(f"{name} must be finite, got {count} NaN/Inf value(s) in shape {tuple(x.shape)}")


def check_index_range(indices, num_codes: int, name: str = "indices", allow_dropped: bool = False) -> None:
    """Raise `IndexRangeError` unless every index lies in [0, num_codes) (or is -1 when `allow_dropped`)."""
    if indices.size == 0 if isinstance(indices, np.ndarray) else indices.numel() == 0:
        return
    low = -1 if allow_dropped else 0
    lo, hi = int(indices.min()), int(indices.max())
    if lo < low or hi >= num_codes:
        expected = f"[{low}, {num_codes})" + (" (-1 marks a dropped stage)" if allow_dropped else "")
        raise IndexRangeError(f"{name} must lie in {expected}, got values from {lo} to {hi}")


def eager_checks_enabled() -> bool:
    """False while torch.export / torch.compile trace a module: data-dependent checks are skipped there."""
    return not (torch.compiler.is_compiling() or torch.compiler.is_exporting())
