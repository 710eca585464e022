"""The real TensorRT Python sources, read at test time (never kept in this repository).

TensorRT itself cannot run on this project's machines, but NVIDIA's bindings wheels hold the
pure-Python ``tensorrt.plugin`` package and the compiled ``tensorrt.so`` whose strings name every
builder/runtime symbol. The fixture ``tensorrt_wheel(requirement)`` pip-downloads such a wheel
(no dependencies) into a cache folder (``$VQDEPLOY_TRT_WHEELS``, else pytest's cache) and opens
it; where pip cannot fetch it (offline), the test skips and says so.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest


class Wheel:
    """Read-only view of a tensorrt bindings wheel."""

    def __init__(self, path: Path):
        self.path = path
        self._zip = zipfile.ZipFile(path)

    def source(self, module: str) -> str:
        """Text of tensorrt_bindings/<module>, e.g. 'plugin/_validate.py'."""
        return self._zip.read(f"tensorrt_bindings/{module}").decode()

    def so_strings(self) -> set[str]:
        """NUL-separated printable strings of tensorrt.so (what `strings` lists)."""
        data = self._zip.read("tensorrt_bindings/tensorrt.so")
        return {part.decode("ascii", "ignore") for part in data.split(b"\0") if part}

    def has_name(self, name: str) -> bool:
        """Whether tensorrt.so holds `name` as a string, or as the tail of one: the linker stores
        "INT8" inside "UINT8" and "num_errors" inside "get_num_errors" (tail merging)."""
        if not hasattr(self, "_strings"):
            self._strings = self.so_strings()
        return name in self._strings or any(s.endswith(name) for s in self._strings)


@pytest.fixture(scope="session")
def tensorrt_wheel(request: pytest.FixtureRequest) -> Callable[[str], Wheel]:
    cache = Path(os.environ.get("VQDEPLOY_TRT_WHEELS") or request.config.cache.mkdir("tensorrt-bindings-wheels"))
    cache.mkdir(parents=True, exist_ok=True)
    opened: dict[str, Wheel] = {}
    failures: list[str] = []  # after one failed download (offline), skip the rest at once

    def get(requirement: str) -> Wheel:
        if requirement in opened:
            return opened[requirement]
        if failures:
            pytest.skip(failures[0])
        name, version = requirement.split("==")
        pattern = f"{name.replace('-', '_')}-{version}-*.whl"
        found = sorted(cache.glob(pattern))
        detail = ""
        if not found:
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                       "--disable-pip-version-check", "--retries", "1", "--timeout", "20", "-q",
                       requirement, "-d", str(cache)]
            try:
                proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
                detail = (proc.stderr or proc.stdout).strip()[-300:]
            except (OSError, subprocess.TimeoutExpired) as exc:
                detail = str(exc)
            found = sorted(cache.glob(pattern))
        if not found:
            failures.append(f"could not pip download {requirement}, the real TensorRT sources this test reads: {detail}")
            pytest.skip(failures[0])
        opened[requirement] = Wheel(found[0])
        return opened[requirement]

    return get
