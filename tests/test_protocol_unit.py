"""The sans-IO allocation protocol against an in-process blade, no sockets, no threads.

The node side (``rallocator.protocol`` generators) is driven by hand against a small region
file, exactly as the shm transport would do it (one-sided verbs on the mapping); the blade
side (``slabd.blade.Blade``) runs only when a test calls ``tick()``, on an injected clock.
So every interleaving below (a claim racing an expiry, a crash between two writes) happens
deterministically.

A "crash" is a second ``Blade`` over the same region: the in-memory state is gone, the
region (what survives a kill -9 of slabd) is all recovery gets. The randomised tests take
RALLOC_MODEL_SEEDS (default 6/8) seeds; a few hundred run in under a minute.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from rallocator import protocol as P
from rallocator.layout import (
    ACKED,
    CLAIMED,
    DONE,
    EPOCH_ENTRY,
    OPEN,
    OWNER_ENTRY,
    RING_ENTRY,
    UNIT_FREE,
    UNIT_FREEING,
    UNIT_OWNED,
    Geometry,
    make_key,
    owner_checksum,
    split_key,
)
from rallocator.region import Region
from slabd.blade import B_FREE, B_RESERVED, Blade

NODE_A, NODE_B = 0xA11CE, 0xB0B
VOL = 0x766F6C
LEASE = 2.0
NODE_LEASE = 10.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, dt: float) -> None:
        self.now += dt


class Rig:
    """A region, a blade over it, a fake clock, and a driver for protocol operations."""

    def __init__(self, path: Path, geo: Geometry) -> None:
        self.path = path
        self.region = Region.create(str(path), geo)
        self.geo = geo
        self.clock = FakeClock()
        self.blade = self.new_blade()
        self.report = self.blade.recover()

    def new_blade(self) -> Blade:
        return Blade(self.region, lease=LEASE, node_lease=NODE_LEASE, stock_ahead=4,
                     clock=self.clock)

    def crash(self) -> dict[str, int]:
        """Lose the blade's memory; recover a fresh one from the region."""
        self.blade = self.new_blade()
        self.report = self.blade.recover()
        return self.report

    # -- verbs, as the shm transport does them ------------------------------------------
    def execute(self, req: Any) -> Any:
        r = self.region
        if isinstance(req, P.Read):
            return r.read(req.addr, req.length)
        if isinstance(req, P.Write):
            r.write(req.addr, req.data)
            return None
        if isinstance(req, P.FetchAdd):
            return r.fetch_add(req.addr, req.delta)
        if isinstance(req, P.CompareSwap):
            return r.compare_swap(req.addr, req.expected, req.new)
        if isinstance(req, P.Persist):
            r.persist(req.addr, req.length)
            return None
        raise TypeError(req)

    def run(self, op: P.Operation, tick: bool = True) -> Any:
        """Drive ``op`` to the end. A Sleep advances the clock and (if ``tick``) lets the
        blade run one round, as its ticker thread would."""
        result: Any = None
        try:
            while True:
                req = op.send(result)
                if isinstance(req, P.Sleep):
                    self.clock.advance(req.seconds)
                    if tick:
                        self.blade.tick()
                    result = None
                else:
                    result = self.execute(req)
        except StopIteration as done:
            return done.value

    def alloc(self, c: int = 0, node: int = NODE_A, index: int = 0) -> P.SlabGrant:
        grant = self.run(P.allocate_slab(self.geo, c, node, VOL, index))
        self.blade.tick()  # the blade commits the ack (shm nodes: on its next tick)
        return grant

    def free(self, unit: int, node: int = NODE_A) -> int:
        f = self.run(P.free_slab(self.geo, node, unit))
        self.blade.tick()
        return f

    # -- inspection ----------------------------------------------------------------------
    def owned_units(self, node: int = NODE_A) -> set[int]:
        return {s.unit for s in self.blade.owned_by(node)}

    def key(self, addr: int) -> tuple[int, int]:
        return split_key(self.region.load(addr))

    def owner_state(self, unit: int) -> int:
        return OWNER_ENTRY.unpack_from(self.region.buf, self.geo.owner_addr(unit))[0]

    def bit(self, unit: int) -> bool:
        b = self.region.read(self.geo.off_bitmap + (unit >> 3), 1)[0]
        return bool(b & (1 << (unit & 7)))

    def announce(self, slot: int, node: int, epoch: int, hb: int, active: int = 1) -> None:
        """What a node's epoch heartbeat writes into its slot."""
        self.region.write(self.geo.epoch_addr(slot), EPOCH_ENTRY.pack(node, epoch, active, hb))

    @property
    def global_epoch(self) -> int:
        return self.region.load(self.geo.global_epoch_addr)

    def close(self) -> None:
        self.region.close()


