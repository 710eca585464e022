"""Which SGEMM the CPU nearest-code op runs its tile product on: torch's (MKL) or numpy's (OpenBLAS).

Why a choice
------------
The op's time at D >= 64 is its GEMM (`vqdeploy.ops.cpu_kernels`). torch's CPU wheels link MKL,
numpy's bundle OpenBLAS, and which one is faster depends on the CPU and on the shape: on an AMD
EPYC torch's SGEMM ran at 45-70% of numpy's, and on an Intel Xeon (AVX-512) MKL took 2-8x
numpy's time at the op's K = 4096, D = 64 tile while the two were even at the other tiles
(benchmarks/RESULTS.md). Both write into the same memory: numpy works on views of the op's
tensors, so nothing is copied and the tokens cannot depend on the choice beyond float32 rounding,
which the op's exact re-check removes (tokens are the exact argmin with either library).

How it is chosen
----------------
`gemm_choice()` times the op with each library, interleaved, at the four CPU sizes of
docs/design.md section 5 (N cut to a quarter or less) and keeps the one with the lower
geometric-mean time. The measurement (3 to 6 seconds on 2 cores) is made once per *key*: the
CPU model and flags, the torch and numpy versions, numpy's BLAS (name, version, the core type it runs: OpenBLAS honours
``OPENBLAS_CORETYPE``), the thread count and the environment variables that change either
library's kernels. The answer is written to ``$VQDEPLOY_CACHE_DIR`` (default
``$XDG_CACHE_HOME/vqdeploy``, else ``~/.cache/vqdeploy``) as ``gemm-<hash of the key>.json``; the
first process to write it wins and every later process reads it, so all processes of a machine
use the same library. ``VQDEPLOY_GEMM=torch`` or ``numpy`` forces a library (no measurement);
``auto`` (the default) measures or reads the cache. Where the cache cannot be written, the
measurement is kept for the process and `GemmChoice.source` says so.

How each library runs: torch.mm on torch's threads, then the compiled argmin on numba's (as
before); numpy's path gives each of torch.get_num_threads() Python worker threads its own tiles
and runs a one-thread OpenBLAS GEMM and a one-thread argmin on them (OpenBLAS's pool is set to one
thread for the span of the call through threadpoolctl, a dependency of scikit-learn, and
restored after), so ``torch.set_num_threads`` governs both paths.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vqdeploy.errors import UnsupportedOptionError

LIBRARIES = ("torch", "numpy")
ENV_GEMM = "VQDEPLOY_GEMM"
ENV_CACHE_DIR = "VQDEPLOY_CACHE_DIR"
# Environment variables that change which kernel MKL or OpenBLAS runs: part of the cache key.
KERNEL_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_VERBOSE", "MKL_ENABLE_INSTRUCTIONS", "MKL_DEBUG_CPU_TYPE", "MKL_CBWR")
# (N, D, K) the op is timed at: the four CPU sizes of docs/design.md section 5 with N cut to a
# quarter or less (about 0.5 s per library and round on 2 cores). Not smaller: on an AMD EPYC
# the two libraries tied at N cut to two tiles of torch's path (8192x256x1024, 4096x64x4096...)
# while numpy took 0.44-0.77 of torch's time from four times those N up to the full sizes.
PROBE_SHAPES = ((32768, 256, 1024), (16384, 64, 4096), (4096, 512, 8192), (131072, 32, 256))
PROBE_ROUNDS = 3
# 2: the numpy path's tiles became 256 rows at most (cpu_kernels.PER_CORE_TILE_ROWS);
# 3: the probe's N four times larger (format 2 chose torch on an AMD EPYC where numpy was 1.5-2x faster);
# 4: both libraries' GEMMs run inside the compiled tile loop (`vqdeploy.ops.sgemm_entry`);
# 5: the loop's fold became 2.5x faster on an AMD EPYC (no masked stores), which moves the balance.
CACHE_FORMAT = 5


@dataclass(frozen=True)
class GemmChoice:
    """The library of the op's tile product and where the decision came from."""

    library: str  # "torch" or "numpy"
    source: str  # "forced (VQDEPLOY_GEMM)", "measured", "cached", "measured (not cached: ...)"
    key: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, dict[str, float]] = field(default_factory=dict)  # library -> "KxDxR" -> median s
    path: str | None = None  # the cache file, where there is one

    def describe(self) -> str:
        """One line for `vqdeploy inspect` / `bench`: the library, why, and the measured ratio."""
        what = "torch's MKL" if self.library == "torch" else f"numpy's {self.key.get('numpy_blas', 'BLAS')}"
        text = f"CPU tile GEMM: {what}, {self.source}"
        if self.seconds.get("torch") and self.seconds.get("numpy"):
            text += f"; numpy / torch time {geometric_mean_ratio(self.seconds['numpy'], self.seconds['torch']):.2f}"
        return text + f", {self.key.get('threads', '?')} thread(s)"


