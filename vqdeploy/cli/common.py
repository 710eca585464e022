"""What every command shares: the exit-status exceptions, the parser class, argument groups and
the checks on the paths a command is given."""

from __future__ import annotations

import argparse
from pathlib import Path

PROG = "vqdeploy"


class UsageError(Exception):
    """A command line that cannot work (exit status 2)."""


class CommandFailed(Exception):
    """The command ran and its verdict is negative (a parity failure, say): exit status 1."""


class Parser(argparse.ArgumentParser):
    """argparse with the one-line error of this CLI (no usage block)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{PROG}: error: {message} (see '{self.prog} --help')\n")


# -- argument groups used by several commands ----------------------------------------------------
def add_force(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--force", action="store_true", help=f"replace {what} if it exists")


def add_device(parser: argparse.ArgumentParser, default: str = "cpu") -> None:
    parser.add_argument("--device", default=default, help=f"cpu or cuda[:N] (default {default})")


def add_precision(parser: argparse.ArgumentParser, help_text: str | None = None) -> None:
    from vqdeploy.runtime import PRECISIONS

    parser.add_argument("--precision", choices=PRECISIONS, default="exact",
                        help=help_text or "exact (default): float32 search, exact argmin; fast: tensor-core "
                                          "candidates, then the same exact re-check")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a usage error otherwise, exit status 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def bounded_int(maximum: int):
    """argparse type: an integer from 1 to `maximum` (a usage error otherwise)."""

    def parse(text: str) -> int:
        value = positive_int(text)
        if value > maximum:
            raise argparse.ArgumentTypeError(f"expected a number at most {maximum}, got {value}")
        return value

    parse.__name__ = "bounded_int"
    return parse


# -- paths ------------------------------------------------------------------------------------------
def check_writable(path: Path, force: bool, what: str = "file") -> None:
    """Refuse what is not a regular file (a directory, a device, a symbolic link), and an existing
    file unless --force (`vqdeploy.files.check_output_path`)."""
    from vqdeploy.files import check_output_path

    check_output_path(path, force, hint="pass --force")


def existing_file(path: Path, what: str) -> Path:
    """`path` itself, once it is known to be a file."""
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} is not a file")
    return path
