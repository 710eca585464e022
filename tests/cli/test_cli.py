"""The `vqdeploy` command end to end, in subprocesses (`python -m vqdeploy ...`), on a fresh tmp dir.

Each subprocess pays the torch import (a few seconds), so the flows share one exported file, and
checks that stop before any real work (each command's --help, usage errors, refusals to
overwrite) also run in-process through `vqdeploy.cli.main`, with the same one-line contract.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from vqdeploy import save_quantizer
from vqdeploy.cli import main
from vqdeploy.examples import load_pretrained

COMMANDS = ("export", "inspect", "verify", "bench", "build", "triton-repo", "demo", "tokenize")


def run_cli(*args: object, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vqdeploy", *map(str, args)],
        cwd=cwd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"


def run_main(capsys, *args: object) -> subprocess.CompletedProcess:
    """`vqdeploy.cli.main` in this process, shaped like a finished subprocess."""
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, captured.out, captured.err)


def assert_one_error_line(proc: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    """Exactly one line on stderr, `vqdeploy: error: ...`, no traceback, and the expected exit status."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, f"exit {proc.returncode}, expected {code}; stderr:\n{proc.stderr}"
    assert len(lines) == 1, f"expected one line on stderr, got:\n{proc.stderr}"
    assert lines[0].startswith("vqdeploy: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A fresh folder with the shipped model's quantizer saved as a vqdeploy checkpoint."""
    folder = tmp_path_factory.mktemp("cli")
    save_quantizer(load_pretrained().quantizer, folder / "vq.safetensors")
    return folder


@pytest.fixture(scope="module")
def exported(workdir: Path) -> Path:
    """`vqdeploy export` of the checkpoint (encode part), shared by the flows below."""
    proc = run_cli("export", "vq.safetensors", "-o", "vq.onnx", "--part", "encode", cwd=workdir)
    assert_ok(proc)
    assert "wrote vq.onnx" in proc.stdout and "part=encode" in proc.stdout
    return workdir / "vq.onnx"


# -- help -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_help_has_an_example(command: str, capsys) -> None:
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"vqdeploy {command}" in out


def test_main_help_in_a_subprocess(tmp_path: Path) -> None:
    proc = run_cli("--help", cwd=tmp_path)
    assert_ok(proc)
    for command in COMMANDS:
        assert f"vqdeploy {command}" in proc.stdout  # one example per command


# -- demo -------------------------------------------------------------------------------------------------------
def test_demo_quick_runs_every_cpu_backend_and_keeps_files_only_with_force(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = run_cli("demo", "--quick", "--out", out, cwd=tmp_path)
    assert_ok(proc)
    header = next(line for line in proc.stdout.splitlines() if line.startswith("backend"))
    for column in ("device", "graph", "tokens identical", "certified ties", "violations", "vs eager"):
        assert column in header
    rows = {tuple(line.split()[:3]) for line in proc.stdout.splitlines()}
    assert ("ort", "cpu", "fused") in rows and ("ort", "cpu", "unfused") in rows
    assert ("torch", "cpu", "(weights)") in rows
    assert any(line.startswith("ort (whole model)") for line in proc.stdout.splitlines())
    for name in ("digits_vq.safetensors", "digits_vq_encode.onnx", "digits_vq_encode_unfused.onnx",
                 "digits_vqvae.onnx", "parity_reports.json"):
        assert (out / name).is_file(), name
    reports = json.loads((out / "parity_reports.json").read_text())
    assert reports and all(r["passed"] and r["violations"] == 0 for r in reports)

    before = (out / "digits_vq_encode.onnx").read_bytes()
    again = run_cli("demo", "--quick", "--out", out, cwd=tmp_path)
    assert_one_error_line(again, 1, "already exists", "--force")
    assert (out / "digits_vq_encode.onnx").read_bytes() == before


# -- export -> inspect -> verify -> bench ---------------------------------------------------------------------
def test_inspect_shows_metadata_io_and_nearest_code_nodes(exported: Path) -> None:
    proc = run_cli("inspect", exported.name, cwd=exported.parent)
    assert_ok(proc)
    for text in ("VectorQuantize", "encode", "b d h w", "codebook_size", "input", "indices", "NearestCode nodes: 1",
                 "CPU tile GEMM: "):
        assert text in proc.stdout

    as_json = run_cli("inspect", exported.name, "--json", cwd=exported.parent)
    assert_ok(as_json)
    described = json.loads(as_json.stdout)
    assert described["metadata"]["part"] == "encode" and described["metadata"]["fused"] is True
    assert described["nearest_code_nodes"] == 1 and described["nearest_code_function"] is True
    assert [v["name"] for v in described["inputs"]] == ["x"]
    assert described["outputs"][0]["dtype"] == "int64"
    assert described["cpu_gemm"].startswith("CPU tile GEMM: ")


def test_verify_passes_prints_the_table_and_writes_json_only_with_force(exported: Path, capsys, monkeypatch) -> None:
    folder = exported.parent
    proc = run_cli("verify", "vq.safetensors", exported.name, "--num-samples", "256", "--json", "report.json",
                   cwd=folder)
    assert_ok(proc)
    assert "PASS" in proc.stdout and "certified ties" in proc.stdout
    report = json.loads((folder / "report.json").read_text())
    assert report["passed"] and report["violations"] == 0 and report["backend"] == "ort"

    monkeypatch.chdir(folder)
    refused = run_main(capsys, "verify", "vq.safetensors", exported.name, "--json", "report.json")
    assert_one_error_line(refused, 1, "report.json already exists", "--force")

    forced = run_main(capsys, "verify", "vq.safetensors", exported.name, "--backend", "torch", "--num-samples", "128",
                      "--json", "report.json", "--force")
    assert_ok(forced)
    assert json.loads((folder / "report.json").read_text())["backend"] == "torch"


def test_verify_takes_inputs_from_a_npy_file(exported: Path) -> None:
    import numpy as np

    folder = exported.parent
    np.save(folder / "x.npy", np.random.default_rng(0).standard_normal((3, 16, 4, 4)).astype(np.float32))
    proc = run_cli("verify", "vq.safetensors", exported.name, "--inputs", "x.npy", cwd=folder)
    assert_ok(proc)
    assert "48 tokens" in proc.stdout  # 3 x 4 x 4


def test_bench_prints_throughput_and_ratios(exported: Path) -> None:
    proc = run_cli("bench", exported.name, "--checkpoint", "vq.safetensors", "--backends", "ort,torch",
                   "--n", "4096", "--repeats", "1", cwd=exported.parent)
    assert_ok(proc)
    lines = proc.stdout.splitlines()
    assert any(line.startswith("ort ") and "x" in line for line in lines)
    assert any(line.startswith("torch ") for line in lines)
    assert any(line.startswith("eager torch") and "1.00x" in line for line in lines)
    assert any(line.startswith("CPU tile GEMM: ") and ("torch's MKL" in line or "numpy's" in line)
               and ("compiled code" in line or "Python tile loop" in line) for line in lines)
    pytest.importorskip("faiss")
    assert any(line.startswith("faiss IndexFlatL2") for line in lines)


def test_export_refuses_to_overwrite_without_force(exported: Path) -> None:
    before = exported.read_bytes()
    proc = run_cli("export", "vq.safetensors", "-o", exported.name, cwd=exported.parent)
    assert_one_error_line(proc, 1, "already exists", "--force")
    assert exported.read_bytes() == before


def test_export_with_force_replaces_the_file(workdir: Path, capsys, monkeypatch) -> None:
    target = workdir / "replace_me.onnx"
    target.write_text("a file the user owns")
    monkeypatch.chdir(workdir)
    proc = run_main(capsys, "export", "vq.safetensors", "-o", target.name, "--unfused", "--force")
    assert_ok(proc)
    model = onnx.load(str(target))
    assert not [n for n in model.graph.node if n.op_type == "NearestCode"]  # unfused: standard ops only


# -- errors: one clear line, non-zero exit ---------------------------------------------------------------------------
def test_missing_file_is_one_line(tmp_path: Path) -> None:
    proc = run_cli("inspect", "missing.onnx", cwd=tmp_path)
    assert_one_error_line(proc, 1, "missing.onnx", "does not exist")


def test_bad_backend_name_is_a_usage_error(exported: Path, capsys, monkeypatch) -> None:
    proc = run_cli("verify", "vq.safetensors", exported.name, "--backend", "tensorflow", cwd=exported.parent)
    assert_one_error_line(proc, 2, "tensorflow")
    monkeypatch.chdir(exported.parent)
    assert_one_error_line(run_main(capsys, "bench", exported.name, "--backends", "ort,foo"), 2, "unknown backend 'foo'")


def test_onnx_file_with_metadata_stripped_is_refused(exported: Path) -> None:
    model = onnx.load(str(exported))
    del model.metadata_props[:]
    tampered = exported.parent / "stripped.onnx"
    onnx.save(model, str(tampered))
    proc = run_cli("verify", "vq.safetensors", tampered.name, cwd=exported.parent)
    assert_one_error_line(proc, 1, "not a vqdeploy export")


def test_a_file_that_is_not_onnx_is_refused(tmp_path: Path) -> None:
    (tmp_path / "fake.onnx").write_bytes(b"\x00\x01 definitely not protobuf \xff" * 10)
    proc = run_cli("bench", "fake.onnx", cwd=tmp_path)
    assert_one_error_line(proc, 1, "fake.onnx")


def test_build_without_tensorrt_names_what_to_install(exported: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here; the error path needs a machine without it")
    proc = run_cli("build", exported.name, cwd=exported.parent)
    assert_one_error_line(proc, 1, "pip install tensorrt")


def test_usage_errors_exit_2_with_one_line(capsys) -> None:
    assert_one_error_line(run_main(capsys), 2, "choose a command")
    assert_one_error_line(run_main(capsys, "export"), 2, "required")
    assert_one_error_line(run_main(capsys, "frobnicate"), 2, "invalid choice")
    assert_one_error_line(run_main(capsys, "bench", "x.onnx", "--n", "many"), 2, "--n")


def test_debug_shows_the_traceback(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    proc = run_main(capsys, "inspect", "missing.onnx", "--debug")
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and proc.stderr.strip().splitlines()[-1].startswith("vqdeploy: error: ")
