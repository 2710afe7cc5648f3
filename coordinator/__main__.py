"""Entry point for ``python -m coordinator``."""

import sys

from coordinator.daemon import main

sys.exit(main())
