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
    project = "pip install -c constraints.txt"
    command = f'python -m venv .venv && . .venv/bin/activate && {install} && {project} -e ".[test]" && python -m pytest -q -n 2'
    assert command in README
    assert f"{install} && {project} -e . && vqdeploy demo" in README
    lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    commands = [line for line in lines if line and not line.startswith("#")]
    steps = ["-m venv .venv", ". .venv/bin/activate", "torch==2.13.0", '-c constraints.txt -e ".[test]"', "python -m pytest -q -n 2"]
    positions = [next(i for i, line in enumerate(commands) if step in line) for step in steps]
    assert positions == sorted(positions)  # venv, torch first, then the project with the pins, then the tests


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt pins exact versions, got {line!r}"
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_constraints_pin_torch_to_the_local_cpu_build_and_fit_pyproject() -> None:
    """Every pin lies inside pyproject's range for it, and torch is the CPU build on disk."""
    import tomllib

    from packaging.requirements import Requirement

    pins = _pins()
    assert pins["torch"] == "2.13.0"
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"]) + list(project["optional-dependencies"]["test"])
    for text in requirements:
        requirement = Requirement(text)
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        assert name in pins, f"{name} is required but constraints.txt does not pin it"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {name}=={pins[name]}, outside pyproject's {requirement.specifier}"
        )
