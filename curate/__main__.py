"""``python -m curate``: the command line, an entry point above the library (pipelines.cli)."""

import sys

from pipelines.cli import main

sys.exit(main())
