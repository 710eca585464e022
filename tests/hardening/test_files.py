"""Files: nothing that is not ours is replaced, nothing half written is left, writes survive kills."""

from __future__ import annotations

import json
import os
import random
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import onnx
import pytest
import torch

from vqdeploy import VectorQuantize, export_onnx, load_quantizer, read_metadata, runtime, save_quantizer
from vqdeploy.errors import (
    ExternalDataError,
    OutputExistsError,
    OutputNotAFileError,
    OutputWriteError,
)
from vqdeploy.files import atomic_write, temp_name

DIM = 8


@pytest.fixture
def vq():
    torch.manual_seed(0)
    return VectorQuantize(dim=DIM, codebook_size=16).eval()


def _char_device(path: Path) -> Path:
    try:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # what /dev/null is
    except (PermissionError, OSError) as error:
        pytest.skip(f"cannot make a device node here: {error}")
    return path


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("kind", ["device", "fifo", "dangling-symlink", "symlink", "directory"])
def test_targets_that_are_not_regular_files_are_never_replaced(vq, tmp_path, kind, overwrite):
    target = tmp_path / "out.onnx"
    if kind == "device":
        _char_device(target)
    elif kind == "fifo":
        os.mkfifo(target)
    elif kind == "dangling-symlink":
        target.symlink_to(tmp_path / "nowhere.onnx")
    elif kind == "symlink":
        (tmp_path / "real.onnx").write_bytes(b"user's file")
        target.symlink_to(tmp_path / "real.onnx")
    else:
        target.mkdir()
    before = os.lstat(target)
    with pytest.raises(OutputNotAFileError) as error:
        export_onnx(vq, target, part="encode", overwrite=overwrite)
    assert str(target) in str(error.value) and "overwrite=True" not in str(error.value)
    after = os.lstat(target)
    assert stat.S_IFMT(after.st_mode) == stat.S_IFMT(before.st_mode) and after.st_ino == before.st_ino
    if kind == "symlink":
        assert (tmp_path / "real.onnx").read_bytes() == b"user's file"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_checkpoint_and_cli_refuse_a_device_too(vq, tmp_path):
    target = _char_device(tmp_path / "vq.safetensors")
    with pytest.raises(OutputNotAFileError):
        save_quantizer(vq, target, overwrite=True)
    assert stat.S_ISCHR(os.lstat(target).st_mode)
    checkpoint = save_quantizer(vq, tmp_path / "ok.safetensors")
    device = _char_device(tmp_path / "vq.onnx")
    result = subprocess.run([sys.executable, "-m", "vqdeploy", "export", str(checkpoint), "-o", str(device), "--force"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "not a regular file" in result.stderr
    assert stat.S_ISCHR(os.lstat(device).st_mode)


def test_a_file_as_parent_and_a_nul_are_typed(vq, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputWriteError, match="file"):
        export_onnx(vq, tmp_path / "file" / "vq.onnx", part="encode")
    with pytest.raises(OutputWriteError, match="NUL"):
        export_onnx(vq, str(tmp_path / "a\0b.onnx"), part="encode")
    with pytest.raises(OutputWriteError):
        save_quantizer(vq, tmp_path / "file" / "vq.safetensors")


def test_existing_file_without_overwrite_is_refused_and_kept(vq, tmp_path):
    target = tmp_path / "vq.onnx"
    target.write_bytes(b"mine")
    with pytest.raises(OutputExistsError, match="overwrite=True"):
        export_onnx(vq, target, part="encode")
    assert target.read_bytes() == b"mine"
    export_onnx(vq, target, part="encode", overwrite=True)
    assert read_metadata(target).part == "encode"


FULL_DISK = textwrap.dedent(
    """
    import resource, signal, sys
    import torch
    from vqdeploy import VectorQuantize, save_quantizer
    from vqdeploy.errors import OutputWriteError
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG, as on a full disk
    vq = VectorQuantize(dim=64, codebook_size=4096)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
    try:
        save_quantizer(vq, sys.argv[1], overwrite=True)
    except OutputWriteError as error:
        print("typed:", error)
    """
)


def test_a_write_that_fails_midway_is_typed_and_leaves_the_target(tmp_path):
    target = tmp_path / "vq.safetensors"
    target.write_bytes(b"old")
    result = subprocess.run([sys.executable, "-c", FULL_DISK, str(target)], capture_output=True, text=True, timeout=120)
    assert result.stdout.startswith("typed:"), result.stdout + result.stderr
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vq.safetensors"]


def test_file_and_folder_are_synced_before_the_rename(tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else str(fd))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    target = tmp_path / "a.bin"
    atomic_write(target, lambda tmp: tmp.write_bytes(b"data"))
    assert target.read_bytes() == b"data"
    if os.path.exists("/proc/self/fd"):
        assert any(name.endswith(".tmp") for name in synced), synced  # the file, under its temp name
        assert str(tmp_path) in synced, synced  # and the folder after the rename
    else:
        assert len(synced) >= 2


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temp_files_of_gone_writers_are_cleaned_live_ones_kept(tmp_path):
    target = tmp_path / "vq.bin"
    live = tmp_path / temp_name(target)  # this process: alive
    live.write_bytes(b"live writer")
    dead = tmp_path / temp_name(target, pid=_dead_pid())
    dead.write_bytes(b"gone")
    reused = tmp_path / temp_name(target, pid=os.getpid(), start="1")  # our pid, another start time
    reused.write_bytes(b"gone too")
    other = tmp_path / ".vq.bin.user-file.tmp"  # not of our naming
    other.write_bytes(b"not ours")
    atomic_write(target, lambda tmp: tmp.write_bytes(b"new"))
    assert target.read_bytes() == b"new"
    assert live.exists() and other.exists()
    assert not dead.exists() and not reused.exists()


def test_external_data_outside_the_folder_is_refused(vq, tmp_path):
    path = export_onnx(vq, tmp_path / "model" / "vq.onnx", part="encode")
    model = onnx.load(str(path))
    initializer = next(i for i in model.graph.initializer if i.name.endswith("embed"))
    onnx.external_data_helper.set_external_data(initializer, location="../secret.bin")
    initializer.data_location = onnx.TensorProto.EXTERNAL
    initializer.ClearField("raw_data")
    (tmp_path / "secret.bin").write_bytes(b"\0" * 4096)
    bad = tmp_path / "model" / "bad.onnx"
    bad.write_bytes(model.SerializeToString())
    for backend in ("ort", "torch"):
        with pytest.raises(ExternalDataError, match="secret.bin"):
            runtime.load(bad, backend=backend)


# -- fault injection: kill -9 at random points of an export, in a loop ----------------------------------
KILLED_EXPORT = textwrap.dedent(
    """
    import os, signal, sys, torch
    from vqdeploy import VectorQuantize, export_onnx
    target, codes, at = sys.argv[1], int(sys.argv[2]), sys.argv[3]

    def kill_after(function):  # the real call, then SIGKILL: nothing after it in the export runs
        def call(*args, **kwargs):
            function(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)
        return call

    if at == "temp written":  # the temporary file is complete and synced, not yet in place
        os.fsync = kill_after(os.fsync)
    elif at == "replaced":  # the new file is in place, its folder not yet synced
        os.replace = kill_after(os.replace)
    torch.manual_seed(codes)
    vq = VectorQuantize(dim=16, codebook_size=codes).eval()
    print("ready", flush=True)
    export_onnx(vq, target, part="encode", overwrite=True)
    print("done", flush=True)
    """
)


@pytest.mark.slow
def test_an_export_killed_at_random_points_never_loses_the_target(tmp_path):
    """The target is always the old file or a complete new one, whenever a SIGKILL lands: at random
    times (tracing, checking: the first seconds of an export), and at the two points of the write
    itself, the temporary file complete and the new file just moved in place."""
    target = tmp_path / "vq.onnx"
    torch.manual_seed(0)
    export_onnx(VectorQuantize(dim=16, codebook_size=8).eval(), target, part="encode")
    rng = random.Random(0)
    kills = []
    for attempt, at in enumerate(["random", "temp written", "random", "replaced", "random"]):
        old = read_metadata(target).codebook_size
        codes = 9 + attempt
        child = subprocess.Popen([sys.executable, "-c", KILLED_EXPORT, str(target), str(codes), at],
                                 stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ready"
        if at == "random":
            time.sleep(rng.uniform(0.0, 1.5))
            child.send_signal(signal.SIGKILL)
        child.wait(timeout=300)
        finished = child.stdout.read().strip() == "done"
        kills.append(not finished)
        info = read_metadata(target)  # a complete vqdeploy export, never a half-written one
        onnx.checker.check_model(onnx.load(str(target)))
        expected = {"temp written": {old}, "replaced": {codes}}.get(at, {old, codes})
        assert info.codebook_size in expected, (at, info.codebook_size, expected)
        assert not finished or info.codebook_size == codes
        if at == "temp written":  # its writer is dead: the next export clears it (checked below)
            assert [p for p in tmp_path.iterdir() if p.name != "vq.onnx"], "no temporary file was left"
    assert kills[1] and kills[3] and any(kills[0::2]), kills  # the write's kills, and one at random
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "vq.onnx"]
    export_onnx(VectorQuantize(dim=16, codebook_size=8).eval(), target, part="encode", overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name != "vq.onnx"], leftovers  # the killed writers' temp files


def test_checkpoint_round_trip_still_works(vq, tmp_path):
    path = save_quantizer(vq, tmp_path / "vq.safetensors")
    assert torch.equal(load_quantizer(path).codebook, vq.codebook)
    assert json.loads(json.dumps(load_quantizer(path).config)) == vq.config


def test_triton_repository_never_replaces_a_file_or_link(vq, tmp_path):
    from vqdeploy.serving import write_triton_repository

    path = export_onnx(vq, tmp_path / "vq.onnx", part="encode")
    repository = tmp_path / "repo"
    repository.mkdir()
    (repository / "vq").write_text("user's file")
    with pytest.raises(OutputExistsError, match="never replaced"):
        write_triton_repository(path, repository, force=True)
    assert (repository / "vq").read_text() == "user's file"
