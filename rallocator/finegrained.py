"""Fine-grained allocation on the working node: the second level of RAllocator.

Slabs borrowed from blades are carved into objects of one size class each (64 B, 128 B, …,
a quarter slab), SLUB-style. Each size class keeps a *partial* list (slabs with room) and a
*full* set; a slab whose last object is freed moves to the shared *empty* list for reuse by
any class, and only empties beyond ``empty_threshold`` go back to the blade. So allocate and
free cost no network round trip except when a class runs dry or too many slabs sit empty.

The slab size for new slabs is tuned at run time (``SlabSizeTuner``): bigger slabs when the
node keeps fetching well-used slabs (streaming), smaller when utilisation drops.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rallocator.node import Slab, WorkingNode

MIN_OBJECT = 64
HEAP_VOLUME = 0x68656170  # "heap": the volume tag of carved slabs


@dataclass(eq=False)
class CarvedSlab:
    slab: Slab
    object_size: int
    free: list[int] = field(default_factory=list)  # freed object indices (a stack)
    used: int = 0
    in_use: bytearray = field(default_factory=bytearray)  # 1 per allocated object
    bump: int = 0  # objects [bump, capacity) were never handed out: no free list to build
    full: bool = False  # in the carver's full set (no free object)

    @property
    def capacity(self) -> int:
        return self.slab.size // self.object_size


class Handle:
    """An allocation: ``size`` bytes at ``offset`` inside ``slab`` (on every replica).

    A slotted class rather than a dataclass: one is made per allocation, on the hot path.
    """

    __slots__ = ("slab", "offset", "size", "carved")

    def __init__(self, slab: Slab, offset: int, size: int, carved: CarvedSlab | None) -> None:
        self.slab = slab
        self.offset = offset
        self.size = size
        self.carved = carved  # None: the allocation has the whole slab

    def __repr__(self) -> str:
        return f"Handle(index={self.slab.index}, offset={self.offset}, size={self.size})"


class SlabSizeTuner:
    """Picks the slab size for the next slab from the ones every blade offers."""

    def __init__(self, sizes: list[int]) -> None:
        self.sizes = sizes
        self.choice = 0
        self.fetches: list[float] = []

    def record_fetch(self, utilisation: float, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.fetches = [t for t in self.fetches if now - t < 1.0] + [now]
        if len(self.fetches) >= 8 and utilisation > 0.75 and self.choice + 1 < len(self.sizes):
            self.choice += 1  # streaming: fewer, larger slabs
            self.fetches.clear()
        elif utilisation < 0.5 and self.choice > 0:
            self.choice -= 1  # sparse: smaller slabs waste less

    def size(self) -> int:
        return self.sizes[self.choice]


class SlabCarver:
    """Full / partial / empty slab lists and the object allocator over them. Thread-safe."""

    def __init__(self, node: WorkingNode, empty_threshold: int = 8, replicas: int = 1) -> None:
        self.node = node
        self.empty_threshold = empty_threshold
        self.replicas = replicas
        self.partial: dict[int, list[CarvedSlab]] = {}
        self.full: dict[int, set[CarvedSlab]] = {}
        self.empty: list[CarvedSlab] = []
        self.whole: dict[int, int] = {}  # id(slab) -> size, of whole-slab allocations
        self.slabs_fetched = 0
        self.slabs_returned = 0
        self._next_index = 0
        self._lock = threading.Lock()
        self._tuner: SlabSizeTuner | None = None

    # ------------------------------------------------------------------ helpers
    def _tuner_get(self) -> SlabSizeTuner:
        if self._tuner is None:
            sizes = self.node.slab_sizes()
            if not sizes:
                from rallocator.node import NoSpace

                raise NoSpace("no reachable blade")
            self._tuner = SlabSizeTuner(sizes)
        return self._tuner

    @staticmethod
    def object_size(size: int) -> int:
        return MIN_OBJECT if size <= MIN_OBJECT else 1 << (size - 1).bit_length()

    def utilisation(self) -> float:
        held = sum(c.slab.size for lst in self.partial.values() for c in lst)
        held += sum(c.slab.size for s in self.full.values() for c in s)
        if not held:
            return 1.0
        used = sum(c.used * c.object_size for lst in self.partial.values() for c in lst)
        used += sum(c.used * c.object_size for s in self.full.values() for c in s)
        return used / held

    def _fetch(self, size: int) -> Slab:
        self._next_index += 1
        slab = self.node.allocate_slab(size, HEAP_VOLUME, self._next_index, self.replicas)
        self.slabs_fetched += 1
        return slab

    # ------------------------------------------------------------------ allocate / free
    def allocate(self, size: int) -> Handle:
        osize = MIN_OBJECT if size <= MIN_OBJECT else 1 << (size - 1).bit_length()
        with self._lock:
            lst = self.partial.get(osize)
            if not lst:  # slow path: this class ran dry (or first use, or a bad size)
                if size <= 0:
                    raise ValueError("allocation size must be positive")
                tuner = self._tuner_get()
                if osize > tuner.sizes[-1] // 4:
                    return self._allocate_whole(size, tuner)
                lst = self.partial.setdefault(osize, [])
                lst.append(self._new_carved(osize, tuner))
            carved = lst[-1]
            free = carved.free
            if free:
                idx = free.pop()
            else:
                idx = carved.bump
                carved.bump += 1
            carved.in_use[idx] = 1
            carved.used += 1
            if not free and carved.bump == len(carved.in_use):
                lst.pop()
                carved.full = True
                self.full.setdefault(osize, set()).add(carved)
            return Handle(carved.slab, idx * osize, size, carved)

    def _new_carved(self, osize: int, tuner: SlabSizeTuner) -> CarvedSlab:
        for i, c in enumerate(self.empty):
            if c.slab.size >= osize * 4:
                self.empty.pop(i)
                return self._format(c.slab, osize)
        tuner.record_fetch(self.utilisation())
        slab = self._fetch(max(tuner.size(), next(s for s in tuner.sizes if s >= osize * 4)))
        return self._format(slab, osize)

    @staticmethod
    def _format(slab: Slab, osize: int) -> CarvedSlab:
        return CarvedSlab(slab, osize, [], 0, bytearray(slab.size // osize), 0)

    def _allocate_whole(self, size: int, tuner: SlabSizeTuner) -> Handle:
        fits = [s for s in tuner.sizes if s >= size]
        if not fits:
            raise ValueError(f"{size} bytes is larger than the largest slab ({tuner.sizes[-1]})")
        slab = self._fetch(fits[0])
        self.whole[id(slab)] = slab.size
        return Handle(slab, 0, size, None)

    def free(self, handle: Handle) -> None:
        carved = handle.carved
        if carved is None:
            self._free_whole(handle)
            return
        with self._lock:
            idx = handle.offset // carved.object_size
            in_use = carved.in_use
            if not in_use[idx]:
                raise ValueError("double free")
            in_use[idx] = 0
            carved.free.append(idx)
            carved.used -= 1
            if not (carved.full or carved.used == 0):
                return  # the common case: it stays partial
            to_return = self._settle(carved)
        for slab in to_return:  # network work outside the lock
            self.node.free_slab(slab)
            self.slabs_returned += 1

    def _settle(self, carved: CarvedSlab) -> list[Slab]:
        """Move a slab between lists after a free (full -> partial, partial -> empty);
        returns the empty slabs beyond the threshold, to go back to the blade."""
        osize = carved.object_size
        if carved.full:
            carved.full = False
            self.full[osize].discard(carved)
            self.partial.setdefault(osize, []).append(carved)
        to_return: list[Slab] = []
        if carved.used == 0:
            self.partial[osize].remove(carved)
            self.empty.append(carved)
            while len(self.empty) > self.empty_threshold:
                to_return.append(self.empty.pop(0).slab)
        return to_return

    def _free_whole(self, handle: Handle) -> None:
        with self._lock:
            if id(handle.slab) not in self.whole:
                raise ValueError("double free")
            del self.whole[id(handle.slab)]
        self.node.free_slab(handle.slab)
        self.slabs_returned += 1

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "partial": sum(len(v) for v in self.partial.values()),
                "full": sum(len(v) for v in self.full.values()),
                "empty": len(self.empty),
                "whole": len(self.whole),
                "bytes_allocated": sum(self.whole.values()) + sum(
                    c.used * c.object_size for lst in (*self.partial.values(),
                                                       *self.full.values()) for c in lst),
                "slabs_fetched": self.slabs_fetched,
                "slabs_returned": self.slabs_returned,
            }
