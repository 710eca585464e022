"""Rows that leave each pass of the GPU ``fast`` mode, emulated on CPU, and the estimated time.

The GPU target sizes, (1M, 256, 1024) and (1M, 64, 4096), with N subsampled (``--rows``, default
65536). For every data set and pass chain, `vqdeploy.ops.pass_emulation.emulate_chain` runs the
chain as the kernel would (each pass recomputes only the rows the previous one could not decide)
and the table gives the % of all rows entering each pass, the % decided from candidate lists, the
% reaching the exact re-check on the host, the rows whose token differs from the exact argmin
(`nearest_code_exact`), and the estimated GPU time.

Chains: ``before`` is the kernel's former ``fast`` (``tf32`` > ``tf32x3`` > ``ieee`` > exact
re-check, residual bound) and its former bound (``legacy``); ``after`` candidates start with a
``bf16`` pass, some with candidate lists of L codes in every pass (``[L]``; docs/design.md
section 10). ``after: bf16[3] ...`` is what the kernel's ``fast`` now runs.

Time model (ms at N = 1,048,576; every figure an assumption, stated in the output):
* full passes of the baseline fused kernel on an H100 (measured 2026-11-26): tf32 2.85, tf32x3
  7.9, ieee 26.6 at (256, 1024); 4.0, 9.0, 28.3 at (64, 4096);
* a fused ``bf16`` pass: not measured. ``additive`` (the default): the bf16 GEMM (1.2 ms) plus
  the fused tf32 pass's overhead over the TF32 GEMM (2.85 - 2.2 ms), i.e. 1.85 ms; at (64, 4096),
  where no GEMM was timed, the same GEMM times (same FLOPs): 1.2 + (4.0 - 2.2) = 3.0 ms.
  ``proportional``: the fused tf32 pass times 1.2 / 2.2 (1.55 ms, 2.18 ms);
* a pass over a share f of the rows (gathered) costs f times a full pass;
* deciding a row from its list of L candidates reads the row and L codes (D floats each) at HBM
  bandwidth, 3.35 TB/s, with nothing cached (the codes are in fact L2-resident);
* left out: the cost of the flag and candidate tracking inside a pass (unmeasured: the baseline
  kept only the running argmin), the exact re-check on the host, and per-call launches.

Data: ``random`` (x, codes ~ N(0, 1)), ``digits`` (scikit-learn's 8x8 digits, standardised,
columns tiled to D; codes = digits + N(0, 0.5^2), rows = digits + N(0, 0.1^2)),
``digits-kmeans`` (the same rows; codes = scikit-learn k-means centroids of 16384 such rows),
``near-ties`` (midpoints between every code and its nearest neighbour, half exact, half moved
towards one code by a relative 10^-8..10^-2).

Usage: ``python benchmarks/bench_pass_bounds.py [--rows 65536] [--sizes 256x1024,64x4096]``
(about an hour on 2 loaded cores at the defaults, most of it scikit-learn's k-means with
4096 clusters for ``digits-kmeans`` at 64x4096; ``--quick`` for 8192 rows). ``--gpu`` (needs CUDA and
Triton) adds, per size and data set, the share of rows the real kernel's ``bf16``, ``tf32`` and
``tf32x3`` passes flag and list (lists of 3) next to the emulated shares, and the % of rows on
which the flags and the listings agree (not 100% by construction: the tensor cores sum in
another order than the CPU).
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

from vqdeploy.ops.contract import nearest_code_exact, squared_norms  # noqa: E402
from vqdeploy.ops.pass_emulation import emulate_chain, emulate_pass  # noqa: E402

# H100 full-pass times (ms) of the baseline fused kernel at N = 1,048,576 (measured 2026-11-26).
PASS_MS = {
    (256, 1024): {"tf32": 2.85, "tf32x3": 7.9, "ieee": 26.6},
    (64, 4096): {"tf32": 4.0, "tf32x3": 9.0, "ieee": 28.3},
}
GEMM_MS = {"tf32": 2.2, "bf16": 1.2}  # cuBLAS GEMM alone at (1M, 256, 1024), H100
HBM_BYTES_PER_MS = 3.35e9  # H100 SXM HBM3, 3.35 TB/s
N_GPU = 1_048_576


def bf16_pass_ms(size: tuple[int, int], model: str) -> float:
    """Estimated fused bf16 pass (module docstring): additive or proportional to the GEMM times."""
    tf32 = PASS_MS[size]["tf32"]
    if model == "additive":
        return GEMM_MS["bf16"] + (tf32 - GEMM_MS["tf32"])
    return tf32 * GEMM_MS["bf16"] / GEMM_MS["tf32"]


# name -> (bound, chain, candidates L)
CHAINS = {
    "before (legacy): tf32 > tf32x3 > ieee": ("legacy", ("tf32", "tf32x3", "ieee"), 0),
    "before: tf32 > tf32x3 > ieee": ("residual", ("tf32", "tf32x3", "ieee"), 0),
    "tf32[4] > tf32x3 > ieee": ("residual", ("tf32", "tf32x3", "ieee"), 4),
    "bf16 > tf32 > tf32x3 > ieee": ("residual", ("bf16", "tf32", "tf32x3", "ieee"), 0),
    "bf16[2] > tf32[2] > tf32x3 > ieee": ("residual", ("bf16", "tf32", "tf32x3", "ieee"), 2),
    "after: bf16[3] > tf32[3] > tf32x3 > ieee": ("residual", ("bf16", "tf32", "tf32x3", "ieee"), 3),
    "bf16[4] > tf32[4] > tf32x3 > ieee": ("residual", ("bf16", "tf32", "tf32x3", "ieee"), 4),
    "bf16[8] > tf32[8] > tf32x3 > ieee": ("residual", ("bf16", "tf32", "tf32x3", "ieee"), 8),
}
PASSES = ("bf16", "tf32", "tf32x3", "ieee")


def estimate_ms(
    shares: dict[str, float], size: tuple[int, int], width: int, dim: int, model: str = "additive"
) -> float:
    """Estimated fast time (ms at N = 1M) from the % of rows entering each pass (module docstring)."""
    times = dict(PASS_MS[size], bf16=bf16_pass_ms(size, model))
    total = sum(shares.get(d, 0.0) / 100 * times[d] for d in PASSES)
    listed_rows = shares.get("candidates", 0.0) / 100 * N_GPU
    return total + listed_rows * (1 + width) * dim * 4 / HBM_BYTES_PER_MS


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
    if name == "digits-kmeans":
        from sklearn.cluster import KMeans

        def noisy(n: int) -> torch.Tensor:
            pick = torch.randint(0, len(digits), (n,), generator=gen)
            return digits[pick] + 0.1 * torch.randn(n, dim, generator=gen)

        train = noisy(max(16384, 4 * codes))
        km = KMeans(n_clusters=codes, n_init=1, max_iter=20, random_state=seed).fit(train.numpy())
        return noisy(rows), torch.from_numpy(km.cluster_centers_.astype(np.float32))
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


def gpu_flags(x: torch.Tensor, codebook: torch.Tensor, size: str, data: str) -> list[str]:
    """The kernel's own flags on CUDA next to the emulated ones, per low-precision pass."""
    from vqdeploy.ops.triton_kernels import nearest_code_pass

    xg, cg = x.cuda(), codebook.cuda()
    norms = squared_norms(cg)
    lines = []

    def pct(mask: torch.Tensor) -> str:
        return f"{100 * float(mask.float().mean()):.3f}"

    for dot in ("bf16", "tf32", "tf32x3"):
        out = torch.empty(x.shape[0], dtype=torch.int64, device="cuda")
        cand = nearest_code_pass(xg, cg, norms, out, dot, candidates=3)
        gpu, gpu_listed = (out < 0).cpu(), (cand[:, 0] >= 0).cpu()
        emulated = emulate_pass(x, codebook, dot, code_norms=norms.cpu(), candidates=3)
        lines.append(
            f"| {size} | {data} | {dot} | {pct(gpu)} | {pct(emulated.flagged)} | {pct(gpu == emulated.flagged)} | "
            f"{pct(gpu_listed)} | {pct(emulated.listed)} | {pct(gpu_listed == emulated.listed)} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=65536)
    parser.add_argument("--tie-rows", type=int, default=8192)
    parser.add_argument("--sizes", default="256x1024,64x4096")
    parser.add_argument("--data", default="random,digits,digits-kmeans,near-ties")
    parser.add_argument("--chains", default=None, help="comma-separated names of CHAINS (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="8192 rows, 2048 near-tie rows")
    parser.add_argument("--gpu", action="store_true", help="compare with the kernel's flags on CUDA")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.tie_rows = 8192, 2048
    chains = CHAINS if args.chains is None else {k: CHAINS[k] for k in args.chains.split(",")}
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(
        f"# CPU: {cpu_model()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    print(f"# rows: {args.rows} (near-ties {args.tie_rows}), seed {args.seed}; times: ms at N=1M, H100")
    for size in PASS_MS:
        print(
            f"# {size[0]}x{size[1]}: full passes {PASS_MS[size]}, fused bf16 estimated "
            f"{bf16_pass_ms(size, 'additive'):.2f} (additive) / {bf16_pass_ms(size, 'proportional'):.2f} "
            "(proportional); candidate lists at 3.35 TB/s; tracking cost, exact re-check left out"
        )
    header = (
        "| D x K | data | chain | 2nd pass % | 3rd % | 4th % | lists % | exact % | wrong | est. ms | est. ms (prop.) |"
    )
    print(header)
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    gpu_rows: list[str] = []
    for size in args.sizes.split(","):
        dim, codes = (int(v) for v in size.split("x"))
        for data in args.data.split(","):
            rows = args.tie_rows if data == "near-ties" else args.rows
            x, codebook = make_data(data, rows, dim, codes, args.seed)
            ref = nearest_code_exact(x, codebook)
            if args.gpu:
                gpu_rows.extend(gpu_flags(x, codebook, f"{dim}x{codes}", data))
            for name, (bound, chain, width) in chains.items():
                res = emulate_chain(x, codebook, chain, bound=bound, candidates=width)
                shares = {k: 100.0 * v / res.rows for k, v in res.entered.items()}
                wrong = int((res.tokens != ref).sum())
                cells = [f"{shares[d]:.3f}" for d in chain[1:]] + ["-"] * (4 - len(chain))
                cells += [f"{shares['candidates']:.3f}" if width else "-", f"{shares['exact']:.3f}"]
                est = [
                    f"{estimate_ms(shares, (dim, codes), width, dim, m):.2f}" if (dim, codes) in PASS_MS else "-"
                    for m in ("additive", "proportional")
                ]
                print(f"| {dim}x{codes} | {data} | {name} | {' | '.join(cells)} | {wrong} | {' | '.join(est)} |", flush=True)
    if gpu_rows:
        print(
            "\n| D x K | data | pass | GPU flagged % | emulated flagged % | flags agree % "
            "| GPU listed % | emulated listed % | listings agree % |"
        )
        print("|---|---|---|---:|---:|---:|---:|---:|---:|")
        print("\n".join(gpu_rows))


if __name__ == "__main__":
    main()
