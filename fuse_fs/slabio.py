"""Blocking slab I/O for the filesystem: run these in worker threads, never on trio's --
except copies that ``local_only`` vouches for (memcpy on a shm mapping, no network).

A data or log slab has a copy on each replica's blade. Writes go to every live copy; reads
come from the first copy that answers. A copy whose blade stops answering is marked dead
(``node.mark_dead``) and skipped from then on; only when no copy is left does the caller see
``SlabIOError`` (the filesystem turns it into EIO).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from rallocator.verbs import BladeUnreachable
from rallocator.wire import VerbError

log = logging.getLogger("fuse_fs.io")

ZEROS = bytes(1 << 20)


class SlabIOError(Exception):
    """No copy of a slab could be read or written."""


def _live(slab: Any) -> list[Any]:
    reps = [r for r in slab.replicas if not r.link.dead]
    return reps or list(slab.replicas)


INLINE_MAX = 1 << 20  # bytes a copy on the trio thread may move at most


def local_only(pieces: Sequence[tuple[Any, int, Any]]) -> bool:
    """True if every copy of every slab in ``pieces`` is on a live shm link and the pieces
    move at most INLINE_MAX bytes: ``read_pieces``/``write_pieces`` on them are then a few
    memcpys on local mappings, cheaper than a hop to a worker thread and never blocking on
    the network. A blade marked dead (its mapping may outlive the blade process), a tcp
    copy or a large copy says False: the caller uses a worker thread as before."""
    total = 0
    for slab, _, data in pieces:
        total += data if isinstance(data, int) else len(data)
        for rep in slab.replicas:
            link = rep.link
            if link.dead or getattr(link, "shm", None) is None:
                return False
    return total <= INLINE_MAX


def write_pieces(node: Any, pieces: Sequence[tuple[Any, int, Any]]) -> None:
    """Write each (slab, offset, data) to every live copy; ``data`` may be an int: that
    many zero bytes."""
    for slab, off, data in pieces:
        if isinstance(data, int):
            data = memoryview(ZEROS)[:data] if data <= len(ZEROS) else bytes(data)
        if not len(data):
            continue
        ok = 0
        last: Exception | None = None
        for rep in _live(slab):
            try:
                with rep.link.verbs() as v:
                    v.write(rep.addr + off, data)
                ok += 1
            except (BladeUnreachable, OSError, VerbError) as e:
                last = e
                log.warning("write to slab %d on %s failed: %s", slab.index, rep.link.name, e)
                if isinstance(e, (BladeUnreachable, OSError)):
                    node.mark_dead(rep.link.name)
        if not ok:
            raise SlabIOError(f"no copy of slab {slab.index} writable: {last}")


def read_pieces(node: Any, pieces: Sequence[tuple[Any, int, memoryview]]) -> None:
    """Fill each (slab, offset, target view) from the first copy that answers."""
    for slab, off, view in pieces:
        last: Exception | None = None
        for rep in _live(slab):
            try:
                with rep.link.verbs() as v:
                    v.read_into(rep.addr + off, view)
                break
            except (BladeUnreachable, OSError, VerbError) as e:
                last = e
                log.warning("read of slab %d on %s failed: %s", slab.index, rep.link.name, e)
                if isinstance(e, (BladeUnreachable, OSError)):
                    node.mark_dead(rep.link.name)
        else:
            raise SlabIOError(f"no copy of slab {slab.index} readable: {last}")


def persist_ranges(node: Any, ranges: Sequence[tuple[Any, int, int]]) -> None:
    """Make (slab, offset, length) durable on every live nvm copy (msync on the blade's
    region); dram copies need nothing."""
    for slab, off, n in ranges:
        ok = 0
        last: Exception | None = None
        for rep in _live(slab):
            if not rep.link.geometry.mode_nvm:
                ok += 1
                continue
            try:
                with rep.link.verbs() as v:
                    v.persist(rep.addr + off, n)
                ok += 1
            except (BladeUnreachable, OSError, VerbError) as e:
                last = e
                if isinstance(e, (BladeUnreachable, OSError)):
                    node.mark_dead(rep.link.name)
        if not ok:
            raise SlabIOError(f"no copy of slab {slab.index} could persist: {last}")


def read_slab(node: Any, slab: Any) -> bytes:
    buf = bytearray(slab.size)
    read_pieces(node, [(slab, 0, memoryview(buf))])
    return bytes(buf)
