"""The SGEMMs of torch's MKL and numpy's OpenBLAS as functions compiled code can call.

`vqdeploy.ops.cpu_kernels` runs its whole tile loop (GEMM, argmin, re-check test) in one numba
call per worker thread. Calling back into Python for each tile's GEMM cost 20-30 us per tile of
the global interpreter lock, which two worker threads then waited on in turn: at 262144x32x256
with 512-row tiles that was more time than the GEMMs themselves (benchmarks/RESULTS.md). So the
loop calls the library's Fortran ``sgemm`` entry directly, through a numba first-class function.

Both libraries export the 64-bit-integer (ILP64) Fortran entry: torch's x86-64 wheels link MKL
statically and export ``sgemm_64_`` from libtorch_cpu, and numpy's wheels bundle
``scipy_openblas64_`` with ``scipy_sgemm_64_``. `entry(library)` finds it, checks it on a small
product against numpy, and returns it, or None where the symbol is missing or gives another
answer (another platform, a numpy built on another BLAS): the op then keeps its Python tile loop.

Threads: a worker must run a one-thread GEMM. For MKL the count is set for the calling thread
alone (``mkl_set_num_threads_local``, `mkl_threads_of_this_thread`); for OpenBLAS, which has no
such call, `vqdeploy.ops.gemm.numpy_blas_threads` sets the library's count for the span of a call.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

# Fortran sgemm(transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc): every argument a
# pointer, integers 64-bit.
_ARGUMENTS = 13


def signature():
    """The numba signature of a Fortran sgemm: 13 pointers, no result."""
    from numba import types

    return types.void(*([types.voidptr] * _ARGUMENTS))


@functools.cache
def _entry_class():
    import numba.experimental.function_type  # noqa: F401 - registers the typing of the protocol below
    from numba import types

    class SgemmEntry(types.WrapperAddressProtocol):
        """A library's ILP64 Fortran sgemm, callable from numba code (the wrapper address protocol)."""

        def __init__(self, library: str, address: int) -> None:
            self.library = library
            self.address = address

        def __wrapper_address__(self) -> int:
            return self.address

        def signature(self):
            return signature()

        def __repr__(self) -> str:
            return f"SgemmEntry({self.library!r}, 0x{self.address:x})"

    return SgemmEntry


def _torch_library() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
    except OSError:
        return None


def _numpy_openblas() -> ctypes.CDLL | None:
    """numpy's own BLAS (the one threadpoolctl finds in numpy's directory), loaded by path."""
    try:
        from threadpoolctl import ThreadpoolController

        for controller in ThreadpoolController().lib_controllers:
            if controller.user_api == "blas" and "numpy" in (controller.filepath or ""):
                return ctypes.CDLL(controller.filepath)
    except Exception:  # noqa: BLE001 - no threadpoolctl, or a library that does not load
        return None
    return None


_SYMBOLS = {"torch": ("sgemm_64_",), "numpy": ("scipy_sgemm_64_", "sgemm_64_")}


def _lookup(library: str) -> int | None:
    shared = _torch_library() if library == "torch" else _numpy_openblas()
    if shared is None:
        return None
    for symbol in _SYMBOLS[library]:
        try:
            return ctypes.cast(getattr(shared, symbol), ctypes.c_void_p).value
        except AttributeError:
            continue
    return None


def call(entry_address: int, codes: np.ndarray, tile: np.ndarray, out: np.ndarray, alpha: float) -> None:
    """out (K, R) = alpha codes (K, D) @ tile (R, D)^T through an sgemm address, from Python (the check)."""
    function = ctypes.CFUNCTYPE(None, *([ctypes.c_void_p] * _ARGUMENTS))(entry_address)
    num_codes, dim = codes.shape
    width = tile.shape[0]
    integers = [ctypes.c_int64(v) for v in (width, num_codes, dim, dim, dim, width)]
    transposed, plain = ctypes.c_char(b"T"), ctypes.c_char(b"N")
    scale, zero = ctypes.c_float(alpha), ctypes.c_float(0.0)

    def ref(value):
        return ctypes.cast(ctypes.byref(value), ctypes.c_void_p)

    function(ref(transposed), ref(plain), ref(integers[0]), ref(integers[1]), ref(integers[2]), ref(scale),
             tile.ctypes.data, ref(integers[3]), codes.ctypes.data, ref(integers[4]), ref(zero),
             out.ctypes.data, ref(integers[5]))


