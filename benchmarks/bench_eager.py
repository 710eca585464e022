"""CPU benchmark of eager quantization: vqdeploy.VectorQuantize vs the reference library (issue 2).

At the CPU sizes of docs/design.md section 5 it times, interleaved and under ``torch.no_grad()``:

- ``reference``: ``vector_quantize_pytorch.VectorQuantize(dim=D, codebook_size=K, rotation_trick=False)``
  eval forward;
- ``vqdeploy``: ``vqdeploy.VectorQuantize.from_vector_quantize_pytorch(reference)`` eval forward
  (same weights);
- ``nearest_code``: the raw op ``vqdeploy.ops.nearest_code(x, codebook)`` (encode only);
- ``faiss``: ``faiss.IndexFlatL2(D).search(x, 1)`` on the same codebook (encode only);

and measures the peak extra memory of one call of each in a fresh process (see `harness`). It
checks that vqdeploy's indices equal the reference's, and classifies any mismatch as a certified
float32 tie or not (docs/design.md section 4, `vqdeploy.ops.contract.certify`).

Run: ``python benchmarks/bench_eager.py [--sizes 65536x256x1024 ...] [--repeats 5] [--quick] [--json out.json]``
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import faiss
import numpy as np
import torch
import vector_quantize_pytorch
from harness import markdown_table, paired_speedup, peak_extra_memory, time_interleaved

import vqdeploy
from vqdeploy.ops.contract import certify
from vqdeploy.ops.custom_op import nearest_code

SIZES: list[tuple[int, int, int]] = [
    (65536, 256, 1024),
    (65536, 64, 4096),
    (16384, 512, 8192),
    (262144, 32, 256),
]
METHODS: dict[str, str] = {
    "reference": "reference VectorQuantize fwd",
    "vqdeploy": "vqdeploy VectorQuantize fwd",
    "nearest_code": "vqdeploy.ops.nearest_code",
    "faiss": "faiss IndexFlatL2.search",
}
QUICK_N = 4096
WARM_ROWS = 64


@dataclass
class Case:
    """Everything one size needs: both modules (same weights), the input and a faiss index."""

    reference: torch.nn.Module
    vqdeploy: torch.nn.Module
    x: torch.Tensor  # (1, N, D)
    codebook: torch.Tensor  # (K, D)
    index: Any  # faiss.IndexFlatL2 holding the codebook


def build_case(n: int, d: int, k: int, seed: int = 0) -> Case:
    """The reference module (seeded init), its vqdeploy conversion, x ~ N(0, 1) and a faiss index."""
    torch.manual_seed(seed)
    reference = vector_quantize_pytorch.VectorQuantize(dim=d, codebook_size=k, rotation_trick=False).eval()
    converted = vqdeploy.VectorQuantize.from_vector_quantize_pytorch(reference).eval()
    x = torch.randn(1, n, d, generator=torch.Generator().manual_seed(seed + 1))
    codebook = converted.codebook.detach().contiguous()
    index = faiss.IndexFlatL2(d)
    index.add(codebook.numpy())
    return Case(reference, converted, x, codebook, index)


def method_calls(case: Case, rows: int | None = None) -> dict[str, Callable[[], Any]]:
    """One zero-argument callable per method, on the first `rows` vectors of x (all by default)."""
    x = case.x if rows is None else case.x[:, :rows]
    x2d = x[0]
    x_np = x2d.numpy()
    return {
        "reference": lambda: case.reference(x),
        "vqdeploy": lambda: case.vqdeploy(x),
        "nearest_code": lambda: nearest_code(x2d, case.codebook),
        "faiss": lambda: case.index.search(x_np, 1),
    }


def indices_of(method: str, result: Any) -> torch.Tensor:
    """Flat int64 indices from a method's result."""
    if method in ("reference", "vqdeploy"):
        return result[1].reshape(-1)
    if method == "faiss":
        return torch.from_numpy(result[1]).reshape(-1)
    return result.reshape(-1)


