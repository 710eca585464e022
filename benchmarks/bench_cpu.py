"""CPU speed in one run: the nearest-code op against the fastest SGEMM of its shape and faiss, and every
vqdeploy CPU path against the op, at the four CPU sizes of docs/design.md section 5.

Methods, timed interleaved (one call of each per round, ``--repeats`` rounds, default 15, after
``--warmup`` untimed rounds), x ~ N(0, 1) of shape (1, N, D) float32, the codebook of a vqdeploy
``VectorQuantize(dim=D, codebook_size=K)``:

- ``sgemm torch`` / ``sgemm numpy``: ``torch.mm(x, C.T, out=)`` (MKL) and ``numpy.matmul(x, C.T, out=)``
  (numpy's OpenBLAS) of the full (N, D) x (D, K) product into a preallocated N x K output;
  ``sgemm best`` is the faster of the two in each round;
- ``op``: ``vqdeploy.ops.nearest_code(x2d, C)`` (the exact argmin; its tile GEMM is the library
  `vqdeploy.ops.gemm` chose on this machine), and ``op torch`` / ``op numpy`` with the GEMM forced;
- ``faiss``: ``faiss.IndexFlatL2(D).search(x2d, 1)``;
- ``runtime torch`` / ``runtime ort``: ``vqdeploy.runtime.load(path, backend=...).encode(x_numpy)``
  on ``export_onnx(vq, path, part="encode")`` (ORT with its exact re-check body, the default);
- ``eager``: ``VectorQuantize`` eval forward under ``torch.no_grad()``.

``--tiles`` adds the op with each GEMM at 4 and 32 MiB tiles (the default is 16 MiB). ORT runs last
in a round (its spinning worker threads slow whatever runs right after them). Every ratio is the
median of per-round ratios with the min-max spread; "time vs sgemm best" above 1 means slower
than the GEMM alone, every "speed" ratio above 1 means faster than what it is compared with.
Tokens of the op (both GEMMs), runtime torch, runtime ort and eager are checked to be identical.

Run: ``python benchmarks/bench_cpu.py [--sizes 1 4 | 65536x64x4096 ...] [--repeats 15] [--tiles] [--json out.json]``
"""

from __future__ import annotations

import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from bench_eager import SIZES, environment, parse_size
from harness import markdown_table, time_interleaved

import vqdeploy
import vqdeploy.runtime
from vqdeploy.ops import gemm, nearest_code
from vqdeploy.ops.cpu_kernels import nearest_code_cpu

MIB = 2**20


def build_methods(n: int, d: int, k: int, tiles: bool, workdir: Path) -> tuple[dict[str, Any], list[Any]]:
    torch.manual_seed(0)
    vq = vqdeploy.VectorQuantize(dim=d, codebook_size=k).eval()
    x = torch.randn(1, n, d, generator=torch.Generator().manual_seed(1))
    x2d, x_np = x[0], x[0].numpy()
    codes = vq._codebook.embed[0].detach().contiguous()
    codes_np = codes.numpy()
    product = torch.empty(n, k)
    product_np = product.numpy()
    index = faiss.IndexFlatL2(d)
    index.add(codes_np)
    path = workdir / f"vq_{n}x{d}x{k}.onnx"
    vqdeploy.export_onnx(vq, path, part="encode")
    rt_torch = vqdeploy.runtime.load(path, backend="torch")
    rt_ort = vqdeploy.runtime.load(path, backend="ort")
    methods: dict[str, Any] = {
        "sgemm torch": lambda: torch.mm(x2d, codes.t(), out=product),
        "sgemm numpy": lambda: np.matmul(x_np, codes_np.T, out=product_np),
        "op": lambda: nearest_code(x2d, codes),
        "op torch": lambda: nearest_code_cpu(x2d, codes, gemm="torch"),
        "op numpy": lambda: nearest_code_cpu(x2d, codes, gemm="numpy"),
        "faiss": lambda: index.search(x_np, 1),
        "runtime torch": lambda: rt_torch.encode(x_np),
        "eager": lambda: vq(x),
    }
    if tiles:
        for mib in (4, 32):
            for lib in gemm.LIBRARIES:
                methods[f"op {lib} {mib} MiB"] = (
                    lambda lib=lib, mib=mib: nearest_code_cpu(x2d, codes, gemm=lib, block_bytes=mib * MIB))
    methods["runtime ort"] = lambda: rt_ort.encode(x_np)  # last: see the module docstring
    return methods, [rt_torch, rt_ort]


def tokens_of(name: str, result: Any) -> torch.Tensor | None:
    if name.startswith("sgemm"):
        return None
    if name == "faiss":
        return torch.from_numpy(result[1]).reshape(-1)
    if name == "eager":
        return result[1].reshape(-1)
    if isinstance(result, np.ndarray):
        return torch.from_numpy(result).reshape(-1)
    return result.reshape(-1)


def per_round(numerator: list[float], denominator: list[float]) -> tuple[float, float, float]:
    ratios = [a / b for a, b in zip(numerator, denominator, strict=True)]
    return statistics.median(ratios), min(ratios), max(ratios)


