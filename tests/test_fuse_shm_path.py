"""The data path's shm shortcut without FUSE or blades: reads and writes whose every replica
is on a live shm link are copied on the trio thread; a tcp replica, a blade marked dead (its
mapping outlives the blade process) or a large copy goes through a worker thread as before,
and a dead replica is skipped there while the live one still gets the bytes."""

from __future__ import annotations

import stat
from types import SimpleNamespace

import pytest
import trio

from fuse_fs import slabio
from fuse_fs.state import BLOCK, FsState, Inode
from fuse_fs.store import Store
from rallocator.node import Replica, Slab

SLAB = 1 << 20


class FakeLink:
    """A blade link over a bytearray; ``shm`` set (any object) means a shm transport."""

    def __init__(self, name: str, shm: bool) -> None:
        self.name = name
        self.mem = bytearray(4 * SLAB)
        self.dead = False
        self.shm = object() if shm else None
        self.transport = "shm" if shm else "tcp"
        self.geometry = SimpleNamespace(mode_nvm=False)

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

        return V()


class FakeNode:
    def __init__(self) -> None:
        self.marked: list[str] = []

    def mark_dead(self, name: str) -> None:
        self.marked.append(name)


def make_store(links: list[FakeLink]) -> tuple[Store, Inode]:
    store = Store(FakeNode(), "t", len(links), SLAB)  # type: ignore[arg-type]
    store.next_data_index = 4
    store.state = FsState()
    for i in range(1, 4):  # one size class per slab: room for three
        store.alloc.add_slab(i, Slab(SLAB, store.data_vol, i,
                                     [Replica(lk, 0, i * SLAB) for lk in links]))
    node = Inode(100, stat.S_IFREG | 0o644)
    store.state.inodes[node.ino] = node
    return store, node


def run_counting(store: Store, body) -> int:
    """Run ``body(store)`` under trio; returns how many worker-thread hops it made."""
    hops = 0
    real = store.run_io

    async def counting(fn, *args):
        nonlocal hops
        hops += 1
        return await real(fn, *args)

    async def main() -> None:
        async with trio.open_nursery() as n:
            store.start(n)
            store.run_io = counting  # type: ignore[method-assign]
            await body(store)

    trio.run(main)
    return hops


def test_local_only() -> None:
    a, b, t = FakeLink("a", True), FakeLink("b", True), FakeLink("t", False)
    both = Slab(SLAB, 1, 1, [Replica(a, 0, 0), Replica(b, 0, 0)])
    mixed = Slab(SLAB, 1, 2, [Replica(a, 0, 0), Replica(t, 0, 0)])
    assert slabio.local_only([(both, 0, 4096), (both, 0, memoryview(bytearray(10)))])
    assert not slabio.local_only([(mixed, 0, 4096)])
    assert not slabio.local_only([(both, 0, slabio.INLINE_MAX + 1)])
    b.dead = True
    assert not slabio.local_only([(both, 0, 4096)])


def test_shm_copies_stay_on_the_trio_thread() -> None:
    a, b = FakeLink("a", True), FakeLink("b", True)
    store, node = make_store([a, b])
    got: list[bytes] = []

    async def body(s: Store) -> None:
        await s.write(node, 10, b"hello" * 1000)
        await s.write(node, BLOCK - 3, b"across")  # block 0 grows by copy, block 1 fresh
        got.append(bytes(await s.read(node, 0, node.size)))

    assert run_counting(store, body) == 0
    expect = bytearray(BLOCK + 3)
    expect[10:5010] = b"hello" * 1000
    expect[BLOCK - 3:BLOCK + 3] = b"across"
    assert got == [bytes(expect)]


@pytest.mark.parametrize("dead, shm_b", [(True, True), (False, False)],
                         ids=["shm-blade-marked-dead", "tcp-replica"])
def test_dead_or_tcp_replica_uses_a_worker_thread(dead: bool, shm_b: bool) -> None:
    a, b = FakeLink("a", True), FakeLink("b", shm_b)
    store, node = make_store([a, b])
    b.dead = dead
    got: list[bytes] = []

    async def body(s: Store) -> None:
        await s.write(node, 0, b"x" * 4096)
        got.append(bytes(await s.read(node, 0, 4096)))

    assert run_counting(store, body) == 2
    assert got == [b"x" * 4096]
    assert b"x" * 4096 in a.mem
    assert (b"x" * 4096 in b.mem) != dead  # the dead copy is skipped
