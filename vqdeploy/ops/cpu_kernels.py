"""Fused CPU nearest-code search: per-core tiles, each a GEMM per block of codes and a compiled running argmin.

`nearest_code_cpu(x, codebook)` computes the contract of `vqdeploy.ops.contract` on the CPU.

Why a compiled argmin
---------------------
With a small D the GEMM is cheap (32 multiply-adds per score at D = 32) and the step after it
dominates: torch's index-tracking ``min(dim=1)`` over a row-major block of scores runs a scalar
loop per row, about twice the time of the GEMM itself (benchmarks/RESULTS.md, 262144x32x256).

How
---
Rows are cut into tiles of at most PER_CORE_TILE_ROWS, and each of torch.get_num_threads() workers
(this thread and long-lived helper threads, `_Workers`) takes every workers-th tile. Where the
library's SGEMM can be called from compiled code (`vqdeploy.ops.sgemm_entry`: torch's MKL or numpy's
OpenBLAS, whichever `vqdeploy.ops.gemm` measured faster here), a worker's whole share runs in one
numba call, `search_tiles`: for each block of codes (CODE_BLOCK_BYTES of scores, so they stay in
the core's L2) a one-thread GEMM writes ``dots = -2 codes_block @ tile^T`` as a (Kb, R) float32
block; the factor -2 is the GEMM's alpha, a power of two, so it scales without rounding. The
kernel folds each block into a running (min, argmin) per column, eight codes at a time, forming
the score ``s_k = ||c_k||^2 + dots_k`` with one add, the value `nearest_code_blocked` computes
(``fl(n_k - 2 fl(x.c_k))``, so the error bound (3) of `vqdeploy.ops.contract` holds), with a
strict ``<``, so ties go to the lowest k. The second-best score comes from the second-best group
winner and the best's group mates (`vqdeploy.ops._running_argmin`). Its inner loops run over the
R contiguous columns, independent from column to column, which the compiler vectorises. Then each
column's margin is tested against the bound (`flag_unproven_rows`: the norm of its row of x, two
per-code coefficients). Flagged rows (0.01-1.2% of random rows) keep, block by block, the list of
codes within their bound of the running best, and the worker decides them from the float64
distances of those few codes; only the rows float64 cannot separate (exact ties, duplicates) come
back to Python (`vqdeploy.ops.contract.exact_nearest_listed`), and rows with more than
LIST_CAPACITY codes near their best, or the Python tile loops' flagged rows, go to
`vqdeploy.ops.contract.exact_nearest`. Nothing of size M x K is ever allocated.

Where the SGEMM cannot be called from compiled code, the Python tile loops do the same steps:
`_search_torch` (torch.mm on torch's threads into 16 MiB tiles, then the kernel's columns split
over numba's threads) and `_search_numpy` (per-core numpy.matmul and the one-thread kernel, a
Python call per tile). Calling back into Python for every tile cost 20-30 us of the interpreter
lock per tile, which the workers then waited on in turn (benchmarks/RESULTS.md).

numba is a dependency of vqdeploy; where it cannot be imported or compiled, `available()` is
False and the op uses `nearest_code_blocked` (same contract, slower at small D). The first call in
a process compiles the kernels (a few seconds) unless numba's on-disk cache already holds them. One
score buffer stays allocated between calls, for the next one.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import queue
import threading
import types
import warnings

import numpy as np
import torch

from vqdeploy.ops import gemm, sgemm_entry
from vqdeploy.ops.contract import (
    exact_nearest,
    exact_nearest_listed,
    float64_separation,
    norm_bound_terms,
    norm_upper_bound,
    recheck_coefficients,
    rows_per_block,
    squared_norms,
)
from vqdeploy.ops.gemm import gemm_choice, numpy_blas_threads, tile_product

# Rows per tile on the per-core paths, where the tile budget allows: a one-thread OpenBLAS GEMM ran
# at 68-97 GFLOP/s on 128-512 rows and at 45-69 on 1024-8192 (AMD EPYC, 1 MiB L2 per core), and the
# compiled tile loop with one-thread MKL GEMMs was fastest at 512 rows at D = 32 and 64 (Intel Xeon,
# 2 MiB L2 per core; benchmarks/RESULTS.md): small tiles stay in the core's cache for the argmin.
PER_CORE_TILE_ROWS = 512
# The compiled tile loop multiplies a tile by this many bytes' worth of codes' scores at a time
# (a block of codes, folded into the tile's running best before the next): the scores stay in
# the core's L2 between the GEMM that writes them and the argmin that reads them.
CODE_BLOCK_BYTES = 1 * 2**20
# A float32 copy of this many bytes of x at most is made at a time where x is not a float32
# C-contiguous array (another dtype, a strided view): the compiled loop reads plain float32 rows.
STAGING_BYTES = 4 * 2**20
# The exact re-solve of the flagged rows runs on the calling thread alone (torch's OpenMP and MKL
# counts set to one for it) up to this many multiply-adds in its candidate pass (rows x K x D):
# each of its small operators otherwise wakes torch's idle OpenMP threads, 7-14 ms for 30 rows at
# K = 256, D = 32 instead of 1.1 ms. Measured (10 rounds, 0.2 s pauses): 66 rows at K = 256, D = 32
# 1.4 ms on one thread against 6.3 ms; 195 rows at K = 1024, D = 256 (5e7) 4.6 against 10.3 ms; 195
# rows at K = 8192, D = 512 (8e8) 39.2 against 29.8 ms, where two threads pay (benchmarks/RESULTS.md).
ONE_THREAD_RESOLVE_MACS = 2**28
# At most this many flagged rows a worker (and chunk of x) get a candidate list from the compiled
# loop (4 MiB of lists); the rest are re-solved over all codes.
LISTED_ROWS_PER_WORKER = 2**16
# Codebooks of at most this many values keep their `_CodebookTerms` between calls (a copy of the
# values is kept with them to tell whether they still hold), the last CACHED_CODEBOOKS of them.
CACHED_CODEBOOK_VALUES = 2**18
CACHED_CODEBOOKS = 8
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


def _compile(function, parallel: bool, signature=_SIGNATURE):
    import numba

    options = dict(parallel=parallel, nogil=True, boundscheck=False, fastmath=False)
    try:
        return numba.njit(signature, cache=True, **options)(function)
    except Exception:  # noqa: BLE001 - e.g. no writable cache directory: compile without the cache
        return numba.njit(signature, cache=False, **options)(function)


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


@functools.cache
def _tile_search_kernel():
    """`search_tiles` compiled (one thread; its GEMM through a library's sgemm entry), or None."""
    try:
        from numba import types

        from vqdeploy.ops._running_argmin import search_tiles

        matrix, vector, count, coefficients = types.float32[:, ::1], types.float32[::1], types.int64, types.float64[::1]
        signature = types.void(types.FunctionType(sgemm_entry.signature()), matrix, matrix, vector, types.int64[::1],
                               vector, count, count, count, count, coefficients, coefficients, types.float64,
                               types.float64, types.float64, types.float64, types.uint8[::1], types.int64[::1],
                               types.int32[:, ::1], types.int64[::1])
        return _compile(search_tiles, parallel=False, signature=signature)
    except Exception as error:  # noqa: BLE001 - the Python tile loops stay in charge
        warnings.warn(f"vqdeploy: the compiled tile loop did not compile ({error}); using the Python tile loops",
                      RuntimeWarning, stacklevel=3)
        return None


def compiled_tile_entry(library: str):
    """The sgemm entry the compiled tile loop runs `library`'s GEMM through, or None where the
    loop or the entry is not available here (the op then runs the Python tile loops)."""
    if _kernel() is None:
        return None
    entry = sgemm_entry.entry(library)
    if entry is None or _tile_search_kernel() is None:
        return None
    return entry


def describe_search(measure_now: bool = False) -> str:
    """The line `vqdeploy inspect` / `bench` print about the CPU search: the tile GEMM's library
    (`vqdeploy.ops.gemm.describe_current`) and whether the tiles run in compiled code."""
    text = gemm.describe_current(measure_now)
    choice = gemm.peek_choice()
    if choice is None:
        return text
    route = ("tiles in compiled code" if compiled_tile_entry(choice.library) is not None
             else "Python tile loop (the library's sgemm is not callable from compiled code here)")
    return f"{text}; {route}"


def available() -> bool:
    """Whether the compiled CPU kernel can run here (compiles it on first call)."""
    return _kernel() is not None


def _thread_count() -> int:
    import numba

    return max(1, min(torch.get_num_threads(), numba.get_num_threads()))


class _CodebookTerms:
    """What a call needs that depends on the codebook alone: its float32 squared norms (`squared_norms`,
    for the scores), norm bounds (`norm_upper_bound`) and the re-check test's coefficients
    (`vqdeploy.ops.contract.recheck_coefficients`), with the dimension's constants."""

    def __init__(self, codes: torch.Tensor):
        dim = codes.shape[1]
        self.norms, self.code_norm = squared_norms(codes), norm_upper_bound(codes)
        alpha, beta, self.limit = recheck_coefficients(dim, self.code_norm)
        self.alpha, self.beta = alpha.numpy(), beta.numpy()
        self.under, self.grow = norm_bound_terms(dim)
        self.separation = float64_separation(dim)


class _TermsCache:
    """The `_CodebookTerms` of the last few small codebooks (at most CACHED_CODEBOOK_VALUES values),
    which took 200 of the 400 us a one-row call cost. An entry is found by the codebook's storage
    and shape and used only where its values still equal a copy kept with it (`torch.equal`), so a
    codebook changed in place by any route (an EMA step through ``.data``, a numpy view, a new
    tensor at a freed address) is never served terms of other values."""

    def __init__(self, entries: int) -> None:
        self._lock = threading.Lock()
        self._entries: collections.OrderedDict = collections.OrderedDict()
        self._size = entries

    def terms(self, codes: torch.Tensor) -> _CodebookTerms:
        if codes.numel() > CACHED_CODEBOOK_VALUES:
            return _CodebookTerms(codes)
        key = (codes.data_ptr(), tuple(codes.shape))
        with self._lock:
            entry = self._entries.get(key)
        if entry is not None and torch.equal(entry[0], codes):
            with self._lock:
                if key in self._entries:
                    self._entries.move_to_end(key)
            return entry[1]
        terms = _CodebookTerms(codes)
        with self._lock:
            self._entries[key] = (codes.clone(), terms)
            self._entries.move_to_end(key)
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)
        return terms


