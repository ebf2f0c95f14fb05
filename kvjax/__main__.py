"""`python -m kvjax ...`: the command line (kvjax.cli)."""

import sys

from kvjax.cli import main

sys.exit(main())