@pytest.fixture
def make_rig(tmp_path: Path) -> Any:
    rigs: list[Rig] = []

    def make(n_units: int = 16, class_units: tuple[int, ...] = (1, 4), ring_slots: int = 8,
             free_slots: int = 8) -> Rig:
        geo = Geometry(unit_size=4096, n_units=n_units, class_units=class_units,
                       ring_slots=ring_slots, free_slots=free_slots, max_nodes=4)
        rig = Rig(tmp_path / f"r{len(rigs)}.region", geo)
        rigs.append(rig)
        return rig

    yield make
    for r in rigs:
        r.close()
        r.path.unlink()


def step_until(rig: Rig, op: P.Operation, stop: Callable[[Any], bool]) -> tuple[Any, Any]:
    """Run ``op`` (ticking on sleeps) until it yields a request ``stop`` accepts; return
    (that request, None) without executing it."""
    result: Any = None
    while True:
        req = op.send(result)
        if stop(req):
            return req, None
        if isinstance(req, P.Sleep):
            rig.clock.advance(req.seconds)
            rig.blade.tick()
            result = None
        else:
            result = rig.execute(req)


def finish(rig: Rig, op: P.Operation, first_result: Any) -> Any:
    """Resume ``op`` with ``first_result`` and run it to the end (no ticks)."""
    result = first_result
    try:
        while True:
            req = op.send(result)
            result = None if isinstance(req, P.Sleep) else rig.execute(req)
    except StopIteration as done:
        return done.value


def is_cas(state: int) -> Callable[[Any], bool]:
    return lambda r: isinstance(r, P.CompareSwap) and split_key(r.new)[1] == state


# ====================================================================== allocation


def test_allocate_until_full_hands_out_every_unit_once(make_rig):
    rig = make_rig()
    grants = []
    with pytest.raises(P.BladeFull):
        for i in range(rig.geo.n_units + 1):
            grants.append(rig.alloc(0, index=i))
    units = [g.unit for g in grants]
    assert len(units) == rig.geo.n_units  # the 4-unit class's stock was given back for us
    assert len(set(units)) == len(units)
    assert rig.owned_units() == set(units)
    assert all(g.addr == rig.geo.unit_addr(g.unit) and g.size == 4096 for g in grants)
    assert rig.region.load(rig.geo.free_units_addr) == 0
    assert rig.blade.check_consistency() == []


def test_mixed_classes_fill_without_overlap_then_full(make_rig):
    rig = make_rig()
    big = [rig.alloc(1, index=i) for i in range(3)]  # 12 of 16 units
    small = [rig.alloc(0, index=10 + i) for i in range(4)]
    covered = [u for g in big for u in range(g.unit, g.unit + 4)] + [g.unit for g in small]
    assert sorted(covered) == list(range(16))
    with pytest.raises(P.BladeFull):
        rig.alloc(0, index=99)
    with pytest.raises(P.BladeFull):
        rig.alloc(1, index=99)
    assert rig.blade.check_consistency() == []


def test_lease_expiry_takes_back_a_ticket_that_was_never_acked(make_rig):
    rig = make_rig()
    op = P.allocate_slab(rig.geo, 0, NODE_A, VOL, 0)
    req, _ = step_until(rig, op, is_cas(CLAIMED))  # ticket taken, slot seen stocked
    t = split_key(req.expected)[0]
    unit = RING_ENTRY.unpack(rig.region.read(rig.geo.ring_addr(0, t), 16))[1]
    assert rig.blade.busy[unit] == B_RESERVED
    rig.blade.tick()  # the ticker notices the ticket was taken: its lease starts now
    # the node goes away here (never claims)
    rig.clock.advance(LEASE - 0.5)
    rig.blade.tick()
    assert rig.key(rig.geo.ack_addr(0, t)) == (t, OPEN), "expired before its lease"
    rig.clock.advance(1.0)
    rig.blade.tick()
    assert rig.key(rig.geo.ack_addr(0, t)) == (t, DONE)
    assert rig.blade.counters["expired"] == 1
    assert unit not in {u for u in range(16) if rig.owner_state(u) != UNIT_FREE}
    # nothing leaked: every unit can still be allocated
    grants = []
    with pytest.raises(P.BladeFull):
        for i in range(17):
            grants.append(rig.alloc(0, index=i))
    assert len(grants) == 16
    assert rig.blade.check_consistency() == []


