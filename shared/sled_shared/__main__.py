"""`python -m sled_shared` runs the `sled` command (where no console script is installed)."""

import sys

from sled_shared.cli import main

sys.exit(main())
