"""Fine-grained allocation on the working node: the second level of RAllocator.

Slabs borrowed from blades are carved into objects of one size class each (64 B, 128 B, …,
256 KiB), SLUB-style. Each size class keeps a *partial* list (slabs with room); a slab whose
last object is freed moves to the shared *empty* list, is reused by any class that needs a
slab, and only empties beyond ``empty_threshold`` go back to the blade. So allocate and free
cost no network round trip except when a class runs dry or too many slabs sit empty.

The bookkeeping is the C core ``rallocator._carver.Carver`` (the hot path: a pair costs a
few hundred nanoseconds, against ~2.5 us in Python); this module owns the slabs themselves
and answers the core's callbacks: fetch a slab (``need_slab``), give one back
(``give_back``), and allocations bigger than an object class (a whole slab each).

A handle is an int, ``slab id << 32 | object index`` (``| 0xFFFFFFFF`` for a whole slab):
the working node's own "remote address", cheap to make, store and pass around.

The slab size for new slabs is tuned at run time (``SlabSizeTuner``): bigger slabs when the
node keeps fetching well-used slabs (streaming), smaller when utilisation drops.
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import TYPE_CHECKING

from rallocator._carver import Carver

if TYPE_CHECKING:
    from rallocator.node import Slab, WorkingNode

MIN_OBJECT = 64
MAX_OBJECT = 256 << 10  # larger allocations get a slab of their own
HEAP_VOLUME = 0x68656170  # "heap": the volume tag of carved slabs
WHOLE = 0xFFFFFFFF

Handle = int


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
    """Full / partial / empty slab lists and the object allocator over them. Thread-safe
    (the core runs under the GIL; the callbacks take their own lock)."""

    def __init__(self, node: WorkingNode, empty_threshold: int = 8, replicas: int = 1) -> None:
        self.node = node
        self.replicas = replicas
        self.slabs: dict[int, Slab] = {}  # slab id -> slab (carved or whole)
        self.whole: set[int] = set()  # slab ids that are one allocation each
        self.slabs_fetched = 0
        self.slabs_returned = 0
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._tuner: SlabSizeTuner | None = None
        self.core = Carver(need_slab=self._need_slab, give_back=self._give_back,
                           big_alloc=self._big_alloc, big_free=self._big_free,
                           empty_threshold=empty_threshold, max_object=MAX_OBJECT)
        self.allocate = self.core.alloc  # allocate(size) -> handle; the hot path, in C
        self.free = self.core.free  # free(handle); raises ValueError on a double free

    # ------------------------------------------------------------------ handles
    def locate(self, handle: Handle) -> tuple[Slab, int, int]:
        """(slab, byte offset in it, bytes available) of a live handle.

        Raises:
            ValueError: not a live handle.
        """
        sid, idx = handle >> 32, handle & WHOLE
        size = self.core.object_size(handle)
        slab = self.slabs.get(sid)
        if slab is None or (idx == WHOLE) != (sid in self.whole):
            raise ValueError("not a live handle")
        if idx == WHOLE:
            return slab, 0, slab.size
        return slab, idx * size, size

    # ------------------------------------------------------------------ callbacks
    def _tuner_get(self) -> SlabSizeTuner:
        if self._tuner is None:
            sizes = self.node.slab_sizes()
            if not sizes:
                from rallocator.node import NoSpace

                raise NoSpace("no reachable blade")
            self._tuner = SlabSizeTuner(sizes)
        return self._tuner

    def utilisation(self) -> float:
        partial, full, empty, used = self.core.stats()
        held = sum(s.size for s in self.slabs.values())
        return used / held if held else 1.0

    def _fetch(self, size: int) -> int:
        sid = next(self._ids)
        slab = self.node.allocate_slab(size, HEAP_VOLUME, sid, self.replicas)
        with self._lock:
            self.slabs[sid] = slab
            self.slabs_fetched += 1
        return sid

    def _need_slab(self, object_size: int) -> tuple[int, int]:
        tuner = self._tuner_get()
        fits = [s for s in tuner.sizes if s >= 4 * object_size]
        if not fits:
            raise ValueError(f"no blade slab holds four {object_size}-byte objects")
        tuner.record_fetch(self.utilisation())
        size = max(tuner.size(), fits[0])
        sid = self._fetch(size)
        return sid, size

    def _give_back(self, sid: int) -> None:
        with self._lock:
            slab = self.slabs.pop(sid)
        self.node.free_slab(slab)
        self.slabs_returned += 1

    def _big_alloc(self, size: int) -> Handle:
        fits = [s for s in self._tuner_get().sizes if s >= size]
        if not fits:
            raise ValueError(f"{size} bytes is larger than the largest slab "
                             f"({self._tuner_get().sizes[-1]})")
        sid = self._fetch(fits[0])
        with self._lock:
            self.whole.add(sid)
        return sid << 32 | WHOLE

    def _big_free(self, handle: Handle) -> None:
        sid = handle >> 32
        with self._lock:
            if sid not in self.whole:
                raise ValueError("double free (or not a live handle)")
            self.whole.discard(sid)
            slab = self.slabs.pop(sid)
        self.node.free_slab(slab)
        self.slabs_returned += 1

    def stats(self) -> dict[str, int]:
        partial, full, empty, used = self.core.stats()
        return {"partial": partial, "full": full, "empty": empty,
                "whole": len(self.whole),
                "bytes_allocated": used + sum(self.slabs[s].size for s in list(self.whole)),
                "slabs_fetched": self.slabs_fetched, "slabs_returned": self.slabs_returned}