_TERMS = _TermsCache(CACHED_CODEBOOKS)


class _Recheck:
    """What the re-check test needs per call (the codebook's `_CodebookTerms`), and the per-row
    flags it writes: `flag_unproven_rows` runs it on each tile right after the kernel."""

    def __init__(self, terms: _CodebookTerms, num_rows: int):
        self.alpha, self.beta, self.limit = terms.alpha, terms.beta, terms.limit
        self.under, self.grow, self.separation = terms.under, terms.grow, terms.separation
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
    the compiled loop decides most of them from their candidate lists, the rest are re-solved by
    `vqdeploy.ops.contract.exact_nearest_listed` (listed) or `vqdeploy.ops.contract.exact_nearest`.
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
    # The codebook's terms: the kernel, its re-check test and the exact re-solve share them.
    terms = _TERMS.terms(codes)
    recheck = _Recheck(terms, num_rows)
    entry = compiled_tile_entry(library)
    listed = _Listed()
    norms = terms.norms.numpy()
    if entry is not None:
        _search_compiled(x.detach(), codes, norms, out.numpy(), recheck, threads, block_bytes, entry, listed)
    else:
        search = _search_numpy if library == "numpy" else _search_torch
        search(x.detach(), codes, norms, out.numpy(), recheck, threads, block_bytes)
    listed_rows, candidates = listed.collect()  # flag 2: rows float64 could not settle from their lists
    if listed_rows.numel():
        with sgemm_entry.torch_one_thread_here():
            out[listed_rows] = exact_nearest_listed(x.detach()[listed_rows], codes, candidates)
    rows = flagged_rows(recheck.flags)
    full = rows[recheck.flags[rows] == 1]  # flag 1: rows the search could not list
    if full.size:
        full = torch.from_numpy(full)
        small = full.numel() * codes.shape[0] * codes.shape[1] <= ONE_THREAD_RESOLVE_MACS
        with sgemm_entry.torch_one_thread_here() if small else contextlib.nullcontext():
            out[full] = exact_nearest(x.detach()[full], codes, code_terms=(terms.norms, terms.code_norm))
    return out