def _gives_the_product(address: int) -> bool:
    """Whether the entry computes -2 codes @ tile^T as numpy does, on a small odd-shaped case."""
    generator = np.random.default_rng(0)
    codes = generator.standard_normal((37, 19)).astype(np.float32)
    tile = generator.standard_normal((23, 19)).astype(np.float32)
    out = np.full((37, 23), np.nan, dtype=np.float32)
    with mkl_threads_of_this_thread(1):
        call(address, codes, tile, out, -2.0)
    expected = -2.0 * (codes.astype(np.float64) @ tile.T.astype(np.float64))
    return bool(np.all(np.abs(out - expected) <= 1e-4 * (1.0 + np.abs(expected))))


_LOCK = threading.Lock()


@functools.cache
def _checked_entry(library: str):
    with _LOCK:
        try:
            address = _lookup(library)
            if address is None or not _gives_the_product(address):
                return None
            return _entry_class()(library, address)
        except Exception:  # noqa: BLE001 - numba or ctypes missing pieces: the Python tile loop stays
            return None


def entry(library: str):
    """The checked ILP64 sgemm of "torch" (MKL) or "numpy" (OpenBLAS) as a numba first-class
    function, or None where it cannot be found or does not compute the product."""
    if library not in _SYMBOLS:
        raise ValueError(f"no sgemm entry for {library!r}")
    return _checked_entry(library)


@functools.cache
def _mkl_set_local():
    shared = _torch_library()
    if shared is None:
        return None
    try:
        function = shared.mkl_set_num_threads_local_
    except AttributeError:
        return None
    function.argtypes, function.restype = [ctypes.POINTER(ctypes.c_int)], ctypes.c_int
    return function


@contextlib.contextmanager
def mkl_threads_of_this_thread(threads: int) -> Iterator[None]:
    """MKL runs `threads` threads for calls made from this thread inside the block (no other
    thread is affected; a no-op where torch's MKL does not export the call)."""
    set_local = _mkl_set_local()
    if set_local is None:
        yield
        return
    previous = set_local(ctypes.byref(ctypes.c_int(threads)))
    try:
        yield
    finally:
        set_local(ctypes.byref(ctypes.c_int(previous)))


def mkl_one_thread_here() -> None:
    """MKL runs one thread for every later call from this thread (for worker threads of the op)."""
    set_local = _mkl_set_local()
    if set_local is not None:
        set_local(ctypes.byref(ctypes.c_int(1)))


@functools.cache
def _torch_openmp():
    """omp_get_max_threads / omp_set_num_threads of the OpenMP runtime torch ships (its libgomp),
    or None (another parallel backend, another platform)."""
    try:
        shared = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libgomp.so.1"))
        get_max, set_count = shared.omp_get_max_threads, shared.omp_set_num_threads
    except (OSError, AttributeError):
        return None
    get_max.argtypes, get_max.restype = [], ctypes.c_int
    set_count.argtypes, set_count.restype = [ctypes.c_int], None
    return get_max, set_count


@contextlib.contextmanager
def torch_one_thread_here() -> Iterator[None]:
    """torch's operators and MKL run on this thread alone inside the block (other threads keep
    their counts): OpenMP's thread count is a per-thread setting, and torch's ``get_num_threads``
    reads it. For the op's small steps after the search (the exact re-solve of a few rows), whose
    parallel regions otherwise wake torch's idle OpenMP threads, op after op: 7-14 ms for 30 rows
    instead of 1.1 ms, in a VM whose idle vCPUs are slow to wake (benchmarks/RESULTS.md)."""
    openmp = _torch_openmp()
    previous = None
    if openmp is not None:
        previous = openmp[0]()
        openmp[1](1)
    try:
        with mkl_threads_of_this_thread(1):
            yield
    finally:
        if openmp is not None and previous is not None:
            openmp[1](previous)
