"""The filesystem's own fine-grained allocator: data slabs carved into extents. No I/O.

Why not ``node.allocate`` (``rallocator.finegrained.SlabCarver``)? Its slabs all carry the
fixed ``HEAP_VOLUME`` tag and its layout lives only in the node's memory, so after a restart
nothing says which carved slab held which file. Here every data slab is allocated with this
filesystem's own volume (``name_id("fs-data:NAME")``) and a unique index, and an extent is
named by (slab index, offset, capacity) in the metadata log; recovery hands ``restore`` the
slabs the blades say we own plus the extents the log references, and gets back the slabs
nothing references (to free). The policy is the same SLUB-style one as the core's carver:
each slab is cut into objects of one size class (512 B .. 64 KiB); per class a *partial*
list; a slab whose last extent is freed goes to the *empty* list, reusable by any class, and
only empties beyond ``empty_threshold`` go back to the blade.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from fuse_fs.state import BLOCK, Ext

MIN_EXTENT = 512
CLASSES = tuple(MIN_EXTENT << i for i in range((BLOCK // MIN_EXTENT).bit_length()))


def class_for(n: int) -> int:
    """The smallest extent size class holding ``n`` bytes (n <= BLOCK)."""
    for c in CLASSES:
        if c >= n:
            return c
    raise ValueError(f"{n} bytes is more than one block ({BLOCK})")


@dataclass(eq=False)
class DataSlab:
    index: int
    slab: Any  # rallocator.node.Slab
    cls: int = 0  # object size; 0 while empty and unformatted
    free: list[int] = field(default_factory=list)  # free offsets (a stack)
    used: int = 0

    @property
    def capacity(self) -> int:
        return self.slab.size // self.cls if self.cls else 0

    def format(self, cls: int) -> None:
        self.cls = cls
        self.used = 0
        self.free = list(range(self.slab.size - cls, -1, -cls))


class ExtentAllocator:
    """Extents out of data slabs. Not thread-safe: the trio thread owns it."""

    def __init__(self, empty_threshold: int = 2) -> None:
        self.empty_threshold = empty_threshold
        self.slabs: dict[int, DataSlab] = {}
        self.partial: dict[int, list[DataSlab]] = {c: [] for c in CLASSES}
        self.empty: list[DataSlab] = []
        self.bytes_used = 0

    # ------------------------------------------------------------------ allocate
    def take(self, cap: int) -> Ext | None:
        """An extent of size class ``cap``, or None if a new slab is needed (``add_slab``)."""
        lst = self.partial[cap]
        if not lst:
            if not self.empty:
                return None
            ds = self.empty.pop()
            ds.format(cap)
            lst.append(ds)
        ds = lst[-1]
        off = ds.free.pop()
        ds.used += 1
        if not ds.free:
            lst.pop()
        self.bytes_used += cap
        return Ext(ds.index, off, cap)

    def add_slab(self, index: int, slab: Any) -> None:
        ds = DataSlab(index, slab)
        self.slabs[index] = ds
        self.empty.append(ds)

    def slab(self, index: int) -> Any:
        return self.slabs[index].slab

    # ------------------------------------------------------------------ free
    def release(self, ext: Ext) -> list[DataSlab]:
        """Give an extent back. Returns slabs to hand back to the blades (now empty and
        beyond the threshold); the caller frees them and nothing references them anymore."""
        ds = self.slabs[ext.slab]
        if ds.cls != ext.cap or ext.off in ds.free:
            raise ValueError(f"bad free of {ext}")
        was_full = not ds.free
        ds.free.append(ext.off)
        ds.used -= 1
        self.bytes_used -= ext.cap
        lst = self.partial[ds.cls]
        if was_full:
            lst.append(ds)
        if ds.used == 0:
            lst.remove(ds)
            ds.cls, ds.free = 0, []
            self.empty.append(ds)
        out = []
        while len(self.empty) > self.empty_threshold:
            gone = self.empty.pop(0)
            del self.slabs[gone.index]
            out.append(gone)
        return out

    # ------------------------------------------------------------------ recovery
    def restore(self, slabs: dict[int, Any], used: Iterable[Ext]) -> tuple[list[DataSlab], list[Ext]]:
        """Rebuild from the slabs we own and the extents the metadata references.

        Returns (slabs nothing references, to free; extents that could not be placed:
        their slab is missing or the references disagree, so the caller drops them)."""
        by_slab: dict[int, list[Ext]] = {}
        for e in used:
            by_slab.setdefault(e.slab, []).append(e)
        bad: list[Ext] = []
        unused: list[DataSlab] = []
        for index, slab in sorted(slabs.items()):
            ds = DataSlab(index, slab)
            self.slabs[index] = ds
            exts = by_slab.pop(index, [])
            if not exts:
                unused.append(ds)
                continue
            cls = max(set(e.cap for e in exts), key=lambda c: sum(e.cap == c for e in exts))
            ds.format(cls)
            free = set(ds.free)
            for e in exts:
                if e.cap != cls or e.off not in free:
                    bad.append(e)
                    continue
                free.discard(e.off)
                ds.used += 1
                self.bytes_used += cls
            ds.free = sorted(free, reverse=True)
            if ds.free:
                self.partial[cls].append(ds)
        for exts in by_slab.values():
            bad.extend(exts)
        for ds in unused:  # keep up to the threshold as empties, the rest go back
            if len(self.empty) < self.empty_threshold:
                self.empty.append(ds)
        keep = {id(d) for d in self.empty}
        unused = [d for d in unused if id(d) not in keep]
        for d in unused:
            del self.slabs[d.index]
        return unused, bad

    # ------------------------------------------------------------------ stats
    def free_bytes(self) -> int:
        """Bytes we hold but have not handed out (room in partial and empty slabs)."""
        n = sum(ds.slab.size for ds in self.empty)
        for lst in self.partial.values():
            n += sum(len(ds.free) * ds.cls for ds in lst)
        return n

    def stats(self) -> dict[str, int]:
        return {"slabs": len(self.slabs), "empty": len(self.empty),
                "partial": sum(len(v) for v in self.partial.values()),
                "bytes_used": self.bytes_used}
