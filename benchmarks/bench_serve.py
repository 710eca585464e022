"""Ray Serve (vqdeploy.serving.ray_serve) latency and throughput vs a direct in-process encode.

One workload: `--requests` requests of `--tokens` token rows (D = --dim, x ~ N(0, 1) float32) sent
by `--clients` concurrent client threads. Methods, timed interleaved (each round runs the whole
workload once per method; figures are medians over rounds, ratios medians of per-round ratios):

- ``direct, 1 thread``: ``Quantizer.encode(rows)`` per request in this process, one after another
  (ORT, 1 intra-op thread);
- ``direct, C threads``: the same calls from the C client threads on one shared Quantizer;
- ``direct, merged``: one ``encode`` of all requests' rows at once (what ideal batching costs);
- ``serve, batched``: POST of each request (.npy body) to Serve's HTTP proxy on 127.0.0.1 from the
  C threads; the replica (1 CPU, ORT 1 intra-op thread) merges them (``@serve.batch``);
- ``serve, unbatched``: the same deployment with max_batch_tokens = --tokens, so one request per
  backend call (what batching saves).

Latency is per request as its client sees it (p50, p99 over all requests of all rounds);
throughput is tokens of the whole workload / its wall time. Every served request's indices are
checked against the direct encode (mismatches column). Local Ray: `--num-cpus` CPUs, no
dashboard, usage stats off, files in a temp dir.

Run: ``python benchmarks/bench_serve.py [--tokens 16] [--clients 8] [--requests 200] [--rounds 3]``
"""

from __future__ import annotations

import argparse
import io
import statistics
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

import vqdeploy
from vqdeploy import runtime
from vqdeploy.serving.ray_serve import NPY_CONTENT_TYPE, build_app, local_serve

METHODS = ["direct, 1 thread", "direct, C threads", "direct, merged", "serve, batched", "serve, unbatched"]


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


def post_npy(url: str, rows: np.ndarray) -> np.ndarray:
    buffer = io.BytesIO()
    np.save(buffer, rows)
    request = urllib.request.Request(url, data=buffer.getvalue(), headers={"content-type": NPY_CONTENT_TYPE})
    with urllib.request.urlopen(request, timeout=120) as response:
        return np.load(io.BytesIO(response.read()))


def run_clients(call: Callable[[np.ndarray], np.ndarray], requests: list[np.ndarray], clients: int):
    """(wall seconds, per-request latencies, results in request order) of the workload from `clients` threads."""
    latencies = [0.0] * len(requests)
    results: list[np.ndarray | None] = [None] * len(requests)

    def client(indices: range) -> None:
        for i in indices:
            start = time.perf_counter()
            results[i] = call(requests[i])
            latencies[i] = time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client, range(c, len(requests), clients)) for c in range(clients)]:
            future.result(timeout=900)
    return time.perf_counter() - start, latencies, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16, help="token rows per request")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--codebook-size", type=int, default=512)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num-cpus", type=int, default=2)
    args = parser.parse_args()

    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="vqbench", dir="/tmp"))
    module = vqdeploy.VectorQuantize(dim=args.dim, codebook_size=args.codebook_size).eval()
    path = vqdeploy.export_onnx(module, work / "vq.onnx", part="encode")
    rng = np.random.default_rng(0)
    requests = [rng.standard_normal((args.tokens, args.dim)).astype(np.float32) for _ in range(args.requests)]
    quantizer = runtime.load(path, backend="ort", intra_op_num_threads=1)
    expected = [quantizer.encode(r) for r in requests]
    merged_rows = np.concatenate(requests)

    walls: dict[str, list[float]] = {m: [] for m in METHODS}
    latencies: dict[str, list[float]] = {m: [] for m in METHODS}
    mismatches = dict.fromkeys(METHODS, 0)
    with local_serve(work / "ray", num_cpus=args.num_cpus) as url:
        from ray import serve

        options = dict(intra_op_num_threads=1, ray_actor_options={"num_cpus": 1})
        batched = serve.run(build_app(path, **options), name="batched", route_prefix="/batched")
        unbatched = serve.run(build_app(path, max_batch_tokens=args.tokens, **options), name="unbatched",
                              route_prefix="/unbatched")
        calls: dict[str, Callable[[], tuple[float, list[float], list]]] = {
            "direct, 1 thread": lambda: run_clients(quantizer.encode, requests, 1),
            "direct, C threads": lambda: run_clients(quantizer.encode, requests, args.clients),
            "serve, batched": lambda: run_clients(lambda r: post_npy(f"{url}/batched", r), requests, args.clients),
            "serve, unbatched": lambda: run_clients(lambda r: post_npy(f"{url}/unbatched", r), requests, args.clients),
        }
        for call in calls.values():  # warm-up: replicas' sessions, HTTP connections, thread pools
            call()
        for _ in range(args.rounds):
            for name in METHODS:
                if name == "direct, merged":
                    start = time.perf_counter()
                    merged = quantizer.encode(merged_rows)
                    wall = time.perf_counter() - start
                    walls[name].append(wall)
                    latencies[name].append(wall)
                    mismatches[name] += int((merged != np.concatenate(expected)).sum())
                    continue
                wall, lat, results = calls[name]()
                walls[name].append(wall)
                latencies[name] += lat
                mismatches[name] += sum(int((got != want).sum()) for got, want in zip(results, expected, strict=True))
        stats = {name: h.stats.remote().result(timeout_s=60) for name, h in (("batched", batched), ("unbatched", unbatched))}

    tokens_total = args.tokens * args.requests
    base = walls["direct, 1 thread"]
    print(f"CPU: {cpu_model()}; Ray {__import__('ray').__version__}, {args.num_cpus} CPUs; "
          f"workload: {args.requests} requests x {args.tokens} tokens (D={args.dim}, K={args.codebook_size}), "
          f"{args.clients} clients, {args.rounds} rounds\n")
    print("| method | p50 latency (ms) | p99 latency (ms) | throughput (tokens/s) | vs direct, 1 thread | mismatches |")
    print("|:---|---:|---:|---:|---:|---:|")
    for name in METHODS:
        lat = sorted(latencies[name])
        p50 = statistics.median(lat) * 1e3
        p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1e3
        rate = tokens_total / statistics.median(walls[name])
        ratio = statistics.median(b / w for b, w in zip(base, walls[name], strict=True))
        label = name.replace("C threads", f"{args.clients} threads")
        print(f"| {label} | {p50:.2f} | {p99:.2f} | {rate:,.0f} | {ratio:.2f}x | {mismatches[name]} |")
    print("\n('direct, merged' is one call for the whole workload: its latency is that call's.)")
    for name, st in stats.items():
        print(f"serve, {name}: {st['requests']} requests in {st['batch_calls']} backend calls "
              f"({st['requests'] / max(st['batch_calls'], 1):.1f} requests per call, warm-up included)")


if __name__ == "__main__":
    main()
