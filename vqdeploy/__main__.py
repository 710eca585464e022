"""`python -m vqdeploy ...` runs the command line (vqdeploy.cli)."""

import sys

from vqdeploy.cli import main

sys.exit(main())
