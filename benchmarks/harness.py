"""Small benchmark harness: interleaved timing, peak extra memory in a fresh process, markdown tables.

Rules it follows (docs/design.md section 5): every figure is a ratio measured side by side in one run,
so methods are timed interleaved (round r times every method once) and ratios are the median of
the per-round ratios, which cancels most of the load drift of a shared machine.

Peak extra memory is measured in a fresh ``spawn`` child. The child builds the inputs and the model
with a *factory*, makes one warm-up call on a tiny input (thread pools, lazy imports, kernels), then
resets the kernel's peak-RSS counter (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0), runs the
real call once and reports ``VmHWM - VmRSS before the call``. Why not plain ``ru_maxrss``: a child
started by fork+exec (``multiprocessing`` spawn or ``python -c`` alike) inherits the parent's peak RSS
into its own ``ru_maxrss`` (Linux folds the pre-exec address space into ``signal->maxrss``), and the
set-up itself (random inputs, model build) may leave a peak higher than the call's; either hides
the call's memory. Where ``clear_refs`` cannot be written, the child falls back to ``ru_maxrss``
growth and says so in ``MemoryResult.method``.
"""

from __future__ import annotations

import gc
import importlib
import multiprocessing as mp
import re
import resource
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

MIB = 2**20


# -- timing ---------------------------------------------------------------------------------------
@dataclass
class Timing:
    """Seconds of every timed repeat of one method; `n_items` items (vectors) per call."""

    seconds: list[float]
    n_items: int
    last_result: Any = field(default=None, repr=False)

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def items_per_s(self) -> float:
        return self.n_items / self.median_s


def time_interleaved(
    calls: Mapping[str, Callable[[], Any]], n_items: int, repeats: int = 5, warmup: int = 1,
    settle_s: float = 0.0,
) -> dict[str, Timing]:
    """Time every callable `warmup + repeats` times, round-robin, and keep the timed repeats.

    The result of each method's last call is kept in `Timing.last_result` (for correctness checks),
    so a benchmark needs no extra, untimed call. ``settle_s`` sleeps (untimed) after each call: the
    worker threads of OpenBLAS (about 0.1 s by default), OpenMP and ONNX Runtime spin after a call
    and slow whatever runs next; measured at 262144x32x256, the op right after numpy's matmul took
    106 ms against 38 ms elsewhere in the same round.
    """
    timings = {name: Timing([], n_items) for name in calls}
    for round_index in range(warmup + repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            result = call()
            elapsed = time.perf_counter() - start
            if round_index >= warmup:
                timings[name].seconds.append(elapsed)
            timings[name].last_result = result
            del result
            if settle_s:
                time.sleep(settle_s)
    return timings


def time_call(call: Callable[[], Any], n_items: int, repeats: int = 5, warmup: int = 1) -> Timing:
    """Time one callable: `warmup` untimed calls, then `repeats` timed ones (median in `Timing`)."""
    return time_interleaved({"call": call}, n_items, repeats, warmup)["call"]


def paired_speedup(baseline: Timing, candidate: Timing) -> float:
    """Median over rounds of baseline_seconds / candidate_seconds (> 1: candidate is faster).

    Pairs come from the same round of `time_interleaved`, so both saw the same machine load.
    """
    return statistics.median(b / c for b, c in zip(baseline.seconds, candidate.seconds, strict=True))


# -- memory ---------------------------------------------------------------------------------------
@dataclass
class MemoryResult:
    """Peak extra resident memory of one call, measured in a fresh process."""

    peak_extra_mib: float
    output_mib: float  # bytes of the tensors/arrays the call returned (part of the peak)
    method: str  # "VmHWM" (peak counter reset before the call) or "ru_maxrss" (fallback)


def nbytes(obj: Any) -> int:
    """Bytes held by the tensors / numpy arrays in `obj` (nested tuples, lists and dicts)."""
    if isinstance(obj, (tuple, list)):
        return sum(nbytes(item) for item in obj)
    if isinstance(obj, dict):
        return sum(nbytes(item) for item in obj.values())
    if hasattr(obj, "untyped_storage"):  # torch.Tensor
        return obj.numel() * obj.element_size()
    return int(getattr(obj, "nbytes", 0))


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel or sandbox does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _memory_child(factory: str, kwargs: dict[str, Any], conn: Any) -> None:
    """Child process body: build, warm up, reset the peak, call once, send a MemoryResult."""
    try:
        module_name, func_name = factory.split(":")
        warm_call, real_call = getattr(importlib.import_module(module_name), func_name)(**kwargs)
        warm_call()
        gc.collect()
        if _reset_peak_rss():
            method = "VmHWM"
            before_kib = _proc_status_kib("VmRSS")
            result = real_call()
            peak_kib = _proc_status_kib("VmHWM")
        else:
            method = "ru_maxrss"
            before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            result = real_call()
            peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        conn.send(MemoryResult((peak_kib - before_kib) / 1024, nbytes(result) / MIB, method))
    except BaseException as error:  # report, don't hang the parent
        conn.send(error)
    finally:
        conn.close()


def peak_extra_memory(factory: str, timeout_s: float = 600.0, **kwargs: Any) -> MemoryResult:
    """Peak extra RSS of one call, measured in a fresh spawned process.

    `factory` is "module:function"; ``function(**kwargs)`` must build everything (inputs, model)
    and return ``(warm_call, real_call)``: `warm_call` runs the same code on a tiny input, and
    `real_call` is the call being measured. The module must be importable in the child (the
    child gets the parent's ``sys.path``).
    """
    context = mp.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_memory_child, args=(factory, kwargs, sender))
    child.start()
    sender.close()
    try:
        if not receiver.poll(timeout_s):
            raise TimeoutError(f"memory measurement of {factory}({kwargs}) took over {timeout_s} s")
        answer = receiver.recv()
    except EOFError as error:
        raise RuntimeError(
            f"memory child for {factory}({kwargs}) died (exit code {child.exitcode})"
        ) from error
    finally:
        child.join(5)
        if child.is_alive():
            child.kill()
    if isinstance(answer, BaseException):
        raise answer
    return answer


# -- reporting ------------------------------------------------------------------------------------
_NUMERIC = re.compile(r"-|[-+]?[0-9.]+[kMx%]?")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; numbers right-aligned, everything else left-aligned."""
    cells = [[format_value(value) for value in row] for row in rows]
    numeric = [
        all(_NUMERIC.fullmatch(row[i]) for row in cells) if cells else False for i in range(len(headers))
    ]
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---:" if n else ":---" for n in numeric) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def format_value(value: Any) -> str:
    """Compact human formatting of a cell: 1.23M, 456k, 2.50, 1090; None becomes "-"."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) >= 1e6:
            return f"{value / 1e6:.2f}M"
        if abs(value) >= 1e4:
            return f"{value / 1e3:.0f}k"
        return f"{value:.2f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)
