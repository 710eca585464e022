"""Fused CPU nearest-code search: one GEMM per tile of rows, then a compiled running argmin.

`nearest_code_cpu(x, codebook)` computes the contract of `vqdeploy.ops.contract` on the CPU.

Why a compiled argmin
---------------------
With a small D the GEMM is cheap (32 multiply-adds per score at D = 32) and the step after it
dominates: torch's index-tracking ``min(dim=1)`` over a row-major block of scores runs a scalar
loop per row, about twice the time of the GEMM itself (benchmarks/RESULTS.md, 262144x32x256).

How
---
For each tile of R rows, ``torch.mm`` (MKL) writes ``dots = codebook @ x_tile^T`` as a (K, R)
float32 block of at most SCORE_BLOCK_BYTES (`rows_per_block`, shared with
`nearest_code_blocked`). The numba kernel then walks the K rows of that block once,
forms the score ``s_k = ||c_k||^2 - 2 dot_k`` exactly as
`nearest_code_blocked` does (``fl(n_k - 2 fl(x.c_k))``, so the error bound (1) of
`vqdeploy.ops.contract` holds) and keeps a running (min, argmin) for every column with a strict
``<``, so ties go to the lowest k. Its inner loops run over the R contiguous columns, independent
from column to column, which the compiler vectorises; the columns are split into one chunk per
thread (details in `vqdeploy.ops._running_argmin`). Nothing of size M x K is ever allocated.

numba is a dependency of vqdeploy; where it cannot be imported or compiled, `available()` is
False and the op uses `nearest_code_blocked` (same contract, slower at small D). The first call in
a process compiles the kernel (a few seconds) unless numba's on-disk cache already holds it. One tile
buffer (at most SCORE_BLOCK_BYTES) stays allocated between calls, for the next one.
"""

from __future__ import annotations

import functools
import threading
import warnings

import numpy as np
import torch

from vqdeploy.ops.contract import norm_upper_bound, resolve_near_ties_, rows_per_block, squared_norms

# A thread gets at least this many columns, so small calls do not pay for waking threads.
MIN_COLUMNS_PER_THREAD = 256
# numba's "workqueue" threading layer (used where no OpenMP or TBB runtime is found) must not be
# entered by two threads at once; one lock around the kernel keeps every layer safe.
_KERNEL_LOCK = threading.Lock()


class _Workspace:
    """Float32 tile buffers shared by calls: one idle buffer is kept for the next call.

    Allocating a fresh 16 MiB tile on every call costs page faults and, through glibc's dynamic mmap
    threshold, fragments the heap: a runtime encode that calls the op once per chunk peaked 35-70
    MiB higher than with a reused tile (measured, 4M vectors). Concurrent calls each get their own
    buffer; at most one (the largest) stays allocated between calls. Buffers are numpy arrays that
    each call wraps anew, so a buffer first used under ``torch.inference_mode`` stays writable
    outside it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: np.ndarray | None = None

    def take(self, size: int) -> np.ndarray:
        with self._lock:
            idle, self._idle = self._idle, None
        if idle is not None and idle.size >= size:
            return idle
        return np.empty(size, dtype=np.float32)

    def give(self, buffer: np.ndarray) -> None:
        with self._lock:
            if self._idle is None or self._idle.size < buffer.size:
                self._idle = buffer


_WORKSPACE = _Workspace()

_SIGNATURE = "void(float32[:, ::1], float32[::1], int64[::1], float32[::1], int64)"


@functools.cache
def _kernel():
    """The compiled kernel, or None where numba is missing or cannot compile it."""
    try:
        import numba

        from vqdeploy.ops._running_argmin import running_argmin_over_codes
    except ImportError:
        return None
    options = dict(parallel=True, nogil=True, boundscheck=False, fastmath=False)
    try:
        return numba.njit(_SIGNATURE, cache=True, **options)(running_argmin_over_codes)
    except Exception:  # noqa: BLE001 - e.g. no writable cache directory: compile without the cache
        pass
    try:
        return numba.njit(_SIGNATURE, cache=False, **options)(running_argmin_over_codes)
    except Exception as error:  # noqa: BLE001 - any numba failure leaves the portable path in charge
        warnings.warn(
            f"vqdeploy: the numba nearest-code kernel did not compile ({error}); "
            "using the slower torch implementation",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def available() -> bool:
    """Whether the compiled CPU kernel can run here (compiles it on first call)."""
    return _kernel() is not None


def _thread_count() -> int:
    import numba

    return max(1, min(torch.get_num_threads(), numba.get_num_threads()))


def nearest_code_cpu(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """The exact nearest code for every row of x (CPU tensors, any float dtype).

    The compiled float32 search also returns each row's margin t_2 - t_b; rows whose margin does
    not prove the float32 argmin exact are re-solved (`vqdeploy.ops.contract.resolve_near_ties_`).
    """
    kernel = _kernel()
    if kernel is None:
        raise RuntimeError("the numba nearest-code kernel is not available; check available() first")
    num_rows, num_codes = x.shape[0], codebook.shape[0]
    out = torch.empty(num_rows, dtype=torch.int64)
    if num_rows == 0:
        return out
    codes = codebook.detach().to(torch.float32).contiguous()
    norms = squared_norms(codes).numpy()
    x = x.detach()
    step = min(rows_per_block(num_codes), num_rows)
    buffer = _WORKSPACE.take(num_codes * step)
    block = torch.from_numpy(buffer)
    out_array = out.numpy()
    margin = np.empty(num_rows, dtype=np.float32)
    x_norm = torch.empty(num_rows, dtype=torch.float64)
    threads = _thread_count()
    try:
        for start in range(0, num_rows, step):
            stop = min(start + step, num_rows)
            width = stop - start
            dots = block[: num_codes * width].view(num_codes, width)  # contiguous for every width
            tile = x[start:stop].to(torch.float32)
            torch.mm(codes, tile.t(), out=dots)
            x_norm[start:stop] = norm_upper_bound(tile)
            chunks = max(1, min(threads, width // MIN_COLUMNS_PER_THREAD))
            with _KERNEL_LOCK:
                kernel(dots.numpy(), norms, out_array[start:stop], margin[start:stop], chunks)
    finally:
        _WORKSPACE.give(buffer)
    resolve_near_ties_(x, codebook, out, torch.from_numpy(margin), x_norm=x_norm,
                       code_norm=norm_upper_bound(codes))
    return out
