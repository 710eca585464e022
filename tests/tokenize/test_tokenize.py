"""vqdeploy.tokenize: every engine writes exactly Quantizer.encode's tokens; resume after SIGKILL; bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vqdeploy import ResidualVQ, VectorQuantize, export_onnx, runtime
from vqdeploy.cli import main
from vqdeploy.errors import (
    InputShapeError,
    ResumeMismatchError,
    TokensDifferError,
    UnreadableInputError,
    UnsupportedOptionError,
)
from vqdeploy.tokenize import read_provenance, tokenize_corpus
from vqdeploy.tokenize.engines import ray_actor_cpus
from vqdeploy.tokenize.shards import vectors_from_arrow

N, D, K = 200_000, 16, 1024
SHARD_ROWS = 50_000


def fixed_size_list(x: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A K=1024 encode export, 200k vectors as parquet (fixed-size lists, 8 row groups) and .npy, the reference tokens."""
    folder = tmp_path_factory.mktemp("corpus")
    import torch

    torch.manual_seed(0)
    vq = VectorQuantize(dim=D, codebook_size=K).eval()
    model = export_onnx(vq, folder / "vq.onnx", part="encode")
    x = np.random.default_rng(0).standard_normal((N, D)).astype(np.float32)
    keys = np.arange(N, dtype=np.int64) * 7 + 3
    pq.write_table(pa.table({"key": keys, "emb": fixed_size_list(x)}), folder / "x.parquet", row_group_size=25_000)
    np.save(folder / "x.npy", x)
    with runtime.load(model, backend="ort") as quantizer:
        reference = quantizer.encode(x)
    return dict(model=model, x=x, keys=keys, parquet=folder / "x.parquet", npy=folder / "x.npy", tokens=reference)


def read_output(folder: Path, id_name: str = "id") -> tuple[np.ndarray, np.ndarray]:
    parts = sorted(folder.glob("part-*.parquet"))
    table = pa.concat_tables(pq.read_table(p) for p in parts)
    ids = table.column(id_name).to_numpy()
    order = np.argsort(ids, kind="stable")
    tokens = table.column("tokens").combine_chunks()
    if pa.types.is_fixed_size_list(tokens.type):
        tokens = tokens.flatten().to_numpy().reshape(len(ids), -1)
    else:
        tokens = tokens.to_numpy()
    return ids[order], tokens[order]


def check_output(corpus, folder: Path, id_column: str | None = "key") -> None:
    ids, tokens = read_output(folder, id_column or "id")
    expected_ids = corpus["keys"] if id_column else np.arange(N)
    np.testing.assert_array_equal(ids, expected_ids)  # every row once, none twice
    np.testing.assert_array_equal(tokens, corpus["tokens"])


# -- local and dask ------------------------------------------------------------------------------
def test_local_engine_writes_encode_tokens_with_provenance(corpus, tmp_path):
    report = tokenize_corpus(corpus["model"], [corpus["parquet"]], tmp_path / "out", id_column="key",
                             shard_rows=SHARD_ROWS, verify_sample=1000)
    assert (report.rows, report.shards, report.shards_written, report.verified_rows) == (N, 4, 4, 1000)
    check_output(corpus, tmp_path / "out")
    provenance = read_provenance(tmp_path / "out" / "part-00000.parquet")
    import hashlib

    assert provenance["model_sha256"] == hashlib.sha256(corpus["model"].read_bytes()).hexdigest()
    assert (provenance["codebook_size"], provenance["stages"], provenance["dim"]) == (K, 1, D)
    assert provenance["column"] == "emb" and provenance["rows"] == [0, 50_000]
    import vqdeploy

    assert provenance["vqdeploy_version"] == vqdeploy.__version__
    assert pq.read_schema(tmp_path / "out" / "part-00001.parquet").field("tokens").type == pa.int32()


