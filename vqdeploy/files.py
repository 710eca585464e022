"""Writing files the safe way: never replace what is not ours, never leave half a file, never lose one.

`atomic_write(path, write, overwrite)`:

- refuses a target that is not a regular file or absent (a directory, a device, a FIFO, a symbolic
  link, dangling or not), whatever `overwrite` says (`OutputNotAFileError`), and an existing file
  unless `overwrite` (`OutputExistsError`);
- writes a temporary file beside the target, fsyncs it, then puts it in place: with `overwrite`
  by ``os.replace``; without, by ``os.link`` (exclusive: of two writers of one path, exactly one
  succeeds, the other gets `OutputExistsError`); then fsyncs the folder, so a power loss leaves
  the old file or the new one, never an empty one;
- names its temporary file ``.NAME.vqdeploy-PID-START-RANDOM.tmp`` (START: the writer's process
  start time), and removes the temporary files of that naming whose writer is gone (no process
  PID, or one that started at another time: the PID was reused). A live writer's file is never
  touched; where the start time of a process cannot be read, nothing is removed.
- raises `OutputWriteError` (an OSError) when the write itself fails (full disk, no permission,
  a file where a folder should be, a NUL in the path); the target is left as it was.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

from vqdeploy.errors import OutputExistsError, OutputNotAFileError, OutputWriteError, VQDeployError

TEMP_TAG = "vqdeploy"
_UNKNOWN = "x"  # start time that could not be read


def process_start_time(pid: int) -> str | None:
    """The start time of process `pid` as a string (clock ticks since boot on Linux), or None when
    no such process exists. Raises LookupError where it cannot be known (no /proc, no psutil)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            text = handle.read().decode("ascii", "replace")
        return text.rsplit(")", 1)[1].split()[19]  # field 22; the command name may hold spaces
    except FileNotFoundError:
        return None
    except OSError:
        pass
    if not os.path.isdir("/proc/self"):
        try:
            import psutil
        except ImportError as error:
            raise LookupError("cannot read process start times here") from error
        try:
            return str(int(psutil.Process(pid).create_time() * 1000))
        except psutil.NoSuchProcess:
            return None
    raise LookupError(f"cannot read the start time of process {pid}")


def temp_name(path: str | os.PathLike, pid: int | None = None, start: str | None = None) -> str:
    """The name of a temporary file for `path` written by process `pid` (default: this one)."""
    pid = os.getpid() if pid is None else pid
    if start is None:
        try:
            start = process_start_time(pid) or _UNKNOWN
        except LookupError:
            start = _UNKNOWN
    return f".{Path(path).name}.{TEMP_TAG}-{pid}-{start}-{secrets.token_hex(4)}.tmp"


def _temp_pattern(path: Path) -> re.Pattern[str]:
    return re.compile(rf"\.{re.escape(path.name)}\.{TEMP_TAG}-(\d+)-(\w+)-[0-9a-f]+\.tmp")


def _writer_gone(pid: int, start: str) -> bool:
    try:
        now = process_start_time(pid)
    except LookupError:
        return False  # cannot tell: keep it
    if now is None:
        return True
    return start != _UNKNOWN and now != start  # the pid now belongs to another process


def clean_stale_temp_files(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files of `path` left by writers that are gone; returns those removed."""
    path = Path(path)
    pattern = _temp_pattern(path)
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match and entry.is_file(follow_symlinks=False) and _writer_gone(int(match.group(1)), match.group(2)):
            try:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
            except FileNotFoundError:
                pass  # another writer cleaned it first
    return removed


def check_output_path(path: str | os.PathLike, overwrite: bool, hint: str = "pass overwrite=True (CLI: --force)") -> Path:
    """`path` as a Path, once it is known to be absent, or a regular file that `overwrite` allows
    replacing; `OutputNotAFileError` / `OutputExistsError` otherwise (named), `OutputWriteError`
    for a path no file can have (a NUL in it)."""
    if "\0" in os.fspath(path):
        raise OutputWriteError(f"the output path {os.fspath(path)!r} holds a NUL character, which no file name can")
    path = Path(path)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return path
    except NotADirectoryError:
        return path  # a file where a folder should be: reported when the folder is made
    except OSError as error:
        raise OutputWriteError(f"cannot look at the output path {path}: {error.strerror}") from error
    mode = info.st_mode
    if stat.S_ISLNK(mode):
        target = os.readlink(path)
        state = "a dangling symbolic link" if not path.exists() else "a symbolic link"
        raise OutputNotAFileError(
            f"{path} is {state} (to {target}), not a regular file; it is not replaced: write to another path, "
            "or remove the link first"
        )
    if not stat.S_ISREG(mode):
        kind = ("a directory" if stat.S_ISDIR(mode) else "a character device" if stat.S_ISCHR(mode) else
                "a block device" if stat.S_ISBLK(mode) else "a FIFO" if stat.S_ISFIFO(mode) else
                "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
        raise OutputNotAFileError(f"{path} is {kind}, not a regular file; it is never replaced: choose another path")
    if not overwrite:
        raise OutputExistsError(f"{path} already exists; {hint} to replace it")
    return path


def _fsync_path(path: Path, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:
            return  # some platforms cannot open a folder; the file itself was synced
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def _write_error(path: Path, error: OSError) -> OutputWriteError:
    reason = error.strerror or str(error)
    code = f" ({errno.errorcode.get(error.errno, error.errno)})" if error.errno else ""
    return OutputWriteError(f"writing {path} failed: {reason}{code}; {path} was left as it was")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Call `write(tmp_path)` on a temporary file beside `path`, then put it in place atomically.

    A failed or killed write leaves `path` as it was. See the module docstring for what is refused.
    """
    path = check_output_path(path, overwrite)
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError as error:
        raise OutputWriteError(f"cannot write {path}: {error.filename or parent} is a file, not a folder") from error
    except NotADirectoryError as error:
        raise OutputWriteError(f"cannot write {path}: a part of {parent} is a file, not a folder") from error
    except OSError as error:
        raise _write_error(path, error) from error
    clean_stale_temp_files(path)
    tmp = parent / temp_name(path)
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the mode open() gives
    except OSError as error:
        raise _write_error(path, error) from error
    try:
        write(tmp)
        _fsync_path(tmp)
        if overwrite:
            check_output_path(path, overwrite)  # still a regular file, or absent
            os.replace(tmp, path)
        else:
            _link_exclusive(tmp, path)
        _fsync_path(parent, directory=True)
    except VQDeployError:
        raise
    except OSError as error:
        raise _write_error(path, error) from error
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
    return path


def _link_exclusive(tmp: Path, path: Path) -> None:
    """Put the finished `tmp` at `path` only if nothing is there: of two writers, exactly one wins."""
    try:
        os.link(tmp, path)
        return
    except FileExistsError as error:
        check_output_path(path, overwrite=True)  # a directory or device appeared: say so
        raise OutputExistsError(
            f"{path} already exists (another writer created it meanwhile); pass overwrite=True (CLI: --force) "
            "to replace it"
        ) from error
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS):
            raise
    # A file system without hard links: claim the name exclusively, then replace the placeholder.
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except FileExistsError as error:
        raise OutputExistsError(f"{path} already exists; pass overwrite=True (CLI: --force) to replace it") from error
    os.replace(tmp, path)