def memory_factory(
    method: str, n: int, d: int, k: int, seed: int = 0
) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """`harness.peak_extra_memory` factory: (warm-up call on WARM_ROWS vectors, the real call)."""
    case = build_case(n, d, k, seed)
    warm, real = method_calls(case, WARM_ROWS)[method], method_calls(case)[method]
    return torch.no_grad()(warm), torch.no_grad()(real)


def compare_indices(case: Case, ours: torch.Tensor, other: torch.Tensor) -> dict[str, int]:
    """Mismatches between two index vectors, split into certified float32 ties and real differences."""
    rows = (ours != other).nonzero().flatten()
    x_rows = case.x[0][rows]
    a, b = ours[rows], other[rows]
    # A mismatch is a certified tie when both tokens pass the project's one rule (vqdeploy.ops.certify).
    cert_a, cert_b = certify(x_rows, case.codebook, a), certify(x_rows, case.codebook, b)
    certified = int((cert_a.certified & cert_b.certified).sum())
    truth = cert_a.reference
    return {
        "mismatches": int(rows.numel()),
        "certified_ties": certified,
        "not_ties": int(rows.numel()) - certified,
        "ours_is_float64_argmin": int((a == truth).sum()),
        "other_is_float64_argmin": int((b == truth).sum()),
    }


def run_size(n: int, d: int, k: int, repeats: int, warmup: int, memory: bool) -> dict[str, Any]:
    """Time all methods interleaved, check index parity, measure memory; one dict per size."""
    case = build_case(n, d, k)
    with torch.no_grad():
        timings = time_interleaved(method_calls(case), n, repeats=repeats, warmup=warmup, settle_s=0.25)
    ours = indices_of("vqdeploy", timings["vqdeploy"].last_result)
    parity = {
        "vqdeploy_vs_reference": compare_indices(
            case, ours, indices_of("reference", timings["reference"].last_result)
        ),
        "vqdeploy_vs_nearest_code": compare_indices(
            case, ours, indices_of("nearest_code", timings["nearest_code"].last_result)
        ),
        "vqdeploy_vs_faiss": compare_indices(case, ours, indices_of("faiss", timings["faiss"].last_result)),
    }
    for timing in timings.values():
        timing.last_result = None
    del case

    methods = {}
    for name, timing in timings.items():
        methods[name] = {
            "median_s": timing.median_s,
            "seconds": timing.seconds,
            "vectors_per_s": timing.items_per_s,
            "x_reference": paired_speedup(timings["reference"], timing),
            "x_faiss": paired_speedup(timings["faiss"], timing),
        }
        if memory:
            result = peak_extra_memory("bench_eager:memory_factory", method=name, n=n, d=d, k=k)
            methods[name].update(asdict(result))
    return {"size": f"{n}x{d}x{k}", "n": n, "d": d, "k": k, "methods": methods, "parity": parity}


