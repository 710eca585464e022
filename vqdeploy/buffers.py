"""Large CPU outputs on transparent huge pages.

A fresh CPU tensor of tens of MiB costs its page faults when it is first written: with 4 KiB pages
that is one fault per 4 KiB, and a gather of 262144 codes of dim 32 (32 MiB) spent 17-21 ms
faulting against 3 ms of copying (benchmarks/RESULTS.md). numpy asks the kernel for huge pages on
large arrays (``madvise(MADV_HUGEPAGE)``); torch's allocator does not unless the process started
with ``THP_MEM_ALLOC_ENABLE=1``. `empty` allocates with torch and gives the same advice for the
buffer's pages before anything touches them, so the output is an ordinary torch tensor that
faults in 2 MiB pages where the system allows (transparent_hugepage "madvise" or "always"), and
nothing changes elsewhere (the advice is only a hint; any failure leaves the tensor as it was).
"""

from __future__ import annotations

import ctypes
import functools
import sys

import torch

# Below this size the faults are few and the system call costs more than it saves.
MIN_BYTES = 4 * 2**20
_MADV_HUGEPAGE = 14  # Linux
_PAGE = 4096


@functools.cache
def _madvise():
    """libc's madvise where this is Linux and it can be loaded, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    function.restype = ctypes.c_int
    return function


def advise_huge_pages(tensor: torch.Tensor) -> bool:
    """Advise huge pages for the whole pages of a CPU tensor's memory; whether the advice was taken."""
    size = tensor.numel() * tensor.element_size()
    madvise = _madvise()
    if tensor.device.type != "cpu" or size < MIN_BYTES or madvise is None:
        return False
    start = tensor.data_ptr()
    first = (start + _PAGE - 1) // _PAGE * _PAGE
    last = (start + size) // _PAGE * _PAGE
    return last > first and madvise(first, last - first, _MADV_HUGEPAGE) == 0


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """torch.empty(shape, dtype=dtype, device=device), on huge pages where it is a large CPU buffer."""
    out = torch.empty(shape, dtype=dtype, device=device)
    advise_huge_pages(out)
    return out
