import sys

from ralloc.cli import main

sys.exit(main())
