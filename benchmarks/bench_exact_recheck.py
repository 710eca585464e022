"""The cost of exact tokens on the CPU: the op with its margin and re-check vs the argmin-only kernel.

At the four CPU sizes of docs/design.md section 5 (x ~ N(0, 1), float32) it times, interleaved:

- ``argmin only``: the compiled CPU search as it was before exact tokens (GEMM per tile, then a
  running (min, argmin) per row with no second best), rebuilt here from the same loop minus the
  margin, so the only difference is what exact tokens add;
- ``exact op``: `vqdeploy.ops.nearest_code` (the same GEMM tiles, a running best and second best,
  then `resolve_near_ties_` on the rows the float32 bound cannot decide).

- ``ort argmin`` / ``ort exact``: the runtime's ONNX Runtime backend on an encode export, with
  ``recheck=False`` (the file's ArgMin body) and with the default re-check body (TopK(2) margin,
  in-graph threshold, flagged tokens re-solved through the torch path).

It prints the median time of each, the median of per-round ratios with its spread, how many rows
were re-solved, and how many tokens changed (those rows, where the argmin-only search was wrong or
broke a tie another way).

    python benchmarks/bench_exact_recheck.py               # 15 rounds at the four sizes
    python benchmarks/bench_exact_recheck.py --repeats 5 --sizes 262144x32x256
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numba
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import markdown_table, time_interleaved  # noqa: E402

from vqdeploy import VectorQuantize, export_onnx, runtime  # noqa: E402
from vqdeploy.ops import cpu_kernels, nearest_code  # noqa: E402
from vqdeploy.ops.contract import norm_upper_bound, recheck_rows, rows_per_block, squared_norms
from vqdeploy.ops.gemm import tile_product

SIZES = ["65536x256x1024", "65536x64x4096", "16384x512x8192", "262144x32x256"]


def argmin_only_loop(dots, norms, out, num_chunks):
    """The running argmin of `vqdeploy.ops._running_argmin` without the second best (baseline); dots
    hold -2 x.c, as the op's tiles do."""
    num_codes, num_columns = dots.shape
    step = ((num_columns + num_chunks - 1) // num_chunks + 15) // 16 * 16
    for chunk in numba.prange(num_chunks):
        first = chunk * step
        last = min(num_columns, first + step)
        width = last - first
        if width <= 0:
            continue
        best = np.empty(width, np.float32)
        best_index = np.zeros(width, np.int32)
        row = dots[0, first:last]
        for r in range(width):
            best[r] = norms[0] + row[r]
        k = 1
        while k + 4 <= num_codes:
            k0, k1, k2, k3 = np.int32(k), np.int32(k + 1), np.int32(k + 2), np.int32(k + 3)
            n0, n1, n2, n3 = norms[k], norms[k + 1], norms[k + 2], norms[k + 3]
            row0, row1, row2, row3 = dots[k, first:last], dots[k + 1, first:last], dots[k + 2, first:last], dots[k + 3, first:last]
            for r in range(width):
                s0, s1, s2, s3 = n0 + row0[r], n1 + row1[r], n2 + row2[r], n3 + row3[r]
                lower = s1 < s0
                s01 = s1 if lower else s0
                i01 = k1 if lower else k0
                lower = s3 < s2
                s23 = s3 if lower else s2
                i23 = k3 if lower else k2
                lower = s23 < s01
                score = s23 if lower else s01
                index = i23 if lower else i01
                lower = score < best[r]
                best[r] = score if lower else best[r]
                best_index[r] = index if lower else best_index[r]
            k += 4
        while k < num_codes:
            row = dots[k, first:last]
            for r in range(width):
                score = norms[k] + row[r]
                lower = score < best[r]
                best[r] = score if lower else best[r]
                best_index[r] = np.int32(k) if lower else best_index[r]
            k += 1
        for r in range(width):
            out[first + r] = best_index[r]


_ARGMIN_ONLY = numba.njit("void(float32[:, ::1], float32[::1], int64[::1], int64)", parallel=True, nogil=True)(
    argmin_only_loop
)


def argmin_only(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """The pre-exact CPU op: same tiles and GEMM, argmin only, no re-check."""
    num_rows, num_codes = x.shape[0], codebook.shape[0]
    out = torch.empty(num_rows, dtype=torch.int64)
    codes = codebook.float().contiguous()
    norms = squared_norms(codes).numpy()
    step = min(rows_per_block(num_codes), num_rows)
    block = torch.from_numpy(np.empty(num_codes * step, np.float32))
    threads = cpu_kernels._thread_count()
    for start in range(0, num_rows, step):
        stop = min(start + step, num_rows)
        width = stop - start
        dots = block[: num_codes * width].view(num_codes, width)
        tile_product("torch", codes, x[start:stop], dots, alpha=-2.0)
        _ARGMIN_ONLY(dots.numpy(), norms, out.numpy()[start:stop], max(1, min(threads, width // 256)))
    return out


def rechecked_rows(x: torch.Tensor, codebook: torch.Tensor) -> int:
    """How many rows the op re-solves (the float32 blocked search's margins, same bound)."""
    from vqdeploy.ops.contract import nearest_code_blocked_with_margin

    indices, margin, x_norm = nearest_code_blocked_with_margin(x, codebook)
    return int(recheck_rows(x.shape[1], indices, margin, x_norm, norm_upper_bound(codebook)).numel())


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=SIZES, help="NxDxK")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    print(f"CPU: {cpu_model()}, torch threads {torch.get_num_threads()}, torch {torch.__version__}")
    rows = []
    for size in args.sizes:
        n, d, k = (int(v) for v in size.split("x"))
        generator = torch.Generator().manual_seed(0)
        x, codebook = torch.randn(n, d, generator=generator), torch.randn(k, d, generator=generator)
        vq = VectorQuantize(dim=d, codebook_size=k).eval()
        with torch.no_grad():
            vq._codebook.embed[0].copy_(codebook)
        path = export_onnx(vq, Path(tempfile.mkdtemp()) / "vq.onnx", part="encode")
        plain = runtime.load(path, backend="ort", recheck=False, allow_spinning=False)
        exact = runtime.load(path, backend="ort", allow_spinning=False)
        calls = {
            "argmin only": lambda x=x, codebook=codebook: argmin_only(x, codebook),
            "exact op": lambda x=x, codebook=codebook: nearest_code(x, codebook),
            "ort argmin": lambda x=x, q=plain: q.encode(x[None])[0],
            "ort exact": lambda x=x, q=exact: q.encode(x[None])[0],
        }
        timings = time_interleaved(calls, n, repeats=args.repeats, warmup=1, settle_s=0.25)
        solved = rechecked_rows(x, codebook)
        for base, cand in (("argmin only", "exact op"), ("ort argmin", "ort exact")):
            ratios = sorted(e / b for b, e in zip(timings[base].seconds, timings[cand].seconds, strict=True))
            changed = int((timings[base].last_result != timings[cand].last_result).sum())
            rows.append([
                size, f"{base} -> {cand}",
                f"{statistics.median(timings[base].seconds) * 1e3:.1f}",
                f"{statistics.median(timings[cand].seconds) * 1e3:.1f}",
                f"{statistics.median(ratios):.3f} ({ratios[0]:.3f}-{ratios[-1]:.3f})",
                f"{solved} ({100 * solved / n:.3f}%)",
                str(changed),
            ])
            print(rows[-1], flush=True)
        plain.close()
        exact.close()
    print()
    print(markdown_table(
        ["N x D x K", "path", "without ms", "exact ms", "time ratio exact / without (spread)",
         "rows re-solved (float32 bound)", "tokens changed"], rows))


if __name__ == "__main__":
    main()
