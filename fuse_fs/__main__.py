"""``python -m fuse_fs --cluster DIR MOUNTPOINT ...``: the same as ``ralloc mount``."""

import sys

from fuse_fs.cli import main

sys.exit(main(prog="python -m fuse_fs"))