def geometric_mean_ratio(numerator: dict[str, float], denominator: dict[str, float]) -> float:
    """Geometric mean over the shapes both hold of numerator / denominator seconds."""
    shapes = sorted(set(numerator) & set(denominator))
    if not shapes:
        return 1.0
    return math.exp(sum(math.log(numerator[s] / denominator[s]) for s in shapes) / len(shapes))


# -- the key ------------------------------------------------------------------------------------------------
def _cpu_model() -> tuple[str, str]:
    """The CPU's model name and a short hash of its feature flags (Linux /proc/cpuinfo, else platform)."""
    model, flags = "", ""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                name, _, value = line.partition(":")
                name = name.strip()
                if name == "model name" and not model:
                    model = value.strip()
                elif name in ("flags", "Features") and not flags:
                    flags = value.strip()
                if model and flags:
                    break
    except OSError:
        pass
    model = model or platform.processor() or platform.machine()
    return model, hashlib.sha256(flags.encode()).hexdigest()[:12]


def _numpy_blas() -> dict[str, Any]:
    """numpy's BLAS: name, version and core type, from threadpoolctl (what is loaded) or numpy's build."""
    for info in _blas_libraries():
        if "numpy" in (info.get("filepath") or ""):
            return {k: info.get(k) for k in ("internal_api", "version", "architecture")}
    try:
        config = np.show_config(mode="dicts")
        blas = config["Build Dependencies"]["blas"]
        return {"internal_api": blas.get("name"), "version": blas.get("version"), "architecture": None}
    except Exception:  # noqa: BLE001 - an older numpy: its version in the key is enough
        return {"internal_api": None, "version": None, "architecture": None}


def _blas_libraries() -> list[dict[str, Any]]:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    return [info for info in threadpool_info() if info.get("user_api") == "blas"]


def choice_key() -> dict[str, Any]:
    """What the measured choice depends on; its hash names the cache file."""
    model, flags = _cpu_model()
    blas = _numpy_blas()
    return {
        "format": CACHE_FORMAT,
        "cpu": model,
        "cpu_flags": flags,
        "machine": platform.machine(),
        "torch": torch.__version__,
        "torch_blas": "mkl" if torch.backends.mkl.is_available() else "other",
        "numpy": np.__version__,
        "numpy_blas": " ".join(str(v) for v in blas.values() if v),
        "threads": torch.get_num_threads(),
        "env": {name: os.environ[name] for name in KERNEL_ENV if name in os.environ},
        "probe": [list(shape) for shape in PROBE_SHAPES],
    }


def cache_dir() -> Path:
    """Where the measured choice is kept: $VQDEPLOY_CACHE_DIR, else $XDG_CACHE_HOME/vqdeploy, else ~/.cache/vqdeploy."""
    if os.environ.get(ENV_CACHE_DIR):
        return Path(os.environ[ENV_CACHE_DIR])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vqdeploy"


