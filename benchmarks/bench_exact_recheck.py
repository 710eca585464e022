"""The cost of exact tokens on the CPU: the op with its margin and re-check vs the argmin-only kernel.

At the four CPU sizes of docs/design.md section 5 (x ~ N(0, 1), float32) it times, interleaved:

- ``argmin only``: the op's compiled per-core tile loop (`search_tiles`: the same library, tiles,
  code blocks and worker threads) with a running (min, argmin) per row and no second best or
  re-check test, rebuilt here, so the only difference is what exact tokens add;
- ``exact op``: `vqdeploy.ops.nearest_code` (the same loop keeping the second-best group winner
  and the best's group mates, the re-check test and the candidate lists of near rows in the
  worker, then the exact re-solve of the rows the float32 bound cannot decide).

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
import functools
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
from vqdeploy.ops import cpu_kernels, nearest_code, sgemm_entry  # noqa: E402
from vqdeploy.ops._running_argmin import fold_codes_argmin_only, leading_dimension, tile_gemm  # noqa: E402
from vqdeploy.ops.contract import norm_upper_bound, recheck_rows, squared_norms  # noqa: E402
from vqdeploy.ops.gemm import gemm_choice, numpy_blas_threads  # noqa: E402

SIZES = ["65536x256x1024", "65536x64x4096", "16384x512x8192", "262144x32x256"]


def argmin_only_tiles(gemm, codes, x, norms, out, dots, first, step, stride, code_block):
    """`vqdeploy.ops._running_argmin.search_tiles` without the second best and the re-check test
    (the baseline): the same tiles, code blocks, GEMM calls and tournament (`fold_codes_argmin_only`,
    the op's fold without its second-best group winner), a running (min, argmin) per column."""
    num_codes = codes.shape[0]
    num_rows = x.shape[0]
    best = np.empty(step, np.float32)
    unused = np.empty(step, np.float32)
    best_index = np.empty(step, np.int32)
    for start in range(first, num_rows, stride):
        stop = min(start + step, num_rows)
        width = stop - start
        lead = leading_dimension(width)
        best[:width] = np.inf
        best_index[:width] = 0
        for offset in range(0, num_codes, code_block):
            count = min(code_block, num_codes - offset)
            block = dots[: count * lead].reshape(count, lead)
            tile_gemm(gemm, x[start:stop], codes[offset : offset + count], block)
            fold_codes_argmin_only(block, norms[offset : offset + count], 0, width, offset, best, unused, best_index)
        for r in range(width):
            out[start + r] = best_index[r]


@functools.cache
def _argmin_only_kernel():
    from numba import types

    matrix, count = types.float32[:, ::1], types.int64
    signature = types.void(types.FunctionType(sgemm_entry.signature()), matrix, matrix, types.float32[::1],
                           types.int64[::1], types.float32[::1], count, count, count, count)
    return numba.njit(signature, nogil=True, boundscheck=False)(argmin_only_tiles)


def argmin_only(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """The op before exact tokens: the op's compiled per-core tile loop (same library, tiles, code
    blocks, workers), argmin only, no re-check; float32 C-contiguous x."""
    library = gemm_choice().library
    entry = cpu_kernels.compiled_tile_entry(library)
    if entry is None:
        raise SystemExit(f"the op's compiled tile loop is not available here for {library}; nothing to compare")
    kernel = _argmin_only_kernel()
    num_rows, num_codes = x.shape[0], codebook.shape[0]
    out = np.empty(num_rows, dtype=np.int64)
    codes = codebook.float().contiguous().numpy()
    norms = squared_norms(codebook.float()).numpy()
    threads = cpu_kernels._thread_count()
    step = min(cpu_kernels.PER_CORE_TILE_ROWS, num_rows)
    workers = max(1, min(threads, -(-num_rows // step)))
    code_block = cpu_kernels._code_block(num_codes, step)
    dots = np.empty((workers, code_block * leading_dimension(step)), dtype=np.float32)
    rows = x.numpy()

    def work(worker: int) -> None:
        kernel(entry, codes, rows, norms, out, dots[worker], worker * step, step, workers * step, code_block)

    one_thread = numpy_blas_threads(1) if library == "numpy" else sgemm_entry.mkl_threads_of_this_thread(1)
    with one_thread:
        cpu_kernels._WORKERS.run(work, workers)
    return torch.from_numpy(out)


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
