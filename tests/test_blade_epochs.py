"""Epoch-based reclamation on a real slabd: a freed slab is not handed out again while a node
that may still touch it is inside ``link.pin()``, and a node that dies stops holding
reclamation back once its node lease (slabd's default: 15 s, not settable from the command
line) runs out."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from blade_helpers import PYTHON, SlabdPool, wait_for

from rallocator.blade_link import BladeLink
from rallocator.layout import EPOCH_ENTRY
from rallocator.node import WorkingNode
from rallocator.protocol import AllocationFailed, BladeFull, allocate_slab, free_slab

NODE_A, NODE_B, NODE_M = 0xA, 0xB, 0x3
MiB = 1 << 20
LEASE = 1.0
NODE_LEASE = 15.0  # slabd.blade.Blade's default; slabd has no flag for it


@pytest.fixture
def pool(tmp_path: Path) -> Any:
    with SlabdPool(tmp_path) as p:
        yield p


def small_blade(pool: SlabdPool) -> Any:
    """8 units of 1 MiB, one size class: 'full' means exactly 8 slabs."""
    return pool.start("b", capacity="8M", lease=LEASE, extra=("--slab-sizes", "1M"))


def stats(pool: SlabdPool, blade: Any) -> dict[str, int]:
    v = pool.connect(blade, 0x57A7)
    try:
        return v.call({"op": "stats"})
    finally:
        v.close()


def alloc(link: BladeLink, index: int) -> Any:
    return link.run(allocate_slab(link.geometry, 0, link.node_id, 1, index))


def fill(link: BladeLink, n: int) -> list[Any]:
    return [alloc(link, i) for i in range(n)]


def test_freed_slab_waits_for_a_pinned_node_then_is_reissued(pool):
    blade = small_blade(pool)
    a = BladeLink("b", blade.address, pool.secret, NODE_A, transport="tcp")
    b = BladeLink("b", blade.address, pool.secret, NODE_B, transport="tcp")
    try:
        with b.pin():
            grants = fill(a, 8)
            victim = grants[3].unit
            a.run(free_slab(a.geometry, NODE_A, victim))
            time.sleep(1.0)  # ~50 epoch heartbeats of both nodes
            s = stats(pool, blade)
            assert s["slabs_freeing"] == 1 and s["reclaims"] == 0, s
            with pytest.raises(BladeFull):
                alloc(a, 100)
        assert wait_for(lambda: stats(pool, blade)["reclaims"] == 1, 3.0), \
            "not reclaimed after the pin ended"
        # the blade publishes it as available once no taken ticket holds it (the ticket
        # that failed above may hold it for one lease): then one allocation gets it
        assert wait_for(lambda: a.available_units() >= 1, LEASE + 3.0)
        g = alloc(a, 101)
        assert g.unit == victim
        assert stats(pool, blade)["slabs_owned"] == 8
    finally:
        a.close()
        b.close()


def test_allocation_retried_after_unpin_succeeds_within_a_few_seconds(pool):
    """What a real caller does: retry until there is room. Each failed attempt leaves a
    taken ticket behind; the blade must not hand the reclaimed unit to those abandoned
    tickets one lease after another while the live caller starves."""
    blade = small_blade(pool)
    a = BladeLink("b", blade.address, pool.secret, NODE_A, transport="tcp")
    b = BladeLink("b", blade.address, pool.secret, NODE_B, transport="tcp")
    try:
        with b.pin():
            grants = fill(a, 8)
            a.run(free_slab(a.geometry, NODE_A, grants[0].unit))
            time.sleep(0.5)
            with pytest.raises(BladeFull):
                alloc(a, 100)
        deadline = time.monotonic() + 2 * LEASE + 3.0
        attempts = 0
        while True:
            attempts += 1
            try:
                g = alloc(a, 200 + attempts)
                break
            except AllocationFailed:
                if time.monotonic() > deadline:
                    pytest.fail(f"no allocation in {2 * LEASE + 3:.0f}s after the unpin "
                                f"({attempts} attempts; blade: {stats(pool, blade)})")
                time.sleep(0.1)
        assert g.unit == grants[0].unit
    finally:
        a.close()
        b.close()


PINNER = """
import sys, time
sys.path.insert(0, {repo!r})
from rallocator.blade_link import BladeLink
from rallocator.secret import load_secret
link = BladeLink("b", {address!r}, load_secret({secret!r}), {node}, transport="tcp")
with link.pin():
    print("PINNED", flush=True)
    time.sleep(600)