def test_npy_input_and_model_bytes(corpus, tmp_path):
    report = tokenize_corpus(corpus["model"].read_bytes(), [corpus["npy"]], tmp_path / "out", shard_rows=60_000)
    assert report.shards == 4  # 60k, 60k, 60k, 20k
    check_output(corpus, tmp_path / "out", id_column=None)


def test_variable_length_list_column_and_several_files(corpus, tmp_path):
    x = corpus["x"]
    half = N // 2
    for i, rows in enumerate((slice(0, half), slice(half, N))):
        vectors = pa.array(list(x[rows].astype(np.float64)), type=pa.list_(pa.float64()))
        pq.write_table(pa.table({"vec": vectors}), tmp_path / f"in{i}.parquet", row_group_size=40_000)
    tokenize_corpus(corpus["model"], [tmp_path / "in0.parquet", tmp_path / "in1.parquet"], tmp_path / "out",
                    shard_rows=SHARD_ROWS)
    check_output(corpus, tmp_path / "out", id_column=None)  # ids run on across files


def test_dask_threads_engine(corpus, tmp_path):
    report = tokenize_corpus(corpus["model"], [corpus["parquet"]], tmp_path / "out", engine="dask", workers=2,
                             id_column="key", shard_rows=SHARD_ROWS, verify_sample=500)
    assert report.shards_written == 4
    check_output(corpus, tmp_path / "out")


@pytest.fixture
def environment_kept():
    """os.environ as it was before the test: LocalCluster leaves its workers' settings
    (OMP_NUM_THREADS=1, MKL_NUM_THREADS=1...) in this process's environment, which every later
    subprocess of the session would inherit."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.slow
def test_dask_cluster_at_address(corpus, tmp_path, environment_kept):
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None, worker_dashboard_address=None) as cluster:
        report = tokenize_corpus(corpus["model"], [corpus["parquet"]], tmp_path / "out", engine="dask",
                                 address=cluster.scheduler_address, id_column="key", shard_rows=SHARD_ROWS)
    assert report.shards_written == 4
    check_output(corpus, tmp_path / "out")


def test_residual_and_multi_head_tokens_per_stage(tmp_path):
    import torch

    torch.manual_seed(0)
    x = np.random.default_rng(2).standard_normal((3000, 32)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    for name, module in (("rvq", ResidualVQ(dim=32, num_quantizers=3, codebook_size=64)),
                         ("heads", VectorQuantize(dim=32, codebook_size=64, heads=4, separate_codebook_per_head=True))):
        model = export_onnx(module.eval(), tmp_path / f"{name}.onnx", part="encode")
        tokenize_corpus(model, [tmp_path / "x.npy"], tmp_path / name, shard_rows=1000, verify_sample=300)
        with runtime.load(model, backend="ort") as quantizer:
            expected = quantizer.encode(x[None])[:, 0].T if name == "rvq" else quantizer.encode(x)
        _, tokens = read_output(tmp_path / name)
        np.testing.assert_array_equal(tokens, expected)
        assert read_provenance(tmp_path / name / "part-00000.parquet")["stages"] == (3 if name == "rvq" else 1)


def test_torch_backend_gives_the_same_tokens(corpus, tmp_path):
    """The job's tokens are the torch backend's encode of the same rows (its exact search may take
    the other code of a float32 tie than ONNX Runtime's ArgMin: a certified tie, not an error)."""
    tokenize_corpus(corpus["model"], [corpus["npy"]], tmp_path / "out", backend="torch", shard_rows=100_000)
    with runtime.load(corpus["model"], backend="torch") as quantizer:
        expected = quantizer.encode(corpus["x"])
    check_output(dict(corpus, tokens=expected), tmp_path / "out", id_column=None)


# -- resume ----------------------------------------------------------------------------------------
KILLED_JOB = textwrap.dedent("""
    import sys, time
    from vqdeploy.tokenize import tokenize_corpus

    def finished(index, rows):
        print(index, flush=True)
        time.sleep(0.3)  # a slow corpus: the parent kills us while the job runs

    tokenize_corpus(sys.argv[1], [sys.argv[2]], sys.argv[3], engine=sys.argv[4], workers=2, shard_rows=10_000,
                    on_shard=finished)
""")


@pytest.mark.parametrize("engine", ["local", "dask"])
def test_killed_job_restarts_where_it_stopped(corpus, tmp_path, engine):
    out = tmp_path / "out"
    child = subprocess.Popen([sys.executable, "-c", KILLED_JOB, str(corpus["model"]), str(corpus["npy"]), str(out),
                              engine], stdout=subprocess.PIPE, text=True)
    try:
        first = child.stdout.readline()  # blocks until the first shard is on disk
        assert first.strip().isdigit(), f"the job printed {first!r}"
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    kept = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("part-*.parquet")}
    assert 1 <= len(kept) < 20, f"{len(kept)} of 20 shards were on disk at the kill"
    report = tokenize_corpus(corpus["model"], [corpus["npy"]], out, engine=engine, workers=2, shard_rows=10_000)
    assert report.shards_skipped == len(kept) and report.shards_written == 20 - len(kept)
    assert not list(out.glob(".*.tmp"))
    for name, stamp in kept.items():  # finished shards were not written again
        path = out / name
        assert (path.stat().st_ino, path.stat().st_mtime_ns) == stamp
    check_output(corpus, out, id_column=None)


