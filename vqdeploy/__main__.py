"""`python -m vqdeploy ...` runs the command line (vqdeploy.cli)."""

import signal
import sys


def _run() -> int:
    try:
        from vqdeploy.cli import main
    except KeyboardInterrupt:  # Ctrl-C while the command line itself loads
        sys.stderr.write("vqdeploy: error: interrupted\n")
        return 128 + signal.SIGINT
    return main()


sys.exit(_run())
