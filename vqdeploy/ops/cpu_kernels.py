"""Fused CPU nearest-code search: one GEMM per tile of rows, then a compiled running argmin.

`nearest_code_cpu(x, codebook)` computes the contract of `vqdeploy.ops.contract` on the CPU.

Why a compiled argmin
---------------------
With a small D the GEMM is cheap (32 multiply-adds per score at D = 32) and the step after it
dominates: torch's index-tracking ``min(dim=1)`` over a row-major block of scores runs a scalar
loop per row, about twice the time of the GEMM itself (benchmarks/RESULTS.md, 262144x32x256).

How
---
For each tile of R rows, the faster SGEMM of the machine (torch's MKL or numpy's OpenBLAS, measured
once and cached: `vqdeploy.ops.gemm`) writes ``dots = -2 codebook @ x_tile^T`` as a (K, R)
float32 block of at most SCORE_BLOCK_BYTES (`rows_per_block`, shared with
`nearest_code_blocked`); the factor -2 is the GEMM's alpha (or is folded into the codes), a
power of two, so it scales without rounding. The numba kernel then walks the K rows of that block
once, forms the score ``s_k = ||c_k||^2 + dots_k`` with one add, the value
`nearest_code_blocked` computes (``fl(n_k - 2 fl(x.c_k))``, so the error bound (3) of
`vqdeploy.ops.contract` holds) and keeps a running (min, second, argmin) for every column with a
strict ``<``, so ties go to the lowest k. Its inner loops run over the R contiguous columns,
independent from column to column, which the compiler vectorises; the columns are split into one
chunk per thread (details in `vqdeploy.ops._running_argmin`). In the same thread, each column's
margin is then tested against the bound (`flag_unproven_rows`: the norm of its row of x, two
per-code coefficients); flagged rows, 0.01-0.6% of random rows, are re-solved exactly afterwards
(`vqdeploy.ops.contract.exact_nearest`). Nothing of size M x K is ever allocated.

numba is a dependency of vqdeploy; where it cannot be imported or compiled, `available()` is
False and the op uses `nearest_code_blocked` (same contract, slower at small D). The first call in
a process compiles the kernel (a few seconds) unless numba's on-disk cache already holds it. One tile
buffer (at most SCORE_BLOCK_BYTES) stays allocated between calls, for the next one.
"""

from __future__ import annotations

import functools
import threading
import types
import warnings

import numpy as np
import torch

from vqdeploy.ops import gemm
from vqdeploy.ops.contract import (
    exact_nearest,
    norm_bound_terms,
    norm_upper_bound,
    recheck_coefficients,
    rows_per_block,
    squared_norms,
)
from vqdeploy.ops.gemm import gemm_choice, numpy_blas_threads, tile_product

# Rows per tile on the per-core (numpy) path, where the tile budget allows: a one-thread OpenBLAS
# GEMM ran at 68-97 GFLOP/s on 128-512 rows and at 45-69 on 1024-8192 (AMD EPYC, 1 MiB L2 per core,
# benchmarks/RESULTS.md): small tiles stay in the core's cache for the argmin that follows.
PER_CORE_TILE_ROWS = 256
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

# dots, norms, out, margin, chunks; then the re-check test's x tile, alpha, beta, under, grow, limit, flags
_SIGNATURE = ("void(float32[:, ::1], float32[::1], int64[::1], float32[::1], int64, "
              "float32[:, ::1], float64[::1], float64[::1], float64, float64, float64, uint8[::1])")


def _compile(function, parallel: bool):
    import numba

    options = dict(parallel=parallel, nogil=True, boundscheck=False, fastmath=False)
    try:
        return numba.njit(_SIGNATURE, cache=True, **options)(function)
    except Exception:  # noqa: BLE001 - e.g. no writable cache directory: compile without the cache
        return numba.njit(_SIGNATURE, cache=False, **options)(function)


def _serial_copy(function):
    """The same Python function under another name: numba's on-disk cache keys a function by its
    qualified name and bytecode, not by its compile flags, so a serial and a parallel build of one
    function would load each other's machine code."""
    copy = types.FunctionType(function.__code__, function.__globals__, function.__name__ + "_serial",
                              function.__defaults__, function.__closure__)
    copy.__qualname__ = function.__qualname__ + "_serial"
    copy.__module__ = function.__module__
    return copy