def git_state() -> str:
    """HEAD of the checkout this runs from, plus '+dirty' if vqdeploy/ has uncommitted changes."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, cwd=os.path.dirname(__file__)
        ).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+dirty" if git("status", "--porcelain", "--", "../vqdeploy") else "")


def environment() -> dict[str, Any]:
    """What the figures depend on: CPU, cores, threads, versions, commit, load, time."""
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": model,
        "cpu_count": os.cpu_count(),
        "git": git_state(),
        "torch_threads": torch.get_num_threads(),
        "faiss_omp_threads": faiss.omp_get_max_threads(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "vector_quantize_pytorch": importlib.metadata.version("vector-quantize-pytorch"),
            "faiss": faiss.__version__,
            "numpy": np.__version__,
            "vqdeploy": vqdeploy.__version__,
        },
        "loadavg_start": os.getloadavg(),
    }


def parse_size(text: str) -> tuple[int, int, int]:
    """'65536x256x1024' -> (65536, 256, 1024); a bare 1-based number picks from SIZES."""
    if text.isdigit() and 1 <= int(text) <= len(SIZES):
        return SIZES[int(text) - 1]
    try:
        n, d, k = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"size must be NxDxK (e.g. 65536x256x1024) or 1..{len(SIZES)}, got {text!r}"
        ) from None
    return n, d, k


def report(results: list[dict[str, Any]]) -> str:
    """The throughput/memory table and the index-parity table, in markdown."""
    rows = []
    for res in results:
        for name, m in res["methods"].items():
            rows.append(
                [
                    res["size"],
                    METHODS[name],
                    m["vectors_per_s"],
                    f"{m['x_reference']:.2f}x",
                    f"{m['x_faiss']:.2f}x",
                    m.get("peak_extra_mib"),
                    m.get("output_mib"),
                ]
            )
    table = markdown_table(
        [
            "N x D x K",
            "method",
            "vectors/s",
            "vs reference",
            "vs faiss",
            "peak extra MiB",
            "of which output MiB",
        ],
        rows,
    )
    parity_rows = []
    for res in results:
        for pair, p in res["parity"].items():
            parity_rows.append(
                [
                    res["size"],
                    pair.replace("_vs_", " vs "),
                    p["mismatches"],
                    p["certified_ties"],
                    p["not_ties"],
                    p["ours_is_float64_argmin"],
                    p["other_is_float64_argmin"],
                ]
            )
    parity = markdown_table(
        [
            "N x D x K",
            "indices",
            "mismatches",
            "certified ties",
            "not ties",
            "vqdeploy = f64 argmin",
            "other = f64 argmin",
        ],
        parity_rows,
    )
    return table + "\n\n" + parity


def run_benchmark(
    name: str,
    description: str,
    argv: list[str] | None,
    run_size: Callable[..., dict[str, Any]],
    report: Callable[[list[dict[str, Any]]], str],
    default_repeats: int,
    default_warmup: int,
    warmup_help: str,
) -> tuple[list[dict[str, Any]], Any]:
    """The command line shared by the benchmark scripts: parse, run every size, print, write JSON."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--sizes", nargs="+", type=parse_size, default=SIZES, help="NxDxK or 1..4 (default: all four)"
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help=f"timed repeats per method (default {default_repeats}, quick 2)"
    )
    parser.add_argument("--warmup", type=int, default=default_warmup, help=warmup_help)
    parser.add_argument("--quick", action="store_true", help=f"smoke run: N capped at {QUICK_N}, 2 repeats")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--json", metavar="PATH", help="also write every figure and the environment as JSON")
    args = parser.parse_args(argv)
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else default_repeats)
    sizes = [(min(n, QUICK_N), d, k) if args.quick else (n, d, k) for n, d, k in args.sizes]

    env = environment()
    print(f"# {name}  {env['date']}  {env['cpu']}  cores={env['cpu_count']}  torch threads={env['torch_threads']}")
    print(f"# vqdeploy at {env['git']}  versions: {env['versions']}")
    print(f"# {' '.join(sys.argv)}  repeats={repeats} warmup={args.warmup}  loadavg={env['loadavg_start']}", flush=True)
    results = []
    for n, d, k in sizes:
        results.append(run_size(n, d, k, repeats, args.warmup, memory=not args.no_memory))
        methods = results[-1]["methods"]
        print(f"# {n}x{d}x{k}: " + ", ".join(f"{m} {v['vectors_per_s']:.3g}/s" for m, v in methods.items()), flush=True)
    env["loadavg_end"] = os.getloadavg()
    print(f"# loadavg at end: {env['loadavg_end']}\n")
    print(report(results))
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"environment": env, "repeats": repeats, "warmup": args.warmup, "results": results}, out, indent=2)
    return results, args


def main(argv: list[str] | None = None) -> int:
    run_benchmark("bench_eager", __doc__.split("\n\n")[0], argv, run_size, report, 5, 1, "untimed rounds before the timed ones")
    return 0


if __name__ == "__main__":
    sys.exit(main())