def test_claimed_but_unacked_ticket_expires_and_the_late_ack_is_lost(make_rig):
    rig = make_rig()
    op = P.allocate_slab(rig.geo, 0, NODE_A, VOL, 0)
    req, _ = step_until(rig, op, is_cas(ACKED))  # claimed, body written, about to ack
    t = split_key(req.expected)[0]
    assert rig.key(rig.geo.ack_addr(0, t)) == (t, CLAIMED)
    rig.blade.tick()  # lease starts
    rig.clock.advance(LEASE + 0.1)
    rig.blade.tick()
    assert rig.key(rig.geo.ack_addr(0, t)) == (t, DONE)
    with pytest.raises(P.TicketLost):
        finish(rig, op, rig.execute(req))
    rig.blade.tick()
    assert rig.owned_units() == set()
    assert rig.blade.check_consistency() == []


def test_ticket_lost_when_claim_races_with_expiry(make_rig):
    rig = make_rig()
    op = P.allocate_slab(rig.geo, 0, NODE_A, VOL, 0)
    req, _ = step_until(rig, op, is_cas(CLAIMED))
    rig.blade.tick()  # lease starts
    # the blade's lease fires between the node seeing its slot stocked and claiming it
    rig.clock.advance(LEASE + 0.1)
    rig.blade.tick()
    with pytest.raises(P.TicketLost):
        finish(rig, op, rig.execute(req))
    assert rig.owned_units() == set()
    # the next ticket works
    g = rig.alloc(0, index=1)
    assert rig.owned_units() == {g.unit}


def test_a_ticket_past_the_ring_is_lost_not_granted(make_rig):
    """A node that slept through a whole ring turn must not take someone else's slot."""
    rig = make_rig(ring_slots=8)
    op = P.allocate_slab(rig.geo, 0, NODE_A, VOL, 0)
    req, _ = step_until(rig, op, lambda r: isinstance(r, P.Read))  # ticket t taken
    # the lease passes, t expires, others use tickets t+1 .. t+8 (slot of t reused)
    rig.blade.tick()
    rig.clock.advance(LEASE + 0.1)
    rig.blade.tick()
    assert rig.blade.counters["expired"] == 1
    others = [rig.alloc(0, node=NODE_B, index=i) for i in range(8)]
    for g in others[:6]:
        rig.free(g.unit, node=NODE_B)
    with pytest.raises(P.TicketLost):
        finish(rig, op, rig.execute(req))
    assert rig.owned_units(NODE_A) == set()
    assert rig.blade.check_consistency() == []


# ====================================================================== free / epochs


def test_free_is_reclaimed_only_after_every_node_passes_its_epoch(make_rig):
    rig = make_rig()
    a = rig.blade.register_node(NODE_A)
    b = rig.blade.register_node(NODE_B)
    E0 = rig.global_epoch
    rig.announce(a, NODE_A, E0, 1)
    rig.announce(b, NODE_B, E0, 1)  # B is inside a pin at E0
    g = rig.alloc(0)
    rig.free(g.unit)
    assert rig.owner_state(g.unit) == UNIT_FREEING
    assert rig.owned_units() == set()
    hb = 1
    for _ in range(50):  # B keeps heartbeating but stays at E0: nothing is reclaimed
        hb += 1
        rig.announce(a, NODE_A, rig.global_epoch, hb)
        rig.announce(b, NODE_B, E0, hb)
        rig.clock.advance(0.1)
        rig.blade.tick()
    assert rig.owner_state(g.unit) == UNIT_FREEING
    assert rig.bit(g.unit)
    assert rig.blade.counters["reclaims"] == 0
    assert rig.global_epoch <= E0 + 1, "the global epoch ran ahead of a pinned node"
    for _ in range(10):  # B unpins: announces whatever is current
        hb += 1
        rig.announce(a, NODE_A, rig.global_epoch, hb)
        rig.announce(b, NODE_B, rig.global_epoch, hb)
        rig.clock.advance(0.1)
        rig.blade.tick()
    assert rig.blade.counters["reclaims"] == 1
    assert rig.owner_state(g.unit) == UNIT_FREE and not rig.bit(g.unit)
    assert rig.blade.check_consistency() == []


