"""What synced codebooks cost per training step: W gloo ranks on this machine, synced vs not.

    python benchmarks/bench_ddp_sync.py                       # 2 ranks, the default sizes
    python benchmarks/bench_ddp_sync.py --world 2 --rows 8192 --dim 64 --codebook-size 1024 --steps 30

Every rank holds one module per mode (sync_codebook=False: each rank its own codebook, the cost
of DDP's broadcast left out; sync_codebook=None: synced) and the steps alternate between them, so
both modes see the same load. Prints the median ms per training forward of each mode, the median
of the per-step ratios, and the values all-reduced per step.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vqdeploy import VectorQuantize


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--rows", type=int, default=8192, help="vectors per rank and step")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--codebook-size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    return parser.parse_args()


def _worker(rank: int, args: argparse.Namespace, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=args.world, timeout=timedelta(seconds=120))
    results = {}
    for dead_codes in (0.0, 2.0):
        modes = {
            mode: VectorQuantize(dim=args.dim, codebook_size=args.codebook_size, sync_codebook=sync,
                                 threshold_ema_dead_code=dead_codes).train()
            for mode, sync in (("per-rank", False), ("synced", None))
        }
        times = {mode: [] for mode in modes}
        generator = torch.Generator().manual_seed(rank)
        for step in range(args.steps + 2):
            x = torch.randn(1, args.rows, args.dim, generator=generator)
            for mode, module in modes.items():
                dist.barrier()  # both modes start their step together on every rank
                start = time.perf_counter()
                module(x)
                if step >= 2:  # the first steps broadcast rank 0's state
                    times[mode].append(time.perf_counter() - start)
        results[dead_codes] = times
    if rank == 0:
        queue.put(results)
    dist.destroy_process_group()


def main() -> None:
    args = parse_args()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    mp.start_processes(_worker, args=(args, port, queue), nprocs=args.world, start_method="spawn")
    results = queue.get()
    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.strip()
    print(f"{cpu}; {args.world} gloo ranks on 127.0.0.1, {args.threads} thread(s) each; torch {torch.__version__}; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"VectorQuantize(dim={args.dim}, codebook_size={args.codebook_size}), {args.rows} vectors per rank, "
          f"{args.steps} steps; all-reduced per step: {args.codebook_size * (args.dim + 1) + args.world} float32")
    print(f"{'threshold_ema_dead_code':>24} {'per-rank ms':>12} {'synced ms':>10} {'synced / per-rank':>18}")
    for dead_codes, times in results.items():
        ratios = [s / p for s, p in zip(times["synced"], times["per-rank"], strict=True)]
        print(f"{dead_codes:>24} {statistics.median(times['per-rank']) * 1e3:>12.2f} "
              f"{statistics.median(times['synced']) * 1e3:>10.2f} {statistics.median(ratios):>18.2f}")


if __name__ == "__main__":
    main()