@functools.cache
def _kernel():
    """The compiled kernel (its column chunks on numba's threads), or None where numba is missing or
    cannot compile it."""
    try:
        from vqdeploy.ops._running_argmin import running_argmin_over_codes
    except ImportError:
        return None
    try:
        return _compile(running_argmin_over_codes, parallel=True)
    except Exception as error:  # noqa: BLE001 - any numba failure leaves the portable path in charge
        warnings.warn(
            f"vqdeploy: the numba nearest-code kernel did not compile ({error}); "
            "using the slower torch implementation",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


@functools.cache
def _serial_kernel():
    """The same kernel compiled for one thread: the numpy path runs one per worker thread."""
    from vqdeploy.ops._running_argmin import running_argmin_over_codes

    return _compile(_serial_copy(running_argmin_over_codes), parallel=False)


def available() -> bool:
    """Whether the compiled CPU kernel can run here (compiles it on first call)."""
    return _kernel() is not None


def _thread_count() -> int:
    import numba

    return max(1, min(torch.get_num_threads(), numba.get_num_threads()))


class _Recheck:
    """What the re-check test needs per call (`vqdeploy.ops.contract.recheck_coefficients`), and the
    per-row flags it writes: `flag_unproven_rows` runs it on each tile right after the kernel."""

    def __init__(self, dim: int, code_norm: torch.Tensor, num_rows: int):
        alpha, beta, self.limit = recheck_coefficients(dim, code_norm)
        self.alpha, self.beta = alpha.numpy(), beta.numpy()
        self.under, self.grow = norm_bound_terms(dim)
        self.flags = np.empty(num_rows, dtype=np.uint8)

    def run(self, kernel, dots: np.ndarray, norms: np.ndarray, tile: np.ndarray, out: np.ndarray,
            margin: np.ndarray, start: int, chunks: int) -> None:
        """The kernel on one tile (rows start.. of the call), flags included."""
        kernel(dots, norms, out, margin, chunks, tile, self.alpha, self.beta, self.under, self.grow, self.limit,
               self.flags[start : start + tile.shape[0]])


def _rows_array(tile: torch.Tensor) -> np.ndarray:
    """A float32 tile of rows as a C-contiguous numpy array (a view where it already is one)."""
    return tile.to(torch.float32).resolve_neg().resolve_conj().contiguous().numpy()


def _rows_source(x: torch.Tensor):
    """rows(start, stop) -> x[start:stop] as a C-contiguous float32 numpy array.

    A float32 C-contiguous x is viewed as one numpy array once, so a tile is a numpy slice (about a
    microsecond, against 20-30 us for torch's slice, cast and conversion per tile); any other x is
    converted tile by tile, so no float32 copy of the whole of x is ever made.
    """
    if x.dtype == torch.float32 and x.is_contiguous() and not x.is_neg() and not x.is_conj():
        whole = x.numpy()
        return lambda start, stop: whole[start:stop]
    return lambda start, stop: _rows_array(x[start:stop])


def nearest_code_cpu(
    x: torch.Tensor, codebook: torch.Tensor, gemm: str | None = None, block_bytes: int | None = None
) -> torch.Tensor:
    """The exact nearest code for every row of x (CPU tensors, any float dtype).

    The compiled float32 search keeps each row's margin t_2 - t_b and flags the rows whose margin
    does not prove the float32 argmin exact (the test of `vqdeploy.ops.contract.recheck_rows`);
    those are re-solved by `vqdeploy.ops.contract.exact_nearest`.
    ``gemm`` ("torch" / "numpy") overrides the library `vqdeploy.ops.gemm.gemm_choice` picks for
    the tile product, ``block_bytes`` the tile budget (SCORE_BLOCK_BYTES); both for benchmarks and tests.
    """
    kernel = _kernel()
    if kernel is None:
        raise RuntimeError("the numba nearest-code kernel is not available; check available() first")
    num_rows = x.shape[0]
    out = torch.empty((num_rows,), dtype=torch.int64)
    if num_rows == 0:
        return out
    codes = codebook.detach().to(torch.float32).contiguous()
    library = gemm or gemm_choice().library
    threads = _thread_count()
    # The codebook's terms, once per call: the kernel, its re-check test and the exact re-solve share them.
    norms, code_norm = squared_norms(codes), norm_upper_bound(codes)
    recheck = _Recheck(codes.shape[1], code_norm, num_rows)
    search = _search_numpy if library == "numpy" else _search_torch
    search(x.detach(), codes, norms.numpy(), out.numpy(), recheck, threads, block_bytes)
    rows = torch.from_numpy(flagged_rows(recheck.flags))
    if rows.numel():
        out[rows] = exact_nearest(x.detach()[rows], codes, code_terms=(norms, code_norm))
    return out


def flagged_rows(flags: np.ndarray) -> np.ndarray:
    """Positions of the nonzero bytes of ``flags`` (uint8), ascending: the same as np.flatnonzero,
    read eight bytes at a time (flagged rows are rare: 0.01-1% of rows), about 6x faster."""
    whole = flags.size // 8 * 8
    words = np.flatnonzero(flags[:whole].view(np.uint64))
    rows, columns = np.nonzero(flags[:whole].reshape(-1, 8)[words])
    tail = np.flatnonzero(flags[whole:]) + whole
    return np.concatenate([words[rows] * 8 + columns, tail])


def _search_torch(
    x: torch.Tensor, codes: torch.Tensor, norms: np.ndarray, out: np.ndarray, recheck: _Recheck,
    threads: int, block_bytes: int | None,
) -> None:
    """torch.mm (MKL, torch's threads) into each tile, then the kernel on numba's threads."""
    kernel = _kernel()
    num_rows, num_codes = x.shape[0], codes.shape[0]
    step = min(rows_per_block(num_codes, block_bytes), num_rows)
    buffer = _WORKSPACE.take(num_codes * step)
    block = torch.from_numpy(buffer)
    margin = np.empty(step, dtype=np.float32)
    try:
        for start in range(0, num_rows, step):
            stop = min(start + step, num_rows)
            width = stop - start
            dots = block[: num_codes * width].view(num_codes, width)  # contiguous for every width
            tile = x[start:stop].to(torch.float32)
            tile_product("torch", codes, tile, dots, alpha=-2.0)
            chunks = max(1, min(threads, width // MIN_COLUMNS_PER_THREAD))
            with _KERNEL_LOCK:
                recheck.run(kernel, dots.numpy(), norms, _rows_array(tile), out[start:stop], margin[:width], start, chunks)
    finally:
        _WORKSPACE.give(buffer)


def _run_on_threads(work, count: int) -> None:
    """work(0) on this thread and work(1..count-1) on new ones; re-raises the first error.

    Threads are started per call (tens of microseconds, against milliseconds of work): nothing
    outlives a call, so nothing is left broken by a fork (a pool's threads do not survive one).
    """
    errors: list[BaseException] = []

    def guarded(index: int) -> None:
        try:
            work(index)
        except BaseException as error:  # noqa: BLE001 - handed to the caller below
            errors.append(error)

    helpers = [threading.Thread(target=guarded, args=(i,), name="vqdeploy-nearest-code") for i in range(1, count)]
    for helper in helpers:
        helper.start()
    guarded(0)
    for helper in helpers:
        helper.join()
    if errors:
        raise errors[0]


def _search_numpy(
    x: torch.Tensor, codes: torch.Tensor, norms: np.ndarray, out: np.ndarray, recheck: _Recheck,
    threads: int, block_bytes: int | None,
) -> None:
    """Each of `threads` worker threads takes every threads-th tile and runs, on its own core, a
    one-thread OpenBLAS GEMM and the one-thread kernel on it: no thread pool hands the cores to
    another between the two steps (with OpenBLAS's own threads, whose workers spin after each
    GEMM, the op took up to 4x as long). A tile has at most PER_CORE_TILE_ROWS rows and a share of
    the tile budget (split between the workers), so its scores are still in the core's cache when
    the kernel reads them; a float32 C-contiguous x is sliced as numpy arrays (`_rows_source`)."""
    kernel = _serial_kernel()
    num_rows, num_codes = x.shape[0], codes.shape[0]
    step = min(rows_per_block(num_codes, block_bytes, parts=threads), PER_CORE_TILE_ROWS, num_rows)
    rows = _rows_source(x)
    starts = list(range(0, num_rows, step))
    workers = min(threads, len(starts))
    buffer = _WORKSPACE.take(workers * num_codes * step)
    codes_array = (codes * -2.0).numpy()  # numpy's matmul has no alpha: the exact factor -2 goes into the codes

    def work(worker: int) -> None:
        dots_all = buffer[worker * num_codes * step : (worker + 1) * num_codes * step]
        margin = np.empty(step, dtype=np.float32)
        for start in starts[worker::workers]:
            stop = min(start + step, num_rows)
            dots = dots_all[: num_codes * (stop - start)].reshape(num_codes, stop - start)
            tile = rows(start, stop)
            np.matmul(codes_array, tile.T, out=dots)
            recheck.run(kernel, dots, norms, tile, out[start:stop], margin[: stop - start], start, 1)

    try:
        with numpy_blas_threads(1):
            _run_on_threads(work, workers)
    finally:
        _WORKSPACE.give(buffer)


gemm.register_timed_op(nearest_code_cpu)  # the GEMM library is chosen on this op as it runs