def test_a_silent_node_stops_holding_back_reclamation_after_the_node_lease(make_rig):
    rig = make_rig()
    b = rig.blade.register_node(NODE_B)
    rig.announce(b, NODE_B, rig.global_epoch, 7)  # then B dies: the heartbeat never changes
    g = rig.alloc(0)
    rig.free(g.unit)
    for _ in range(int(NODE_LEASE / 0.5) - 2):
        rig.clock.advance(0.5)
        rig.blade.tick()
    assert rig.owner_state(g.unit) == UNIT_FREEING, "reclaimed under a live node's lease"
    rig.clock.advance(2.0)
    rig.blade.tick()
    rig.blade.tick()
    assert rig.owner_state(g.unit) == UNIT_FREE
    assert EPOCH_ENTRY.unpack_from(rig.region.buf, rig.geo.epoch_addr(b))[2] == 0  # inactive


def test_free_of_someone_elses_slab_is_refused(make_rig):
    rig = make_rig()
    g = rig.alloc(0, node=NODE_A)
    rig.free(g.unit, node=NODE_B)
    assert rig.owned_units(NODE_A) == {g.unit}
    assert rig.owner_state(g.unit) == UNIT_OWNED
    assert rig.blade.counters["rejected"] == 1


def test_freed_unit_is_allocatable_again_after_reclaim(make_rig):
    rig = make_rig(n_units=4, class_units=(1,))
    gs = [rig.alloc(0, index=i) for i in range(4)]
    rig.free(gs[2].unit)
    for _ in range(5):
        rig.clock.advance(0.01)
        rig.blade.tick()
    assert rig.owner_state(gs[2].unit) == UNIT_FREE
    # tickets abandoned while full would hog the unit; this path never took one
    g = rig.alloc(0, index=9)
    assert g.unit == gs[2].unit
    assert rig.blade.check_consistency() == []


# ====================================================================== crash recovery


def test_recover_commits_an_acked_ack_the_blade_never_saw(make_rig):
    rig = make_rig()
    grant = rig.run(P.allocate_slab(rig.geo, 1, NODE_A, VOL, 5), tick=False)
    t = grant.ticket
    assert rig.key(rig.geo.ack_addr(1, t)) == (t, ACKED)
    assert rig.owner_state(grant.unit) == UNIT_FREE  # the blade died before its tick
    report = rig.crash()
    assert report["replayed_acks"] == 1
    assert [(s.unit, s.volume, s.index, s.size_class) for s in rig.blade.owned_by(NODE_A)] \
        == [(grant.unit, VOL, 5, 1)]
    assert rig.key(rig.geo.ack_addr(1, t)) == (t, DONE)
    assert all(rig.bit(u) for u in range(grant.unit, grant.unit + 4))
    assert rig.blade.check_consistency() == []


def test_recover_replay_of_a_committed_ack_is_idempotent(make_rig):
    rig = make_rig()
    g = rig.alloc(0, index=3)
    gen = rig.blade.heads[g.unit].generation
    # crash after the owner entry was persisted but before the key went DONE
    rig.region.store(rig.geo.ack_addr(0, g.ticket), make_key(g.ticket, ACKED))
    rig.crash()
    slabs = rig.blade.owned_by(NODE_A)
    assert [(s.unit, s.generation) for s in slabs] == [(g.unit, gen)]
    assert rig.blade.check_consistency() == []


def test_recover_after_crash_between_owner_head_and_continuation_entries(make_rig):
    """Commit of a 4-unit slab writes the head owner entry, then the continuation entries.
    A kill -9 between the two must still recover to bitmap == owner table."""
    rig = make_rig()
    grant = rig.run(P.allocate_slab(rig.geo, 1, NODE_A, VOL, 1), tick=False)
    u = grant.unit
    # exactly what Blade._write_owner has done when the process dies after its first write
    csum = owner_checksum(UNIT_OWNED, NODE_A, VOL, 1, 1, 1, 0)
    rig.region.write(rig.geo.owner_addr(u),
                     OWNER_ENTRY.pack(UNIT_OWNED, NODE_A, VOL, 1, 1, 1, 0, csum))
    rig.crash()
    assert rig.owned_units() == {u}
    assert rig.blade.check_consistency() == []


