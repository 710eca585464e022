"""Input checks shared by every public entry point (docs/design.md section 6).

They accept torch tensors and numpy arrays alike, and raise the typed errors of
`vqdeploy.errors` with a message that names what was expected and what came.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from vqdeploy.errors import (
    IndexRangeError,
    InputDtypeError,
    InputShapeError,
    InputTypeError,
    NonFiniteInputError,
    NotAnArrayError,
)

_FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")
# Values a check reads (and, for a cast, copies) at a time: 1M, at most 8 MiB for float64.
CHECK_BLOCK_VALUES = 2**20


def _dtype_name(x) -> str:
    return str(x.dtype).removeprefix("torch.")


def check_tensor(x, name: str = "x") -> None:
    """Raise `InputTypeError` unless `x` is a strided torch tensor with data (not sparse, not meta)."""
    if not isinstance(x, torch.Tensor):
        hint = " (convert it with torch.from_numpy)" if isinstance(x, np.ndarray) else ""
        raise InputTypeError(f"{name} must be a torch.Tensor, got {type(x).__module__}.{type(x).__name__}{hint}")
    if x.layout != torch.strided:
        raise InputTypeError(f"{name} must be a dense (strided) tensor, got layout {x.layout} (use {name}.to_dense())")
    if x.is_meta:
        raise InputTypeError(f"{name} is a tensor on the meta device, which holds no values")


def check_numpy_readable(x: np.ndarray, name: str = "x") -> None:
    """Raise the typed error for a numpy array torch cannot view: a dtype torch has no match for
    (object, str, datetime, ml_dtypes'), a non-native byte order, negative strides."""
    dtype = x.dtype
    if dtype.kind not in "biuf" or dtype.fields is not None or dtype.type.__module__ != "numpy":
        raise InputDtypeError(f"{name} must hold numbers (a float or integer dtype), got numpy dtype {dtype!r}")
    if not dtype.isnative:
        raise InputDtypeError(
            f"{name} has a non-native byte order (numpy dtype {dtype.str!r}); convert it with "
            f"{name}.astype({dtype.newbyteorder('=').name!r})"
        )
    if any(stride < 0 for stride in x.strides):
        raise InputTypeError(
            f"{name} has negative strides {x.strides} (a reversed view such as a[::-1]); pass np.ascontiguousarray({name})"
        )


def as_tensor(x, name: str = "x") -> tuple[torch.Tensor, bool]:
    """(a torch view of x, whether x was a numpy array): numpy arrays are viewed, never copied."""
    if isinstance(x, np.ndarray):
        check_numpy_readable(x, name)
        if x.flags.writeable:
            return torch.from_numpy(x), True
        # A read-only array (a memory map opened "r", Arrow's buffers): torch warns that writing
        # to its view is undefined. vqdeploy only reads the view, so the warning would only alarm.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
            return torch.from_numpy(x), True
    if not isinstance(x, torch.Tensor):
        raise NotAnArrayError(f"{name} must be a numpy array or a torch tensor, got {type(x).__module__}.{type(x).__name__}")
    check_tensor(x, name)
    return x.detach(), False


def blocks(x: torch.Tensor, values: int = CHECK_BLOCK_VALUES) -> Iterator[torch.Tensor]:
    """Views of x that together cover it, each of at most `values` values (or one row of the last
    axis, if longer): never a copy, whatever the strides."""
    if x.numel() <= values or x.ndim <= 1:
        if x.ndim == 1 and x.numel() > values:
            for start in range(0, x.shape[0], values):
                yield x[start : start + values]
        elif x.numel():
            yield x
        return
    inner = math.prod(x.shape[1:])
    if inner <= values:
        step = max(1, values // max(inner, 1))
        for start in range(0, x.shape[0], step):
            yield x[start : start + step]
        return
    for i in range(x.shape[0]):
        yield from blocks(x[i], values)


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


def check_positive_int(value, name: str, error: type[Exception]) -> int:
    """`value` itself if it is an int >= 1 (not a bool); else raise `error` naming it."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise error(f"{name} must be a positive integer, got {value!r}")
    return int(value)


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


def check_finite(x, name: str = "x", dtype: torch.dtype | None = None, what: str = "") -> None:
    """Raise `NonFiniteInputError` if `x` holds NaN or infinity, or values that overflow `dtype`
    (the dtype the search sees: x is checked after the cast to it).

    Reads x a block of views at a time (`blocks`): one min/max reduction per block (NaN and Inf
    propagate through it), so the memory a check takes is one block's cast at most, whatever x's
    size and strides; blocks with a bad value are counted element-wise. A cast that cannot
    overflow (to a dtype whose range holds x's: float16 to float32) is not made; a narrowing one,
    and a strided block (whose min/max torch reads from a contiguous copy), is written into one
    buffer that every block reuses: a fresh 4 MiB copy per block, freed among other allocations,
    grew glibc's heap by up to 24 MiB per encode of 4M vectors (tests/hardening/test_memory.py).
    """
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    target = x.dtype if dtype is None else dtype
    # No cast where every finite value of x is finite in `target` (NaN and Inf stay what they are).
    widening = x.is_floating_point() and target.is_floating_point and torch.finfo(target).max >= torch.finfo(x.dtype).max
    reads = x.dtype if widening else target
    count = 0
    buffer: torch.Tensor | None = None
    for block in blocks(x):
        if block.dtype == reads and block.is_contiguous():
            seen = block
        else:
            if buffer is None:
                buffer = torch.empty(min(x.numel(), max(CHECK_BLOCK_VALUES, block.numel())), dtype=reads,
                                     device=block.device)
            if buffer.numel() < block.numel():  # one row of the last axis longer than a block
                buffer = torch.empty(block.numel(), dtype=reads, device=block.device)
            seen = buffer[: block.numel()].view(block.shape).copy_(block)
        low, high = torch.aminmax(seen)
        if bool(torch.isfinite(low)) and bool(torch.isfinite(high)):
            continue
        count += int((~torch.isfinite(seen)).sum())
    if count:
        cast = "" if dtype is None or dtype == x.dtype else (
            f" in {_dtype_name(torch.empty(0, dtype=target))} (the dtype {what or 'the search'} sees; "
            f"largest {torch.finfo(target).max:.6g})"
        )
        kind = "NaN/Inf value(s)" if not cast else "value(s) that are NaN/Inf or overflow it"
        raise NonFiniteInputError(
            f"{name} must be finite{cast}, got {count} {kind} in {name} of shape {tuple(x.shape)}, "
            f"dtype {_dtype_name(x)}"
        )


def _min_max(indices) -> tuple[int, int]:
    """The smallest and largest index, exactly (unsigned dtypes torch cannot reduce included)."""
    if isinstance(indices, np.ndarray):
        return int(indices.min()), int(indices.max())
    if indices.dtype in (torch.uint16, torch.uint32, torch.uint64):
        lo, hi = None, None
        for block in blocks(indices):
            # uint64 values beyond int64 come back negative: reported as such (out of range anyway)
            low, high = torch.aminmax(block.to(torch.int64))
            lo = int(low) if lo is None else min(lo, int(low))
            hi = int(high) if hi is None else max(hi, int(high))
        return lo, hi
    low, high = torch.aminmax(indices)
    return int(low), int(high)


def check_index_range(indices, num_codes: int, name: str = "indices", allow_dropped: bool = False) -> None:
    """Raise `IndexRangeError` unless every index lies in [0, num_codes) (or is -1 when `allow_dropped`)."""
    if indices.size == 0 if isinstance(indices, np.ndarray) else indices.numel() == 0:
        return
    low = -1 if allow_dropped else 0
    lo, hi = _min_max(indices)
    if lo < low or hi >= num_codes:
        expected = f"[{low}, {num_codes})" + (" (-1 marks a dropped stage)" if allow_dropped else "")
        raise IndexRangeError(f"{name} must lie in {expected}, got values from {lo} to {hi}")


def eager_checks_enabled() -> bool:
    """False while torch.export / torch.compile trace a module: data-dependent checks are skipped there."""
    return not (torch.compiler.is_compiling() or torch.compiler.is_exporting())
