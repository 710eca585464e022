"""What an eval forward pays beyond the search: the quantized vectors in fresh memory.

An eval ``VectorQuantize`` forward returns the codes of its tokens (N x D float32, 32 MiB at
262144 x 32), gathered into a tensor the caller keeps, so it is new memory on every call; the
nearest-code op returns only N int64 indices. Timed interleaved, at one size (default the D = 32 CPU
size of docs/design.md section 5):

- ``op``: `vqdeploy.ops.nearest_code` (the search alone);
- ``eager``: ``VectorQuantize`` eval forward under ``torch.no_grad()`` (the search, then the gather
  into memory that the output dropped before gave back, `vqdeploy.nn.reused_outputs`);
- ``eager fresh``: the same forward with that reuse off (``VQDEPLOY_REUSE_OUTPUTS=0``): the gather
  into a new tensor from torch's allocator, as before 2026-12-03;
- ``gather fresh``: ``torch.index_select`` of N codes into a new tensor, as the forward does;
- ``gather reused``: the same into a tensor allocated and written before (no new pages);
- ``touch fresh``: a new tensor with one value written per 4 KiB page, no gather: the cost of the
  new pages alone.

    python benchmarks/bench_fresh_output.py
    python benchmarks/bench_fresh_output.py --size 65536x256x1024 --repeats 21
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_eager import environment, parse_size  # noqa: E402
from harness import markdown_table, time_interleaved  # noqa: E402

import vqdeploy  # noqa: E402
from vqdeploy.nn import reused_outputs  # noqa: E402
from vqdeploy.ops import nearest_code  # noqa: E402

PAGE_FLOATS = 1024  # float32 values per 4 KiB page


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=parse_size, default=(262144, 32, 256), help="NxDxK (default 262144x32x256)")
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds (default 15)")
    args = parser.parse_args(argv)
    n, d, k = args.size
    env = environment()
    torch.manual_seed(0)
    vq = vqdeploy.VectorQuantize(dim=d, codebook_size=k).eval()
    x = torch.randn(1, n, d, generator=torch.Generator().manual_seed(1))
    codes = vq._codebook.embed[0].detach().contiguous()
    indices = torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(2))
    reused = torch.zeros(n, d)

    def gather_fresh() -> torch.Tensor:
        return torch.index_select(codes, 0, indices, out=torch.empty(n, d))

    def touch_fresh() -> torch.Tensor:
        out = torch.empty(n, d)
        out.view(-1)[::PAGE_FLOATS].zero_()
        return out

    def eager_fresh():
        os.environ[reused_outputs.ENV_REUSE] = "0"
        try:
            return vq(x)
        finally:
            del os.environ[reused_outputs.ENV_REUSE]

    calls = {
        "op": lambda: nearest_code(x[0], codes),
        "eager": lambda: vq(x),
        "eager fresh": eager_fresh,
        "gather fresh": gather_fresh,
        "gather reused": lambda: torch.index_select(codes, 0, indices, out=reused),
        "touch fresh": touch_fresh,
    }
    with torch.no_grad():
        timings = time_interleaved(calls, n, repeats=args.repeats, warmup=1, settle_s=0.1)
    if not all(torch.equal(timings[name].last_result[1].reshape(-1), timings["op"].last_result)
               for name in ("eager", "eager fresh")):
        print("error: eager and op tokens differ", file=sys.stderr)
        return 1
    print(f"# bench_fresh_output  {env['date']}  {env['cpu']}  cores={env['cpu_count']}  "
          f"torch threads={env['torch_threads']}  vqdeploy at {env['git']}")
    print(f"# {' '.join(sys.argv)}  size={n}x{d}x{k}  repeats={args.repeats}  output {n * d * 4 / 2**20:.0f} MiB\n")
    rows = [[name, f"{t.median_s * 1e3:.1f} ms"] for name, t in timings.items()]
    print(markdown_table(["method", "median"], rows))
    op = timings["op"].seconds
    print()
    for name in ("eager", "eager fresh"):
        eager = timings[name].seconds
        ratios = [a / b for a, b in zip(op, eager, strict=True)]
        extra = [b - a for a, b in zip(op, eager, strict=True)]
        print(f"{name} speed vs op: {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}); "
              f"{name} - op: {statistics.median(extra) * 1e3:.1f} ms a call")
    print(f"a gather into reused memory takes {timings['gather reused'].median_s * 1e3:.1f} ms, new pages alone "
          f"{timings['touch fresh'].median_s * 1e3:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
