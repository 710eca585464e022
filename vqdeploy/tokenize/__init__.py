"""Bulk tokenization: a corpus of vectors in, parquet files of tokens out, on one process, dask or Ray.

>>> import tempfile, pathlib, numpy as np, pyarrow.parquet as pq, vqdeploy
>>> from vqdeploy.tokenize import tokenize_corpus
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> vq = vqdeploy.VectorQuantize(dim=8, codebook_size=16).eval()
>>> model = vqdeploy.export_onnx(vq, folder / "vq.onnx", part="encode")
>>> np.save(folder / "x.npy", np.random.default_rng(0).standard_normal((1000, 8)).astype(np.float32))
>>> report = tokenize_corpus(model, [folder / "x.npy"], folder / "tokens", verify_sample=100)
>>> report.rows, pq.read_table(folder / "tokens").column_names
(1000, ['id', 'tokens'])

Output: a folder of ``part-SSSSS.parquet`` files (columns ``id`` -- the input's id column or the
row number in the corpus -- and ``tokens``: int32, or a fixed-size list of one token per stage
or head), each carrying the model's provenance under the ``vqdeploy.tokenize`` key of its
parquet metadata (`read_provenance`). A killed job run again with the same arguments continues
where it stopped (see `vqdeploy.tokenize.shards`).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vqdeploy.errors import ShardsMissingError, TokensDifferError, UnsupportedOptionError
from vqdeploy.tokenize.engines import ENGINES, RUNNERS, check_engine
from vqdeploy.tokenize.shards import (
    DEFAULT_ID_COLUMN,
    DEFAULT_SHARD_ROWS,
    DONE_FILE,
    METADATA_KEY,
    TOKEN_COLUMN,
    JobSpec,
    Shard,
    check_input,
    encode_rows,
    expand_inputs,
    job_record,
    plan_shards,
    prepare_output,
    sha256_of,
    vectors_from_arrow,
)


@dataclass
class TokenizeReport:
    """What a job did. `finished` holds (seconds since the start, rows) per shard encoded in this run."""

    output_dir: Path
    engine: str
    rows: int
    shards: int
    shards_written: int
    shards_skipped: int  # already on disk from an earlier run
    verified_rows: int
    seconds: float
    finished: list[tuple[float, int]] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)


def provenance_of(model: bytes, info, name: str, backend: str) -> dict[str, Any]:
    """The facts every output file carries about the tokenizer that produced it."""
    from vqdeploy._version import __version__

    return dict(
        model_sha256=sha256_of(model),
        model_file=name,
        codebook_size=info.codebook_size,
        stages=info.num_quantizers,
        heads=info.heads,
        dim=info.dim,
        kind=info.kind,
        metric=info.metric,
        export_vqdeploy_version=info.version,
        vqdeploy_version=__version__,
        backend=backend,
    )


def read_provenance(path: str | os.PathLike) -> dict[str, Any]:
    """The provenance stored in one output parquet file (model_sha256, codebook_size, stages, ...)."""
    import pyarrow.parquet as pq

    metadata = pq.read_schema(str(path)).metadata or {}
    if METADATA_KEY not in metadata:
        raise UnsupportedOptionError(f"{path} was not written by vqdeploy tokenize (no {METADATA_KEY.decode()} metadata)")
    return json.loads(metadata[METADATA_KEY])


def _progress_bar(total: int, initial: int, enabled: bool | None):
    import sys

    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="vec", unit_scale=True, desc="tokenize", leave=False,
                disable=None if enabled is None else not enabled, file=sys.stderr)


def tokenize_corpus(
    model: str | os.PathLike | bytes,
    inputs: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    engine: str = "local",
    address: str | None = None,
    workers: int | None = None,
    column: str | None = None,
    id_column: str | None = None,
    verify_sample: int = 0,
    shard_rows: int = DEFAULT_SHARD_ROWS,
    backend: str = "ort",
    threads_per_worker: int | None = None,
    force: bool = False,
    progress: bool | None = False,
    on_shard: Callable[[int, int], None] | None = None,
    ray_init: dict[str, Any] | None = None,
    seed: int = 0,
    prefetch: int = 1,
) -> TokenizeReport:
    """Tokenize `inputs` (parquet files with a list-of-floats column, or (N, D) .npy arrays) into `output`.

    engine: "local" (this process), "dask" (threads here, or the dask cluster at `address`) or "ray"
    (Ray Data; a private local Ray, or the cluster at `address`). workers: threads (dask) or actors
    (Ray), default one per CPU; each runs the backend with `threads_per_worker` threads (default 1;
    local: the backend's default). verify_sample: re-encode that many random rows here after the
    job and raise `TokensDifferError` on any difference. on_shard(index, rows) is called in this
    process as each shard is written. ray_init: extra `ray.init` arguments for a private Ray.
    prefetch (local engine): shards read ahead in a thread while this one encodes, the finished one
    written in another (0: read, encode and write one after another).
    """
    check_engine(engine, address)
    if verify_sample < 0:
        raise UnsupportedOptionError(f"verify_sample must be >= 0, got {verify_sample}")
    if prefetch < 0:
        raise UnsupportedOptionError(f"prefetch must be >= 0, got {prefetch}")
    if workers is not None and workers < 1:
        raise UnsupportedOptionError(f"workers must be >= 1, got {workers}")
    from vqdeploy import runtime
    from vqdeploy.export.metadata import read_metadata

    start = time.perf_counter()
    if isinstance(model, bytes):
        model_bytes, model_name = model, "<bytes>"
    else:
        path = Path(model)
        if not path.is_file():
            from vqdeploy.errors import NotAVQDeployModelError

            raise NotAVQDeployModelError(f"model {path} does not exist")
        model_bytes, model_name = path.read_bytes(), path.name
    info = read_metadata(model if not isinstance(model, bytes) else model_bytes)
    if info.kind == "model" or info.part not in ("encode", "quantize"):
        raise UnsupportedOptionError(
            f"tokenize needs a bare quantizer exported with part 'encode' (or 'quantize'); this file is "
            f"{'a whole user model' if info.kind == 'model' else 'part ' + repr(info.part)}"
        )
    runtime.resolve_backend(backend, "cpu")
    provenance = provenance_of(model_bytes, info, model_name, backend)

    files = expand_inputs(inputs)
    rows, chosen = [], column
    for file in files:
        count, found = check_input(file, chosen, id_column, info.dim)
        rows.append(count)
        chosen = chosen or found
    shards = plan_shards(files, shard_rows)
    output_dir = Path(output)
    prepare_output(output_dir, job_record(provenance, files, rows, chosen, id_column, shards), force)
    provenance.update(column=chosen, id_column=id_column or DEFAULT_ID_COLUMN, token_column=TOKEN_COLUMN)
    token_dtype = "int32" if info.codebook_size <= np.iinfo(np.int32).max else "int64"
    job = JobSpec(column=chosen, id_column=id_column, output_dir=str(output_dir), token_dtype=token_dtype,
                  provenance=provenance)

    pending = [s for s in shards if not (output_dir / s.output).exists()]
    skipped = len(shards) - len(pending)
    threads = threads_per_worker if threads_per_worker is not None else (None if engine == "local" else 1)
    count = workers if workers is not None or engine != "dask" else os.cpu_count() or 1  # Ray sizes its own pool
    report = TokenizeReport(output_dir, engine, sum(rows), len(shards), 0, skipped, 0, 0.0, provenance=provenance)
    done_rows = sum(s.rows for s in shards) - sum(s.rows for s in pending)
    with _progress_bar(report.rows, done_rows, progress) as bar:
        if pending:
            results = RUNNERS[engine](model_bytes, provenance["model_sha256"], backend, pending, job, threads,
                                      workers=count, address=address, ray_init=ray_init, prefetch=prefetch)
            # closing: an error here (on_shard's, say) stops the engine now, its writes in flight finished
            with contextlib.closing(results):
                for index, shard_rows_done, written in results:
                    report.finished.append((time.perf_counter() - start, shard_rows_done))
                    report.shards_written += int(written)
                    report.shards_skipped += int(not written)
                    bar.update(shard_rows_done)
                    if on_shard is not None:
                        on_shard(index, shard_rows_done)
    missing = [s.output for s in shards if not (output_dir / s.output).exists()]
    if missing:
        raise ShardsMissingError(f"{len(missing)} shard(s) were not written (first: {missing[0]}); run the job again")
    if verify_sample:
        with runtime.load(model_bytes, backend=backend) as quantizer:
            report.verified_rows = verify_sample_rows(quantizer, shards, job, verify_sample, seed)
    report.seconds = time.perf_counter() - start
    from vqdeploy.files import atomic_write

    summary = dict(rows=report.rows, shards=report.shards, model_sha256=provenance["model_sha256"],
                   verified_rows=report.verified_rows)
    atomic_write(output_dir / DONE_FILE, lambda tmp: tmp.write_text(json.dumps(summary, indent=1)), overwrite=True)
    return report


def _rows_of(shard: Shard, job: JobSpec, dim: int, local: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(vectors, ids) of rows `local` (sorted, relative to the shard's start), reading only their row groups."""
    import pyarrow.parquet as pq

    if shard.kind == "npy":
        vectors = np.load(shard.source, mmap_mode="r")[shard.start + local]
        return np.asarray(vectors), shard.id_offset + local
    file = pq.ParquetFile(shard.source)
    bounds = np.cumsum([0] + [file.metadata.row_group(g).num_rows for g in shard.row_groups])
    groups = np.searchsorted(bounds, local, side="right") - 1
    needed = sorted(set(groups.tolist()))
    columns = [job.column] + ([job.id_column] if job.id_column else [])
    table = file.read_row_groups([shard.row_groups[g] for g in needed], columns=columns, use_threads=False)
    first = {g: int(bounds[g]) for g in needed}
    base, offset = {}, 0
    for g in needed:
        base[g] = offset
        offset += int(bounds[g + 1] - bounds[g])
    where = np.array([base[g] + (r - first[g]) for g, r in zip(groups.tolist(), local.tolist(), strict=True)])
    taken = table.take(where)
    vectors = vectors_from_arrow(taken.column(job.column).combine_chunks(), dim, shard.source)
    ids = taken.column(job.id_column).to_numpy() if job.id_column else shard.id_offset + local
    return vectors, ids


def verify_sample_rows(quantizer, shards: Sequence[Shard], job: JobSpec, count: int, seed: int = 0) -> int:
    """Re-encode `count` random rows of the corpus here; `TokensDifferError` if any written token differs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sizes = np.array([s.rows for s in shards])
    total = int(sizes.sum())
    if total == 0:
        return 0
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(total, size=min(count, total), replace=False))
    starts = np.concatenate([[0], np.cumsum(sizes)])
    owner = np.searchsorted(starts, picked, side="right") - 1
    id_name = job.id_column or DEFAULT_ID_COLUMN
    differ, first = 0, ""
    for index in np.unique(owner):
        shard = shards[int(index)]
        local = picked[owner == index] - starts[index]
        vectors, ids = _rows_of(shard, job, quantizer.info.dim, local)
        again = encode_rows(quantizer, vectors)
        written = pq.read_table(Path(job.output_dir) / shard.output, columns=[id_name, TOKEN_COLUMN]).take(local)
        tokens = written.column(TOKEN_COLUMN).combine_chunks()
        if pa.types.is_fixed_size_list(tokens.type):
            tokens = tokens.flatten()
        stored = np.asarray(tokens.to_numpy(zero_copy_only=False)).reshape(len(local), -1)
        bad = np.flatnonzero((stored != again).any(axis=1) | (written.column(id_name).to_numpy() != np.asarray(ids)))
        if len(bad) and not first:
            row = int(local[bad[0]])
            first = (f" (first: {shard.output} row {row}: written {stored[bad[0]].tolist()}, "
                     f"re-encoded {again[bad[0]].tolist()})")
        differ += len(bad)
    if differ:
        raise TokensDifferError(f"{differ} of {len(picked)} re-encoded rows differ from the tokens written{first}")
    return len(picked)


__all__ = ["ENGINES", "TokenizeReport", "read_provenance", "tokenize_corpus", "verify_sample_rows"]
