"""The filesystem's metadata log without FUSE or blades: slabs are bytearrays behind fake
links. Properties: replay gives back exactly the state after the last committed
transaction; a log cut anywhere (a crash mid-write) replays to the state after some earlier
transaction, never to anything else; an incomplete checkpoint falls back to the older
chain; gaps in segment numbers are followed by lsn."""

from __future__ import annotations

import random
from types import SimpleNamespace

from hypothesis import given, settings
from hypothesis import strategies as st

from fuse_fs.extents import ExtentAllocator, class_for
from fuse_fs.metalog import (
    CutExtents,
    DelEntry,
    DropInode,
    SetEntry,
    SetExtents,
    SetInode,
)
from fuse_fs.state import ROOT, Ext, FsState
from fuse_fs.store import LogWriter, replay
from rallocator.node import Replica, Slab

SEG = 256 * 1024
FS_ID = 0xF5
VOL = 0x10C


class FakeLink:
    def __init__(self, size: int) -> None:
        self.mem = bytearray(size)
        self.name = "fake"
        self.dead = False
        self.geometry = SimpleNamespace(mode_nvm=True)

    def verbs(self):
        link = self

        class V:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

            def write(self, addr, data, fua=False):
                link.mem[addr:addr + len(data)] = data

            def read_into(self, addr, view):
                view[:] = link.mem[addr:addr + len(view)]

            def persist(self, addr, n):
                pass

        return V()


class FakeNode:
    """Just what LogWriter and replay use: allocate/free slabs that live in bytearrays."""

    def __init__(self) -> None:
        self.slabs: dict[int, Slab] = {}
        self.freeing = True

    def allocate_slab(self, size, volume, index, replicas=1, exclude=()):
        slab = Slab(size, volume, index, [Replica(FakeLink(size), 0, 0)])
        self.slabs[index] = slab
        return slab

    def free_slab(self, slab):
        if self.freeing:
            self.slabs.pop(slab.index, None)

    def mark_dead(self, name):
        pass

    def cut(self, segno: int, offset: int, garbage: bool) -> None:
        """A crash: bytes from ``offset`` of segment ``segno`` on, and every later segment,
        never made it (zeros, or garbage left from an older use of the slab)."""
        rng = random.Random(segno * 7919 + offset)
        for no, slab in self.slabs.items():
            mem = slab.replicas[0].link.mem
            start = offset if no == segno else 0 if no > segno else None
            if start is None:
                continue
            n = len(mem) - start
            mem[start:] = rng.randbytes(n) if garbage else bytes(n)


def dump(s: FsState) -> dict:
    return {ino: (tuple(n.record().__struct_fields__ and
                        [getattr(n.record(), f) for f in n.record().__struct_fields__]),
                  sorted(n.entries.items()), sorted(n.extents.items()))
            for ino, n in s.inodes.items()}


ops_strategy = st.lists(st.tuples(st.integers(0, 5), st.integers(2, 12), st.integers(0, 3),
                                  st.integers(0, 2**20)), min_size=1, max_size=40)


def parent_of(ino: int) -> int:
    """A directory: the root or an inode that ``make_ops`` always creates as one."""
    return (ino % 4) * 3 or ROOT


def make_ops(spec, big: bool = False) -> list:
    out = []
    for kind, ino, name, val in spec:
        nm = b"n%d" % name
        if kind == 0:
            out.append(SetInode(ino, 0o100644 if ino % 3 else 0o40755, 0, 0, 0, val, 1, 2, 3,
                                b"t" * (val % 50 if not big else 4000)))
        elif kind == 1:
            out.append(SetEntry(parent_of(ino), nm, ino))
        elif kind == 2:
            out.append(DelEntry(parent_of(ino), nm))
        elif kind == 3:
            out.append(SetExtents(ino, [(b, val % 97, (val >> 3) % 64 * 512, 512)
                                        for b in range(val % 5 + (300 if big else 0))]))
        elif kind == 4:
            out.append(CutExtents(ino, val % 4))
        else:
            out.append(DropInode(ino))
    return out


def fresh_log() -> tuple[FakeNode, LogWriter, FsState]:
    node = FakeNode()
    w = LogWriter(node, FS_ID, VOL, SEG, 1, next_segno=1, next_lsn=1)
    state = FsState.fresh(0, 0, 1)
    w.checkpoint(state.snapshot_ops())
    return node, w, state


def replayed(node: FakeNode) -> FsState | None:
    rec = replay(node, FS_ID, dict(node.slabs))
    return rec.state if rec else None


@settings(max_examples=40, deadline=None)
@given(txns=st.lists(ops_strategy, min_size=1, max_size=25), big=st.booleans(),
       checkpoint_at=st.integers(0, 30), cut=st.tuples(st.integers(0, 10**9),
                                                         st.booleans()))