def flagged_rows(flags: np.ndarray) -> np.ndarray:
    """Positions of the nonzero bytes of ``flags`` (uint8), ascending: the same as np.flatnonzero,
    read eight bytes at a time (flagged rows are rare: 0.01-1% of rows), about 6x faster."""
    whole = flags.size // 8 * 8
    words = np.flatnonzero(flags[:whole].view(np.uint64))
    rows, columns = np.nonzero(flags[:whole].reshape(-1, 8)[words])
    tail = np.flatnonzero(flags[whole:]) + whole
    return np.concatenate([words[rows] * 8 + columns, tail])


def _code_block(num_codes: int, rows: int) -> int:
    """Codes per GEMM of the compiled tile loop: CODE_BLOCK_BYTES of scores, a multiple of the
    fold's GROUP of codes (its tournaments are aligned to each block)."""
    from vqdeploy.ops._running_argmin import GROUP

    return max(GROUP, min(num_codes, CODE_BLOCK_BYTES // (4 * rows) // GROUP * GROUP))


_NO_ROWS = torch.zeros(0, dtype=torch.int64)


class _Listed:
    """The flagged rows the compiled tile loop wrote a complete candidate list for (flag 2): each
    worker's rows and lists, gathered once the search is done. Room for LISTED_ROWS_PER_WORKER rows
    a worker and chunk, at most; a flagged row beyond that keeps flag 1 (the search over all codes)."""

    def __init__(self) -> None:
        self._rows: list[np.ndarray] = []
        self._codes: list[np.ndarray] = []

    def room(self, workers: int, rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows, codes, counts) arrays for one chunk of `rows` rows searched by `workers` workers."""
        from vqdeploy.ops._running_argmin import LIST_CAPACITY

        per_worker = max(64, min(LISTED_ROWS_PER_WORKER, -(-rows // workers) // 16))
        return (np.empty((workers, per_worker), dtype=np.int64),
                np.empty((workers, per_worker, LIST_CAPACITY), dtype=np.int32),
                np.zeros((workers, 1), dtype=np.int64))

    def keep(self, rows: np.ndarray, codes: np.ndarray, counts: np.ndarray, begin: int) -> None:
        for worker in range(counts.shape[0]):
            count = int(counts[worker, 0])
            if count:
                self._rows.append(rows[worker, :count] + begin)
                self._codes.append(codes[worker, :count])

    def collect(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows int64, candidates int64 [rows, width], -1 after each row's codes)."""
        if not self._rows:
            return _NO_ROWS, _NO_ROWS.view(0, 0)
        return (torch.from_numpy(np.concatenate(self._rows)),
                torch.from_numpy(np.concatenate(self._codes).astype(np.int64)))


class _Workers:
    """Helper threads that live as long as the process, for the compiled per-core search.

    MKL keeps buffers for every thread that calls it; helpers started per call would leave one set
    per call behind (a CI run of short-lived MKL threads once ended in a segmentation fault at exit),
    so the helpers are kept, each set once to one-thread MKL GEMMs (`sgemm_entry.mkl_one_thread_here`).
    After a fork the child starts its own (threads do not survive a fork). Concurrent calls queue
    their pieces on the same helpers.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queues: list[queue.SimpleQueue] = []

    def reset(self) -> None:
        self._lock = threading.Lock()
        self._queues = []

    @staticmethod
    def _serve(tasks: queue.SimpleQueue) -> None:
        sgemm_entry.mkl_one_thread_here()
        while True:
            work, index, finished = tasks.get()
            work(index)
            finished.release()

    def _helpers(self, count: int) -> list[queue.SimpleQueue]:
        with self._lock:
            while len(self._queues) < count:
                tasks: queue.SimpleQueue = queue.SimpleQueue()
                threading.Thread(target=self._serve, args=(tasks,), name="vqdeploy-nearest-code", daemon=True).start()
                self._queues.append(tasks)
            return self._queues[:count]

    def run(self, work, count: int) -> None:
        """work(0) on this thread and work(1..count-1) on helpers; re-raises the first error."""
        errors: list[BaseException] = []

        def guarded(index: int) -> None:
            try:
                work(index)
            except BaseException as error:  # noqa: BLE001 - handed to the caller below
                errors.append(error)

        finished = threading.Semaphore(0)
        helpers = self._helpers(count - 1)
        for index, tasks in enumerate(helpers, start=1):
            tasks.put((guarded, index, finished))
        guarded(0)
        for _ in helpers:
            finished.acquire()
        if errors:
            raise errors[0]


_WORKERS = _Workers()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_WORKERS.reset)


def _search_compiled(
    x: torch.Tensor, codes: torch.Tensor, norms: np.ndarray, out: np.ndarray, recheck: _Recheck,
    threads: int, block_bytes: int | None, entry, listed: _Listed,
) -> None:
    """Each of `threads` workers (this thread and long-lived helpers) runs `search_tiles` once: its
    share of the tiles of at most PER_CORE_TILE_ROWS rows, every tile's one-thread GEMM through the
    library's sgemm entry, then the argmin, the re-check test and the candidate lists of flagged
    rows (into `listed`), in compiled code that holds no lock, so nothing waits on Python between
    tiles. A float32 C-contiguous x is read in place; any other x is copied to float32
    STAGING_BYTES at a time."""
    from vqdeploy.ops._running_argmin import leading_dimension

    kernel = _tile_search_kernel()
    num_rows, num_codes = x.shape[0], codes.shape[0]
    # Scores live only CODE_BLOCK_BYTES at a time, so the tile budget bounds the rows only where a
    # caller sets one (tests: ragged small tiles).
    budget_rows = num_rows if block_bytes is None else rows_per_block(num_codes, block_bytes, parts=threads)
    step = min(budget_rows, PER_CORE_TILE_ROWS, num_rows)
    workers = max(1, min(threads, -(-num_rows // step)))
    code_block = _code_block(num_codes, step)
    block_floats = code_block * leading_dimension(step)
    buffer = _WORKSPACE.take(workers * block_floats)
    codes_array = codes.numpy()
    whole = _rows_source(x)
    in_place = x.dtype == torch.float32 and x.is_contiguous() and not x.is_neg() and not x.is_conj()
    chunk = num_rows if in_place else max(workers * step, STAGING_BYTES // (4 * max(1, codes.shape[1])))
    one_thread = numpy_blas_threads(1) if entry.library == "numpy" else sgemm_entry.mkl_threads_of_this_thread(1)
    try:
        with one_thread:
            for begin in range(0, num_rows, chunk):
                end = min(begin + chunk, num_rows)
                rows = whole(begin, end)
                listed_rows, listed_codes, listed_counts = listed.room(workers, end - begin)

                def work(worker: int, rows=rows, begin=begin, end=end,
                         room=(listed_rows, listed_codes, listed_counts)) -> None:
                    kernel(entry, codes_array, rows, norms, out[begin:end],
                           buffer[worker * block_floats : (worker + 1) * block_floats],
                           worker * step, step, workers * step, code_block, recheck.alpha, recheck.beta, recheck.under,
                           recheck.grow, recheck.limit, recheck.separation, recheck.flags[begin:end], room[0][worker],
                           room[1][worker], room[2][worker])

                _WORKERS.run(work, min(workers, -(-(end - begin) // step)))
                listed.keep(listed_rows, listed_codes, listed_counts, begin)
    finally:
        _WORKSPACE.give(buffer)


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
            _WORKERS.run(work, workers)
    finally:
        _WORKSPACE.give(buffer)


gemm.register_timed_op(nearest_code_cpu)  # the GEMM library is chosen on this op as it runs
