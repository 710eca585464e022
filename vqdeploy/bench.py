"""Throughput of an export on each backend, against eager PyTorch and faiss (what `vqdeploy bench` prints).

Every figure is the best wall time of `repeats` calls after one warm-up call, on the same random
input; ratios are only meaningful within one run (the machine may be shared).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Timing:
    """One row of a bench: who ran what, and the best time of one call on `tokens` vectors."""

    name: str
    device: str
    call: str
    seconds: float
    tokens: int

    @property
    def vectors_per_second(self) -> float:
        return self.tokens / self.seconds


def best_seconds(fn: Callable[[], Any], repeats: int, tick: Callable[[], None] | None = None) -> float:
    """Best wall time of `repeats` calls after one warm-up call."""
    fn()
    best = math.inf
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
        if tick is not None:
            tick()
    return best


def bench_input(info, tokens: int, seed: int = 0):
    """Random input of `tokens` tokens in the layout the export's part takes (batch 1)."""
    import torch

    from vqdeploy.spec import QuantizerSpec

    spec = QuantizerSpec.from_info(info)
    generator = torch.Generator().manual_seed(seed)
    if info.part == "decode":
        return torch.randint(0, info.codebook_size, spec.indices_shape(1, tokens), generator=generator)
    return torch.randn(spec.input_shape(1, tokens), generator=generator)


def eager_call(module, part: str) -> Callable[[Any], Any]:
    """The eager module's call for an export part (decode: get_output_from_indices)."""
    import torch

    def run(x):
        with torch.inference_mode():
            return module.get_output_from_indices(x) if part == "decode" else module(x)

    return run


def searched_codebooks(module) -> list[Any]:
    """Every codebook (K, d) a forward searches once per token: stages, or separate heads."""
    from vqdeploy.nn import ResidualVQ

    if isinstance(module, ResidualVQ):
        return [layer.codebook.detach() for layer in module.layers]
    codebook = module.codebook.detach()
    return list(codebook) if codebook.ndim == 3 else [codebook] * module.heads


def faiss_seconds(module, tokens: int, repeats: int) -> float | None:
    """Best time of faiss.IndexFlatL2(d).search(rows, 1) over every codebook search of `tokens` tokens
    (None without faiss)."""
    try:
        import faiss
    except ImportError:
        return None
    import numpy as np

    searches = []
    rng = np.random.default_rng(0)
    for codebook in searched_codebooks(module):
        codes = np.ascontiguousarray(codebook.float().numpy())
        index = faiss.IndexFlatL2(codes.shape[1])
        index.add(codes)
        rows = (rng.standard_normal((tokens, codes.shape[1])) * float(codes.std() or 1.0)).astype(np.float32)
        searches.append((index, rows))
    return best_seconds(lambda: [index.search(rows, 1) for index, rows in searches], repeats)


def quantizer_from_file(path: Path, info):
    """The eager module an export's weights describe (for faiss's codebooks when no checkpoint is given)."""
    import onnx

    from vqdeploy.runtime.torch_backend import rebuild_quantizer

    return rebuild_quantizer(onnx.load(str(path)), info)


def bench_export(path: Path, info, backends: Sequence[str], *, device: str = "cpu", precision: str = "exact",
                 tokens: int = 65536, repeats: int = 3, module=None,
                 tick: Callable[[], None] | None = None, status: Callable[[str], None] | None = None) -> list[Timing]:
    """Time each backend on one random input, then eager (when `module` is given) and faiss.

    `tick` is called after every call (a progress bar), `status` with what runs now.
    """
    import torch

    from vqdeploy import runtime

    x = bench_input(info, tokens)
    method = "decode" if info.part == "decode" else "encode"
    timings: list[Timing] = []
    for name in backends:
        if status is not None:
            status(name)
        with runtime.load(path, backend=name, device=device, precision=precision) as quantizer:
            feed = x.to(device)
            run = getattr(quantizer, method)
            seconds = best_seconds(lambda run=run, feed=feed: run(feed), repeats, tick)
        timings.append(Timing(name, device, method, seconds, tokens))
    if module is not None:
        if status is not None:
            status("eager")
        module = module.to(device).eval()
        eager = eager_call(module, info.part)
        feed = x.to(device)
        seconds = best_seconds(lambda: eager(feed), repeats, tick)
        timings.append(Timing("eager torch", device, "forward" if info.part != "decode" else "decode", seconds, tokens))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    if info.part != "decode":
        reference = module if module is not None else quantizer_from_file(path, info)
        seconds = faiss_seconds(reference, tokens, repeats)
        if seconds is not None:
            timings.append(Timing("faiss IndexFlatL2", "cpu", "search(x, 1)", seconds, tokens))
    return timings