def test_recover_ignores_a_slot_caught_mid_stock(make_rig):
    rig = make_rig(ring_slots=8)
    owned = [rig.alloc(0, index=i) for i in range(8)]  # wraps the ring once
    t = rig.blade.next_stock[0]
    slot_ticket, slot_unit = RING_ENTRY.unpack(rig.region.read(rig.geo.ring_addr(0, t), 16))
    assert slot_ticket == t - 8 and slot_unit in {g.unit for g in owned}
    # crash mid-stock of ticket t: the ack key was reopened for t, the ring entry still
    # names ticket t-8 and its (now owned) unit
    rig.region.store(rig.geo.ack_addr(0, t), make_key(t, OPEN))
    report = rig.crash()
    assert report["outstanding"] == 0
    assert rig.owned_units() == {g.unit for g in owned}
    assert rig.blade.busy[slot_unit] != B_RESERVED
    g = rig.alloc(0, index=100)
    assert g.unit not in {o.unit for o in owned}
    assert rig.blade.check_consistency() == []


def test_recover_outstanding_ticket_keeps_its_lease_then_expires(make_rig):
    rig = make_rig()
    op = P.allocate_slab(rig.geo, 0, NODE_A, VOL, 0)
    req, _ = step_until(rig, op, is_cas(CLAIMED))
    t = split_key(req.expected)[0]
    report = rig.crash()
    assert report["outstanding"] == 1
    g = finish(rig, op, rig.execute(req))  # the node finishes against the recovered blade
    rig.blade.tick()
    assert rig.owned_units() == {g.unit} and g.ticket == t
    # and a second taker that vanishes is expired by the recovered blade
    op2 = P.allocate_slab(rig.geo, 0, NODE_B, VOL, 0)
    req2, _ = step_until(rig, op2, is_cas(CLAIMED))
    t2 = split_key(req2.expected)[0]
    rig.crash()
    rig.clock.advance(LEASE + 0.1)
    rig.blade.tick()
    assert rig.key(rig.geo.ack_addr(0, t2)) == (t2, DONE)
    assert rig.blade.check_consistency() == []


def test_recover_replays_an_acked_free_and_reclaims_later(make_rig):
    rig = make_rig()
    g = rig.alloc(0)
    rig.run(P.free_slab(rig.geo, NODE_A, g.unit), tick=False)  # acked, blade never ticked
    assert rig.owner_state(g.unit) == UNIT_OWNED
    report = rig.crash()
    assert report["replayed_frees"] == 1
    assert rig.owned_units() == set()
    for _ in range(4):
        rig.clock.advance(0.01)
        rig.blade.tick()
    assert rig.owner_state(g.unit) == UNIT_FREE and not rig.bit(g.unit)
    assert rig.blade.check_consistency() == []


def test_recover_drops_a_torn_owner_entry_and_replays_its_ack(make_rig):
    rig = make_rig()
    grant = rig.run(P.allocate_slab(rig.geo, 0, NODE_A, VOL, 2), tick=False)
    # a half-written owner entry: right state, wrong checksum
    rig.region.write(rig.geo.owner_addr(grant.unit),
                     OWNER_ENTRY.pack(UNIT_OWNED, NODE_A, VOL, 2, 0, 1, 0, 12345))
    report = rig.crash()
    assert report["torn"] == 1 and report["replayed_acks"] == 1
    assert rig.owned_units() == {grant.unit}
    assert rig.blade.check_consistency() == []


def test_recover_fixes_a_bitmap_that_disagrees(make_rig):
    rig = make_rig()
    g = rig.alloc(0)
    rig.region.write(rig.geo.off_bitmap, bytes(rig.geo.bitmap_bytes))  # lost bitmap write
    assert rig.blade.check_consistency() != []
    report = rig.crash()
    assert report["bitmap_fixed"] >= 1
    assert rig.bit(g.unit)
    assert rig.blade.check_consistency() == []


# ====================================================================== random model


