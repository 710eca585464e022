"""CPU encode throughput of the vqdeploy runtime backends vs faiss and the reference library.

At the CPU sizes of docs/design.md section 5 it times, interleaved (see `harness`), one encode of
x ~ N(0, 1) of shape (1, N, D) float32 by:

- ``reference``: ``vector_quantize_pytorch.VectorQuantize(dim=D, codebook_size=K, rotation_trick=False)``
  eval forward (under ``torch.no_grad()``);
- ``eager``: ``vqdeploy.VectorQuantize.from_vector_quantize_pytorch(reference)`` eval forward;
- ``nearest_code``: the raw op ``vqdeploy.ops.nearest_code(x2d, codebook)`` (on CPU: MKL GEMM tiles
  + the numba-compiled argmin of `vqdeploy.ops.cpu_kernels`);
- ``blocked``: ``vqdeploy.ops.nearest_code_blocked(x2d, codebook)``, the torch-only path the op
  falls back to where numba is missing;
- ``faiss``: ``faiss.IndexFlatL2(D).search(x2d, 1)`` on the same codebook;
- ``ort fused`` / ``ort unfused``: ``vqdeploy.runtime.load(path, backend="ort").encode(x_numpy)`` on
  ``export_onnx(vq, path, part="encode")`` with ``fused=True`` / ``fused=False``, at the default
  chunk size and with ``chunk_size=16384`` (``c16k``);
- ``torch``: the same call with ``backend="torch"`` (fused file).

Every method is first called once, untimed, on a slice of x; then `--repeats` rounds are timed.
Ratios vs faiss and vs the reference are medians of per-round ratios. Peak extra memory of one call
is measured in a fresh process (`harness.peak_extra_memory`) for the runtime backends and faiss
(eager and the raw op: see bench_eager.py), and for the reference only where N*K <= 2**26 and
N <= 65536 (elsewhere its N x K temporaries make it take too long). Every vqdeploy path's indices are checked
against the eager module's (mismatch counts).

Run: ``python benchmarks/bench_backends.py [--sizes 65536x256x1024 ...] [--repeats 3] [--quick] [--json out.json]``
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_eager import build_case, run_benchmark
from harness import markdown_table, paired_speedup, peak_extra_memory, time_interleaved

import vqdeploy
import vqdeploy.runtime
from vqdeploy.ops.contract import nearest_code_blocked
from vqdeploy.ops.custom_op import nearest_code

CHUNK_VARIANT = 16384
WARM_ROWS = 64
REFERENCE_MEMORY_MAX_NK = 2**26  # above this the reference's N x K temporaries take > 1 GiB and long
REFERENCE_MEMORY_MAX_N = 65536  # and above this one reference call alone takes ~15 s on 2 cores
WARM_SLICE = 4096  # rows of the untimed warm-up call (ORT methods: one CHUNK_VARIANT chunk)
# Order of the calls within a round. ONNX Runtime's worker threads keep spinning for a while after
# a run and slow down whatever runs next on the same cores (measured: a torch-backend encode took
# 80 ms right after an ORT call, 38 ms alone), so the ORT methods come last in a round, followed by
# the next round's reference call, which takes seconds and so hardly feels it.
METHODS: dict[str, str] = {
    "reference": "reference VectorQuantize fwd",
    "eager": "vqdeploy VectorQuantize fwd (eager)",
    "nearest_code": "vqdeploy.ops.nearest_code",
    "blocked": "nearest_code_blocked (torch only)",
    "faiss": "faiss IndexFlatL2.search",
    "torch": "runtime torch",
    "ort_fused": "runtime ort, fused",
    "ort_fused_c16k": f"runtime ort, fused, chunk {CHUNK_VARIANT}",
    "ort_unfused": "runtime ort, unfused",
    "ort_unfused_c16k": f"runtime ort, unfused, chunk {CHUNK_VARIANT}",
}
VQDEPLOY_METHODS = [
    "eager",
    "nearest_code",
    "blocked",
    "ort_fused",
    "ort_fused_c16k",
    "ort_unfused",
    "ort_unfused_c16k",
    "torch",
]
RUNTIME_METHODS = [m for m in VQDEPLOY_METHODS if m.startswith(("ort", "torch"))]


@dataclass
class Backends:
    """Exported files and loaded runtime quantizers for one case."""

    tmpdir: tempfile.TemporaryDirectory
    quantizers: dict[str, Any]

    def close(self) -> None:
        for q in self.quantizers.values():
            q.close()
        self.tmpdir.cleanup()


def load_backends(vq: torch.nn.Module, methods: list[str]) -> Backends:
    """Export `vq` (encode part, fused and unfused) and load the runtime quantizers `methods` needs."""
    tmpdir = tempfile.TemporaryDirectory(prefix="bench_backends_")
    fused = Path(tmpdir.name) / "enc.onnx"
    unfused = Path(tmpdir.name) / "enc_unfused.onnx"
    quantizers: dict[str, Any] = {}
    for name in methods:
        if name not in RUNTIME_METHODS:
            continue
        path = unfused if "unfused" in name else fused
        if not path.exists():
            vqdeploy.export_onnx(vq, path, part="encode", fused=path is fused)
        backend = "torch" if name == "torch" else "ort"
        chunk = CHUNK_VARIANT if name.endswith("c16k") else None
        quantizers[name] = vqdeploy.runtime.load(path, backend=backend, chunk_size=chunk)
    return Backends(tmpdir, quantizers)


def method_calls(
    case: Any, backends: Backends, methods: list[str], rows: int | None = None
) -> dict[str, Callable[[], Any]]:
    """One zero-argument callable per method, on the first `rows` vectors of x (all by default)."""
    x = case.x if rows is None else case.x[:, :rows].contiguous()
    x2d = x[0]
    x_np = x.numpy()
    x2d_np = x2d.numpy()
    calls: dict[str, Callable[[], Any]] = {
        "reference": lambda: case.reference(x),
        "eager": lambda: case.vqdeploy(x),
        "nearest_code": lambda: nearest_code(x2d, case.codebook),
        "blocked": lambda: nearest_code_blocked(x2d, case.codebook),
        "faiss": lambda: case.index.search(x2d_np, 1),
    }
    for name, q in backends.quantizers.items():
        calls[name] = lambda q=q: q.encode(x_np)
    return {name: calls[name] for name in methods}


def indices_of(method: str, result: Any) -> np.ndarray:
    """Flat int64 indices from a method's result."""
    if method in ("reference", "eager"):
        result = result[1]
    elif method == "faiss":
        result = result[1]
    if isinstance(result, torch.Tensor):
        result = result.numpy()
    return np.asarray(result).reshape(-1).astype(np.int64)