# -- the local engine's read-ahead / write-behind pipeline -----------------------------------------
def tokenize_threads() -> list[str]:
    import threading

    return [t.name for t in threading.enumerate() if t.name.startswith("vqdeploy-tokenize")]


@pytest.mark.parametrize("prefetch", [0, 1, 3])
def test_local_prefetch_gives_the_same_files_in_shard_order(corpus, tmp_path, prefetch):
    seen: list[int] = []
    report = tokenize_corpus(corpus["model"], [corpus["parquet"]], tmp_path / "out", id_column="key",
                             shard_rows=SHARD_ROWS, prefetch=prefetch, on_shard=lambda index, rows: seen.append(index))
    assert seen == [0, 1, 2, 3] and report.shards_written == 4
    check_output(corpus, tmp_path / "out")
    assert read_provenance(tmp_path / "out" / "part-00002.parquet")["rows"] == [100_000, 150_000]
    assert tokenize_threads() == []


def test_prefetch_must_not_be_negative(corpus, tmp_path):
    with pytest.raises(UnsupportedOptionError, match="prefetch must be >= 0, got -1"):
        tokenize_corpus(corpus["model"], [corpus["npy"]], tmp_path / "out", prefetch=-1)


def test_a_read_error_ahead_stops_the_job_after_the_shards_before_it(corpus, tmp_path):
    """Shard 3's vectors hold a null: the reader thread's error surfaces as the typed error, after
    shards 0-2 were written whole, and no thread of the pipeline is left running."""
    x = corpus["x"][:4000]
    vectors = pa.array([None if i == 3500 else row for i, row in enumerate(x.tolist())], type=pa.list_(pa.float32(), D))
    pq.write_table(pa.table({"emb": vectors}), tmp_path / "nulls.parquet", row_group_size=1000)
    with pytest.raises(InputShapeError, match="rows 3000-4000: 1 row"):
        tokenize_corpus(corpus["model"], [tmp_path / "nulls.parquet"], tmp_path / "out", shard_rows=1000, prefetch=2)
    assert sorted(p.name for p in (tmp_path / "out").glob("part-*")) == [f"part-0000{i}.parquet" for i in range(3)]
    assert not list((tmp_path / "out").glob(".*.tmp")) and tokenize_threads() == []
    _, tokens = read_output(tmp_path / "out")
    np.testing.assert_array_equal(tokens, corpus["tokens"][:3000])