def run_size(
    n: int, d: int, k: int, repeats: int, warmup: int, tiles: bool, workdir: Path, settle: float = 0.25
) -> dict[str, Any]:
    methods, closables = build_methods(n, d, k, tiles, workdir)
    with torch.no_grad():
        timings = time_interleaved(methods, n, repeats=repeats, warmup=warmup, settle_s=settle)
    for runner in closables:
        runner.close()
    seconds = {name: t.seconds for name, t in timings.items()}
    best = [min(a, b) for a, b in zip(seconds["sgemm torch"], seconds["sgemm numpy"], strict=True)]
    seconds["sgemm best"] = best
    op = seconds["op"]
    tokens = {name: tokens_of(name, t.last_result) for name, t in timings.items()}
    reference = tokens["op"]
    differ = {name: int((tok != reference).sum()) for name, tok in tokens.items() if tok is not None}
    ratios = {
        "op time vs sgemm best": per_round(op, best),
        "op speed vs faiss": per_round(seconds["faiss"], op),
        "op speed vs op torch": per_round(seconds["op torch"], op),
        "op speed vs op numpy": per_round(seconds["op numpy"], op),
        "runtime torch speed vs op": per_round(op, seconds["runtime torch"]),
        "eager speed vs op": per_round(op, seconds["eager"]),
        "runtime ort speed vs faiss": per_round(seconds["faiss"], seconds["runtime ort"]),
        "runtime ort speed vs op": per_round(op, seconds["runtime ort"]),
        "sgemm numpy speed vs torch": per_round(seconds["sgemm torch"], seconds["sgemm numpy"]),
        "faiss time vs sgemm best": per_round(seconds["faiss"], best),
    }
    if tiles:
        for name in methods:
            if name.endswith("MiB"):
                lib = name.split()[1]
                ratios[f"{name} speed vs 16 MiB"] = per_round(seconds[f"op {lib}"], seconds[name])
    flops = 2.0 * n * d * k
    return {
        "size": f"{n}x{d}x{k}",
        "median_ms": {name: 1e3 * statistics.median(s) for name, s in seconds.items()},
        "gflops": {name: flops / statistics.median(seconds[name]) / 1e9 for name in ("sgemm torch", "sgemm numpy", "op")},
        "ratios": ratios,
        "tokens_differing_from_op": differ,
    }


TARGETS = {  # ratio name -> (comparison, threshold, what docs/design.md section 5 asks)
    "op time vs sgemm best": ("<=", 1.1, "op <= 1.1x the fastest SGEMM"),
    "op speed vs faiss": (">=", 1.0, "op >= 1.0x faiss (>= 1.2x at D <= 64)"),
    "runtime torch speed vs op": (">=", 0.95, "runtime torch >= 0.95x the op"),
    "eager speed vs op": (">=", 0.8, "eager eval >= 0.8x the op"),
}


def verdict(name: str, value: float, dim: int) -> str:
    if name not in TARGETS:
        return ""
    comparison, threshold, _ = TARGETS[name]
    if name == "op speed vs faiss" and dim <= 64:
        threshold = 1.2
    met = value <= threshold if comparison == "<=" else value >= threshold
    return "met" if met else "NOT met"


def report(results: list[dict[str, Any]]) -> str:
    lines = []
    names = list(results[0]["median_ms"])
    lines.append(markdown_table(["method", *(r["size"] for r in results)],
                                [[name, *(f"{r['median_ms'][name]:.1f} ms" for r in results)] for name in names]))
    lines.append("")
    lines.append(markdown_table(["GFLOP/s (2NDK / median)", *(r["size"] for r in results)],
                                [[name, *(f"{r['gflops'][name]:.0f}" for r in results)] for name in results[0]["gflops"]]))
    lines.append("")
    rows = []
    for name in results[0]["ratios"]:
        cells = []
        for r in results:
            median, low, high = r["ratios"][name]
            dim = int(r["size"].split("x")[1])
            mark = verdict(name, median, dim)
            cells.append(f"{median:.2f} ({low:.2f}-{high:.2f})" + (f" {mark}" if mark else ""))
        rows.append([name, *cells])
    lines.append(markdown_table(["ratio: median (min-max) of per-round ratios", *(r["size"] for r in results)], rows))
    lines.append("")
    lines.append("Tokens differing from the op's: " + "; ".join(
        f"{r['size']}: " + ", ".join(f"{m} {c}" for m, c in r["tokens_differing_from_op"].items() if m != "op")
        for r in results))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    import sys

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=SIZES, help="NxDxK or 1..4 (default: all four)")
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds (default 15)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    parser.add_argument("--settle", type=float, default=0.25,
                        help="seconds of sleep after each call, so spinning BLAS/OpenMP/ORT threads go idle (default 0.25)")
    parser.add_argument("--tiles", action="store_true", help="also the op with each GEMM at 4 and 32 MiB tiles")
    parser.add_argument("--json", metavar="PATH", help="also write every figure and the environment as JSON")
    args = parser.parse_args(argv)
    env = environment()
    choice = gemm.gemm_choice()
    env["gemm_choice"] = gemm.as_dict(choice)
    env["OPENBLAS_CORETYPE"] = os.environ.get("OPENBLAS_CORETYPE")
    print(f"# bench_cpu  {env['date']}  {env['cpu']}  cores={env['cpu_count']}  torch threads={env['torch_threads']}")
    print(f"# vqdeploy at {env['git']}  versions: {env['versions']}  OPENBLAS_CORETYPE={env['OPENBLAS_CORETYPE']}")
    print(f"# {choice.describe()}")
    print(f"# {' '.join(sys.argv)}  repeats={args.repeats} warmup={args.warmup} settle={args.settle}s  loadavg={env['loadavg_start']}", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for n, d, k in args.sizes:
            results.append(run_size(n, d, k, args.repeats, args.warmup, args.tiles, Path(workdir), args.settle))
            r = results[-1]
            print(f"# {r['size']}: " + ", ".join(f"{m} {v:.1f} ms" for m, v in r["median_ms"].items()))
            print(f"# loadavg now: {os.getloadavg()}\n{report([r])}\n", flush=True)  # each size as it completes
    env["loadavg_end"] = os.getloadavg()
    print(f"# loadavg at end: {env['loadavg_end']}\n")
    print(report(results))
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"environment": env, "repeats": args.repeats, "results": results}, out, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
