"""A do-nothing pyfuse3 filesystem: one file, kept in local memory. The benchmark's baseline.

    python bench/fuse_null_fs.py MOUNTPOINT [--size 256M] [--name data]

The root directory holds one regular file (``data``) backed by a bytearray, opened with
the page cache on exactly as ``fuse_fs`` opens its files (``direct_io=False``,
``keep_cache=True``) so mmap works the same way. Whatever the far-memory filesystem costs
beyond this is the price of remote slabs, the log and the allocator; what this one costs is
pyfuse3 + trio + the kernel's FUSE round trips. SIGTERM/SIGINT or ``fusermount3 -u``
unmount it.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import stat
import sys
import time

import pyfuse3
import trio

ROOT = pyfuse3.ROOT_INODE
FILE = ROOT + 1


class NullFS(pyfuse3.Operations):
    """Root directory + one fixed-size file in a bytearray."""

    def __init__(self, name: bytes, size: int) -> None:
        super().__init__()
        self.name = name
        self.data = bytearray(size)
        self.now = time.time_ns()

    def _attrs(self, ino: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.entry_timeout = a.attr_timeout = 300
        a.st_uid, a.st_gid = os.getuid(), os.getgid()
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self.now
        a.st_blksize = 4096
        if ino == ROOT:
            a.st_mode, a.st_nlink = stat.S_IFDIR | 0o755, 2
        else:
            a.st_mode, a.st_nlink, a.st_size = stat.S_IFREG | 0o644, 1, len(self.data)
            a.st_blocks = len(self.data) // 512
        return a

    async def getattr(self, inode, ctx=None):
        if inode not in (ROOT, FILE):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(inode)

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode == ROOT and name == self.name:
            return self._attrs(FILE)
        if name in (b".", b".."):
            return self._attrs(ROOT)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def setattr(self, inode, attr, fields, fh, ctx):
        return self._attrs(inode)  # fixed size: truncate is a no-op

    async def opendir(self, inode, ctx):
        return inode

    async def readdir(self, fh, start_id, token):
        if start_id == 0:
            pyfuse3.readdir_reply(token, self.name, self._attrs(FILE), 1)

    async def open(self, inode, flags, ctx):
        if inode != FILE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        return pyfuse3.FileInfo(fh=inode, direct_io=False, keep_cache=True)

    async def read(self, fh, off, size):
        return bytes(self.data[off:off + size])

    async def write(self, fh, off, buf):
        end = min(off + len(buf), len(self.data))
        if off >= end:
            raise pyfuse3.FUSEError(errno.ENOSPC)
        self.data[off:end] = buf[:end - off]
        return len(buf)

    async def fsync(self, fh, datasync):
        return None

    async def flush(self, fh):
        return None

    async def release(self, fh):
        return None

    async def statfs(self, ctx):
        st = pyfuse3.StatvfsData()
        st.f_bsize = st.f_frsize = 4096
        st.f_blocks = len(self.data) // 4096
        st.f_namemax = 255
        return st


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mountpoint")
    p.add_argument("--size", default="256M", help="size of the one file (default 256M)")
    p.add_argument("--name", default="data", help="its name (default data)")
    args = p.parse_args(argv)
    from rallocator.sizes import parse_size

    fs = NullFS(args.name.encode(), parse_size(args.size))
    opts = {"fsname=nullfs", "subtype=nullfs", "default_permissions"}
    pyfuse3.init(fs, args.mountpoint, opts)

    async def run() -> None:
        async with trio.open_nursery() as n:
            async def signals(task_status=trio.TASK_STATUS_IGNORED) -> None:
                # keep receiving until main() returns: a second signal must not fall back
                # to the default action and kill us before close() unmounts
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT,
                                               signal.SIGHUP) as sigs:
                    task_status.started()
                    async for _ in sigs:
                        pyfuse3.terminate()

            # handlers first, READY after: a SIGTERM right after READY used to hit the
            # default action (the receiver was not installed yet) and leave a dead mount
            await n.start(signals)
            print("READY", flush=True)
            await pyfuse3.main()
            n.cancel_scope.cancel()

    try:
        trio.run(run)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
