"""One checkout's CPU paths against the op, for comparing two checkouts of vqdeploy on a noisy host.

Prints, per size, the median times of the op (`vqdeploy.ops.nearest_code`) and a full SGEMM
of the shape (`torch.mm` and `numpy.matmul`; "best" is the faster of the two in each round), the runtime's torch backend encode and the eager `VectorQuantize` eval forward, and
the median of per-round ratios: op time / best SGEMM time, runtime torch speed / op, eager speed / op. The
methods are interleaved per round with ``--sleep`` seconds after each call.

Run it with each checkout first on the import path, alternately (old, new, old, new), so that
drift of the host shows up as disagreement between runs of the same checkout:

    PYTHONPATH=/path/to/old python benchmarks/bench_checkouts.py
    PYTHONPATH=/path/to/new python benchmarks/bench_checkouts.py
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import vqdeploy
import vqdeploy.runtime
from vqdeploy.ops import nearest_code

SIZES = ["262144x32x256", "65536x256x1024", "65536x64x4096"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=SIZES, help="N x D x K")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--sleep", type=float, default=0.1)
    args = parser.parse_args()
    print(f"# vqdeploy from {Path(vqdeploy.__file__).parent}, torch {torch.__version__}")
    workdir = Path(tempfile.mkdtemp())
    for size in args.sizes:
        n, d, k = (int(v) for v in size.split("x"))
        torch.manual_seed(0)
        vq = vqdeploy.VectorQuantize(dim=d, codebook_size=k).eval()
        codes = vq._codebook.embed[0].detach().contiguous()
        x = torch.randn(1, n, d, generator=torch.Generator().manual_seed(1))
        path = workdir / f"vq_{size}.onnx"
        vqdeploy.export_onnx(vq, path, part="encode")
        runtime = vqdeploy.runtime.load(path, backend="torch")
        product = torch.empty(n, k)
        x_np, codes_np, product_np = x[0].numpy(), codes.numpy(), product.numpy()

        def eager(vq=vq, x=x):
            with torch.no_grad():
                vq(x)

        methods = {
            "op": lambda x=x, codes=codes: nearest_code(x[0], codes),
            "mm": lambda x=x, codes=codes, product=product: torch.mm(x[0], codes.t(), out=product),
            "matmul": lambda x_np=x_np, codes_np=codes_np, out=product_np: np.matmul(x_np, codes_np.T, out=out),
            "runtime torch": lambda runtime=runtime, x=x: runtime.encode(x.numpy()),
            "eager": eager,
        }
        for call in methods.values():
            call()
        seconds: dict[str, list[float]] = {name: [] for name in methods}
        for _ in range(args.rounds):
            for name, call in methods.items():
                start = time.perf_counter()
                call()
                seconds[name].append(time.perf_counter() - start)
                time.sleep(args.sleep)
        op = seconds["op"]
        best = [min(a, b) for a, b in zip(seconds["mm"], seconds["matmul"], strict=True)]

        def ratio(top: list[float], bottom: list[float]) -> float:
            return statistics.median(a / b for a, b in zip(top, bottom, strict=True))

        medians = ", ".join(f"{name} {statistics.median(v) * 1e3:.1f} ms" for name, v in seconds.items())
        print(f"{size}: {medians}; op / best sgemm {ratio(op, best):.3f}, "
              f"runtime torch vs op {ratio(op, seconds['runtime torch']):.3f}, eager vs op {ratio(op, seconds['eager']):.3f}")
        runtime.close()


if __name__ == "__main__":
    main()
