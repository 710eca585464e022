"""Inputs, shards and outputs of a tokenize job: what every engine reads, encodes and writes.

A job cuts its inputs (parquet files, or .npy arrays of shape (N, D)) into *shards*: runs of
whole parquet row groups holding about `shard_rows` rows, or row ranges of a .npy file. Each shard
becomes one output file, ``part-SSSSS.parquet``, written under a temporary name and then linked
into place, so an output file is either whole or absent: it is the shard's completion marker. A
restarted job skips the shards whose file exists; ``_job.json`` records what the job was (model
hash, inputs, column, shard plan) so that a restart with other settings is refused instead of
mixing two jobs in one folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from vqdeploy.errors import (
    BackendNotAvailableError,
    InputDtypeError,
    InputShapeError,
    ResumeMismatchError,
    UnreadableInputError,
    UnsupportedOptionError,
)
from vqdeploy.spec import QuantizerSpec

JOB_FILE = "_job.json"
DONE_FILE = "_SUCCESS.json"
METADATA_KEY = b"vqdeploy.tokenize"
TOKEN_COLUMN = "tokens"
DEFAULT_ID_COLUMN = "id"
DEFAULT_SHARD_ROWS = 1 << 20

# Arrow memory is read-only; torch.from_numpy warns about that on every shard, though the
# Quantizer never writes to its input. Silence exactly that warning, from that module only.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", module=r"vqdeploy\.runtime\.base")


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as error:
        raise BackendNotAvailableError("vqdeploy tokenize needs pyarrow: pip install 'vqdeploy[dask]' or pyarrow") from error
    return pyarrow


@dataclass(frozen=True)
class Shard:
    """One unit of work: rows [start, stop) of an input, written to `output` (a file name)."""

    index: int
    source: str
    kind: str  # "parquet" or "npy"
    start: int  # first row within the source
    stop: int
    row_groups: tuple[int, ...]  # parquet row groups covering [start, stop), in order
    id_offset: int  # row number of `start` in the whole corpus (the default id)
    output: str

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class JobSpec:
    """What a worker needs besides the model: where to read, what to write, the provenance."""

    column: str | None
    id_column: str | None
    output_dir: str
    token_dtype: str
    provenance: dict[str, Any] = field(default_factory=dict)


# -- inputs -------------------------------------------------------------------------------------------
def expand_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Files as given; a folder stands for its *.parquet and *.npy files, sorted by name."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix in (".parquet", ".npy") and p.is_file())
            if not found:
                raise UnreadableInputError(f"input folder {path} holds no .parquet or .npy file")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise UnreadableInputError(f"input {path} does not exist")
    if not files:
        raise UnreadableInputError("no input given; pass parquet or .npy files (or folders of them)")
    return files


def _open_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as error:
        raise UnreadableInputError(f"{path} is not a readable .npy file: {error}") from error


def _open_parquet(path: Path):
    pa = _pyarrow()
    try:
        return pa.parquet.ParquetFile(str(path))
    except Exception as error:  # ArrowInvalid and friends
        raise UnreadableInputError(f"{path} is not a parquet file ({' '.join(str(error).split())})") from error


def _vector_field(schema, column: str | None, path: Path):
    """The list-of-floats field to tokenize: `column`, or the only such field."""
    pa = _pyarrow()
    names = schema.names
    if column is not None:
        if column not in names:
            raise UnreadableInputError(f"{path} has no column {column!r}; its columns are {', '.join(names)}")
        return schema.field(column)
    lists = [f for f in schema if pa.types.is_list(f.type) or pa.types.is_fixed_size_list(f.type)
             or pa.types.is_large_list(f.type)]
    if len(lists) != 1:
        found = "none" if not lists else ", ".join(f.name for f in lists)
        raise UnreadableInputError(f"{path}: pass --column to choose the vector column (list columns found: {found})")
    return lists[0]


def check_input(path: Path, column: str | None, id_column: str | None, dim: int) -> tuple[int, str | None]:
    """Rows of one input and the vector column it will be read from; typed errors for bad input."""
    pa = _pyarrow()
    if path.suffix == ".npy":
        array = _open_npy(path)
        if array.ndim != 2 or array.shape[1] != dim:
            raise InputShapeError(f"{path} has shape {tuple(array.shape)}; expected (N, {dim}) vectors of the model's dim")
        if array.dtype.kind != "f":
            raise InputDtypeError(f"{path} holds {array.dtype}; expected floating-point vectors")
        if id_column is not None:
            raise UnsupportedOptionError(f"{path} is a .npy array: it has no id column (ids are row numbers)")
        return array.shape[0], None
    if path.suffix != ".parquet":
        raise UnreadableInputError(f"{path} is neither a .parquet nor a .npy file")
    schema = _open_parquet(path).schema_arrow
    chosen = _vector_field(schema, column, path)
    kind = chosen.type
    if not (pa.types.is_list(kind) or pa.types.is_fixed_size_list(kind) or pa.types.is_large_list(kind)):
        raise InputDtypeError(f"{path}: column {chosen.name!r} is {kind}; expected a list of floats (one vector per row)")
    if not pa.types.is_floating(kind.value_type):
        raise InputDtypeError(f"{path}: column {chosen.name!r} holds {kind.value_type}; expected floating-point vectors")
    if pa.types.is_fixed_size_list(kind) and kind.list_size != dim:
        raise InputShapeError(f"{path}: column {chosen.name!r} holds vectors of {kind.list_size}; the model's dim is {dim}")
    if id_column is not None and id_column not in schema.names:
        raise UnreadableInputError(f"{path} has no id column {id_column!r}; its columns are {', '.join(schema.names)}")
    return _open_parquet(path).metadata.num_rows, chosen.name


def plan_shards(files: Sequence[Path], shard_rows: int) -> list[Shard]:
    """Shards of about `shard_rows` rows, each within one file (parquet: whole row groups)."""
    if shard_rows < 1:
        raise UnsupportedOptionError(f"shard_rows must be >= 1, got {shard_rows}")
    shards: list[Shard] = []
    offset = 0

    def add(path: Path, kind: str, start: int, stop: int, groups: tuple[int, ...]) -> None:
        index = len(shards)
        shards.append(Shard(index, str(path), kind, start, stop, groups, offset + start, f"part-{index:05d}.parquet"))

    for path in files:
        if path.suffix == ".npy":
            rows = _open_npy(path).shape[0]
            for start in range(0, rows, shard_rows):
                add(path, "npy", start, min(start + shard_rows, rows), ())
        else:
            meta = _open_parquet(path).metadata
            rows = meta.num_rows
            start, groups, count = 0, [], 0
            for group in range(meta.num_row_groups):
                size = meta.row_group(group).num_rows
                if groups and count + size > shard_rows:
                    add(path, "parquet", start, start + count, tuple(groups))
                    start, groups, count = start + count, [], 0
                groups.append(group)
                count += size
            if count:
                add(path, "parquet", start, start + count, tuple(groups))
        offset += rows
    return shards


def vectors_from_arrow(column, dim: int, where: str) -> np.ndarray:
    """(n, dim) numpy view of a list-of-floats Arrow column; zero-copy for a one-chunk
    fixed-size-list column without nulls (what Ray Data and parquet readers give)."""
    pa = _pyarrow()
    import pyarrow.compute as pc

    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    parts = []
    for chunk in chunks:
        if chunk.null_count:
            raise InputShapeError(f"{where}: {chunk.null_count} row(s) hold no vector (null)")
        if pa.types.is_fixed_size_list(chunk.type):
            if chunk.type.list_size != dim:
                raise InputShapeError(f"{where}: vectors of {chunk.type.list_size}; the model's dim is {dim}")
        else:
            lengths = pc.list_value_length(chunk).to_numpy(zero_copy_only=False)
            if len(lengths) and (lengths.min() != dim or lengths.max() != dim):
                bad = int(np.flatnonzero(lengths != dim)[0])
                raise InputShapeError(f"{where}: row {bad} holds a vector of {int(lengths[bad])}; the model's dim is {dim}")
        values = chunk.flatten()  # respects the chunk's offset; a slice of the child, no copy
        if values.null_count:
            raise InputShapeError(f"{where}: vectors hold null values")
        parts.append(values.to_numpy(zero_copy_only=True).reshape(-1, dim))
    if not parts:
        return np.empty((0, dim), np.float32)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def read_shard(shard: Shard, job: JobSpec, dim: int) -> tuple[np.ndarray, Any]:
    """(vectors (n, dim), ids) of a shard, ids as an Arrow array."""
    pa = _pyarrow()
    where = f"{shard.source} rows {shard.start}-{shard.stop}"
    if shard.kind == "npy":
        vectors = np.ascontiguousarray(_open_npy(Path(shard.source))[shard.start:shard.stop])
        return vectors, pa.array(np.arange(shard.id_offset, shard.id_offset + shard.rows, dtype=np.int64))
    columns = [job.column] + ([job.id_column] if job.id_column else [])
    table = _open_parquet(Path(shard.source)).read_row_groups(list(shard.row_groups), columns=columns, use_threads=False)
    vectors = vectors_from_arrow(table.column(job.column), dim, where)
    if job.id_column:
        ids = table.column(job.id_column).combine_chunks()
    else:
        ids = pa.array(np.arange(shard.id_offset, shard.id_offset + shard.rows, dtype=np.int64))
    return vectors, ids


def encode_rows(quantizer, vectors: np.ndarray) -> np.ndarray:
    """Tokens (n, S) of n vectors: S = stages for a ResidualVQ, heads for a multi-head quantizer, else 1."""
    spec = quantizer.spec
    return spec.token_major(quantizer.encode(spec.rows_to_input(vectors)), vectors.shape[0])


def tokens_per_row(info) -> int:
    return info.num_quantizers if QuantizerSpec.from_info(info).residual else info.heads


def token_table(tokens: np.ndarray, ids, job: JobSpec, id_name: str):
    """The output table: the id column, then `tokens` (int, or a fixed-size list of S ints)."""
    pa = _pyarrow()
    tokens = tokens.astype(job.token_dtype, copy=False)
    if tokens.shape[1] == 1:
        token_array = pa.array(tokens[:, 0])
    else:
        token_array = pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(tokens).reshape(-1)), tokens.shape[1])
    table = pa.table({id_name: ids, TOKEN_COLUMN: token_array})
    return table.replace_schema_metadata({METADATA_KEY: json.dumps(job.provenance).encode()})


def write_shard(table, final: Path) -> bool:
    """Write `table` to `final` whole or not at all; False (nothing written) if `final` exists."""
    pa = _pyarrow()
    if final.exists():
        return False
    tmp = final.with_name(f".{final.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        pa.parquet.write_table(table, str(tmp))
        try:
            os.link(tmp, final)  # unlike rename, never replaces a shard another worker finished
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links
            os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return True


def shard_table(tokens: np.ndarray, ids, shard: Shard, job: JobSpec):
    """The output table of one shard: its tokens and ids, the job's provenance plus the shard's source rows."""
    provenance = dict(job.provenance, source=shard.source, rows=[shard.start, shard.stop], shard=shard.index)
    return token_table(tokens, ids, replace(job, provenance=provenance), job.id_column or DEFAULT_ID_COLUMN)


def encode_shard(quantizer, shard: Shard, job: JobSpec) -> tuple[int, int, bool]:
    """Read, encode and write one shard; (index, rows, written). Skips a shard already on disk."""
    final = Path(job.output_dir) / shard.output
    if final.exists():
        return shard.index, shard.rows, False
    vectors, ids = read_shard(shard, job, quantizer.info.dim)
    tokens = encode_rows(quantizer, vectors)
    return shard.index, shard.rows, write_shard(shard_table(tokens, ids, shard, job), final)


def encode_shards_pipelined(quantizer, shards: Sequence[Shard], job: JobSpec, prefetch: int = 1,
                            ) -> Iterator[tuple[int, int, bool]]:
    """`encode_shard` over `shards`, with reading and writing overlapped with the encode.

    A reader thread reads up to `prefetch` shards ahead and a writer thread writes each encoded
    shard while this thread encodes the next (pyarrow's parquet reader and writer, like ONNX
    Runtime's and torch's kernels, release the GIL). At most `prefetch` shards wait read and two
    wait written, so memory stays at a few shards. Yields ``(index, rows, written)`` in shard order,
    each once its file is in place. prefetch=0: one shard after another in this thread.

    Closing the generator early (the consumer raised, or stopped) cancels the reads not started and
    waits for the writes in flight; a write is whole or absent either way (`write_shard`), so a
    killed or stopped job leaves only whole shards, which a restart skips.
    """
    if prefetch < 0:
        raise UnsupportedOptionError(f"prefetch must be >= 0, got {prefetch}")
    if prefetch == 0:
        for shard in shards:
            yield encode_shard(quantizer, shard, job)
        return
    from collections import deque
    from concurrent.futures import Future, ThreadPoolExecutor

    output_dir = Path(job.output_dir)
    dim = quantizer.info.dim

    def read(shard: Shard):
        if (output_dir / shard.output).exists():  # written meanwhile (another job on the same folder)
            return None
        return read_shard(shard, job, dim)

    def write(shard: Shard, table) -> tuple[int, int, bool]:
        return shard.index, shard.rows, write_shard(table, output_dir / shard.output)

    reader = ThreadPoolExecutor(1, thread_name_prefix="vqdeploy-tokenize-read")
    writer = ThreadPoolExecutor(1, thread_name_prefix="vqdeploy-tokenize-write")
    reads: deque = deque()
    writes: deque[Future] = deque()
    upcoming = iter(shards)
    try:
        for shard in upcoming:
            reads.append((shard, reader.submit(read, shard)))
            if len(reads) == prefetch:
                break
        while reads:
            shard, future = reads.popleft()
            data = future.result()  # a read error surfaces here, in shard order
            for following in upcoming:  # keep `prefetch` reads queued behind this encode
                reads.append((following, reader.submit(read, following)))
                break
            if data is None:
                skipped: Future = Future()
                skipped.set_result((shard.index, shard.rows, False))
                writes.append(skipped)
            else:
                vectors, ids = data
                del data
                table = shard_table(encode_rows(quantizer, vectors), ids, shard, job)
                del vectors, ids
                while len(writes) >= 2:
                    yield writes.popleft().result()
                writes.append(writer.submit(write, shard, table))
                del table
            while writes and writes[0].done():
                yield writes.popleft().result()
        while writes:
            yield writes.popleft().result()
    finally:
        reader.shutdown(wait=True, cancel_futures=True)
        writer.shutdown(wait=True)


# -- the job file --------------------------------------------------------------------------------------
def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def job_record(provenance: dict[str, Any], files: Sequence[Path], rows: Sequence[int], column: str | None,
               id_column: str | None, shards: Sequence[Shard]) -> dict[str, Any]:
    """What identifies a job: a restart must match it field for field."""
    return dict(
        model_sha256=provenance["model_sha256"],
        inputs=[dict(path=str(p.resolve()), rows=int(n), bytes=p.stat().st_size) for p, n in zip(files, rows, strict=True)],
        column=column,
        id_column=id_column,
        shards=[[s.source, s.start, s.stop] for s in shards],
    )


def prepare_output(output_dir: Path, record: dict[str, Any], force: bool) -> None:
    """Create the output folder or check that it holds this very job; clear stale temp files."""
    from vqdeploy.errors import OutputExistsError

    job_file = output_dir / JOB_FILE
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputExistsError(f"{output_dir} is a file; the output of tokenize is a folder")
    if job_file.exists() and not force:
        try:
            previous = json.loads(job_file.read_text())
        except (OSError, ValueError) as error:
            raise ResumeMismatchError(f"{job_file} is unreadable ({error}); pass --force to start over") from error
        differs = [key for key in record if previous.get(key) != record[key]]
        if differs:
            raise ResumeMismatchError(
                f"{output_dir} holds another job's tokens ({', '.join(differs)} differ); "
                "write to a new folder, or pass --force to start over"
            )
    elif output_dir.exists() and any(output_dir.iterdir()):
        if not force:
            raise OutputExistsError(f"{output_dir} exists and is not a tokenize output; pass --force to replace its parts")
    if force and output_dir.is_dir():
        for stale in [*output_dir.glob("part-*.parquet"), output_dir / JOB_FILE, output_dir / DONE_FILE]:
            stale.unlink(missing_ok=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    for stale in output_dir.glob(".part-*.tmp"):  # left by a killed run: never a finished shard
        with contextlib.suppress(OSError):
            stale.unlink()
    if not job_file.exists():
        from vqdeploy.files import atomic_write

        atomic_write(job_file, lambda tmp: tmp.write_text(json.dumps(record, indent=1)), overwrite=True)
