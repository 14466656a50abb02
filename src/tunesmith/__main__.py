"""``python -m tunesmith``: the command line (what torchrun starts in each process)."""

import sys

from tunesmith.cli import main

sys.exit(main())
