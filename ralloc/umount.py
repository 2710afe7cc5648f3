"""``ralloc umount MOUNTPOINT [--lazy]``: unmount a far-memory filesystem and wait for its
daemon to checkpoint its metadata and exit."""

from __future__ import annotations


def main(argv: list[str]) -> int:
    from fuse_fs.cli import umount_main

    return umount_main(argv, prog="ralloc umount")
