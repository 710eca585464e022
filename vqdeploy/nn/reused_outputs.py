"""Memory for large eval outputs, used again once the caller has dropped the tensor it backed.

Why
---
An eval forward returns its quantized vectors in a tensor the caller keeps, so it cannot write
them into a buffer of its own; with torch's allocator every call then gets new memory. glibc serves
a block of 32 MiB or more with a fresh mapping and unmaps it on free (its dynamic mmap threshold
stops at 32 MiB), so each such call pays the kernel for every page again: 8192 page faults for the
32 MiB output of a 262144 x 32 float32 batch, 15 ms of a 71 ms forward on the AMD EPYC VM of
benchmarks/RESULTS.md, against 2.7 ms for the same gather into memory written before.

How
---
`empty(shape, dtype)` returns a tensor over a block of numpy memory (`torch.frombuffer` of a view
of it). A finalizer on that view runs when the last tensor sharing its storage is gone (the
caller dropped the output and every view of it, or its storage moved to shared memory) and gives
the block back; the next output of the same size in bytes takes it. Outputs smaller than
REUSED_MIN_BYTES come from torch's allocator as before (glibc already reuses its heap for those),
and at most IDLE_MAX_BYTES of blocks are kept idle: beyond that the blocks idle longest are freed
(a caller that moves on to another size gets its new size reused, not the old one kept).

Such a tensor is like any other CPU tensor except that its storage cannot grow (``resize_`` to a
larger size raises, as for ``torch.from_numpy``); ``VQDEPLOY_REUSE_OUTPUTS=0`` in the environment
turns the reuse off (read at each call).
"""

from __future__ import annotations

import math
import os
import threading
import weakref

import numpy as np
import torch

# Outputs of at least this many bytes are reused; smaller ones come from torch's allocator.
REUSED_MIN_BYTES = 16 * 2**20
# Idle blocks kept for later outputs, in bytes at most (a larger output is never reused).
IDLE_MAX_BYTES = 128 * 2**20
# The tensor's data starts on this boundary, as torch's own CPU allocations do.
ALIGNMENT = 64
ENV_REUSE = "VQDEPLOY_REUSE_OUTPUTS"


def reuse_enabled() -> bool:
    """False where VQDEPLOY_REUSE_OUTPUTS is 0 / false / no / off."""
    return os.environ.get(ENV_REUSE, "1").strip().lower() not in ("0", "false", "no", "off")


class _IdleBlocks:
    """The blocks given back and not yet taken: (bytes, numpy uint8 array) pairs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._blocks: list[tuple[int, np.ndarray]] = []

    def take(self, nbytes: int) -> np.ndarray | None:
        with self._lock:
            for position, (size, block) in enumerate(self._blocks):
                if size == nbytes:
                    del self._blocks[position]
                    return block
        return None

    def give(self, nbytes: int, block: np.ndarray) -> None:
        # A finalizer runs wherever the last reference went, possibly in this module on the same
        # thread (a garbage collection inside `take`): it never waits for the lock, and a block it
        # cannot keep is simply freed.
        if not self._lock.acquire(blocking=False):
            return
        try:
            self._blocks.append((nbytes, block))
            idle = sum(size for size, _ in self._blocks)
            while idle > IDLE_MAX_BYTES:  # the longest idle go first: a loop's sizes are the recent ones
                idle -= self._blocks.pop(0)[0]
        finally:
            self._lock.release()

    def idle_bytes(self) -> int:
        with self._lock:
            return sum(size for size, _ in self._blocks)

    def clear(self) -> None:
        with self._lock:
            self._blocks = []


_IDLE = _IdleBlocks()


def empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor of `shape` and `dtype`; for REUSED_MIN_BYTES or more, over a
    block that a dropped output of the same size gave back where there is one."""
    nbytes = math.prod(shape) * dtype.itemsize
    if not REUSED_MIN_BYTES <= nbytes <= IDLE_MAX_BYTES or not reuse_enabled():
        return torch.empty(shape, dtype=dtype)
    block = _IDLE.take(nbytes)
    if block is None:
        block = np.empty(nbytes + ALIGNMENT, dtype=np.uint8)
    start = -block.ctypes.data % ALIGNMENT
    view = block[start : start + nbytes]
    tensor = torch.frombuffer(view, dtype=dtype).view(shape)
    weakref.finalize(view, _IDLE.give, nbytes, block).atexit = False
    return tensor


def idle_bytes() -> int:
    """Bytes of blocks held for later outputs now."""
    return _IDLE.idle_bytes()


def release() -> None:
    """Free the idle blocks now (the tensors still in use keep theirs)."""
    _IDLE.clear()
