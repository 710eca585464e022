#!/usr/bin/env python3
"""Run the test suite against the newest releases of vqdeploy's dependencies, and say what changed.

Not part of CI: CI installs the tested set in constraints.txt. This script is how that set is
upgraded on purpose:

    python tools/check_latest_releases.py            # newest releases inside pyproject's ranges
    python tools/check_latest_releases.py --beyond   # ignore the upper bounds (what would break?)
    python tools/check_latest_releases.py --write    # replace constraints.txt when the suite passed
    python tools/check_latest_releases.py -- -x tests/ops   # arguments after -- go to pytest

It makes a fresh venv in a temporary folder, installs torch==2.13.0 first (the CPU build; any
other torch request downloads a CUDA build of several GB), then the project's test extra without
constraints and with --upgrade, runs pytest, and prints every package whose version differs
from constraints.txt. The exit status is pytest's.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONSTRAINTS = REPO / "constraints.txt"
TORCH = "torch==2.13.0"
HEADER = """# The dependency set the test suite last passed with (bash .ci/run, Python {python}, CPU, {date}).
# Install with: pip install torch==2.13.0 && pip install -c constraints.txt -e ".[test]"
# Upgrade it on purpose: python tools/check_latest_releases.py (see README, 'Dependencies').
"""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[canonical(name)] = version.strip()
    return pins


def requirements_without_upper_bounds() -> list[str]:
    """pyproject's runtime and test requirements with every '<' / '<=' / '~=' / '==' bound dropped."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    out = []
    for text in list(project["dependencies"]) + list(project["optional-dependencies"]["test"]):
        requirement, _, marker = text.partition(";")
        name = re.match(r"\s*([A-Za-z0-9_.\-\[\]]+)", requirement).group(1)
        lower = [part.strip() for part in requirement[len(name) :].split(",") if part.strip().startswith(">")]
        spec = name + ",".join(lower)
        if canonical(re.sub(r"\[.*\]", "", name)) == "torch":
            spec = TORCH
        out.append(spec + (f";{marker}" if marker else ""))
    return out


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, **kwargs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--beyond", action="store_true", help="ignore pyproject's upper bounds")
    parser.add_argument("--write", action="store_true", help="write constraints.txt if the suite passed")
    parser.add_argument("--keep", action="store_true", help="keep the venv (its path is printed)")
    parser.add_argument("pytest_args", nargs="*", help="arguments for pytest (after --)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="vqdeploy-latest-"))
    venv = work / "venv"
    run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    pip = [python, "-m", "pip", "install", "--progress-bar", "off", "--upgrade"]
    run(pip + ["pip"], check=True)
    run(pip + [TORCH], check=True)
    if args.beyond:
        run(pip + requirements_without_upper_bounds(), check=True)
        run(pip + ["--no-deps", "-e", str(REPO)], check=True)
    else:
        run(pip + ["-e", f"{REPO}[test]"], check=True)

    frozen = run([python, "-m", "pip", "freeze", "--exclude-editable"], check=True, capture_output=True, text=True)
    lines = [line for line in frozen.stdout.splitlines() if "==" in line and not line.startswith("vqdeploy")]
    lines = [re.sub(r"^torch==([^+]+)\+.*$", r"torch==\1", line) for line in lines]
    new = {canonical(line.split("==")[0]): line.split("==")[1] for line in lines}

    tests = run([python, "-m", "pytest", "-q", *args.pytest_args], cwd=REPO)
    old = read_pins(CONSTRAINTS)
    changed = sorted(name for name in set(old) | set(new) if old.get(name) != new.get(name))
    print(f"\n{'package':<28} {'constraints.txt':<16} {'newest':<16}")
    for name in changed:
        print(f"{name:<28} {old.get(name, '-'):<16} {new.get(name, '-'):<16}")
    if not changed:
        print("(no package changed)")
    verdict = "passed" if tests.returncode == 0 else f"FAILED (pytest exit {tests.returncode})"
    print(f"\nsuite with the newest releases{' beyond the upper bounds' if args.beyond else ''}: {verdict}")

    if args.write and tests.returncode == 0:
        import datetime
        import platform

        header = HEADER.format(python=platform.python_version(), date=datetime.date.today().isoformat())
        CONSTRAINTS.write_text(header + "\n".join(sorted(lines, key=str.lower)) + "\n")
        print(f"wrote {CONSTRAINTS}; check pyproject's ranges still admit every pin, then commit both")
    elif args.write:
        print("constraints.txt left as it is: the suite did not pass")
    if args.keep:
        print(f"venv kept at {venv}")
    else:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return tests.returncode


if __name__ == "__main__":
    sys.exit(main())
