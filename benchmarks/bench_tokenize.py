"""vqdeploy tokenize: each engine's throughput after start-up vs the single-process encode, start-up, peak PSS.

A corpus of N random float32 vectors (default 10M x 64, 2.4 GiB) is written once as parquet
(fixed-size-list column, row groups of 262,144 rows); the K=1024 encode export of a VectorQuantize
tokenizes it with every engine into a fresh folder. Figures per engine:

- throughput after start-up: rows of the shards that finished after the first one, divided by the
  time from the first shard's finish to the last's (reading, encoding and writing included);
- start-up: total seconds minus N / that throughput (Ray: starting the cluster and its actors);
- peak PSS: sampled every 0.5 s with psutil over this process and its descendants; for Ray the
  largest peak of any encoder actor process (``ray::MapWorker``), else this process (the dask
  threads and the local engine run here).

The reference is the single-process encode: ``Quantizer.encode`` on the same row groups (ORT, its
default threads, allow_spinning=False as the engines use it), parquet reading excluded, timed
before the first engine, between engines and after the last; each engine's ratio divides by the
mean of the two encodes on either side of it (the machine is shared and its load drifts). The
default-loaded encode (spinning on) is timed once with --default-encode and printed for context. Every
engine's tokens are checked equal to the reference's. `local-serial` is the local engine with
prefetch=0 (read, encode, write one after another, as before the read-ahead thread), for comparison.
--rounds R repeats the engines R times (each between two encodes) and reports medians of the
per-round ratios. CPU s/M: CPU seconds of this process per million vectors (user + system, all
threads; the reference counts its encode calls only; Ray's actors run elsewhere: n/a). On a shared
machine, wall-clock ratios follow the load (a run with more threads gets a bigger share of a busy
CPU); the CPU seconds do not, and the load average is printed with each engine.

    python benchmarks/bench_tokenize.py                    # 10M x 64, K=1024, workers 2
    python benchmarks/bench_tokenize.py --n 1000000 --engines local,local-serial,dask --rounds 3
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from vqdeploy import VectorQuantize, export_onnx, runtime
from vqdeploy.tokenize import tokenize_corpus

GIB = 2**30
ROW_GROUP = 262_144


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:
        return platform.processor() or "unknown"


def write_corpus(path: Path, n: int, dim: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    schema = pa.schema([("id", pa.int64()), ("emb", pa.list_(pa.float32(), dim))])
    with pq.ParquetWriter(str(path), schema, compression="none") as writer:
        for start in range(0, n, ROW_GROUP):
            rows = min(ROW_GROUP, n - start)
            x = rng.standard_normal((rows, dim), dtype=np.float32)
            emb = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), dim)
            writer.write_table(pa.table({"id": np.arange(start, start + rows), "emb": emb}, schema=schema))


def cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def reference_encode(model: Path, corpus: Path, **options) -> tuple[float, np.ndarray, float]:
    """Seconds of Quantizer.encode over every row group (reading excluded), the tokens, and the CPU
    seconds of those encode calls."""
    file = pq.ParquetFile(str(corpus))
    tokens, seconds, cpu = [], 0.0, 0.0
    with runtime.load(model, backend="ort", **options) as quantizer:
        for group in range(file.num_row_groups):
            column = file.read_row_group(group, columns=["emb"]).column("emb").combine_chunks()
            x = column.flatten().to_numpy().reshape(len(column), -1)
            start, start_cpu = time.perf_counter(), cpu_seconds()
            tokens.append(quantizer.encode(x))
            seconds += time.perf_counter() - start
            cpu += cpu_seconds() - start_cpu
    return seconds, np.concatenate(tokens), cpu


class PssSampler:
    """Peak PSS (bytes) per process of this process tree, sampled in a thread."""

    def __init__(self, every_s: float = 0.5):
        self.every_s = every_s
        self.peaks: dict[int, tuple[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process()
        for proc in [me, *me.children(recursive=True)]:
            try:
                pss = proc.memory_full_info().pss
                name = " ".join(proc.cmdline())[:80] or proc.name()
            except (psutil.Error, OSError):
                continue
            old = self.peaks.get(proc.pid, (name, 0))
            self.peaks[proc.pid] = (name if "ray::" in name else old[0], max(old[1], pss))

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._sample()

    def __enter__(self) -> PssSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def worker_peak(self, engine: str) -> tuple[int, int]:
        """(peak PSS of the largest worker, number of worker processes seen)."""
        if engine == "ray":
            workers = [pss for name, pss in self.peaks.values() if "MapWorker" in name]
            return (max(workers), len(workers)) if workers else (0, 0)
        return self.peaks[psutil.Process().pid][1], 1


def read_tokens(folder: Path) -> np.ndarray:
    table = pa.concat_tables(pq.read_table(p) for p in sorted(folder.glob("part-*.parquet")))
    order = np.argsort(table.column("id").to_numpy(), kind="stable")
    return table.column("tokens").to_numpy()[order]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--codebook-size", type=int, default=1024)
    parser.add_argument("--engines", default="local,dask,ray")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shard-rows", type=int, default=ROW_GROUP)
    parser.add_argument("--workdir", type=Path, default=None, help="where the corpus goes (default: a temp dir)")
    parser.add_argument("--rounds", type=int, default=1, help="times to run the engines, each between two encodes")
    parser.add_argument("--default-encode", action="store_true", help="also time the encode with ORT's default options")
    args = parser.parse_args()

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="vqtok"))
    workdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = export_onnx(VectorQuantize(dim=args.dim, codebook_size=args.codebook_size).eval(), workdir / "vq.onnx",
                        part="encode", overwrite=True)
    corpus = workdir / "corpus.parquet"
    start = time.perf_counter()
    write_corpus(corpus, args.n, args.dim)
    print(f"# {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC  CPU: {cpu_model()}, {psutil.cpu_count()} "
          f"logical CPUs; N={args.n:,} D={args.dim} K={args.codebook_size} ({args.n * args.dim * 4 / GIB:.2f} GiB "
          f"float32), corpus written in {time.perf_counter() - start:.0f} s, load average {os.getloadavg()[0]:.1f}",
          flush=True)

    if args.default_encode:
        default_s = reference_encode(model, corpus)[0]
        print(f"single-process Quantizer.encode as ORT loads it by default (spinning on): {args.n / default_s / 1e6:.3f}M "
              "vec/s", flush=True)
    seconds, reference, cpu = reference_encode(model, corpus, allow_spinning=False)
    baselines, reference_cpu = [seconds], [cpu]
    runs: dict[str, list[tuple]] = {}
    engines = args.engines.split(",")
    for round_ in range(args.rounds):
        for engine in engines:
            out = workdir / f"out_{engine}"
            shutil.rmtree(out, ignore_errors=True)
            load_before, cpu_before = os.getloadavg()[0], cpu_seconds()
            with PssSampler() as sampler:
                report = tokenize_corpus(model, [corpus], out, engine="local" if engine == "local-serial" else engine,
                                         workers=args.workers, id_column="id", shard_rows=args.shard_rows,
                                         prefetch=0 if engine == "local-serial" else 1)
            engine_cpu = cpu_seconds() - cpu_before
            load = (load_before, os.getloadavg()[0])
            same = np.array_equal(read_tokens(out), reference)
            shutil.rmtree(out, ignore_errors=True)
            seconds, _, cpu = reference_encode(model, corpus, allow_spinning=False)  # the engine sits between two
            baselines.append(seconds)
            reference_cpu.append(cpu)
            first_t = report.finished[0][0]
            after_rows = sum(r for _, r in report.finished[1:])
            steady = after_rows / (report.finished[-1][0] - first_t) if len(report.finished) > 1 else float("nan")
            peak, count = sampler.worker_peak(engine)
            base = args.n / ((baselines[-2] + baselines[-1]) / 2)
            runs.setdefault(engine, []).append((report.seconds, steady, base, report.seconds - args.n / steady, peak,
                                                count, same, None if engine == "ray" else engine_cpu, load))
            print(f"round {round_ + 1} {engine}: {steady / base:.2f}x ({steady / 1e6:.3f}M vs {base / 1e6:.3f}M vec/s), "
                  f"load {load[0]:.1f}->{load[1]:.1f}", flush=True)
    per_m = args.n / 1e6
    print("\nsingle-process Quantizer.encode (allow_spinning=False), before/between/after the engines: "
          + ", ".join(f"{args.n / s / 1e6:.3f}M" for s in baselines) + " vec/s; its CPU s/M: "
          + ", ".join(f"{c / per_m:.2f}" for c in reference_cpu) + "\n")
    print("| engine | workers | rounds | total s | vec/s after start-up | encode vec/s (adjacent) | vs encode (range) | "
          "start-up s | CPU s/M (encode's) | peak PSS per worker | load avg | tokens == encode |")
    print("|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---|")
    encode_cpu = statistics.median(reference_cpu) / per_m
    def med(results: list[tuple], i: int) -> float:
        return statistics.median(r[i] for r in results)

    for engine, results in runs.items():
        ratios = [steady / base for _, steady, base, *_ in results]
        peak = max(r[4] for r in results)
        count = results[0][5]
        cpus = [r[7] for r in results if r[7] is not None]
        cpu = f"{statistics.median(cpus) / per_m:.2f} ({encode_cpu:.2f})" if cpus else "n/a"
        loads = f"{min(r[8][0] for r in results):.1f}-{max(r[8][1] for r in results):.1f}"
        workers = 1 if engine.startswith("local") else args.workers
        seen = f" ({count} actors)" if engine == "ray" else ""
        spread = f" ({min(ratios):.2f}-{max(ratios):.2f})" if len(ratios) > 1 else ""
        print(f"| {engine} | {workers} | {len(results)} | {med(results, 0):.1f} | {med(results, 1) / 1e6:.3f}M | {med(results, 2) / 1e6:.3f}M | "
              f"{statistics.median(ratios):.2f}x{spread} | {med(results, 3):.1f} | {cpu} | {peak / 2**20:.0f} MiB{seen} | {loads} | "
              f"{'yes' if all(r[6] for r in results) else 'NO'} |")
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