@pytest.mark.parametrize("seed", range(int(os.environ.get("RALLOC_MODEL_SEEDS", "6"))))
def test_random_ops_and_crashes_keep_bitmap_equal_to_owner_table(make_rig, seed):
    """Random allocations, frees, lease expiries and crashes (also in the middle of an
    operation); after every step the blade's owners equal the node's own record and the
    bitmap equals the owner table."""
    rng = random.Random(seed)
    rig = make_rig(n_units=24, class_units=(1, 2, 4))
    nodes = [NODE_A, NODE_B]
    model: dict[int, set[int]] = {n: set() for n in nodes}
    index = 0
    for _ in range(120):
        node = rng.choice(nodes)
        action = rng.random()
        if action < 0.45:
            index += 1
            try:
                g = rig.alloc(rng.randrange(3), node=node, index=index)
                model[node].add(g.unit)
            except (P.BladeFull, P.TicketLost):
                pass
        elif action < 0.8 and model[node]:
            unit = rng.choice(sorted(model[node]))
            rig.free(unit, node=node)
            model[node].discard(unit)
        elif action < 0.9:
            # crash in the middle of an operation, the node keeping what its verbs told it
            alloc = rng.random() < 0.6 or not model[node]
            if alloc:
                index += 1
                op = P.allocate_slab(rig.geo, rng.randrange(3), node, VOL, index)
            else:
                unit = rng.choice(sorted(model[node]))
                op = P.free_slab(rig.geo, node, unit)
            acked_key = None
            result: Any = None
            try:
                for _ in range(rng.randrange(1, 12)):
                    req = op.send(result)
                    if isinstance(req, P.Sleep):
                        rig.clock.advance(req.seconds)
                        rig.blade.tick()
                        result = None
                        continue
                    result = rig.execute(req)
                    if isinstance(req, P.CompareSwap) and split_key(req.new)[1] == ACKED \
                            and result == req.expected:
                        acked_key = req.addr
            except (StopIteration, P.AllocationFailed):
                pass
            if acked_key is not None:  # the durable record: the body next to the key
                body = rig.region.read(acked_key + 8, 32)
                if alloc:
                    model[node].add(int.from_bytes(body[24:32], "little"))
                else:
                    model[node].discard(int.from_bytes(body[8:16], "little"))
            rig.crash()
        else:
            rig.clock.advance(rng.choice([0.01, 0.5, LEASE + 0.1]))
            rig.blade.tick()
        for n in nodes:
            assert rig.owned_units(n) == model[n], f"node {n:x} owners disagree"
        assert rig.blade.check_consistency() == []
    # give everything back; after leases and epochs every unit is free again
    for n in nodes:
        for unit in sorted(model[n]):
            rig.free(unit, node=n)
    for _ in range(10):
        rig.clock.advance(LEASE + 0.1)
        rig.blade.tick()
    assert rig.blade.heads == {}
    assert rig.blade.busy.count(B_FREE) + rig.blade.busy.count(B_RESERVED) == 24
    assert all(t >= rig.region.load(rig.geo.seq_addr(c))
               for c in range(3) for t in rig.blade.pending[c]), "a taken ticket never expired"
    assert rig.blade.check_consistency() == []
    assert all(rig.owner_state(u) == UNIT_FREE for u in range(24))


# ====================================================================== crash at any blade write


class Crash(Exception):
    """The blade process died here (kill -9 between two of its writes)."""


class CrashingRegion:
    """The blade's view of the region, dying after ``budget`` more mutating writes.

    Node-side verbs go to the real region (they are another process); only the blade's
    writes count down.
    """

    def __init__(self, region: Region, budget: int) -> None:
        self._r = region
        self.budget = budget

    def __getattr__(self, name: str) -> Any:
        return getattr(self._r, name)

    def _spend(self) -> None:
        self.budget -= 1
        if self.budget < 0:
            raise Crash

    def store(self, addr: int, value: int) -> None:
        self._spend()
        self._r.store(addr, value)

    def write(self, addr: int, data: Any) -> None:
        self._spend()
        self._r.write(addr, data)

    def compare_swap(self, addr: int, expected: int, new: int) -> int:
        self._spend()
        return self._r.compare_swap(addr, expected, new)

    def fetch_add(self, addr: int, delta: int) -> int:
        self._spend()
        return self._r.fetch_add(addr, delta)


