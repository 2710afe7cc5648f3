"""Where the filesystem's bytes live: data extents and the metadata log, over blade slabs.

``Store.open`` (blocking, before the mount) finds this filesystem's slabs on the blades,
replays the metadata log, frees whatever nothing references and writes a fresh checkpoint.
At run time every network call happens in a worker thread (``trio.to_thread.run_sync``
behind one capacity limiter); the trio thread only does bookkeeping, and the data copies of
reads and writes whose every copy is on a live shm link (a memcpy on a local mapping, a few
µs: the hop to a worker thread would cost more than the copy).

Durability ("ordered mode"): a sync first persists every data extent written since the last
sync (msync on nvm blades), then appends the pending metadata ops to the log as one
transaction and persists it. ``fsync``/``fsyncdir`` sync; so does a timer every second.
Extents freed by truncate/unlink return to the allocator only once the op that dropped them
is durable *and* no read or write that might still touch them is in flight, so a crash never
shows one file's old extent holding another file's new data.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import trio

from fuse_fs import metalog, slabio
from fuse_fs.extents import ExtentAllocator, class_for
from fuse_fs.metalog import CutExtents, DropInode, Op, SetExtents
from fuse_fs.state import BLOCK, Ext, FsState, Inode, block_span
from rallocator.node import NoSpace, Replica, Slab, WorkingNode, name_id
from rallocator.verbs import BladeUnreachable

log = logging.getLogger("fuse_fs.store")

COMMIT_INTERVAL = 1.0
SPACE_WAIT = 3.0
CHECKPOINT_MIN_BYTES = 2 << 20  # two segments' worth: small clusters stay roomy


class RecoveryError(Exception):
    """The filesystem's slabs cannot be made into a consistent filesystem (a message for
    the user says why and what to do)."""


# ------------------------------------------------------------------ adapters over the core


def owned_slabs_strict(node: WorkingNode, volume: int) -> tuple[dict[int, Slab], list[str]]:
    """Like ``node.owned_slabs(volume)`` but also says which blades did not answer, so
    recovery never frees data because a blade holding its metadata was down."""
    found: dict[int, Slab] = {}
    missing: list[str] = []
    for name in node.blade_addrs:
        try:
            mine = _owned_on(node, name, volume)
        except (BladeUnreachable, OSError) as e:
            log.warning("blade %s unreachable while recovering: %s", name, e)
            missing.append(name)
            continue
        for s in mine:
            slab = found.setdefault(s.index, Slab(s.size, s.volume, s.index))
            slab.replicas.extend(s.replicas)
    return found, missing


def _owned_on(node: WorkingNode, name: str, volume: int) -> list[Slab]:
    """Our slabs on one blade (``node.owned_on`` where the core has it)."""
    owned_on = getattr(node, "owned_on", None)
    if owned_on is not None:
        return owned_on(name, volume)
    link = node.link(name)
    reply = link.call({"op": "owned", "volume": volume})
    return [Slab(s["size"], s["volume"], s["index"], [Replica(link, s["unit"], s["addr"])])
            for s in reply["slabs"]]


def allocate_zeroed(node: WorkingNode, size: int, volume: int, index: int,
                    replicas: int) -> Slab:
    slab = node.allocate_slab(size, volume, index, replicas)
    try:
        slabio.write_pieces(node, [(slab, 0, size)])
    except slabio.SlabIOError:
        node.free_slab(slab)
        raise
    return slab


# ------------------------------------------------------------------ the log writer (blocking)


class LogWriter:
    """Appends transactions to the segment chain. Blocking; the caller serialises calls."""

    def __init__(self, node: WorkingNode, fs_id: int, volume: int, seg_size: int,
                 replicas: int, next_segno: int, next_lsn: int) -> None:
        self.node = node
        self.fs_id = fs_id
        self.volume = volume
        self.seg_size = seg_size
        self.replicas = replicas
        self.next_segno = next_segno
        self.lsn = next_lsn
        self.chain: list[tuple[int, Slab]] = []  # segments since the last checkpoint
        self.pos = 0  # where the next frame goes in chain[-1]
        self.spare: tuple[int, Slab] | None = None
        self.bytes_since_checkpoint = 0
        self.checkpoint_bytes = 0

    def _new_segment(self) -> tuple[int, Slab]:
        no = self.next_segno
        slab = allocate_zeroed(self.node, self.seg_size, self.volume, no, self.replicas)
        self.next_segno += 1
        return no, slab

    def ensure_spare(self) -> None:
        """Keep one zeroed segment in hand, so the log can always take a record that frees
        space even when the cluster is full."""
        if self.spare is None:
            self.spare = self._new_segment()

    def _take_segment(self) -> tuple[int, Slab]:
        if self.spare is not None:
            seg, self.spare = self.spare, None
            return seg
        return self._new_segment()

    def _layout(self, frames: list[tuple[int, bytes]], chain: list[tuple[int, Slab]], pos: int,
                take: Any) -> tuple[list[tuple[int, Slab]], int, int, list[tuple[Slab, int, bytes]]]:
        """Lay frames out from (chain[-1], pos) -- or a fresh segment if ``chain`` is empty
        -- rolling to segments from ``take()`` as they fill. Returns (chain, position, next
        lsn, writes in order)."""
        chain = list(chain)
        writes: list[tuple[Slab, int, bytes]] = []
        lsn = self.lsn
        buf = bytearray()
        start = pos

        def open_segment() -> None:
            nonlocal buf, start, pos
            no, slab = take()
            chain.append((no, slab))
            buf = bytearray(metalog.pack_segment_header(self.fs_id, no, lsn))
            start, pos = 0, metalog.FRAMES_AT

        if not chain:
            open_segment()
        for flags, payload in frames:
            size = metalog.FRAME.size + len(payload)
            if pos + size + metalog.FRAME.size > self.seg_size:
                buf += metalog.pack_frame(lsn, metalog.END, b"")
                lsn += 1
                writes.append((chain[-1][1], start, bytes(buf)))
                open_segment()
            buf += metalog.pack_frame(lsn, flags, payload)
            pos += size
            lsn += 1
        writes.append((chain[-1][1], start, bytes(buf)))
        return chain, pos, lsn, writes

    def _segments_needed(self, frames: list[tuple[int, bytes]]) -> int:
        n, pos = 1, metalog.FRAMES_AT
        for _, payload in frames:
            size = metalog.FRAME.size + len(payload)
            if pos + size + metalog.FRAME.size > self.seg_size:
                n, pos = n + 1, metalog.FRAMES_AT
            pos += size
        return n

    def _commit(self, writes: list[tuple[Slab, int, bytes]]) -> None:
        slabio.write_pieces(self.node, writes)
        slabio.persist_ranges(self.node, [(s, off, len(b)) for s, off, b in writes])

    def _give_back(self, segs: list[tuple[int, Slab]]) -> None:
        for _, slab in segs:  # may hold frames of the failed attempt: never reuse them
            self.node.free_slab(slab)

    def append(self, ops: list[Op]) -> None:
        """One transaction, durable when this returns."""
        frames = [(f, p) for _, f, p in metalog.frames_for(ops, 0)]
        taken: list[tuple[int, Slab]] = []

        def take() -> tuple[int, Slab]:
            seg = self._take_segment()
            taken.append(seg)
            return seg

        try:
            chain, pos, lsn, writes = self._layout(frames, self.chain, self.pos, take)
            self._commit(writes)
        except BaseException:
            self._give_back(taken)
            raise
        self.chain, self.pos, self.lsn = chain, pos, lsn
        self.bytes_since_checkpoint += sum(len(b) for _, _, b in writes)
        try:
            self.ensure_spare()
        except (NoSpace, slabio.SlabIOError) as e:
            log.debug("no spare log segment for now: %s", e)

    def checkpoint(self, ops: list[Op]) -> list[tuple[int, Slab]]:
        """Write the whole state as a RESET transaction starting a fresh segment. Returns
        the segments it made obsolete (the caller frees them)."""
        frames = [(f, p) for _, f, p in metalog.frames_for(ops, 0, reset=True)]
        pool: list[tuple[int, Slab]] = []
        try:  # every segment up front: a checkpoint does not run out of room half way
            for _ in range(self._segments_needed(frames)):
                pool.append(self._take_segment())
            it = iter(pool)
            chain, pos, lsn, writes = self._layout(frames, [], 0, lambda: next(it))
            self._commit(writes)
        except BaseException:
            self._give_back(pool)
            raise
        old = self.chain
        self.chain, self.pos, self.lsn = chain, pos, lsn
        self.checkpoint_bytes = sum(len(b) for _, _, b in writes)
        self.bytes_since_checkpoint = 0
        used = {no for no, _ in chain}
        self._give_back([seg for seg in pool if seg[0] not in used])
        return old

    def should_checkpoint(self) -> bool:
        return self.bytes_since_checkpoint > max(CHECKPOINT_MIN_BYTES, 4 * self.checkpoint_bytes)


# ------------------------------------------------------------------ recovery (blocking)


@dataclass
class Recovered:
    state: FsState
    next_lsn: int
    found_log: bool


def replay(node: WorkingNode, fs_id: int, segs: dict[int, Slab]) -> Recovered | None:
    """The state the log describes: from the newest segment that opens with a committed
    checkpoint, along its chain. None if no segment does."""
    cache: dict[int, bytes] = {}

    def seg(no: int) -> bytes:
        if no not in cache:
            cache[no] = slabio.read_slab(node, segs[no])
        return cache[no]

    for start in sorted(segs, reverse=True):
        first = metalog.parse_segment_header(seg(start), fs_id, start)
        if first is None:
            continue
        head = next(metalog.iter_frames(seg(start), first), None)
        if head is None or not head.flags & metalog.RESET:
            continue
        state, lsn, complete = _replay_chain(seg, segs, fs_id, start, first)
        if complete:
            log.info("metadata log: checkpoint at segment %d, replayed to lsn %d", start, lsn)
            return Recovered(state, lsn, True)
        log.warning("checkpoint at segment %d is incomplete; trying an older one", start)
    return None


def _replay_chain(seg: Any, segs: dict[int, Slab], fs_id: int, no: int,
                  lsn: int) -> tuple[FsState, int, bool]:
    state = FsState()
    rp = metalog.Replayer()
    complete = False
    while True:
        first = metalog.parse_segment_header(seg(no), fs_id, no)
        if first is None or first != lsn:
            break
        ended = False
        for fr in metalog.iter_frames(seg(no), lsn):
            lsn = fr.lsn + 1
            if fr.flags & metalog.END:
                ended = True
                break
            done = rp.feed(fr)
            if done is None:
                continue
            ops, reset = done
            if reset:
                state = FsState()
                complete = True
            for op in ops:
                state.apply(op)
        if not ended:
            break
        # the next segment is the one whose header carries the next lsn (numbers may have
        # gaps: a segment taken by a failed append is given back)
        nxt = [s for s in segs if s > no
               and metalog.parse_segment_header(seg(s), fs_id, s) == lsn]
        if not nxt:
            break
        no = max(nxt)
    return state, lsn, complete


# ------------------------------------------------------------------ the store


class IoEpochs:
    """Which reads/writes are in flight, by the epoch they started in."""

    def __init__(self) -> None:
        self.epoch = 0
        self.active: Counter[int] = Counter()

    def enter(self) -> int:
        self.active[self.epoch] += 1
        return self.epoch

    def leave(self, e: int) -> None:
        self.active[e] -= 1
        if not self.active[e]:
            del self.active[e]

    def bump(self) -> int:
        e = self.epoch
        self.epoch += 1
        return e

    def quiet_since(self, e: int) -> bool:
        """No I/O that started at or before epoch ``e`` is still running."""
        return not self.active or min(self.active) > e


class Store:
    """Data extents and the metadata log of one filesystem (see module doc)."""

    def __init__(self, node: WorkingNode, name: str, replicas: int, slab_size: int) -> None:
        self.node = node
        self.name = name
        self.replicas = replicas
        self.slab_size = slab_size
        self.fs_id = name_id(f"fs:{name}")
        self.meta_vol = name_id(f"fs-meta:{name}")
        self.data_vol = name_id(f"fs-data:{name}")
        self.alloc = ExtentAllocator()
        self.state = FsState()
        self.log: LogWriter | None = None
        self.next_data_index = 1
        # pending metadata: structural ops in order; inodes whose attributes changed
        self.pending: list[Op] = []
        self.dirty_inodes: set[int] = set()
        self.dirty_data: dict[Ext, None] = {}
        self.op_seq = 0
        self.durable_seq = 0
        self.deferred: list[tuple[int, int, Ext]] = []  # (op seq, io epoch, extent)
        self.io = IoEpochs()
        self.limiter: trio.CapacityLimiter | None = None
        self.flush_lock: trio.Lock | None = None
        self.fetch_lock: trio.Lock | None = None
        self.nursery: trio.Nursery | None = None
        self._capacity: tuple[float, int, int] = (0.0, 0, 0)
        self.blades_missing: list[str] = []
        self.returned_at = -1e9  # trio time we last gave slabs back

    # ================================================================ open / recover
    @classmethod
    def open(cls, node: WorkingNode, name: str, replicas: int = 1,
             uid: int = 0, gid: int = 0, reformat: bool = False) -> Store:
        """Recover (or create) the filesystem ``name``. Blocking; call before mounting.

        Args:
            reformat: discard whatever the blades hold for ``name`` and start empty.

        Raises:
            NoSpace: the cluster cannot hold even the first log segment.
            RecoveryError: a log or data exist but no complete checkpoint does.
        """
        sizes = node.slab_sizes()
        if not sizes:
            raise NoSpace("no reachable blade")
        self = cls(node, name, replicas, sizes[0])
        meta, missing_m = owned_slabs_strict(node, self.meta_vol)
        data, missing_d = owned_slabs_strict(node, self.data_vol)
        self.blades_missing = sorted(set(missing_m + missing_d))
        if reformat:
            log.warning("reformat: discarding %d metadata and %d data slab(s) of %r",
                        len(meta), len(data), name)
            for slab in [*meta.values(), *data.values()]:
                node.free_slab(slab)
            meta, data = {}, {}
        rec = replay(node, self.fs_id, meta) if meta else None
        if rec is None:
            written = [no for no, slab in meta.items() if metalog.parse_segment_header(
                slabio.read_slab(node, slab), self.fs_id, no) is not None]
            if written or data:
                raise RecoveryError(
                    f"filesystem {name!r} has {len(meta)} metadata and {len(data)} data slab(s) "
                    "on the blades but no complete checkpoint in its log"
                    + (f" (unreachable blades: {', '.join(self.blades_missing)})"
                       if self.blades_missing else
                       "; mount with --reformat to discard them and start empty"))
            # a new filesystem (segments left by a first mount that died before its first
            # checkpoint hold nothing and are freed below with the rest)
            log.info("new filesystem %r", name)
            rec = Recovered(FsState.fresh(uid, gid, time.time_ns()), 1, False)
        state = rec.state
        dropped = state.finish_replay()
        if dropped:
            log.info("recovery: dropped %d unreachable inode(s)", len(dropped))
        unused, bad = self.alloc.restore(data, state.referenced_extents())
        if bad:
            log.warning("recovery: %d extent(s) point at missing slabs; they read as zeros",
                        len(bad))
            badset = set(bad)
            for node_ in state.inodes.values():
                for b in [b for b, e in node_.extents.items() if e in badset]:
                    del node_.extents[b]
        self.state = state
        self.next_data_index = max(data, default=0) + 1
        self.log = LogWriter(node, self.fs_id, self.meta_vol, self.slab_size, replicas,
                             max(meta, default=0) + 1, rec.next_lsn)
        self.log.chain = []
        self.log.checkpoint(state.snapshot_ops())
        # everything older than the new checkpoint, and data nothing references, goes back
        if self.blades_missing:
            log.warning("blades %s unreachable: keeping unreferenced slabs until they answer",
                        ", ".join(self.blades_missing))
            return self
        for _, slab in sorted(meta.items()):
            node.free_slab(slab)
        for ds in unused:
            node.free_slab(ds.slab)
        if unused:
            log.info("recovery: returned %d unreferenced data slab(s)", len(unused))
        return self

    # ================================================================ trio side
    def start(self, nursery: trio.Nursery, threads: int = 8) -> None:
        self.nursery = nursery
        self.limiter = trio.CapacityLimiter(threads)
        self.flush_lock = trio.Lock()
        self.fetch_lock = trio.Lock()

    async def run_io(self, fn: Any, *args: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    async def copy(self, fn: Any, pieces: list[Any]) -> None:
        """``slabio.read_pieces``/``write_pieces`` on ``pieces``: inline when every copy is
        a live shm mapping (``slabio.local_only``), else in a worker thread."""
        if slabio.local_only(pieces):
            fn(self.node, pieces)
        else:
            await self.run_io(fn, self.node, pieces)

    def log_op(self, op: Op) -> None:
        self.pending.append(op)
        self.op_seq += 1

    def touch(self, ino: int) -> None:
        self.dirty_inodes.add(ino)

    # ---------------------------------------------------------------- extents
    async def new_extent(self, cap: int) -> Ext:
        """An extent of size class ``cap``; a new data slab if none has room.

        Raises:
            NoSpace: the cluster has no slab for us, and none is on its way back (space we
                freed becomes allocatable once the free is durable and the blade reclaimed
                it: we wait up to SPACE_WAIT seconds for that before saying ENOSPC).
        """
        e = self.alloc.take(cap)
        if e is not None:
            return e
        assert self.fetch_lock is not None and self.flush_lock is not None
        async with self.fetch_lock:
            deadline = trio.current_time() + SPACE_WAIT
            while True:
                self.release_deferred()
                e = self.alloc.take(cap)
                if e is not None:
                    return e
                try:
                    if self.log is not None and self.log.spare is None:
                        async with self.flush_lock:
                            await self.run_io(self.log.ensure_spare)
                    idx = self.next_data_index
                    self.next_data_index += 1
                    slab = await self.run_io(self.node.allocate_slab, self.slab_size,
                                             self.data_vol, idx, self.replicas)
                    break
                except NoSpace:
                    coming = self.deferred or trio.current_time() - self.returned_at < 2.0
                    if not coming or trio.current_time() > deadline:
                        raise
                    if self.deferred:
                        await self.sync()  # make the frees durable so they can be reused
                    await trio.sleep(0.05)
            self.alloc.add_slab(idx, slab)
            self._capacity = (0.0, 0, 0)
            e = self.alloc.take(cap)
            assert e is not None
            return e

    def forget_new_extents(self, exts: list[Ext]) -> None:
        """Extents taken but never referenced by the log (a failed write): straight back."""
        for e in exts:
            self._returned(self.alloc.release(e))

    def free_extent(self, ext: Ext) -> None:
        """An extent the log no longer references (once the pending ops are durable)."""
        self.dirty_data.pop(ext, None)
        self.deferred.append((self.op_seq, self.io.bump(), ext))

    def release_deferred(self) -> None:
        keep = []
        for seq, epoch, ext in self.deferred:
            if seq <= self.durable_seq and self.io.quiet_since(epoch):
                self._returned(self.alloc.release(ext))
            else:
                keep.append((seq, epoch, ext))
        self.deferred = keep

    def _returned(self, slabs: list[Any]) -> None:
        if slabs:
            self._capacity = (0.0, 0, 0)
            if self.nursery is not None:
                self.returned_at = trio.current_time()
        for ds in slabs:
            if self.nursery is not None:
                self.nursery.start_soon(self.run_io, self.node.free_slab, ds.slab)
            else:
                self.node.free_slab(ds.slab)

    # ---------------------------------------------------------------- file data
    async def read(self, node: Inode, off: int, size: int) -> bytes | bytearray:
        end = min(off + size, node.size)
        if off >= end:
            return b""
        buf = bytearray(end - off)
        view = memoryview(buf)
        pieces = []
        for b in block_span(off, end):
            e = node.extents.get(b)
            if e is None:
                continue
            base = b * BLOCK
            lo, hi = max(off, base), min(end, base + e.cap)
            if hi > lo:
                pieces.append((self.alloc.slab(e.slab), e.off + lo - base,
                               view[lo - off:hi - off]))
        if pieces:
            ep = self.io.enter()
            try:
                await self.copy(slabio.read_pieces, pieces)
            finally:
                self.io.leave(ep)
        return buf  # pyfuse3 takes any buffer: no copy

    async def write(self, node: Inode, off: int, data: bytes) -> None:
        """Write ``data`` at ``off`` (the caller holds the inode's lock)."""
        end = off + len(data)
        new_size = max(node.size, end)
        view = memoryview(data)
        pieces: list[tuple[Any, int, Any]] = []
        fresh: list[tuple[int, Ext]] = []
        replaced: list[Ext] = []
        copies: list[tuple[Ext, Ext]] = []
        touched: list[Ext] = []
        try:
            for b in block_span(off, end):
                base = b * BLOCK
                lo, hi = max(off, base) - base, min(end, base + BLOCK) - base
                if b == 0 and new_size < BLOCK:
                    need = class_for(max(hi, node.size))
                else:
                    need = BLOCK
                e = node.extents.get(b)
                if e is not None and e.cap >= need:
                    target = e
                else:
                    target = await self.new_extent(need)
                    fresh.append((b, target))
                    slab = self.alloc.slab(target.slab)
                    if e is None:
                        pieces.append((slab, target.off, lo))
                        pieces.append((slab, target.off + hi, target.cap - hi))
                    else:  # block 0 outgrew its small extent: copy, zero the rest
                        copies.append((e, target))
                        replaced.append(e)
                        pieces.append((slab, target.off + e.cap, target.cap - e.cap))
                pieces.append((self.alloc.slab(target.slab), target.off + lo,
                               view[base + lo - off:base + hi - off]))
                touched.append(target)
            ep = self.io.enter()
            try:
                if copies:
                    old = [bytearray(src.cap) for src, _ in copies]
                    await self.copy(slabio.read_pieces,
                                    [(self.alloc.slab(src.slab), src.off, memoryview(buf))
                                     for (src, _), buf in zip(copies, old, strict=True)])
                    pieces[:0] = [(self.alloc.slab(dst.slab), dst.off, bytes(buf))
                                  for (_, dst), buf in zip(copies, old, strict=True)]
                await self.copy(slabio.write_pieces, pieces)
            finally:
                self.io.leave(ep)
        except BaseException:
            self.forget_new_extents([e for _, e in fresh])
            raise
        if node.ino not in self.state.inodes:  # dropped meanwhile: nothing to record
            self.forget_new_extents([e for _, e in fresh])
            return
        for e in touched:  # dirty only now: a sync that ran during the write saw old bytes
            self.dirty_data[e] = None
        if fresh:
            for b, e in fresh:
                node.extents[b] = e
            self.log_op(SetExtents(node.ino, [(b, e.slab, e.off, e.cap) for b, e in fresh]))
            for e in replaced:
                self.free_extent(e)
        node.size = new_size
        node.mtime = node.ctime = time.time_ns()
        self.touch(node.ino)

    async def truncate(self, node: Inode, size: int) -> None:
        """Set the file size (the caller holds the inode's lock)."""
        old = node.size
        if size < old:
            first_gone = -(-size // BLOCK)
            gone = [(b, e) for b, e in node.extents.items() if b >= first_gone]
            if gone:
                for b, _ in gone:
                    del node.extents[b]
                self.log_op(CutExtents(node.ino, first_gone))
                for _, e in gone:
                    self.free_extent(e)
            b = size // BLOCK
            e = node.extents.get(b)
            if size % BLOCK and e is not None:  # bytes past the new end must read as zeros
                base = b * BLOCK
                lo, hi = size - base, min(e.cap, old - base)
                if hi > lo:
                    ep = self.io.enter()
                    try:
                        await self.copy(slabio.write_pieces,
                                        [(self.alloc.slab(e.slab), e.off + lo, hi - lo)])
                    finally:
                        self.io.leave(ep)
                    self.dirty_data[e] = None
        node.size = size
        self.touch(node.ino)

    def drop_inode(self, node: Inode) -> None:
        """The inode is gone (no links, not open): log it and free its extents."""
        self.state.inodes.pop(node.ino, None)
        self.dirty_inodes.discard(node.ino)
        self.log_op(DropInode(node.ino))
        for e in node.extents.values():
            self.free_extent(e)
        node.extents.clear()

    # ---------------------------------------------------------------- durability
    async def sync(self) -> None:
        """Persist written data, then make every pending metadata op durable."""
        assert self.flush_lock is not None and self.log is not None
        async with self.flush_lock:
            if not (self.pending or self.dirty_inodes or self.dirty_data):
                return
            log = self.log

            def records(ops: list, dirty: set[int]) -> list:
                return ops + [self.state.inodes[i].record() for i in sorted(dirty)
                              if i in self.state.inodes]

            async def write_log(batch: list) -> None:
                if batch:
                    await self.run_io(log.append, batch)

            await self._make_durable(records, write_log)

    async def checkpoint(self) -> None:
        """Rewrite the log as one snapshot and free the segments it replaces."""
        assert self.flush_lock is not None and self.log is not None
        old: list = []
        async with self.flush_lock:
            log = self.log

            async def write_log(snapshot: list) -> None:
                old.extend(await self.run_io(log.checkpoint, snapshot))

            await self._make_durable(lambda ops, dirty: self.state.snapshot_ops(), write_log)
        for _, slab in old:
            await self.run_io(self.node.free_slab, slab)

    async def _make_durable(self, make_batch, write_log) -> None:
        """Take the pending ops, dirty inodes and written extents; build the log batch from
        them at once (``make_batch(ops, dirty)``: before any await, so it shows the state as
        of ``seq``), persist the data, then ``write_log(batch)``. On failure everything
        taken is put back, so the next sync tries again. The caller holds ``flush_lock``."""
        ops, self.pending = self.pending, []
        dirty, self.dirty_inodes = self.dirty_inodes, set()
        data, self.dirty_data = self.dirty_data, {}
        seq = self.op_seq
        batch = make_batch(ops, dirty)
        ranges = [(self.alloc.slab(e.slab), e.off, e.cap) for e in data
                  if e.slab in self.alloc.slabs]
        try:
            if ranges:
                await self.run_io(slabio.persist_ranges, self.node, ranges)
            await write_log(batch)
        except BaseException:
            self.pending[:0] = ops
            self.dirty_inodes |= dirty
            for e in data:
                self.dirty_data.setdefault(e, None)
            raise
        self.durable_seq = seq
        self.release_deferred()

    async def periodic(self) -> None:
        """Commit every COMMIT_INTERVAL seconds; checkpoint when the log grows long."""
        while True:
            await trio.sleep(COMMIT_INTERVAL)
            try:
                await self.sync()
                assert self.log is not None
                if self.log.should_checkpoint():
                    await self.checkpoint()
                self.release_deferred()
            except (NoSpace, slabio.SlabIOError, BladeUnreachable, OSError) as e:
                log.warning("background commit failed (will retry): %s", e)

    async def capacity(self) -> tuple[int, int]:
        """(capacity, free) bytes over the blades we can reach (cached for a second, or
        until we take or return a slab)."""
        at, total, free = self._capacity
        if time.monotonic() - at < 1.0:
            return total, free

        def ask() -> tuple[int, int]:
            total = free = 0
            for name in self.node.blade_addrs:
                try:
                    s = self.node.link(name).call({"op": "stats"})
                except (BladeUnreachable, OSError):
                    continue
                total += s["capacity_bytes"]
                free += max(0, s["capacity_bytes"] - s["used_bytes"])
            return total, free

        total, free = await self.run_io(ask)
        self._capacity = (time.monotonic(), total, free)
        return total, free

    async def shutdown(self) -> None:
        """Clean unmount: one last checkpoint (a short log for the next mount)."""
        try:
            await self.checkpoint()
        except (NoSpace, slabio.SlabIOError, BladeUnreachable, OSError) as e:
            log.warning("final checkpoint failed (%s); trying a plain commit", e)
            await self.sync()