"""


def test_a_dead_node_stops_holding_back_reclamation_after_the_node_lease(pool, tmp_path):
    blade = small_blade(pool)
    script = PINNER.format(repo=str(Path(__file__).resolve().parent.parent),
                           address=blade.address, secret=str(pool.secret_file), node=NODE_B)
    pinner = pool.spawn([PYTHON, "-c", script], stdout=subprocess.PIPE, text=True)
    assert pinner.stdout is not None and pinner.stdout.readline().strip() == "PINNED"
    a = BladeLink("b", blade.address, pool.secret, NODE_A, transport="tcp")
    try:
        g = alloc(a, 0)
        a.run(free_slab(a.geometry, NODE_A, g.unit))
        time.sleep(1.0)
        assert stats(pool, blade)["reclaims"] == 0, "reclaimed under a live pin"
        pinner.kill()
        pinner.wait(timeout=10)
        killed = time.monotonic()
        assert wait_for(lambda: stats(pool, blade)["reclaims"] == 1, NODE_LEASE + 5.0, 0.2), \
            f"a dead node held reclamation back for more than {NODE_LEASE + 5:.0f}s"
        waited = time.monotonic() - killed
        assert waited >= NODE_LEASE - 2.0, f"reclaimed {waited:.1f}s after the kill: the " \
            "node lease did not protect a node that merely paused"
        s = stats(pool, blade)
        assert s["slabs_used"] == 0 and s["slabs_freeing"] == 0, s
    finally:
        a.close()


def epoch_slots(pool: SlabdPool, blade: Any) -> dict[int, tuple[int, int]]:
    """node -> (epoch, active) for every used epoch slot."""
    v = pool.connect(blade, 0xE9)
    try:
        g = v.geometry
        raw = v.read(g.off_epochs, g.max_nodes * 64)
    finally:
        v.close()
    out = {}
    for slot in range(g.max_nodes):
        node, epoch, active, _ = EPOCH_ENTRY.unpack_from(raw, slot * 64)
        if node:
            out[node] = (epoch, active)
    return out


def test_concurrent_first_use_does_not_give_away_the_nodes_epoch_slot(pool):
    """Threads sharing a WorkingNode all call link() at first use; link() is check-then-
    create, so each opens (and registers) a BladeLink, and the losers are closed. They share
    the node's epoch slot, and closing them marks it inactive; another node registering in
    that moment is given the slot, and from then on the node's heartbeats are refused
    (EACCES "not your epoch slot") and its pins hold nothing back."""
    blade = small_blade(pool)
    a = BladeLink("b", blade.address, pool.secret, NODE_A, transport="tcp")
    nodes: list[WorkingNode] = []
    others: list[BladeLink] = []
    try:
        for k in range(3):
            node_id = NODE_B + 16 * k
            node = WorkingNode([("b", blade.address)], pool.secret, node_id, transport="tcp")
            nodes.append(node)
            newcomer = pool.connect(blade, NODE_M + 16 * k)  # another node, about to join
            start = threading.Barrier(4)

            def first_use(node: WorkingNode = node, start: threading.Barrier = start) -> None:
                start.wait()
                node.link("b")

            threads = [threading.Thread(target=first_use) for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            newcomer.call({"op": "register"})
            newcomer.close()
            # the newcomer's own link (same slot as its registration) keeps heartbeating
            others.append(BladeLink("b", blade.address, pool.secret, NODE_M + 16 * k,
                                    transport="tcp"))
            time.sleep(0.2)  # the node's live link has heartbeaten ~10 times since
            slots = epoch_slots(pool, blade)
            if slots.get(node_id, (0, 0))[1] != 1:
                break
        else:
            return  # the slot survived every round: nothing to show
        # the consequence: the node's pin no longer protects what it may be touching
        g = alloc(a, 0)
        with node.link("b").pin():
            a.run(free_slab(a.geometry, NODE_A, g.unit))
            time.sleep(1.0)
            reclaims = stats(pool, blade)["reclaims"]
        pytest.fail(f"node {node_id:x} lost its epoch slot to a newcomer ({slots}); "
                    f"a slab freed under its pin was {'' if reclaims else 'not '}reclaimed")
    finally:
        for o in others:
            o.close()
        a.close()
        for n in nodes:
            try:
                n.close()
            except Exception as e:  # BladeLink.close() lets VerbError out (see report)
                print(f"node.close() raised {type(e).__name__}: {e}", file=sys.stderr)
