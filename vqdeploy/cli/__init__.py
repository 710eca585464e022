"""The `vqdeploy` command: demo | export | inspect | verify | bench | build | tokenize | triton-repo.

One module per command (NAME, HELP, EPILOG, add_arguments, run); `common` holds the argument groups
and path checks they share, `output` the tables and one-line errors, `app` the parser and `main`.
Every failure ends in ONE line on stderr, ``vqdeploy: error: <message>``, and a non-zero exit
status (2 for a usage error, 1 for anything else, 130 when interrupted); ``--debug`` adds the
traceback. Nothing a user owns is overwritten without ``--force``. Progress bars (tqdm) go to
stderr, on a terminal only.
"""

from vqdeploy.cli.app import build_parser, main

__all__ = ["build_parser", "main"]
