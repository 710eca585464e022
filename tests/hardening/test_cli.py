"""The command line under abuse: one line on stderr, exit status 1, 2 or 130, never a traceback,
never a file that lies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import onnx
import pytest
import torch

from vqdeploy import VectorQuantize, export_onnx, save_quantizer
from vqdeploy.cli.output import one_line


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vqdeploy", *args], capture_output=True, text=True, timeout=timeout)


def _one_line_error(result: subprocess.CompletedProcess, codes=(1, 2)) -> str:
    assert result.returncode in codes, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vqdeploy: error:"), result.stderr
    assert "Traceback" not in result.stderr and "\x1b" not in result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    return save_quantizer(VectorQuantize(dim=8, codebook_size=16).eval(), tmp_path_factory.mktemp("cli") / "vq.safetensors")


@pytest.mark.parametrize("opset", ["99", "17", "-1"])
def test_an_opset_out_of_range_is_one_line_and_writes_nothing(checkpoint, tmp_path, opset):
    out = tmp_path / "vq.onnx"
    line = _one_line_error(_cli("export", str(checkpoint), "-o", str(out), "--opset", opset))
    assert "opset" in line
    assert not out.exists()


def test_every_supported_opset_is_what_the_file_says(checkpoint, tmp_path):
    from vqdeploy.export.functions import MIN_OPSET
    from vqdeploy.export.onnx import MAX_OPSET

    vq = VectorQuantize(dim=8, codebook_size=16).eval()
    for opset in sorted({MIN_OPSET, MAX_OPSET}):
        path = export_onnx(vq, tmp_path / f"vq{opset}.onnx", part="encode", opset=opset)
        model = onnx.load(str(path))
        declared = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        from vqdeploy import read_metadata

        assert declared == opset == read_metadata(path).opset


@pytest.mark.parametrize(("args", "expected"), [
    (["verify", "CK", "X.onnx", "--num-samples", "0"], "expected a number >= 1, got 0"),
    (["bench", "X.onnx", "--n", "1e12"], "expected a whole number, got '1e12'"),
    (["bench", "X.onnx", "--n", str(10**13)], "at most"),
])
def test_number_arguments_are_usage_errors(checkpoint, args, expected):
    args = [str(checkpoint) if a == "CK" else a for a in args]
    line = _one_line_error(_cli(*args), codes=(2,))
    assert expected in line, line


def _wait_for_library(pid: int, name: str, limit: float = 60) -> bool:
    """Wait until process `pid` has mapped a shared library whose path holds `name` (it is importing it)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/maps") as maps:
                if name in maps.read():
                    return True
        except FileNotFoundError:
            return False
        time.sleep(0.005)
    return False


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="finds the start-up phase through /proc")
@pytest.mark.parametrize("library", ["libtorch", "onnx"])
def test_sigint_during_start_up_exits_130_with_one_line(library):
    """A Ctrl-C while start-up imports torch (or onnx): one line, exit status 130, no traceback.

    A KeyboardInterrupt raised inside onnx's native module as it loaded killed the interpreter
    (SIGSEGV, SIGABRT) or was lost; the CLI defers the signal until the libraries have loaded
    (vqdeploy.cli.app.interrupts_deferred)."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # a child inherits it (pytest started with `&`)
        pytest.skip("SIGINT is ignored in this process, so in the command's too")
    child = subprocess.Popen([sys.executable, "-m", "vqdeploy", "inspect", "nothing.onnx"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert _wait_for_library(child.pid, library), "start-up never loaded " + library
    child.send_signal(signal.SIGINT)
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == 130, (child.returncode, stderr)
    assert stderr.strip() == "vqdeploy: error: interrupted", stderr


def test_one_line_strips_onnxruntime_log_lines():
    coloured = ("\x1b[1;31m2026-12-01 18:00:00.123456789 [E:onnxruntime:, inference_session.cc:2544 operator()] "
                "Exception during initialization: bad graph\x1b[m\n")
    error = RuntimeError(coloured + "[ONNXRuntimeError] : 1 : FAIL : Load model failed:\n  node 3 invalid")
    line = one_line(error)
    assert "\x1b" not in line and "[E:onnxruntime" not in line and "\n" not in line
    assert "bad graph" in line and "node 3 invalid" in line


def test_a_broken_graph_is_one_line_through_onnxruntime(checkpoint, tmp_path):
    """ORT's own log line (coloured, on stderr) must not join the CLI's one line."""
    path = export_onnx(VectorQuantize(dim=8, codebook_size=16).eval(), tmp_path / "vq.onnx", part="encode")
    model = onnx.load(str(path))
    model.graph.node[0].op_type = "NoSuchOp"
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(model.SerializeToString())
    env = dict(os.environ, TERM="xterm-256color")
    result = subprocess.run([sys.executable, "-m", "vqdeploy", "bench", str(broken), "--n", "64"],
                            capture_output=True, text=True, timeout=300, env=env)
    _one_line_error(result, codes=(1,))