def test_replay_is_the_state_after_some_committed_transaction(txns, big, checkpoint_at, cut):
    node, w, state = fresh_log()
    durable = (w.chain[-1][0], w.pos)  # where the last checkpoint ends
    dumps = [dump(state)]
    for i, spec in enumerate(txns):
        ops = make_ops(spec, big)
        w.append(ops)
        for op in ops:
            state.apply(op)
        dumps.append(dump(state))
        if i == checkpoint_at:
            for _, slab in w.checkpoint(state.snapshot_ops()):
                node.free_slab(slab)
            durable = (w.chain[-1][0], w.pos)
            dumps = [dump(state)]
    # intact: exactly the last state
    got = replayed(node)
    assert got is not None and dump(got) == dumps[-1]
    # a crash: everything from some point after the last checkpoint is lost or garbage;
    # replay gives the state after one of the transactions since that checkpoint
    pick, garbage = cut
    places = [(no, 0) for no, _ in w.chain if no > durable[0]] + [durable]
    segno, low = places[pick % len(places)]
    offset = low + pick % (SEG - low)
    node.cut(segno, offset, garbage)
    got = replayed(node)
    assert got is not None
    assert dump(got) in dumps


def test_log_rolls_over_many_segments_and_replays() -> None:
    node, w, state = fresh_log()
    rng = random.Random(1)
    for _ in range(80):
        spec = [(rng.randrange(6), rng.randrange(2, 50), rng.randrange(4), rng.randrange(2**20))
                for _j in range(30)]
        ops = make_ops(spec, big=True)
        w.append(ops)
        for op in ops:
            state.apply(op)
    assert len(w.chain) > 5
    got = replayed(node)
    assert got is not None and dump(got) == dump(state)


def test_incomplete_checkpoint_falls_back_to_the_older_chain() -> None:
    node, w, state = fresh_log()
    ops = [SetInode(5, 0o100644, 0, 0, 0, 10, 1, 1, 1), SetEntry(ROOT, b"f", 5)]
    w.append(ops)
    for op in ops:
        state.apply(op)
    # a checkpoint whose last frame never lands, and whose segments stay owned (a crash)
    big = FsState()
    for op in state.snapshot_ops():
        big.apply(op)
    for ino in range(100, 3000):
        big.apply(SetInode(ino, 0o100644, 0, 0, 0, 0, 0, 0, 0, b"x" * 300))
    commit = w._commit

    def torn(writes):
        commit(writes[:-1])
        raise OSError("crash")

    w._commit = torn
    node.freeing = False
    try:
        w.checkpoint(big.snapshot_ops())
    except OSError:
        pass
    got = replayed(node)
    assert got is not None and dump(got) == dump(state)


def test_chain_follows_lsn_across_a_gap_in_segment_numbers() -> None:
    node, w, state = fresh_log()
    w.next_segno += 3  # segments given back after a failed append leave holes
    for i in range(200):
        ops = [SetInode(10 + i, 0o100644, 0, 0, 0, i, 0, 0, 0, b"y" * 3000)]
        w.append(ops)
        for op in ops:
            state.apply(op)
    nos = [no for no, _ in w.chain]
    assert nos != list(range(nos[0], nos[0] + len(nos)))  # there is a gap
    got = replayed(node)
    assert got is not None and dump(got) == dump(state)


def test_extent_allocator_restore_and_release() -> None:
    a = ExtentAllocator(empty_threshold=1)
    slabs = {i: Slab(1 << 20, VOL, i) for i in (1, 2, 3, 4)}
    for i, s in slabs.items():
        a.add_slab(i, s)
    got = [a.take(class_for(n)) for n in (100, 600, 5000, 65536, 65536, 100)]
    assert all(e is not None for e in got)  # four size classes: one slab each
    assert a.take(2048) is None  # a fifth class needs a fifth slab
    assert len({(e.slab, e.off) for e in got}) == len(got)
    assert {e.slab for e in got if e.cap == 512} == {got[0].slab}  # small ones share a slab
    # recovery: the same extents are in use, one unreferenced slab comes back
    b = ExtentAllocator(empty_threshold=0)
    extra = {**slabs, 5: Slab(1 << 20, VOL, 5)}
    unused, bad = b.restore(extra, got + [Ext(99, 0, 512)])
    assert [d.index for d in unused] == [5] and bad == [Ext(99, 0, 512)]
    assert b.bytes_used == sum(e.cap for e in got)
    e = b.take(512)
    assert e is not None and (e.slab, e.off) not in {(g.slab, g.off) for g in got}
    for g in got:
        b.release(g)
    b.release(e)
    assert b.bytes_used == 0
