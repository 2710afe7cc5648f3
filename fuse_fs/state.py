"""The filesystem's metadata in memory: inodes, directory entries, extent maps. No I/O.

The running filesystem mutates a ``FsState`` directly and logs each change as an op
(``fuse_fs.metalog``); recovery rebuilds a ``FsState`` by ``apply``-ing the committed ops,
then ``finish_replay`` recomputes link counts and drops what is no longer reachable.
``snapshot_ops`` is the checkpoint: the ops that rebuild the current state from nothing.

A file's data is cut into 64 KiB blocks. Block b lives in an extent ``Ext(slab, off, cap)``
covering file bytes [b * BLOCK, b * BLOCK + cap); bytes of the block past ``cap`` and blocks
with no extent (holes) read as zeros. Only block 0 of a file smaller than a block has
``cap < BLOCK`` (the first extent is sized to the file, so small files share slabs).
"""

from __future__ import annotations

import stat
from typing import NamedTuple

from fuse_fs.metalog import (
    CutExtents,
    DelEntry,
    DropInode,
    Op,
    SetEntry,
    SetExtents,
    SetInode,
)

BLOCK = 64 * 1024
ROOT = 1
NAME_MAX = 255


class Ext(NamedTuple):
    """An extent: ``cap`` bytes at offset ``off`` of data slab number ``slab``."""

    slab: int
    off: int
    cap: int


class Inode:
    """One inode. ``entries`` (name -> inode) for directories, ``extents`` (block -> Ext)
    for regular files, ``target`` for symlinks. ``opens``/``dirty`` are runtime only."""

    __slots__ = ("ino", "mode", "uid", "gid", "rdev", "size", "atime", "mtime", "ctime",
                 "nlink", "target", "entries", "cookies", "next_cookie", "parent", "extents",
                 "opens", "dirty", "listing")

    def __init__(self, ino: int, mode: int, uid: int = 0, gid: int = 0, rdev: int = 0,
                 size: int = 0, atime: int = 0, mtime: int = 0, ctime: int = 0,
                 target: bytes = b"") -> None:
        self.ino = ino
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.rdev = rdev
        self.size = size
        self.atime = atime
        self.mtime = mtime
        self.ctime = ctime
        self.target = target
        self.nlink = 0
        self.entries: dict[bytes, int] = {}
        self.cookies: dict[bytes, int] = {}  # readdir position of each entry
        self.next_cookie = 1
        self.listing: list[tuple[int, bytes]] | None = None  # cached sorted (cookie, name)
        self.parent = ROOT
        self.extents: dict[int, Ext] = {}
        self.opens = 0
        self.dirty: set[Ext] = set()  # extents written since the last sync

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    def record(self) -> SetInode:
        return SetInode(self.ino, self.mode, self.uid, self.gid, self.rdev, self.size,
                        self.atime, self.mtime, self.ctime, self.target)

    # -- directory helpers (keep cookies in step with entries) ------------------------------
    def add_entry(self, name: bytes, ino: int) -> None:
        if name not in self.entries:
            self.cookies[name] = self.next_cookie
            self.next_cookie += 1
            self.listing = None
        self.entries[name] = ino

    def del_entry(self, name: bytes) -> int | None:
        ino = self.entries.pop(name, None)
        if ino is not None:
            del self.cookies[name]
            self.listing = None
        return ino

    def sorted_listing(self) -> list[tuple[int, bytes]]:
        if self.listing is None:
            self.listing = sorted((c, n) for n, c in self.cookies.items())
        return self.listing


def block_span(off: int, end: int) -> range:
    """Blocks touched by file bytes [off, end)."""
    if end <= off:
        return range(0)
    return range(off // BLOCK, (end - 1) // BLOCK + 1)


class FsState:
    """All inodes, by number. ``apply`` is tolerant: ops naming inodes that do not exist
    are skipped, so a replay that starts mid-log cannot crash (the checkpoint after it
    replaces whatever it built)."""

    def __init__(self) -> None:
        self.inodes: dict[int, Inode] = {}
        self.next_ino = ROOT + 1

    @classmethod
    def fresh(cls, uid: int, gid: int, now_ns: int) -> FsState:
        s = cls()
        root = Inode(ROOT, stat.S_IFDIR | 0o755, uid, gid, 0, 0, now_ns, now_ns, now_ns)
        root.nlink = 2
        root.parent = ROOT
        s.inodes[ROOT] = root
        return s

    # ------------------------------------------------------------------ replay
    def apply(self, op: Op) -> None:
        if isinstance(op, SetInode):
            node = self.inodes.get(op.ino)
            if node is None:
                node = self.inodes[op.ino] = Inode(op.ino, op.mode)
            node.mode, node.uid, node.gid, node.rdev = op.mode, op.uid, op.gid, op.rdev
            node.size, node.atime, node.mtime, node.ctime = op.size, op.atime, op.mtime, op.ctime
            node.target = op.target
            self.next_ino = max(self.next_ino, op.ino + 1)
        elif isinstance(op, SetEntry):
            parent = self.inodes.get(op.parent)
            if parent is not None:
                parent.add_entry(op.name, op.ino)
            self.next_ino = max(self.next_ino, op.ino + 1)
        elif isinstance(op, DelEntry):
            parent = self.inodes.get(op.parent)
            if parent is not None:
                parent.del_entry(op.name)
        elif isinstance(op, SetExtents):
            node = self.inodes.get(op.ino)
            if node is not None:
                for block, slab, off, cap in op.exts:
                    node.extents[block] = Ext(slab, off, cap)
        elif isinstance(op, CutExtents):
            node = self.inodes.get(op.ino)
            if node is not None:
                for b in [b for b in node.extents if b >= op.first_block]:
                    del node.extents[b]
        elif isinstance(op, DropInode):
            self.inodes.pop(op.ino, None)

    def finish_replay(self) -> list[int]:
        """Recompute link counts and parents; drop inodes no entry reaches (files unlinked
        while open when the node stopped, or half-made ones). Returns the dropped inodes."""
        for node in self.inodes.values():
            node.nlink = 2 if node.is_dir else 0
        reachable = {ROOT}
        stack = [ROOT]
        while stack:
            d = self.inodes[stack.pop()]
            for name, ino in list(d.entries.items()):
                child = self.inodes.get(ino)
                if child is None or (child.is_dir and ino in reachable):
                    d.del_entry(name)  # dangling, or a second link to a directory
                    continue
                if child.is_dir:
                    child.parent = d.ino
                    d.nlink += 1
                    reachable.add(ino)
                    stack.append(ino)
                else:
                    child.nlink += 1
                    reachable.add(ino)
        dropped = [ino for ino in self.inodes if ino not in reachable]
        for ino in dropped:
            del self.inodes[ino]
        return dropped

    # ------------------------------------------------------------------ checkpoint
    def snapshot_ops(self) -> list[Op]:
        ops: list[Op] = []
        for node in self.inodes.values():
            ops.append(node.record())
            if node.extents:
                exts = [(b, e.slab, e.off, e.cap) for b, e in sorted(node.extents.items())]
                for i in range(0, len(exts), 2048):
                    ops.append(SetExtents(node.ino, exts[i:i + 2048]))
        for node in self.inodes.values():
            if node.is_dir:
                for _, name in node.sorted_listing():
                    ops.append(SetEntry(node.ino, name, node.entries[name]))
        return ops

    def referenced_extents(self) -> list[Ext]:
        return [e for node in self.inodes.values() for e in node.extents.values()]
