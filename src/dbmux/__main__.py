"""`python -m dbmux`: the command line, as the `dbmux` script runs it."""

import sys

from dbmux.cli import main

sys.exit(main())
