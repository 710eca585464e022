"""Rows that leave each pass of the Triton kernel's ``fast`` mode, emulated on CPU, per bound.

The GPU target sizes, (1M, 256, 1024) and (1M, 64, 4096), with N subsampled
(``--rows``, default 65536). For every data set and bound, `vqdeploy.ops.pass_emulation` runs
each pass (``tf32``, ``tf32x3``, ``ieee`` with its own flag, the exact re-check's trigger) over
every row; a row's flag does not depend on the other rows, so the share of rows that enter each
pass of any chain follows from the flag sets. Prints, per chain, the % of rows entering each
pass after the first, whether the chain's tokens equal the float64 argmin on every row, and the
estimated GPU time from the H100 full-pass times of the baseline kernel (tf32 2.85 ms, tf32x3
7.9 ms, ieee 26.6 ms at (1M, 256, 1024); 4.0, 9.0, 28.3 ms at (1M, 64, 4096)), assuming a pass over a
share f of the rows costs f times a full pass (the exact re-check's own cost is left out).

Bounds: ``legacy`` (the kernel's former test: Cauchy-Schwarz with the largest code norm C),
``per-code`` (per-code norms, no residual norms), ``residual`` (per-code norms and TF32 residual
norms: what the kernel now evaluates). Data: ``random`` (x, codes ~ N(0, 1)), ``digits``
(scikit-learn's 8x8 digits, standardised, columns tiled to D; codes = digits + N(0, 0.5^2), rows =
digits + N(0, 0.1^2)), ``near-ties`` (verify's construction: midpoints between every code and its
nearest neighbour, half exact, half moved towards one code by a relative 10^-8..10^-2).

Usage: ``python benchmarks/bench_pass_bounds.py [--rows 65536] [--sizes 256x1024,64x4096]``
(~10 min on 2 cores at the defaults; ``--quick`` for 8192 rows). ``--gpu`` (needs CUDA and
Triton) adds, per size and data set, the share of rows the real kernel's ``tf32`` and ``tf32x3``
passes flag next to the emulated share, and the % of rows on which the two flags agree (not
100% by construction: the tensor cores sum in another order than the CPU).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install

from vqdeploy.ops.contract import nearest_code_reference, squared_norms  # noqa: E402
from vqdeploy.ops.pass_emulation import emulate_pass  # noqa: E402

# H100 full-pass times (ms) of the baseline fused kernel at N = 1,048,576 (measured 2026-11-26).
PASS_MS = {
    (256, 1024): {"tf32": 2.85, "tf32x3": 7.9, "ieee": 26.6},
    (64, 4096): {"tf32": 4.0, "tf32x3": 9.0, "ieee": 28.3},
}
CHAINS = {
    "fast: tf32 > tf32x3 > ieee": ("tf32", "tf32x3", "ieee"),
    "fast: tf32 > ieee": ("tf32", "ieee"),
    "exact: tf32x3 > ieee": ("tf32x3", "ieee"),
}
BOUNDS = ("legacy", "per-code", "residual")


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return "unknown CPU"
    for line in out.splitlines():
        if line.startswith("Model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def make_data(name: str, rows: int, dim: int, codes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    if name == "random":
        return torch.randn(rows, dim, generator=gen), torch.randn(codes, dim, generator=gen)
    from sklearn.datasets import load_digits

    digits = torch.from_numpy(load_digits().data.astype(np.float32))
    digits = (digits - digits.mean(0)) / (digits.std(0) + 1e-6)
    digits = digits.repeat(1, -(-dim // digits.shape[1]))[:, :dim]
    pick_c = torch.randint(0, len(digits), (codes,), generator=gen)
    codebook = digits[pick_c] + 0.5 * torch.randn(codes, dim, generator=gen)
    if name == "digits":
        pick_x = torch.randint(0, len(digits), (rows,), generator=gen)
        return digits[pick_x] + 0.1 * torch.randn(rows, dim, generator=gen), codebook
    if name == "near-ties":
        codebook = torch.randn(codes, dim, generator=gen)
        dist = torch.cdist(codebook.double(), codebook.double())
        dist.fill_diagonal_(float("inf"))
        nearest = dist.argmin(1)
        pick = torch.randint(0, codes, (rows,), generator=gen)
        mid = (codebook[pick] + codebook[nearest[pick]]) / 2
        towards = (codebook[pick] - codebook[nearest[pick]]) / 2
        delta = 10 ** (torch.rand(rows, 1, generator=gen) * 6 - 8)
        delta[: rows // 2] = 0.0
        return mid + delta * towards, codebook
    raise ValueError(name)


def chain_stats(
    flags: dict[str, torch.Tensor], tokens: dict[str, torch.Tensor], ref: torch.Tensor, chain: tuple[str, ...]
):
    """(% entering each pass after the first, % reaching the exact re-check, wrong tokens)."""
    n = ref.numel()
    entering = torch.ones(n, dtype=torch.bool)
    out = torch.full((n,), -1, dtype=torch.int64)
    shares = {}
    for dot in chain:
        shares[dot] = 100.0 * float(entering.float().mean())
        decided = entering & ~flags[dot]
        out[decided] = tokens[dot][decided]
        entering = entering & flags[dot]
    shares["exact"] = 100.0 * float(entering.float().mean())
    out[entering] = ref[entering]
    return shares, int((out != ref).sum())


def gpu_flags(x: torch.Tensor, codebook: torch.Tensor, size: str, data: str) -> list[str]:
    """The kernel's own flags on CUDA next to the emulated ones, per low-precision pass."""
    from vqdeploy.ops.triton_kernels import nearest_code_pass

    xg, cg = x.cuda(), codebook.cuda()
    norms = squared_norms(cg)
    lines = []
    for dot in ("tf32", "tf32x3"):
        out = torch.empty(x.shape[0], dtype=torch.int64, device="cuda")
        nearest_code_pass(xg, cg, norms, out, dot)
        gpu = (out < 0).cpu()
        emulated = emulate_pass(x, codebook, dot, code_norms=norms.cpu()).flagged
        lines.append(
            f"| {size} | {data} | {dot} | {100 * float(gpu.float().mean()):.3f} | "
            f"{100 * float(emulated.float().mean()):.3f} | {100 * float((gpu == emulated).float().mean()):.3f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=65536)
    parser.add_argument("--tie-rows", type=int, default=8192)
    parser.add_argument("--sizes", default="256x1024,64x4096")
    parser.add_argument("--data", default="random,digits,near-ties")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="8192 rows, 2048 near-tie rows")
    parser.add_argument("--gpu", action="store_true", help="compare with the kernel's flags on CUDA")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.tie_rows = 8192, 2048
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(
        f"# CPU: {cpu_model()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    print(
        f"# rows: {args.rows} (near-ties {args.tie_rows}), seed {args.seed}; times: H100 full passes at N=1M"
    )
    header = "| D x K | data | bound | chain | tf32x3 % | ieee % | exact % | wrong | est. ms |"
    print(header)
    print("|---|---|---|---|---:|---:|---:|---:|---:|")
    gpu_rows: list[str] = []
    for size in args.sizes.split(","):
        dim, codes = (int(v) for v in size.split("x"))
        for data in args.data.split(","):
            rows = args.tie_rows if data == "near-ties" else args.rows
            x, codebook = make_data(data, rows, dim, codes, args.seed)
            ref = nearest_code_reference(x, codebook)
            norms = squared_norms(codebook)
            if args.gpu:
                gpu_rows.extend(gpu_flags(x, codebook, f"{dim}x{codes}", data))
            for bound in BOUNDS:
                flags, tokens = {}, {}
                for dot in ("tf32", "tf32x3", "ieee"):
                    res = emulate_pass(x, codebook, dot, bound=bound, code_norms=norms, track=True)
                    flags[dot], tokens[dot] = res.flagged, res.tokens
                for name, chain in CHAINS.items():
                    shares, wrong = chain_stats(flags, tokens, ref, chain)
                    times = PASS_MS.get((dim, codes))
                    est = sum(shares[d] / 100 * times[d] for d in chain) if times else float("nan")
                    cells = [f"{shares[d]:.3f}" if d in shares else "-" for d in ("tf32x3", "ieee", "exact")]
                    print(
                        f"| {dim}x{codes} | {data} | {bound} | {name} | {' | '.join(cells)} | {wrong} | {est:.2f} |",
                        flush=True,
                    )
    if gpu_rows:
        print("\n| D x K | data | pass | GPU flagged % | emulated flagged % | flags agree % |")
        print("|---|---|---|---:|---:|---:|")
        print("\n".join(gpu_rows))


if __name__ == "__main__":
    main()
