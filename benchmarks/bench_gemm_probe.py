"""The CPU op with each GEMM library at growing N: whether the choice's probe sizes say what the full sizes say.

`vqdeploy.ops.gemm` picks torch's (MKL) or numpy's (OpenBLAS) product for the op's tiles by timing
the op at `gemm.PROBE_SHAPES` (the four CPU sizes of docs/design.md section 5 with N cut down).
This script times ``nearest_code_cpu(x, codes, gemm=...)`` with both libraries, interleaved, at
each probe shape's N times 1/4 (the size the probe used before cache format 3), 1, 4 and 16 (the
full sizes of section 5 lie at 2-4x), and prints the numpy / torch time: where the ratio at the probe's
N has the same side of 1 as at the larger N, the probe decides as the full sizes would.

Run: ``python benchmarks/bench_gemm_probe.py [--repeats 5] [--multiples 0.25 1 4 16]``
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch
from bench_eager import environment
from harness import markdown_table, time_interleaved

from vqdeploy.ops import gemm
from vqdeploy.ops.cpu_kernels import nearest_code_cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--multiples", type=float, nargs="+", default=[0.25, 1, 4, 16],
                        help="N as multiples of each probe shape's N (default 0.25 1 4 16)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or any(m <= 0 for m in args.multiples):
        parser.error("--repeats and --multiples must be positive")
    env = environment()
    print(f"# bench_gemm_probe  {env['date']}  {env['cpu']}  cores={env['cpu_count']}  torch threads="
          f"{env['torch_threads']}  OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE')}  "
          f"loadavg={env['loadavg_start']}")
    print(f"# {gemm.describe_current()}")
    generator = torch.Generator().manual_seed(0)
    rows = []
    for probe_n, dim, num_codes in gemm.PROBE_SHAPES:
        codes = torch.randn(num_codes, dim, generator=generator)
        for multiple in args.multiples:
            n = max(1, int(probe_n * multiple))
            x = torch.randn(n, dim, generator=generator)
            for library in gemm.LIBRARIES:  # compile, thread pools
                nearest_code_cpu(x[:1024], codes, gemm=library)
            timings = time_interleaved(
                {library: (lambda lib=library, x=x, codes=codes: nearest_code_cpu(x, codes, gemm=lib))
                 for library in gemm.LIBRARIES},
                n, repeats=args.repeats, warmup=1, settle_s=0.1)
            if not torch.equal(timings["torch"].last_result, timings["numpy"].last_result):
                raise SystemExit(f"tokens differ between the libraries at {n}x{dim}x{num_codes}")
            ratios = [a / b for a, b in zip(timings["numpy"].seconds, timings["torch"].seconds, strict=True)]
            label = "probe" if multiple == 1 else f"probe x {multiple:g}"
            rows.append([f"{n}x{dim}x{num_codes} ({label})", f"{timings['torch'].median_s * 1e3:.1f} ms",
                         f"{timings['numpy'].median_s * 1e3:.1f} ms",
                         f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"])
            print(f"# {rows[-1]}", flush=True)
    print(markdown_table(["N x D x K", "torch", "numpy", "numpy / torch time (spread)"], rows))
    print(f"# loadavg at end: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
