"""atomic_write: no overwrite without asking, no half-written file, the usual file mode."""

from __future__ import annotations

import os
import stat

import pytest

from vqdeploy.errors import OutputExistsError
from vqdeploy.files import atomic_write


def test_refuses_then_replaces(tmp_path):
    target = tmp_path / "out.bin"
    atomic_write(target, lambda p: p.write_bytes(b"one"))
    with pytest.raises(OutputExistsError, match="--force"):
        atomic_write(target, lambda p: p.write_bytes(b"two"))
    assert target.read_bytes() == b"one"
    atomic_write(target, lambda p: p.write_bytes(b"two"), overwrite=True)
    assert target.read_bytes() == b"two"


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"good")

    def broken(path):
        path.write_bytes(b"half")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        atomic_write(target, broken, overwrite=True)
    assert target.read_bytes() == b"good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_mode_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write(tmp_path / "m.bin", lambda p: p.write_bytes(b"x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
