"""GPU check of the fused nearest-code kernel: timings, memory and token parity on one CUDA device.

For each size (default: N=1,048,576 x D=256 x K=1,024 and 1,048,576 x 64 x 4,096, docs/design.md
section 5) it measures, side by side in one process:

* vqdeploy ``exact`` and ``fast`` (`vqdeploy.ops.triton_kernels.nearest_code_triton`),
* ``torch.cdist`` + ``argmin``,
* the reference library's eval forward (``vector_quantize_pytorch``, where importable),
* float32 and TF32 GEMM floors (``x @ c.T`` alone, the arithmetic a non-fused path must do),
* ONNX Runtime's CUDA EP on the unfused MatMul + Add + ArgMin graph with TF32 off and on
  (where ``onnxruntime-gpu`` is importable),

and reports the median of CUDA-event timings (ms), the peak extra GPU memory (growth of
``torch.cuda.max_memory_allocated`` beyond inputs and the returned output; ONNX Runtime's arena is
measured with ``cudaMemGetInfo`` instead) and the % of tokens equal to the float64 argmin. Results
go to ``$OUT/gpu_check.json`` when ``OUT`` is set. Without CUDA it exits with status 2 and says so.

Usage (repository root): ``python benchmarks/gpu_check.py [--sizes 1048576x256x1024,...]``;
``benchmarks/gpu_check.sh`` runs the GPU tests first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install

MIB = 2**20
DEFAULT_SIZES = ((1_048_576, 256, 1024), (1_048_576, 64, 4096))


@dataclass
class Result:
    """One method at one size."""

    method: str
    ms: float | None = None
    extra_mib: float | None = None
    tokens_equal_pct: float | None = None
    note: str = ""
    timings_ms: list[float] = field(default_factory=list)


# -- helpers that need no GPU -------------------------------------------------------------------


def parse_sizes(text: str) -> list[tuple[int, int, int]]:
    """'1048576x256x1024,4096x64x512' -> [(1048576, 256, 1024), (4096, 64, 512)] as (N, D, K)."""
    sizes = []
    for item in text.split(","):
        parts = item.lower().strip().split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"a size is NxDxK with positive integers, got {item!r}")
        sizes.append((int(parts[0]), int(parts[1]), int(parts[2])))
    return sizes


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def tokens_equal_pct(tokens: Any, reference: torch.Tensor) -> float:
    """% of tokens equal to the reference (any array-like of indices)."""
    got = torch.as_tensor(np.asarray(tokens) if not isinstance(tokens, torch.Tensor) else tokens)
    got = got.to(reference.device).reshape(-1).long()
    return 100.0 * float((got == reference).float().mean())


def format_table(size: tuple[int, int, int], results: list[Result]) -> str:
    """A markdown table of one size's results."""
    n, d, k = size
    lines = [
        f"N={n:,} D={d} K={k}",
        "| method | ms | extra GPU MiB | tokens = float64 argmin | note |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        ms = "-" if r.ms is None else f"{r.ms:.2f}"
        mem = "-" if r.extra_mib is None else f"{r.extra_mib:.0f}"
        pct = "-" if r.tokens_equal_pct is None else f"{r.tokens_equal_pct:.4f}%"
        lines.append(f"| {r.method} | {ms} | {mem} | {pct} | {r.note} |")
    return "\n".join(lines)


def unfused_onnx_model(codebook: np.ndarray) -> bytes:
    """The unfused encode graph vqdeploy itself exports for a VectorQuantize holding `codebook`
    (x[1, N, D] -> indices[1, N]), as bytes: the graph the package ships, not one built here."""
    import tempfile
    from pathlib import Path

    from vqdeploy import VectorQuantize, export_onnx

    k, d = codebook.shape
    vq = VectorQuantize(dim=d, codebook_size=k).eval()
    state = vq.state_dict()
    state["_codebook.embed"] = torch.from_numpy(codebook.astype(np.float32))[None]
    vq.load_state_dict(state)
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(vq, Path(tmp) / "encode_unfused.onnx", part="encode", fused=False)
        return path.read_bytes()


# -- GPU measurement ----------------------------------------------------------------------------


def time_cuda(call: Callable[[], Any], repeats: int, warmup: int = 2) -> tuple[list[float], Any]:
    """CUDA-event milliseconds of `repeats` calls after `warmup` calls; returns (times, last result)."""
    result = None
    for _ in range(warmup):
        result = call()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        del result
        start.record()
        result = call()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return times, result


def peak_extra_mib(call: Callable[[], Any]) -> tuple[float, Any]:
    """Growth of torch's peak allocation during one call, minus the returned tensor's bytes."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = call()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    out_bytes = result.numel() * result.element_size() if isinstance(result, torch.Tensor) else 0
    return max(0, peak - out_bytes) / MIB, result


def measure(
    name: str,
    call: Callable[[], Any],
    reference: torch.Tensor,
    repeats: int,
    tokens: Callable[[Any], Any] | None,
) -> Result:
    """Memory first (one call), then timings; token parity of the last result when `tokens` is given."""
    res = Result(name)
    try:
        res.extra_mib, out = peak_extra_mib(call)
        del out
        res.timings_ms, out = time_cuda(call, repeats)
        res.ms = median(res.timings_ms)
        if tokens is not None:
            res.tokens_equal_pct = tokens_equal_pct(tokens(out), reference)
        del out
    except torch.cuda.OutOfMemoryError:
        res.note = "out of GPU memory"
    except Exception as exc:  # a failing baseline must not hide the others
        res.note = f"{type(exc).__name__}: {str(exc)[:120]}"
    torch.cuda.empty_cache()
    return res


def reference_library_forward(codebook: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The reference library's eval forward with our codebook, or None when it is not installed."""
    try:
        from vector_quantize_pytorch import VectorQuantize
    except ImportError:
        return None
    k, d = codebook.shape
    vq = VectorQuantize(dim=d, codebook_size=k).cuda().eval()
    with torch.no_grad():
        vq._codebook.embed.copy_(codebook[None])

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            _, indices, _ = vq(x[None])
        return indices[0]

    return forward


def onnxruntime_cuda(
    codebook: torch.Tensor, use_tf32: bool
) -> tuple[Callable[[torch.Tensor], Any], Callable[[], int]] | None:
    """(run, arena bytes) for ORT's CUDA EP on the unfused graph; None without onnxruntime-gpu."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return None
    model = unfused_onnx_model(codebook.cpu().numpy())
    device_id = codebook.device.index or 0
    providers = [("CUDAExecutionProvider", {"device_id": device_id, "use_tf32": int(use_tf32)})]
    session = ort.InferenceSession(model, providers=providers)

    def run(x: torch.Tensor) -> Any:
        binding = session.io_binding()
        binding.bind_input("x", "cuda", device_id, np.float32, (1, *x.shape), x.data_ptr())
        binding.bind_output("indices", "cuda", device_id)
        session.run_with_iobinding(binding)
        return binding.get_outputs()[0]

    def used_bytes() -> int:
        free, total = torch.cuda.mem_get_info()
        return total - free

    return run, used_bytes


def check_size(
    size: tuple[int, int, int], repeats: int, seed: int = 0
) -> tuple[list[Result], dict[str, Any]]:
    """Every method at one size; also whether fast == exact and whether exact's ties are certified."""
    from vqdeploy.ops.contract import certify, nearest_code_reference
    from vqdeploy.ops.triton_kernels import nearest_code_triton

    n, d, k = size
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(n, d, device="cuda", generator=gen)
    codebook = torch.randn(k, d, device="cuda", generator=gen)
    reference = nearest_code_reference(x, codebook)
    results: list[Result] = []
    extra: dict[str, Any] = {}

    def as_tokens(t: Any) -> Any:
        return t

    results.append(
        measure(
            "vqdeploy exact", lambda: nearest_code_triton(x, codebook, "exact"), reference, repeats, as_tokens
        )
    )
    results.append(
        measure(
            "vqdeploy fast", lambda: nearest_code_triton(x, codebook, "fast"), reference, repeats, as_tokens
        )
    )
    exact = nearest_code_triton(x, codebook, "exact")
    fast = nearest_code_triton(x, codebook, "fast")
    uncertified = int((~certify(x, codebook, exact).certified).sum())
    extra.update(fast_equals_exact=bool(torch.equal(fast, exact)), exact_uncertified_tokens=uncertified)
    del exact, fast

    results.append(
        measure(
            "torch.cdist + argmin",
            lambda: torch.cdist(x, codebook).argmin(dim=1),
            reference,
            repeats,
            as_tokens,
        )
    )
    forward = reference_library_forward(codebook)
    if forward is None:
        results.append(Result("reference library eval", note="vector_quantize_pytorch not installed"))
    else:
        results.append(measure("reference library eval", lambda: forward(x), reference, repeats, as_tokens))
    previous_tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        results.append(measure("float32 GEMM floor", lambda: x @ codebook.T, reference, repeats, None))
        torch.backends.cuda.matmul.allow_tf32 = True
        results.append(measure("TF32 GEMM floor", lambda: x @ codebook.T, reference, repeats, None))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous_tf32

    for use_tf32 in (False, True):
        name = f"ONNX Runtime CUDA EP, unfused, TF32 {'on' if use_tf32 else 'off'}"
        try:
            ort_run = onnxruntime_cuda(codebook, use_tf32)
        except Exception as exc:
            results.append(Result(name, note=f"{type(exc).__name__}: {str(exc)[:120]}"))
            continue
        if ort_run is None:
            results.append(Result(name, note="onnxruntime-gpu (CUDA EP) not available"))
            continue
        run, used_bytes = ort_run
        torch.cuda.synchronize()
        before = used_bytes()
        res = measure(name, lambda run=run: run(x), reference, repeats, lambda v: v.numpy().reshape(-1))
        res.extra_mib = None if res.ms is None else max(0, used_bytes() - before) / MIB
        res.note = (res.note + " memory: cudaMemGetInfo growth (arena)").strip()
        results.append(res)
    return results, extra  # the caller empties the cache once these tensors are gone


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join("x".join(map(str, s)) for s in DEFAULT_SIZES))
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    sizes = parse_sizes(args.sizes)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; this check needs an NVIDIA GPU (nothing was measured).")
        return 2
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("gpu_check: TRITON_INTERPRET=1 is set; unset it to measure the compiled kernel.")
        return 2
    started = time.time()
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "sizes": [],
    }
    ok = True
    tables = []
    for size in sizes:
        results, extra = check_size(size, args.repeats)
        torch.cuda.empty_cache()
        ok = ok and extra["fast_equals_exact"] and extra["exact_uncertified_tokens"] == 0
        tables.append(
            format_table(size, results) + f"\nfast == exact: {extra['fast_equals_exact']}, "
            f"exact tokens not certified: {extra['exact_uncertified_tokens']}"
        )
        report["sizes"].append({"size": size, "results": [asdict(r) for r in results], **extra})
    report["seconds"] = round(time.time() - started, 1)
    out_dir = os.environ.get("OUT")
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "gpu_check.json").write_text(json.dumps(report, indent=1))
    print(
        f"device: {report['device']}, torch {report['torch']}, triton {report['triton']}, {report['seconds']} s"
    )
    print("\n\n".join(tables))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
