"""The pyfuse3 request handlers: a POSIX namespace over ``Store``.

Every handler runs on trio's one thread. Metadata changes happen synchronously (mutate the
``FsState``, log the op, mark the inode dirty; no ``await`` in between, so a checkpoint
never sees half an operation); only data I/O and slab allocation await worker threads
(data copies on live shm links run inline: see ``Store.copy``).
Writes, truncates and opens with O_TRUNC of one file are serialised by a per-inode lock.

Regular files are opened with the page cache on (``direct_io=False``, ``keep_cache=True``):
that is what makes shared writable ``mmap`` work, and two processes mapping the same file
share the same pages. The kernel checks permissions (``default_permissions``).

Inodes are freed when their last link goes and no handle is open (lookup counts are not
tracked: a getattr on such an inode answers ENOENT). Inode numbers are never reused.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time
from bisect import bisect_right
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pyfuse3
import trio
from pyfuse3 import FUSEError

from fuse_fs.metalog import DelEntry, SetEntry
from fuse_fs.slabio import SlabIOError
from fuse_fs.state import NAME_MAX, ROOT, Inode
from fuse_fs.store import Store
from rallocator.node import NoSpace
from rallocator.verbs import BladeUnreachable

log = logging.getLogger("fuse_fs.fs")

ATTR_TIMEOUT = 5.0
ENTRY_TIMEOUT = 5.0
BLKSIZE = 4096
MAX_FILES = 1 << 32

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def handler(fn: F) -> F:
    """Only FUSEError may leave a handler (anything else stops pyfuse3's main loop): no
    room is ENOSPC, a blade that cannot be reached is EIO, a bug is logged and EIO."""

    @functools.wraps(fn)
    async def wrapper(self: Any, *args: Any) -> Any:
        try:
            return await fn(self, *args)
        except FUSEError:
            raise
        except NoSpace as e:
            log.info("%s: no space: %s", fn.__name__, e)
            raise FUSEError(errno.ENOSPC) from None
        except (SlabIOError, BladeUnreachable, OSError) as e:
            log.error("%s: I/O error: %s", fn.__name__, e)
            raise FUSEError(errno.EIO) from None
        except Exception:
            log.exception("%s failed", fn.__name__)
            raise FUSEError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]


def _now() -> int:
    return time.time_ns()


def _check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise FUSEError(errno.ENAMETOOLONG)


class FarFS(pyfuse3.Operations):
    """The filesystem. ``store`` holds the state, the data path and the log."""

    supports_dot_lookup = True
    # off: with it, write(2) on a full cluster succeeds and ENOSPC only shows at close/fsync
    # (bench/RESULTS.md, "File view"), although it would keep the page cache across msync
    enable_writeback_cache = False

    def __init__(self, store: Store) -> None:
        super().__init__()
        self.store = store
        self.state = store.state
        self.locks: dict[int, trio.Lock] = {}

    # ------------------------------------------------------------------ helpers
    def _get(self, ino: int) -> Inode:
        node = self.state.inodes.get(ino)
        if node is None:
            raise FUSEError(errno.ENOENT)
        return node

    def _dir(self, ino: int) -> Inode:
        node = self._get(ino)
        if not node.is_dir:
            raise FUSEError(errno.ENOTDIR)
        return node

    def _lock(self, ino: int) -> trio.Lock:
        lock = self.locks.get(ino)
        if lock is None:
            lock = self.locks[ino] = trio.Lock()
        return lock

    def _attrs(self, node: Inode) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.ino
        a.generation = 0
        a.entry_timeout = ENTRY_TIMEOUT
        a.attr_timeout = ATTR_TIMEOUT
        a.st_mode = node.mode
        a.st_nlink = node.nlink
        a.st_uid = node.uid
        a.st_gid = node.gid
        a.st_rdev = node.rdev
        a.st_size = node.size
        a.st_blksize = BLKSIZE
        a.st_blocks = sum(e.cap for e in node.extents.values()) // 512
        a.st_atime_ns = node.atime
        a.st_mtime_ns = node.mtime
        a.st_ctime_ns = node.ctime
        return a

    def _changed(self, *nodes: Inode, now: int | None = None, mtime: bool = True) -> None:
        now = _now() if now is None else now
        for n in nodes:
            n.ctime = now
            if mtime:
                n.mtime = now
            self.store.touch(n.ino)

    def _unref(self, node: Inode) -> None:
        """One link fewer; free the inode if that was the last and nobody has it open."""
        node.nlink = 0 if node.is_dir else node.nlink - 1
        node.ctime = _now()
        if node.nlink <= 0 and node.opens <= 0:
            self.store.drop_inode(node)
            self.locks.pop(node.ino, None)
        else:
            self.store.touch(node.ino)

    def _make(self, parent_ino: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext,
              rdev: int = 0, target: bytes = b"") -> Inode:
        _check_name(name)
        parent = self._dir(parent_ino)
        if name in parent.entries:
            raise FUSEError(errno.EEXIST)
        now = _now()
        gid = ctx.gid
        if parent.mode & stat.S_ISGID:  # BSD group semantics for setgid directories
            gid = parent.gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        ino = self.state.next_ino
        self.state.next_ino += 1
        node = Inode(ino, mode, ctx.uid, gid, rdev, len(target), now, now, now, target)
        node.parent = parent.ino
        node.nlink = 2 if node.is_dir else 1
        self.state.inodes[ino] = node
        parent.add_entry(name, ino)
        if node.is_dir:
            parent.nlink += 1
        self.store.log_op(node.record())  # before anything else names it
        self.store.log_op(SetEntry(parent.ino, name, ino))
        self._changed(parent, now=now)
        return node

    # ------------------------------------------------------------------ lookups
    @handler
    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self._dir(parent_inode)
        if name == b".":
            return self._attrs(parent)
        if name == b"..":
            return self._attrs(self._get(parent.parent))
        _check_name(name)
        ino = parent.entries.get(name)
        if ino is None:
            raise FUSEError(errno.ENOENT)
        return self._attrs(self._get(ino))

    @handler
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(self._get(inode))

    async def forget(self, inode_list: Any) -> None:
        return None  # no lookup counts: inodes go with their last link and handle

    @handler
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._get(inode)
        now = _now()
        if fields.update_size:
            if node.is_dir:
                raise FUSEError(errno.EISDIR)
            if not node.is_reg:
                raise FUSEError(errno.EINVAL)
            async with self._lock(inode):
                if attr.st_size != node.size:
                    await self.store.truncate(node, attr.st_size)
                node.mtime = now
        if fields.update_mode:
            node.mode = stat.S_IFMT(node.mode) | stat.S_IMODE(attr.st_mode)
        if fields.update_uid:
            node.uid = attr.st_uid
        if fields.update_gid:
            node.gid = attr.st_gid
        if fields.update_atime:
            node.atime = attr.st_atime_ns
        if fields.update_mtime:
            node.mtime = attr.st_mtime_ns
        node.ctime = attr.st_ctime_ns if fields.update_ctime else now
        self.store.touch(inode)
        return self._attrs(node)

    @handler
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._get(inode)
        if not stat.S_ISLNK(node.mode):
            raise FUSEError(errno.EINVAL)
        return node.target

    # ------------------------------------------------------------------ namespace
    @handler
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(self._make(parent_inode, name, mode, ctx, rdev=rdev))

    @handler
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(self._make(parent_inode, name, stat.S_IFDIR | stat.S_IMODE(mode),
                                      ctx))

    @handler
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if len(target) > 4095:
            raise FUSEError(errno.ENAMETOOLONG)
        return self._attrs(self._make(parent_inode, name, stat.S_IFLNK | 0o777, ctx,
                                      target=target))

    @handler
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        _check_name(new_name)
        node = self._get(inode)
        if node.is_dir:
            raise FUSEError(errno.EPERM)
        parent = self._dir(new_parent_inode)
        if new_name in parent.entries:
            raise FUSEError(errno.EEXIST)
        parent.add_entry(new_name, inode)
        node.nlink += 1
        self.store.log_op(SetEntry(parent.ino, new_name, inode))
        now = _now()
        self._changed(parent, now=now)
        self._changed(node, now=now, mtime=False)
        return self._attrs(node)

    @handler
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        _check_name(name)
        parent = self._dir(parent_inode)
        ino = parent.entries.get(name)
        if ino is None:
            raise FUSEError(errno.ENOENT)
        node = self._get(ino)
        if node.is_dir:
            raise FUSEError(errno.EISDIR)
        parent.del_entry(name)
        self.store.log_op(DelEntry(parent.ino, name))
        self._changed(parent)
        self._unref(node)

    @handler
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        _check_name(name)
        parent = self._dir(parent_inode)
        ino = parent.entries.get(name)
        if ino is None:
            raise FUSEError(errno.ENOENT)
        node = self._get(ino)
        if not node.is_dir:
            raise FUSEError(errno.ENOTDIR)
        if node.entries:
            raise FUSEError(errno.ENOTEMPTY)
        parent.del_entry(name)
        parent.nlink -= 1
        self.store.log_op(DelEntry(parent.ino, name))
        self._changed(parent)
        self._unref(node)

    def _is_ancestor(self, maybe_ancestor: int, ino: int) -> bool:
        """True if directory ``maybe_ancestor`` is ``ino`` or above it."""
        seen = 0
        while True:
            if ino == maybe_ancestor:
                return True
            if ino == ROOT or seen > 4096:
                return False
            node = self.state.inodes.get(ino)
            if node is None:
                return False
            ino = node.parent
            seen += 1

    @handler
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        _check_name(name_old)
        _check_name(name_new)
        pold = self._dir(parent_inode_old)
        pnew = self._dir(parent_inode_new)
        src_ino = pold.entries.get(name_old)
        if src_ino is None:
            raise FUSEError(errno.ENOENT)
        src = self._get(src_ino)
        dst_ino = pnew.entries.get(name_new)
        dst = self.state.inodes.get(dst_ino) if dst_ino is not None else None
        if src.is_dir and self._is_ancestor(src.ino, pnew.ino):
            raise FUSEError(errno.EINVAL)  # a directory into itself
        now = _now()
        if flags & pyfuse3.RENAME_EXCHANGE:
            if dst is None:
                raise FUSEError(errno.ENOENT)
            if dst.is_dir and self._is_ancestor(dst.ino, pold.ino):
                raise FUSEError(errno.EINVAL)
            pold.entries[name_old], pnew.entries[name_new] = dst.ino, src.ino
            for moved, frm, to in ((src, pold, pnew), (dst, pnew, pold)):
                if moved.is_dir and frm is not to:
                    frm.nlink -= 1
                    to.nlink += 1
                    moved.parent = to.ino
            self.store.log_op(SetEntry(pold.ino, name_old, dst.ino))
            self.store.log_op(SetEntry(pnew.ino, name_new, src.ino))
            self._changed(pold, pnew, now=now)
            self._changed(src, dst, now=now, mtime=False)
            return
        if dst is not None:
            if flags & pyfuse3.RENAME_NOREPLACE:
                raise FUSEError(errno.EEXIST)
            if dst.ino == src.ino:
                return  # two links to one file: POSIX says do nothing
            if src.is_dir and not dst.is_dir:
                raise FUSEError(errno.ENOTDIR)
            if not src.is_dir and dst.is_dir:
                raise FUSEError(errno.EISDIR)
            if dst.is_dir and dst.entries:
                raise FUSEError(errno.ENOTEMPTY)
        pnew.add_entry(name_new, src.ino)
        pold.del_entry(name_old)
        self.store.log_op(SetEntry(pnew.ino, name_new, src.ino))
        self.store.log_op(DelEntry(pold.ino, name_old))
        if src.is_dir and pold is not pnew:
            pold.nlink -= 1
            pnew.nlink += 1
            src.parent = pnew.ino
        if dst is not None:
            if dst.is_dir:
                pnew.nlink -= 1
            self._unref(dst)
        self._changed(pold, pnew, now=now)
        self._changed(src, now=now, mtime=False)

    # ------------------------------------------------------------------ directories
    @handler
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        self._dir(inode)
        return inode

    @handler
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        node = self.state.inodes.get(fh)
        if node is None:
            return
        listing = node.sorted_listing()
        i = bisect_right(listing, start_id, key=lambda t: t[0])
        for cookie, name in listing[i:]:
            child = self.state.inodes.get(node.entries[name])
            if child is None:
                continue
            if not pyfuse3.readdir_reply(token, name, self._attrs(child), cookie):
                break

    async def releasedir(self, fh: int) -> None:
        return None

    @handler
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        await self.store.sync()

    # ------------------------------------------------------------------ files
    def _file_info(self, ino: int) -> pyfuse3.FileInfo:
        # page cache on: shared writable mmap needs it (direct_io makes MAP_SHARED ENODEV)
        return pyfuse3.FileInfo(fh=ino, direct_io=False, keep_cache=True)

    @handler
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._get(inode)
        if node.is_dir:
            raise FUSEError(errno.EISDIR)
        node.opens += 1
        if flags & os.O_TRUNC and node.is_reg:  # the kernel sends O_TRUNC (atomic_o_trunc)
            try:
                async with self._lock(inode):
                    if node.size:
                        await self.store.truncate(node, 0)
                    self._changed(node)
            except BaseException:
                node.opens -= 1
                raise
        return self._file_info(inode)

    @handler
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo,
                                                           pyfuse3.EntryAttributes]:
        node = self._make(parent_inode, name, stat.S_IFREG | stat.S_IMODE(mode), ctx)
        node.opens += 1
        return self._file_info(node.ino), self._attrs(node)

    @handler
    async def read(self, fh: int, off: int, size: int) -> bytes | bytearray:
        return await self.store.read(self._get(fh), off, size)

    @handler
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        node = self._get(fh)
        async with self._lock(fh):
            await self.store.write(node, off, buf)
        return len(buf)

    @handler
    async def flush(self, fh: int) -> None:
        return None

    @handler
    async def release(self, fh: int) -> None:
        node = self.state.inodes.get(fh)
        if node is None:
            return
        node.opens -= 1
        if node.opens <= 0 and node.nlink <= 0:
            self.store.drop_inode(node)
            self.locks.pop(fh, None)

    @handler
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.store.sync()

    # ------------------------------------------------------------------ the whole fs
    @handler
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        total, free = await self.store.capacity()
        k = max(1, self.store.replicas)
        st = pyfuse3.StatvfsData()
        st.f_bsize = BLKSIZE
        st.f_frsize = BLKSIZE
        st.f_blocks = total // k // BLKSIZE
        st.f_bfree = min(st.f_blocks, (free // k + self.store.alloc.free_bytes()) // BLKSIZE)
        st.f_bavail = st.f_bfree
        st.f_files = MAX_FILES
        st.f_ffree = MAX_FILES - len(self.state.inodes)
        st.f_favail = st.f_ffree
        st.f_namemax = NAME_MAX
        return st
