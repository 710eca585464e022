"""Run a Triton repository's model.onnx in the ONNX Runtime that Triton's onnxruntime backend ships.

Triton cannot run here; what its backend does with the file is load it in its own ONNX Runtime and
run it. This script does the same in a separate virtual environment holding only that version of
onnxruntime (and this numpy), feeds it token rows, and compares its tokens with this
environment's ONNX Runtime on the same file. Exit status: 0 tokens identical, 1 they differ,
3 the old ONNX Runtime could not be installed (no registry reachable, say).

    python tools/triton_ort_check.py REPO/NAME                 # ORT = vqdeploy.serving.triton.TRITON_ORT_VERSION
    python tools/triton_ort_check.py REPO/NAME --ort-version 1.24.4 --venv /tmp/ort124
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

import numpy as np
import onnxruntime as ort

from vqdeploy.serving.triton import TRITON_ORT_VERSION

# Runs inside the old environment: load the file as Triton's backend would (CPU provider), run x.
CHILD = """
import sys, numpy as np, onnxruntime as ort
session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
x = np.load(sys.argv[2])
np.save(sys.argv[3], session.run(["indices"], {"x": x})[0])
print(ort.__version__)
"""


def ensure_venv(path: Path, ort_version: str) -> Path:
    """A venv at `path` with onnxruntime==ort_version and this numpy; returns its python."""
    python = path / "bin" / "python"
    marker = path / f"onnxruntime-{ort_version}.ok"
    if marker.exists():
        return python
    venv.create(path, with_pip=True, clear=True)
    command = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
               f"onnxruntime=={ort_version}", f"numpy=={np.__version__}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip().splitlines()[-5:]
        raise OSError(f"could not install onnxruntime=={ort_version}: " + " | ".join(tail))
    marker.write_text("")
    return python


def check(model_dir: Path, ort_version: str, venv_dir: Path, tokens: int, seed: int) -> dict:
    model = model_dir / "1" / "model.onnx" if model_dir.is_dir() else model_dir
    current = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    dim = current.get_inputs()[0].shape[1]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, dim)).astype(np.float32)
    expected = current.run(["indices"], {"x": x})[0]
    python = ensure_venv(venv_dir, ort_version)
    with tempfile.TemporaryDirectory() as tmp:
        x_path, out_path = Path(tmp) / "x.npy", Path(tmp) / "indices.npy"
        np.save(x_path, x)
        done = subprocess.run([str(python), "-c", CHILD, str(model), str(x_path), str(out_path)],
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"onnxruntime {ort_version} could not run {model}: {done.stderr.strip()[-2000:]}")
        got = np.load(out_path)
        old_version = done.stdout.strip().splitlines()[-1]
    differing = int((got != expected).sum()) if got.shape == expected.shape else -1
    return {"model": str(model), "old_ort": old_version, "current_ort": ort.__version__, "tokens": tokens,
            "shape": list(got.shape), "expected_shape": list(expected.shape), "differing": differing}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="REPO/NAME (or a model.onnx)")
    parser.add_argument("--ort-version", default=TRITON_ORT_VERSION)
    parser.add_argument("--venv", type=Path, default=None, help="where the old ONNX Runtime lives (reused if there)")
    parser.add_argument("--tokens", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    venv_dir = args.venv or Path(tempfile.gettempdir()) / f"vqdeploy-ort-{args.ort_version}"
    try:
        report = check(args.model, args.ort_version, venv_dir, args.tokens, args.seed)
    except OSError as error:
        print(f"triton_ort_check: {error}", file=sys.stderr)
        return 3
    print(json.dumps(report))
    return 0 if report["differing"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
