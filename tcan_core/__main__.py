"""``python -m tcan_core``: the pack's command line."""

import sys

from .cli import main

sys.exit(main())