def memory_factory(
    method: str, n: int, d: int, k: int, seed: int = 0
) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """`harness.peak_extra_memory` factory: (warm-up call on WARM_ROWS vectors, the real call)."""
    case = build_case(n, d, k, seed)
    backends = load_backends(case.vqdeploy, [method])
    warm = method_calls(case, backends, [method], WARM_ROWS)[method]
    real = method_calls(case, backends, [method])[method]
    memory_factory.keep = (case, backends)  # keep files and sessions alive in the child
    return torch.no_grad()(warm), torch.no_grad()(real)


def run_size(n: int, d: int, k: int, repeats: int, warmup: int, memory: bool) -> dict[str, Any]:
    """Time all methods interleaved, check index parity against eager, measure memory."""
    case = build_case(n, d, k)
    methods = list(METHODS)
    backends = load_backends(case.vqdeploy, methods)
    try:
        with torch.no_grad():
            timings = time_interleaved(
                method_calls(case, backends, methods), n, repeats=repeats, warmup=warmup
            )
    finally:
        backends.close()
    eager = indices_of("eager", timings["eager"].last_result)
    parity = {
        name: int((indices_of(name, timings[name].last_result) != eager).sum())
        for name in methods
        if name != "eager"
    }
    for timing in timings.values():
        timing.last_result = None
    del case

    results: dict[str, dict[str, Any]] = {}
    for name, timing in timings.items():
        results[name] = {
            "median_s": timing.median_s,
            "seconds": timing.seconds,
            "vectors_per_s": timing.items_per_s,
            "x_faiss": paired_speedup(timings["faiss"], timing),
            "x_reference": paired_speedup(timings["reference"], timing),
            "mismatches_vs_eager": parity.get(name, 0),
        }
        if name == "reference":
            measure = n * k <= REFERENCE_MEMORY_MAX_NK and n <= REFERENCE_MEMORY_MAX_N
        else:
            measure = name == "faiss" or name in RUNTIME_METHODS  # eager/op memory: bench_eager.py
        if memory and measure:
            result = peak_extra_memory("bench_backends:memory_factory", method=name, n=n, d=d, k=k)
            results[name].update(asdict(result))
    runtime = {m: results[m] for m in VQDEPLOY_METHODS}
    best = max(runtime, key=lambda m: runtime[m]["x_faiss"])
    return {
        "size": f"{n}x{d}x{k}",
        "n": n,
        "d": d,
        "k": k,
        "methods": results,
        "best_vqdeploy": best,
        "best_x_faiss": results[best]["x_faiss"],
    }


def report(results: list[dict[str, Any]]) -> str:
    """Throughput/memory/parity table and the per-size target verdict, in markdown."""
    rows = []
    for res in results:
        for name, m in res["methods"].items():
            rows.append(
                [
                    res["size"],
                    METHODS[name] + (" **(best)**" if name == res["best_vqdeploy"] else ""),
                    m["vectors_per_s"],
                    f"{m['x_faiss']:.2f}x",
                    f"{m['x_reference']:.2f}x",
                    m.get("peak_extra_mib"),
                    "-" if name == "eager" else m["mismatches_vs_eager"],
                ]
            )
    table = markdown_table(
        [
            "N x D x K",
            "method",
            "vectors/s",
            "vs faiss",
            "vs reference",
            "peak extra MiB",
            "index mismatches vs eager",
        ],
        rows,
    )
    verdict_rows = [
        [
            res["size"],
            METHODS[res["best_vqdeploy"]],
            f"{res['best_x_faiss']:.2f}x",
            "met" if res["best_x_faiss"] >= 1.0 else "NOT met",
        ]
        for res in results
    ]
    verdict = markdown_table(
        ["N x D x K", "best vqdeploy CPU path", "vs faiss", "target >= 1.0x faiss"], verdict_rows
    )
    return table + "\n\n" + verdict


def main(argv: list[str] | None = None) -> int:
    results, _ = run_benchmark(
        "bench_backends", __doc__.split("\n\n")[0], argv, run_size, report, 3, 0,
        "untimed full rounds after the slice warm-up (default 0)",
    )
    total = sum(
        m["mismatches_vs_eager"]
        for res in results
        for name, m in res["methods"].items()
        if name in VQDEPLOY_METHODS
    )
    print(f"\n# vqdeploy index mismatches vs eager, all backends and sizes: {total}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
