"""torch's SGEMM (MKL) against numpy's (OpenBLAS) at the CPU op's tile shapes, side by side.

Times ``torch.mm(C, X.T, out=)`` and ``numpy.matmul(C, X.T, out=)`` on the same memory, interleaved,
at the (K, D, R) tiles the op multiplies at the four CPU sizes of docs/design.md section 5 (16 MiB
tiles: R = 4096, 1024, 512, 16384). Prints GFLOP/s (2KDR / median) and the median of per-round
time ratios with the spread, and the OpenBLAS core type numpy's library runs (threadpoolctl), so
that runs under different ``OPENBLAS_CORETYPE`` values can be put next to each other:

    for t in "" Haswell SkylakeX Zen Prescott; do OPENBLAS_CORETYPE=$t python benchmarks/bench_sgemm.py; done

Run: ``python benchmarks/bench_sgemm.py [--repeats 15]``
"""

from __future__ import annotations

import argparse
import os
import statistics

import numpy as np
import torch
from bench_eager import environment
from harness import markdown_table, time_interleaved

TILES = ((1024, 256, 4096), (4096, 64, 1024), (8192, 512, 512), (256, 32, 16384))


def numpy_blas() -> str:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "unknown"
    found = [f"{i.get('internal_api')} {i.get('version')} {i.get('architecture')}"
             for i in threadpool_info() if i.get("user_api") == "blas" and "numpy" in (i.get("filepath") or "")]
    return ", ".join(found) or "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    env = environment()
    print(f"# bench_sgemm  {env['date']}  {env['cpu']}  torch threads={env['torch_threads']}  "
          f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE')}  numpy BLAS: {numpy_blas()}  "
          f"loadavg={env['loadavg_start']}")
    rows = []
    for k, d, r in TILES:
        codes, tile, out = torch.randn(k, d), torch.randn(r, d), torch.empty(k, r)
        codes_np, tile_np, out_np = codes.numpy(), tile.numpy(), out.numpy()
        timings = time_interleaved({
            "torch": lambda c=codes, t=tile, o=out: torch.mm(c, t.t(), out=o),
            "numpy": lambda c=codes_np, t=tile_np, o=out_np: np.matmul(c, t.T, out=o),
        }, r, repeats=args.repeats, warmup=2)
        flops = 2.0 * k * d * r
        ratios = [a / b for a, b in zip(timings["torch"].seconds, timings["numpy"].seconds, strict=True)]
        rows.append([f"{k}x{d}x{r}", f"{flops / timings['torch'].median_s / 1e9:.0f}",
                     f"{flops / timings['numpy'].median_s / 1e9:.0f}",
                     f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"])
    print(markdown_table(["K x D x R tile", "torch GFLOP/s", "numpy GFLOP/s", "torch / numpy time (spread)"], rows))
    print(f"# loadavg at end: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
