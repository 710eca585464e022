"""The parser of every command, and `main`: one line on stderr for every failure, exit status
0 (done), 1 (failed), 2 (usage error) or 130 (interrupted)."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Iterator, Sequence

from vqdeploy.cli import bench, build, demo, export, inspect, tokenize, triton_repo, verify
from vqdeploy.cli.common import PROG, CommandFailed, Parser, UsageError
from vqdeploy.cli.output import one_line

# In the order `vqdeploy --help` lists them. Each module has NAME, HELP, EPILOG, add_arguments, run.
COMMANDS = (demo, export, inspect, verify, bench, build, tokenize, triton_repo)

MAIN_EPILOG = """\
commands, with an example each:
  demo     vqdeploy demo                                   the whole job on the shipped model
  export   vqdeploy export vq.safetensors -o vq.onnx       a checkpoint to ONNX
  inspect  vqdeploy inspect vq.onnx                         what an export holds
  verify   vqdeploy verify vq.safetensors vq.onnx           token parity with eager PyTorch
  bench    vqdeploy bench vq.onnx --checkpoint vq.safetensors
  build    vqdeploy build vq.onnx                           a TensorRT engine (needs TensorRT + GPU)
  tokenize vqdeploy tokenize vq.onnx corpus/ -o tokens/       a corpus to token files (local, dask, Ray)
  triton-repo
           vqdeploy triton-repo vq_encode.onnx -o models    an NVIDIA Triton model repository

`vqdeploy COMMAND --help` shows each command's options and examples.
"""


def build_parser() -> argparse.ArgumentParser:
    """The `vqdeploy` parser; each subcommand's namespace carries its `handler`."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks and library warnings")
    common.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS, help="no progress bars")

    formatter = argparse.RawDescriptionHelpFormatter
    parser = Parser(prog=PROG, description="Export vector quantizers to ONNX, run them on ONNX Runtime, TensorRT "
                    "or torch, and prove the tokens are the eager model's.", epilog=MAIN_EPILOG,
                    formatter_class=formatter, parents=[common])
    from vqdeploy._version import __version__

    parser.add_argument("--version", action="version", version=f"vqdeploy {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for command in COMMANDS:
        sub = commands.add_parser(command.NAME, help=command.HELP, description=command.HELP, epilog=command.EPILOG,
                                  formatter_class=formatter, parents=[common])
        command.add_arguments(sub)
        sub.set_defaults(handler=command.run)
    return parser


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Ctrl-C while native libraries load is recorded and raised (KeyboardInterrupt) once they
    have loaded. Raised inside one (onnx's pybind11 module calls into Python's enum while it
    initialises), it killed the interpreter: of 8 start-ups interrupted as onnx loaded, on a busy
    machine, 3 ended in SIGSEGV, 3 in SIGABRT with a traceback, 1 exited 1 as if no signal had come.
    Only where SIGINT has Python's own handler, in the main thread (else nothing changes)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    received: list[int] = []
    signal.signal(signal.SIGINT, lambda number, frame: received.append(number))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if received:
        raise KeyboardInterrupt


def _quiet_libraries() -> None:
    """ONNX Runtime's C++ log lines stay out of the user's terminal (warnings: see `main`)."""
    try:
        import onnxruntime

        onnxruntime.set_default_logger_severity(4)  # fatal only: errors reach the user as exceptions, on one line
    except ImportError:
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 error, 2 usage error, 130 interrupted)."""
    debug = False
    try:
        with interrupts_deferred():  # imports torch and onnx: a Ctrl-C is raised once they have loaded
            parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as exit_:  # --help, --version, usage errors
            return exit_.code if isinstance(exit_.code, int) else 2
        debug = args.debug = getattr(args, "debug", False)
        args.quiet = getattr(args, "quiet", False)
        if args.command is None:
            names = ", ".join(command.NAME for command in COMMANDS)
            sys.stderr.write(f"{PROG}: error: choose a command: {names} (see '{PROG} --help')\n")
            return 2
        from vqdeploy.errors import VQDeployError

        with warnings.catch_warnings():
            if not debug:  # library warnings would break the one-line contract of errors
                warnings.simplefilter("ignore")
                with interrupts_deferred():  # imports onnxruntime
                    _quiet_libraries()
            return args.handler(args)
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: error: interrupted\n")
        return 128 + signal.SIGINT
    except BrokenPipeError:  # `vqdeploy inspect x.onnx | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as error:
        if debug:
            traceback.print_exc()
        if isinstance(error, UsageError):
            sys.stderr.write(f"{PROG}: error: {one_line(error)}\n")
            return 2
        if isinstance(error, VQDeployError | CommandFailed | OSError):
            sys.stderr.write(f"{PROG}: error: {one_line(error)}\n")
        else:
            hint = "" if debug else " (run with --debug for the traceback)"
            sys.stderr.write(f"{PROG}: error: unexpected {type(error).__name__}: {one_line(error)}{hint}\n")
        return 1
