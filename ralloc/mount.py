"""``ralloc mount --cluster DIR MOUNTPOINT [--foreground] [--replicas K] [--name NAME]``.

The far-memory filesystem (``fuse_fs``): files whose bytes live in blade slabs. Returns
once the mount is up (the daemon runs detached, logging to DIR/logs/fs-NAME.log).
"""

from __future__ import annotations


def main(argv: list[str]) -> int:
    from fuse_fs.cli import main as mount_main

    return mount_main(argv, prog="ralloc mount")