def cache_path(key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / f"gemm-{digest}.json"


# -- the product itself --------------------------------------------------------------------------------------
class _NumpyBlasThreads:
    """numpy's OpenBLAS pool size, set for the span of the op's calls (nested and concurrent calls
    share one setting; the first to enter saves the count, the last to leave restores it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._controllers: list[Any] | None = None
        self._depth = 0
        self._saved: list[int] = []

    def _libraries(self) -> list[Any]:
        if self._controllers is None:
            try:
                from threadpoolctl import ThreadpoolController

                self._controllers = [c for c in ThreadpoolController().lib_controllers
                                     if c.user_api == "blas" and "numpy" in (c.filepath or "")]
            except Exception:  # noqa: BLE001 - no threadpoolctl: OpenBLAS keeps its own count
                self._controllers = []
        return self._controllers

    @contextlib.contextmanager
    def limit(self, threads: int) -> Iterator[None]:
        with self._lock:
            if self._depth == 0:
                libraries = self._libraries()
                self._saved = [lib.get_num_threads() for lib in libraries]
                for lib in libraries:
                    lib.set_num_threads(threads)
            self._depth += 1
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0:
                    for lib, count in zip(self._libraries(), self._saved, strict=True):
                        lib.set_num_threads(count)


_NUMPY_BLAS = _NumpyBlasThreads()


def numpy_blas_threads(threads: int) -> contextlib.AbstractContextManager[None]:
    """Context manager: numpy's OpenBLAS runs `threads` threads inside it (threadpoolctl; a no-op without)."""
    return _NUMPY_BLAS.limit(threads)


def tile_product(library: str, codes: torch.Tensor, tile: torch.Tensor, out: torch.Tensor, alpha: float = 1.0) -> None:
    """out (K, R) = alpha codes (K, D) @ tile (R, D)^T in float32, by torch (MKL's alpha) or
    numpy.matmul on views (numpy has no alpha: only 1 there; scale the codes instead).

    ``codes`` and ``out`` are C-contiguous float32 CPU tensors; ``tile`` any float32 CPU view.
    """
    if library == "numpy":
        if alpha != 1.0:
            raise ValueError("numpy's matmul takes no alpha: scale the codes")
        np.matmul(codes.numpy(), tile.resolve_neg().numpy().T, out=out.numpy())
    elif alpha == 1.0:
        torch.mm(codes, tile.t(), out=out)
    else:  # beta = 0: out's old values are ignored, NaN included
        torch.addmm(out, codes, tile.t(), beta=0.0, alpha=alpha, out=out)


# -- measuring -------------------------------------------------------------------------------------------
# The op each library is timed with, registered by `vqdeploy.ops.cpu_kernels` when it is imported
# (it imports this module; the choice is made on the op as it runs, so this module names no kernel).
_TIMED_OP: Callable[..., torch.Tensor] | None = None


def register_timed_op(op: Callable[..., torch.Tensor]) -> None:
    """Set the op `measure` times: op(x, codes, gemm=library)."""
    global _TIMED_OP
    _TIMED_OP = op


def measure(shapes: tuple[tuple[int, int, int], ...] | None = None, rounds: int | None = None) -> dict[str, dict[str, float]]:
    """Median seconds of the CPU op (`nearest_code_cpu`) with each library, per (N, D, K), the two
    libraries interleaved per round: the GEMM as the op runs it (threads, tiles, the argmin after it)."""
    nearest_code_cpu = _TIMED_OP
    if nearest_code_cpu is None:
        raise RuntimeError("no CPU op registered to time: import vqdeploy.ops.cpu_kernels first")

    generator = torch.Generator().manual_seed(0)
    seconds: dict[str, dict[str, list[float]]] = {lib: {} for lib in LIBRARIES}
    for rows, dim, num_codes in PROBE_SHAPES if shapes is None else shapes:
        name = f"{rows}x{dim}x{num_codes}"
        x = torch.randn(rows, dim, generator=generator)
        codes = torch.randn(num_codes, dim, generator=generator)
        for lib in LIBRARIES:  # warm-up: compiles, thread pools
            nearest_code_cpu(x[:1024], codes, gemm=lib)
            seconds[lib][name] = []
        for _ in range(PROBE_ROUNDS if rounds is None else rounds):
            for lib in LIBRARIES:
                start = time.perf_counter()
                nearest_code_cpu(x, codes, gemm=lib)
                seconds[lib][name].append(time.perf_counter() - start)
    return {lib: {name: statistics.median(v) for name, v in per.items()} for lib, per in seconds.items()}


def _faster(seconds: dict[str, dict[str, float]]) -> str:
    return "numpy" if geometric_mean_ratio(seconds["numpy"], seconds["torch"]) < 1.0 else "torch"


def _read(path: Path, key: dict[str, Any]) -> GemmChoice | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if data.get("key") != key or data.get("library") not in LIBRARIES:
        return None
    return GemmChoice(data["library"], "cached", key, data.get("seconds", {}), str(path))


def _write_once(path: Path, payload: dict[str, Any]) -> bool:
    """Write the cache file unless it exists (the first writer wins); False where it already did."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=".gemm-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(payload, handle, indent=1, sort_keys=True)
        os.link(temporary, path)  # atomic, and fails where another process got there first
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(temporary)


def forced_library() -> str | None:
    """The library ``VQDEPLOY_GEMM`` forces, or None for ``auto`` / unset."""
    value = os.environ.get(ENV_GEMM, "auto").strip().lower() or "auto"
    if value == "auto":
        return None
    if value not in LIBRARIES:
        raise UnsupportedOptionError(f"{ENV_GEMM} must be one of auto, {', '.join(LIBRARIES)}; got {value!r}")
    return value


_LOCK = threading.Lock()


def gemm_choice() -> GemmChoice:
    """The library of the op's tile product here: forced, read from the cache, or measured and cached.

    Cheap after the first call of a process (the op asks on every call).

    >>> gemm_choice().library in ("torch", "numpy")
    True
    """
    state = (torch.get_num_threads(), os.environ.get(ENV_GEMM), os.environ.get(ENV_CACHE_DIR),
             os.environ.get("XDG_CACHE_HOME"), tuple(os.environ.get(name) for name in KERNEL_ENV))
    found = _LAST.get(state)
    if found is None:
        forced = forced_library()
        key = choice_key()
        if forced is not None:
            found = GemmChoice(forced, f"forced ({ENV_GEMM})", key)
        else:
            found = _cached_choice(json.dumps(key, sort_keys=True), str(cache_dir()))
        _LAST[state] = found
    return found


# What gemm_choice answered for each (threads, environment) seen in this process.
_LAST: dict[tuple[Any, ...], GemmChoice] = {}


@functools.cache
def _cached_choice(key_text: str, directory: str) -> GemmChoice:
    del directory  # part of the in-process cache key only
    key = json.loads(key_text)
    path = cache_path(key)
    with _LOCK:
        found = _read(path, key)
        if found is not None:
            return found
        seconds = measure()
        library = _faster(seconds)
        payload = {"key": key, "library": library, "seconds": seconds,
                   "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        try:
            if not _write_once(path, payload):
                found = _read(path, key)  # another process measured first: use its answer
                if found is not None:
                    return found
        except OSError as error:
            return GemmChoice(library, f"measured (not cached: {error.strerror or error})", key, seconds)
        return GemmChoice(library, "measured", key, seconds, str(path))


def peek_choice() -> GemmChoice | None:
    """The choice without measuring: forced, this process's, or the cache file's; None where none
    was made on this machine yet (the first CPU encode makes it)."""
    forced = forced_library()
    key = choice_key()
    if forced is not None:
        return GemmChoice(forced, f"forced ({ENV_GEMM})", key)
    if _cached_choice.cache_info().currsize:
        return gemm_choice()
    return _read(cache_path(key), key)


def describe_current(measure_now: bool = False) -> str:
    """The line `vqdeploy inspect` / `bench` print about the CPU tile GEMM."""
    choice = gemm_choice() if measure_now else peek_choice()
    if choice is None:
        return "CPU tile GEMM: not chosen yet on this machine (the first CPU encode measures torch vs numpy)"
    return choice.describe()


def forget_cached_choice() -> None:
    """Drop this process's memory of the choice (the file stays): the next call reads or measures again."""
    _cached_choice.cache_clear()
    _LAST.clear()


def as_dict(choice: GemmChoice) -> dict[str, Any]:
    """The choice as plain data (for ``--json`` outputs)."""
    return asdict(choice)
