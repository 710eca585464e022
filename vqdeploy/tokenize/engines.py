"""Engines that run a tokenize job's shards: one process, dask, or Ray Data.

Every engine runs the same `encode_shard` on each pending shard and reports ``(index, rows,
written)`` to the driver as shards finish. The model travels as the ONNX file's bytes (dask:
scattered once; Ray: one object in the object store), so workers need no shared file system for
it; their inputs and the output folder they do share.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from vqdeploy.errors import BackendNotAvailableError, UnsupportedOptionError
from vqdeploy.tokenize.shards import JobSpec, Shard, encode_shard, encode_shards_pipelined

ENGINES = ("local", "dask", "ray")
# CPU Ray keeps free for its own tasks when it sizes the actor pool: actors asking 1 CPU each on
# every CPU of the node left none for Ray Data's planner (2 actors x 1 CPU on 2 CPUs deadlocked).
RAY_RESERVED_CPUS = 0.5

Result = tuple[int, int, bool]

_SESSIONS: dict[tuple[str, str, int | None], Any] = {}
_SESSIONS_LOCK = threading.Lock()


def backend_options(backend: str, threads: int | None) -> dict[str, Any]:
    """Runtime options for one worker: ORT with `threads` intra-op threads (None: ORT's default) and
    no idle spinning (a worker reads and writes parquet between calls; spinning threads slow that)."""
    if backend != "ort":
        return {}
    if threads is None:
        return dict(allow_spinning=False)
    return dict(intra_op_num_threads=threads, inter_op_num_threads=1, allow_spinning=False)


def shared_quantizer(model: bytes, sha256: str, backend: str, threads: int | None):
    """One Quantizer per process and model, shared by its threads (ORT sessions allow concurrent runs)."""
    from vqdeploy import runtime

    key = (sha256, backend, threads)
    with _SESSIONS_LOCK:
        if key not in _SESSIONS:
            _SESSIONS[key] = runtime.load(model, backend=backend, **backend_options(backend, threads))
        return _SESSIONS[key]


def _encode_with_shared(model: bytes, sha256: str, backend: str, threads: int | None, shard: Shard, job: JobSpec) -> Result:
    return encode_shard(shared_quantizer(model, sha256, backend, threads), shard, job)


# -- local -----------------------------------------------------------------------------------------
def run_local(model: bytes, sha256: str, backend: str, shards: Sequence[Shard], job: JobSpec, threads: int | None,
              prefetch: int = 1, **_: Any) -> Iterator[Result]:
    """Shards one after another in this process (the backend's own threads use the cores), the next
    shard read and the last one written in two threads while this one encodes."""
    quantizer = shared_quantizer(model, sha256, backend, threads)
    yield from encode_shards_pipelined(quantizer, shards, job, prefetch)


# -- dask ------------------------------------------------------------------------------------------
def _import_dask(distributed: bool):
    try:
        import dask

        if distributed:
            import distributed as dist

            return dask, dist
    except ImportError as error:
        raise BackendNotAvailableError("engine 'dask' needs dask (and distributed for --address): "
                                       "pip install 'vqdeploy[dask]'") from error
    return dask, None


def run_dask(model: bytes, sha256: str, backend: str, shards: Sequence[Shard], job: JobSpec, threads: int | None,
             workers: int, address: str | None = None, **_: Any) -> Iterator[Result]:
    """dask: the threaded scheduler in this process (one shared session), or a cluster at `address`."""
    dask, dist = _import_dask(address is not None)
    if address is not None:
        with dist.Client(address) as client:
            model_future = client.scatter(model, broadcast=True)
            futures = [client.submit(_encode_with_shared, model_future, sha256, backend, threads, shard, job, pure=False)
                       for shard in shards]
            for future in dist.as_completed(futures):
                yield future.result()
        return
    from queue import Queue

    from dask.diagnostics import Callback

    done: Queue = Queue()

    class _Finished(Callback):
        def _posttask(self, key, result, dsk, state, worker_id):  # noqa: ANN001 - dask's signature
            if isinstance(result, tuple) and len(result) == 3:
                done.put(result)

    tasks = [dask.delayed(_encode_with_shared, pure=False)(model, sha256, backend, threads, shard, job) for shard in shards]
    failure: list[BaseException] = []

    def compute() -> None:
        try:
            with _Finished():
                dask.compute(*tasks, scheduler="threads", num_workers=workers)
        except BaseException as error:  # handed to the driver thread below
            failure.append(error)
        finally:
            done.put(None)

    thread = threading.Thread(target=compute, name="vqdeploy-dask", daemon=True)
    thread.start()
    while (item := done.get()) is not None:
        yield item
    thread.join()
    if failure:
        raise failure[0]


# -- Ray Data --------------------------------------------------------------------------------------
def _import_ray():
    try:
        import ray
        import ray.data
    except ImportError as error:
        raise BackendNotAvailableError("engine 'ray' needs Ray Data: pip install 'vqdeploy[ray]'") from error
    return ray


class RayShardEncoder:
    """A Ray Data actor: loads the model once (from the object store), then encodes shards."""

    def __init__(self, model_box: list, sha256: str, backend: str, threads: int | None, job: dict[str, Any]):
        import ray

        self.quantizer = shared_quantizer(ray.get(model_box[0]), sha256, backend, threads)
        self.job = JobSpec(**job)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = [encode_shard(self.quantizer, Shard(**_shard_fields(text)), self.job) for text in batch["shard"]]
        return {name: np.array(values) for name, values in zip(("index", "rows", "written"), zip(*results, strict=True),
                                                                  strict=True)}


def _shard_fields(text: str) -> dict[str, Any]:
    fields = json.loads(text)
    fields["row_groups"] = tuple(fields["row_groups"])
    return fields


def ray_actor_cpus(total_cpus: float, workers: int) -> float:
    """CPUs each of `workers` actors asks for: at most 1, leaving RAY_RESERVED_CPUS free."""
    return max(0.01, min(1.0, (total_cpus - RAY_RESERVED_CPUS) / workers))


def run_ray(model: bytes, sha256: str, backend: str, shards: Sequence[Shard], job: JobSpec, threads: int | None,
            workers: int | None, address: str | None = None, ray_init: dict[str, Any] | None = None,
            **_: Any) -> Iterator[Result]:
    """Ray Data: `map_batches` over the pending shards with an actor pool of `workers` encoders."""
    ray = _import_ray()
    started_here = False
    if not ray.is_initialized():
        options = dict(ray_init or {})
        if address is not None:
            options["address"] = address
        else:  # a private single-node Ray: loopback only, no dashboard, no usage report
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            options.setdefault("num_cpus", workers or os.cpu_count())
            options.setdefault("include_dashboard", False)
            options.setdefault("_node_ip_address", "127.0.0.1")
        options.setdefault("log_to_driver", False)
        options.setdefault("logging_level", logging.WARNING)
        ray.init(**options)
        started_here = True
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        total = float(ray.cluster_resources().get("CPU", 1))
        pool = workers or max(1, int(total - RAY_RESERVED_CPUS))
        model_box = [ray.put(model)]
        items = [{"shard": json.dumps(asdict(shard))} for shard in shards]
        dataset = ray.data.from_items(items, override_num_blocks=max(1, len(items))).map_batches(
            RayShardEncoder,
            fn_constructor_args=(model_box, sha256, backend, threads, asdict(job)),
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=pool),
            num_cpus=ray_actor_cpus(total, pool),
        )
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0):
            for index, rows, written in zip(batch["index"], batch["rows"], batch["written"], strict=True):
                yield int(index), int(rows), bool(written)
    finally:
        if started_here:
            ray.shutdown()


RUNNERS: dict[str, Callable[..., Iterator[Result]]] = {"local": run_local, "dask": run_dask, "ray": run_ray}


def check_engine(engine: str, address: str | None) -> None:
    if engine not in RUNNERS:
        raise UnsupportedOptionError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
    if engine == "local" and address is not None:
        raise UnsupportedOptionError("--address names a dask or Ray cluster; engine 'local' runs in this process")


def output_path(job: JobSpec, shard: Shard) -> Path:
    return Path(job.output_dir) / shard.output