@pytest.mark.parametrize("seed", range(int(os.environ.get("RALLOC_MODEL_SEEDS", "8"))))
def test_blade_killed_between_any_two_writes_recovers_consistently(make_rig, seed):
    """kill -9 of slabd can land between any two of its writes, also during recovery.
    Whatever the node was told (its ack or free CAS succeeded) must hold after recovery,
    and the bitmap must equal the owner table."""
    rng = random.Random(1000 + seed)
    rig = make_rig(n_units=20, class_units=(1, 2, 4))
    model: dict[int, set[int]] = {NODE_A: set(), NODE_B: set()}
    crashes = 0

    def new_blade() -> None:
        nonlocal crashes
        while True:
            rig.blade = Blade(CrashingRegion(rig.region, rng.randrange(1, 60)), lease=LEASE,
                              node_lease=NODE_LEASE, stock_ahead=4, clock=rig.clock)
            try:
                rig.blade.recover()
                return
            except Crash:
                crashes += 1

    def tick() -> None:
        nonlocal crashes
        try:
            rig.blade.tick()
        except Crash:
            crashes += 1
            new_blade()

    def run(op: P.Operation) -> tuple[bool, Any]:
        """Node side: (acked, request that acked) — the node's knowledge."""
        result: Any = None
        acked_req = None
        try:
            for _ in range(400):
                req = op.send(result)
                if isinstance(req, P.Sleep):
                    rig.clock.advance(req.seconds)
                    tick()
                    result = None
                    continue
                result = rig.execute(req)
                if isinstance(req, P.CompareSwap) and split_key(req.new)[1] == ACKED \
                        and result == req.expected:
                    acked_req = req
        except (StopIteration, P.AllocationFailed):
            pass
        return acked_req is not None, acked_req

    new_blade()
    index = 0
    for _ in range(150):
        node = rng.choice((NODE_A, NODE_B))
        if rng.random() < 0.55 or not model[node]:
            index += 1
            ok, req = run(P.allocate_slab(rig.geo, rng.randrange(3), node, VOL, index))
            if ok:
                model[node].add(int.from_bytes(rig.region.read(req.addr + 32, 8), "little"))
        else:
            unit = rng.choice(sorted(model[node]))
            ok, _ = run(P.free_slab(rig.geo, node, unit))
            if ok:
                model[node].discard(unit)
        tick()
        if rng.random() < 0.2:
            rig.clock.advance(LEASE + 0.1)
            tick()
        for n, units in model.items():
            assert rig.owned_units(n) == units, f"seed {seed}: owners of {n:x} disagree"
        assert rig.blade.check_consistency() == [], f"seed {seed} after {crashes} crashes"
    assert crashes > 10


class HookedRegion:
    """The blade's view of the region; ``hook`` runs once, the first time the blade loads
    ``addr`` — i.e. at a precise point inside one of its ticks."""

    def __init__(self, region: Region, addr: int, hook: Callable[[], None]) -> None:
        self._r = region
        self._addr = addr
        self._hook: Callable[[], None] | None = hook

    def __getattr__(self, name: str) -> Any:
        return getattr(self._r, name)

    def load(self, addr: int) -> int:
        if addr == self._addr and self._hook is not None:
            hook, self._hook = self._hook, None
            hook()
        return self._r.load(addr)


def test_free_right_after_ack_within_one_tick_is_not_refused(make_rig):
    """shm nodes ack and free on the mapping without waiting for the blade. If the ack
    lands after the tick looked at the ring but before it looked at the free ring, the
    free must not be refused as 'not its slab' (the slab would leak: owned forever by a
    node that believes it gave it back)."""
    rig = make_rig()
    op = P.allocate_slab(rig.geo, 0, NODE_A, VOL, 0)
    req, _ = step_until(rig, op, is_cas(ACKED))  # claimed + body written
    rig.blade.tick()  # the blade sees the ticket CLAIMED
    box: dict[str, Any] = {}

    def node_acks_and_frees() -> None:
        box["grant"] = finish(rig, op, rig.execute(req))
        rig.run(P.free_slab(rig.geo, NODE_A, box["grant"].unit), tick=False)

    # the free sequencer is loaded between the ring pass and the free-ring pass of a tick
    hooked = Blade(HookedRegion(rig.region, rig.geo.free_seq_addr, node_acks_and_frees),
                   lease=LEASE, node_lease=NODE_LEASE, stock_ahead=4, clock=rig.clock)
    hooked.__dict__.update({k: v for k, v in rig.blade.__dict__.items() if k != "region"})
    rig.blade = hooked
    rig.blade.tick()
    rig.blade.tick()
    unit = box["grant"].unit
    assert rig.blade.counters["rejected"] == 0, "the free was refused"
    assert rig.owned_units() == set(), "the node freed it, the blade still says it is owned"
    assert rig.owner_state(unit) in (UNIT_FREEING, UNIT_FREE)