def test_a_failing_consumer_stops_the_pipeline_with_whole_shards(corpus, tmp_path):
    out = tmp_path / "out"

    def stop(index, rows):
        raise KeyboardInterrupt  # as Ctrl-C in the driver while reads and writes are in flight

    with pytest.raises(KeyboardInterrupt):
        tokenize_corpus(corpus["model"], [corpus["npy"]], out, shard_rows=10_000, prefetch=3, on_shard=stop)
    assert tokenize_threads() == []
    kept = sorted(out.glob("part-*.parquet"))
    assert 1 <= len(kept) <= 3 and not list(out.glob(".*.tmp"))  # shard 0, and the writes in flight finished
    for part in kept:
        assert pq.read_metadata(part).num_rows == 10_000
    report = tokenize_corpus(corpus["model"], [corpus["npy"]], out, shard_rows=10_000)
    assert (report.shards_skipped, report.shards_written) == (len(kept), 20 - len(kept))
    check_output(corpus, out, id_column=None)


STALLED_WRITE_JOB = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import vqdeploy.tokenize.shards as shards
    from vqdeploy.tokenize import tokenize_corpus

    real_write = shards.write_shard

    def write_shard(table, final):  # shard 2's write dies half-way: half a temp file, never linked
        if final.name != "part-00002.parquet":
            return real_write(table, final)
        real_write(table, final.with_name("whole.parquet"))
        data = final.with_name("whole.parquet").read_bytes()
        final.with_name("whole.parquet").unlink()
        final.with_name(f".{final.name}.123.abcd.tmp").write_bytes(data[: len(data) // 2])
        print("stalled", flush=True)
        time.sleep(600)

    shards.write_shard = write_shard
    tokenize_corpus(sys.argv[1], [sys.argv[2]], sys.argv[3], shard_rows=10_000, prefetch=2)
""")


def test_job_killed_with_a_write_in_flight_resumes_without_half_shards(corpus, tmp_path):
    out = tmp_path / "out"
    child = subprocess.Popen([sys.executable, "-c", STALLED_WRITE_JOB, str(corpus["model"]), str(corpus["npy"]), str(out)],
                             stdout=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()  # shard 2 is half on disk; the encoder has moved on
        assert line.strip() == "stalled", f"the job printed {line!r}"
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert [p.name for p in out.glob(".*.tmp")] == [".part-00002.parquet.123.abcd.tmp"]
    kept = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("part-*.parquet")}
    assert "part-00002.parquet" not in kept and {"part-00000.parquet", "part-00001.parquet"} <= set(kept)
    report = tokenize_corpus(corpus["model"], [corpus["npy"]], out, shard_rows=10_000, prefetch=2)
    assert report.shards_skipped == len(kept) and report.shards_written == 20 - len(kept)
    assert not list(out.glob(".*.tmp"))
    for name, stamp in kept.items():
        assert ((out / name).stat().st_ino, (out / name).stat().st_mtime_ns) == stamp
    check_output(corpus, out, id_column=None)


def test_restart_with_other_settings_is_refused(corpus, tmp_path):
    tokenize_corpus(corpus["model"], [corpus["npy"]], tmp_path / "out", shard_rows=100_000)
    with pytest.raises(ResumeMismatchError, match="shards differ"):
        tokenize_corpus(corpus["model"], [corpus["npy"]], tmp_path / "out", shard_rows=50_000)
    report = tokenize_corpus(corpus["model"], [corpus["npy"]], tmp_path / "out", shard_rows=50_000, force=True)
    assert report.shards_written == 4 and len(list((tmp_path / "out").glob("part-*"))) == 4


# -- verify-sample ---------------------------------------------------------------------------------
def test_verify_sample_catches_a_changed_token(corpus, tmp_path):
    out = tmp_path / "out"
    tokenize_corpus(corpus["model"], [corpus["npy"]], out, shard_rows=100_000)
    part = out / "part-00001.parquet"
    table = pq.read_table(part)
    tokens = table.column("tokens").to_numpy().copy()
    tokens[123] = (tokens[123] + 1) % K
    pq.write_table(table.set_column(1, "tokens", pa.array(tokens)), part)
    with pytest.raises(TokensDifferError, match=r"1 of 200000 re-encoded rows differ .*part-00001.parquet row 123"):
        tokenize_corpus(corpus["model"], [corpus["npy"]], out, shard_rows=100_000, verify_sample=N)


def test_cli_verify_failure_is_one_line(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["tokenize", str(corpus["model"]), str(corpus["npy"]), "-o", str(out), "--shard-rows", "100000", "-q"]
    assert main(args) == 0
    assert "200000 vectors" in capsys.readouterr().out
    part = out / "part-00000.parquet"
    table = pq.read_table(part)
    pq.write_table(table.set_column(1, "tokens", pa.array(np.zeros(len(table), np.int32))), part)
    assert main([*args, "--verify-sample", "5000"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vqdeploy: error: ") and "re-encoded rows differ" in err


# -- bad input -------------------------------------------------------------------------------------
def test_bad_input_gives_one_line_cli_errors(corpus, tmp_path, capsys):
    x = corpus["x"][:100]
    pq.write_table(pa.table({"emb": fixed_size_list(x[:, :8])}), tmp_path / "dim8.parquet")
    pq.write_table(pa.table({"emb": pa.array(list(x[:, :15]), type=pa.list_(pa.float32()))}), tmp_path / "ragged.parquet")
    (tmp_path / "notes.parquet").write_text("not parquet")
    np.save(tmp_path / "dim8.npy", x[:, :8])
    model = str(corpus["model"])
    cases = {
        "has no column 'vec'": [str(corpus["parquet"]), "--column", "vec"],
        "has no id column 'nope'": [str(corpus["parquet"]), "--id-column", "nope"],
        "holds vectors of 8; the model's dim is 16": [str(tmp_path / "dim8.parquet")],
        "holds a vector of 15; the model's dim is 16": [str(tmp_path / "ragged.parquet")],
        "has shape (100, 8); expected (N, 16)": [str(tmp_path / "dim8.npy")],
        "notes.parquet is not a parquet file": [str(tmp_path / "notes.parquet")],
        "is neither a .parquet nor a .npy file": [model],
        "does not exist": [str(tmp_path / "missing.parquet")],
        "engine 'local' runs in this process": [str(corpus["npy"]), "--address", "127.0.0.1:1"],
    }
    for i, (message, extra) in enumerate(cases.items()):
        status = main(["tokenize", model, *extra, "-o", str(tmp_path / f"out{i}"), "-q"])
        err = capsys.readouterr().err
        assert status != 0, message
        assert err.count("\n") == 1 and err.startswith("vqdeploy: error: ") and message in err, (message, err)


def test_bad_input_raises_typed_errors(corpus, tmp_path):
    with pytest.raises(UnreadableInputError, match="pass --column"):
        pq.write_table(pa.table({"a": fixed_size_list(corpus["x"][:10]), "b": fixed_size_list(corpus["x"][:10])}),
                       tmp_path / "two.parquet")
        tokenize_corpus(corpus["model"], [tmp_path / "two.parquet"], tmp_path / "out")
    with pytest.raises(InputShapeError):
        np.save(tmp_path / "flat.npy", corpus["x"][:10].reshape(-1))
        tokenize_corpus(corpus["model"], [tmp_path / "flat.npy"], tmp_path / "out")
    decode = export_onnx(VectorQuantize(dim=D, codebook_size=K).eval(), tmp_path / "decode.onnx", part="decode")
    with pytest.raises(UnsupportedOptionError, match="part 'decode'"):
        tokenize_corpus(decode, [corpus["npy"]], tmp_path / "out")
    with pytest.raises(UnsupportedOptionError, match="unknown engine"):
        tokenize_corpus(corpus["model"], [corpus["npy"]], tmp_path / "out", engine="spark")


def test_fixed_size_list_columns_are_read_without_a_copy(corpus):
    x = corpus["x"][:1000]
    column = fixed_size_list(x)  # pyarrow wraps the numpy buffer
    vectors = vectors_from_arrow(column, D, "test")
    assert np.shares_memory(vectors, x)
    sliced = vectors_from_arrow(column.slice(10, 20), D, "test")  # an offset, as a row-group slice has
    np.testing.assert_array_equal(sliced, x[10:30])
    assert np.shares_memory(sliced, x)
    ragged = pa.array(list(x[:5]), type=pa.list_(pa.float32()))
    np.testing.assert_array_equal(vectors_from_arrow(ragged, D, "test"), x[:5])


@pytest.mark.parametrize("engine, package, extra", [("ray", "ray", "vqdeploy[ray]"), ("dask", "dask", "vqdeploy[dask]")])
def test_missing_engine_names_the_extra(corpus, tmp_path, engine, package, extra):
    script = textwrap.dedent(f"""
        import sys
        sys.modules[{package!r}] = None  # as if not installed
        from vqdeploy.errors import BackendNotAvailableError
        from vqdeploy.tokenize import tokenize_corpus
        try:
            tokenize_corpus({str(corpus["model"])!r}, [{str(corpus["npy"])!r}], {str(tmp_path / "out")!r}, engine={engine!r})
        except BackendNotAvailableError as error:
            print(error)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"pip install '{extra}'" in proc.stdout


# -- Ray -------------------------------------------------------------------------------------------
def test_ray_actors_leave_cpu_for_the_planner():
    assert ray_actor_cpus(2, 2) == 0.75  # 2 x 1 CPU on 2 CPUs deadlocked
    assert ray_actor_cpus(64, 8) == 1.0
    assert ray_actor_cpus(2, 4) * 4 <= 2 - 0.5


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    """A private Ray: 2 CPUs, loopback only, no dashboard, no usage stats, its files in the test's tmp dir."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    temp = tmp_path_factory.mktemp("ray")  # short: Ray's socket paths must stay under ~107 characters
    previous = os.environ.get("RAY_USAGE_STATS_ENABLED")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", _temp_dir=str(temp),
             log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()
    if previous is None:
        os.environ.pop("RAY_USAGE_STATS_ENABLED", None)
    else:
        os.environ["RAY_USAGE_STATS_ENABLED"] = previous


@pytest.mark.slow
def test_ray_engine(corpus, tmp_path, local_ray):
    start = time.perf_counter()
    report = tokenize_corpus(corpus["model"], [corpus["parquet"]], tmp_path / "out", engine="ray", workers=2,
                             id_column="key", shard_rows=SHARD_ROWS, verify_sample=1000)
    assert report.shards_written == 4 and report.verified_rows == 1000 and time.perf_counter() > start
    check_output(corpus, tmp_path / "out")
    again = tokenize_corpus(corpus["model"], [corpus["parquet"]], tmp_path / "out", engine="ray", workers=2,
                            id_column="key", shard_rows=SHARD_ROWS)
    assert (again.shards_written, again.shards_skipped) == (0, 4)


@pytest.mark.slow
def test_ray_engine_resumes_a_partial_output(corpus, tmp_path, local_ray):
    """Shards left by an earlier (local) run are kept; Ray encodes only the rest, from npy input."""
    out = tmp_path / "out"
    tokenize_corpus(corpus["model"], [corpus["npy"]], out, shard_rows=SHARD_ROWS)
    (out / "part-00001.parquet").unlink()
    (out / "part-00003.parquet").unlink()
    kept = (out / "part-00000.parquet").stat().st_mtime_ns
    report = tokenize_corpus(corpus["model"], [corpus["npy"]], out, engine="ray", workers=2, shard_rows=SHARD_ROWS)
    assert (report.shards_written, report.shards_skipped) == (2, 2)
    assert (out / "part-00000.parquet").stat().st_mtime_ns == kept
    check_output(corpus, out, id_column=None)


def test_module_example_runs(tmp_path, monkeypatch):
    import doctest

    import vqdeploy.tokenize

    monkeypatch.chdir(tmp_path)
    result = doctest.testmod(vqdeploy.tokenize, verbose=False)
    assert result.attempted >= 5 and result.failed == 0
