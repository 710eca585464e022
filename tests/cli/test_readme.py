"""Every Python example of README.md runs as written (in a fresh folder), and the set-up commands
in the README are the ones .ci/run runs."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


def test_readme_has_the_examples() -> None:
    assert len(BLOCKS) >= 6
    assert sum("from vqdeploy import" in block for block in BLOCKS) >= 4


def test_readme_python_examples_run(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("vector_quantize_pytorch")  # the conversion example imports the reference library
    monkeypatch.chdir(tmp_path)  # the examples write their files into the current folder
    for number, block in enumerate(BLOCKS):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the conversion example warns about rotation_trick, as documented
            exec(compile(block, f"README.md python block {number}", "exec"), {"__name__": f"readme_{number}"})
    assert (tmp_path / "vq_encode.onnx").is_file() and (tmp_path / "digits_vqvae.onnx").is_file()


def test_ci_runs_the_readme_test_command() -> None:
    install = "pip install torch==2.13.0"
    command = f'python -m venv .venv && . .venv/bin/activate && {install} && pip install -e ".[test]" && python -m pytest -q'
    assert command in README
    assert f"{install} && pip install -e . && vqdeploy demo" in README
    lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    commands = [line for line in lines if line and not line.startswith("#")]
    steps = ["-m venv .venv", ". .venv/bin/activate", "torch==2.13.0", '-e ".[test]"', "python -m pytest -q"]
    positions = [next(i for i, line in enumerate(commands) if step in line) for step in steps]
    assert positions == sorted(positions)  # venv, torch first, then the project, then the tests
