"""The blade's side of RAllocator: keep the rings stocked, turn acks into owners, reclaim frees.

Everything the blade knows that matters lives in the region (``rallocator.layout``); the
in-memory state here (which units are busy, who owns them, which tickets are outstanding) is
a cache rebuilt by ``recover()`` from the region at every start. The order of writes makes
every crash point recoverable:

* stocking slot t:  ack key := (t, OPEN)  ->  ring unit  ->  ring ticket := t
  (a ring whose ticket disagrees with its ack key was caught mid-stock: not stocked;
  an ack key (t, DONE) before t was stocked means its taker gave up: t is skipped)
* commit of ack t:  owner entries + bitmap, persisted  ->  ack key := (t, DONE)
  (an ACKED key found at recovery is committed again; the commit is idempotent)
* free f:           owner state FREEING + free epoch, persisted  ->  free key := (f, DONE)
* reclaim:          owner entry cleared + bitmap bit cleared, persisted
  (only once every active node's epoch is past the free's epoch)

The node's ack (its CLAIMED -> ACKED compare-and-swap, persisted) is the durable record of
an allocation: after it, the slab is the node's even if the blade dies before committing.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from rallocator.layout import (
    ACK_BODY,
    ACKED,
    CLAIMED,
    DONE,
    EPOCH_ENTRY,
    FREE_BODY,
    OPEN,
    OWNER_ENTRY,
    RING_ENTRY,
    UNIT_CONT,
    UNIT_FREE,
    UNIT_FREEING,
    UNIT_OWNED,
    Geometry,
    make_key,
    owner_checksum,
    split_key,
)
from rallocator.region import Region

log = logging.getLogger("slabd.blade")

_EPOCH_ROW = struct.Struct("<QQQQ32x")  # an epoch slot with its padding, for iter_unpack

# in-memory unit states (a bytearray, so free runs are found with bytes.find)
B_FREE, B_OWNED, B_RESERVED, B_FREEING = 0, 1, 2, 3


@dataclass
class OwnedSlab:
    unit: int
    size_class: int
    node: int
    volume: int
    index: int
    generation: int


class Blade:
    """The blade engine over one region. Thread-safe: every mutation holds ``self.lock``.

    Args:
        region: the mapped region (created or opened by the daemon).
        lease: seconds a taken ticket or a claimed free slot may stay unacked.
        node_lease: seconds a node's epoch slot may go without a heartbeat before it stops
            holding back reclamation.
        stock_ahead: the most slabs per size class to keep pre-allocated in the ring; a
            class never stocks more than an eighth of the region (None: half the ring).
        clock: monotonic seconds (injected by tests).
    """

    def __init__(self, region: Region, lease: float = 5.0, node_lease: float = 15.0,
                 stock_ahead: int | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.region = region
        self.geo: Geometry = region.geo
        self.lease = lease
        self.node_lease = node_lease
        most = self.geo.ring_slots // 2 if stock_ahead is None else stock_ahead
        self.ahead = [max(1, min(most, self.geo.ring_slots,
                                 self.geo.n_units // (8 * units)))
                      for units in self.geo.class_units]
        self.clock = clock
        self.lock = threading.RLock()
        g = self.geo
        self.busy = bytearray(g.n_units)
        self.unit_owner = [0] * g.n_units  # node id that may touch this unit (tcp checks)
        self.heads: dict[int, OwnedSlab] = {}  # head unit -> slab (owned or freeing)
        self.freeing: dict[int, int] = {}  # head unit -> free epoch
        self.next_stock = [1] * g.n_classes
        self.pending: list[dict[int, float | None]] = [{} for _ in range(g.n_classes)]
        self.free_pending: dict[int, float | None] = {}  # free tickets opened, not done
        self.epoch_seen: dict[int, tuple[int, float]] = {}  # slot -> (heartbeat, when seen)
        self.cursor = 0
        self._zero_unit: bytes | None = None
        self.counters = {"allocs": 0, "frees": 0, "reclaims": 0, "expired": 0, "rejected": 0}

    # ================================================================ recovery / startup
    def recover(self) -> dict[str, int]:
        """Rebuild the in-memory state from the region; finish what a crash interrupted.

        Returns a small report (counts) that the daemon logs.
        """
        with self.lock:
            return self._recover()

    def _recover(self) -> dict[str, int]:
        r, g = self.region, self.geo
        report = {"owned": 0, "freeing": 0, "torn": 0, "replayed_acks": 0,
                  "replayed_frees": 0, "bitmap_fixed": 0, "outstanding": 0}
        clean_off, starts_off = Geometry.superblock_flag_offsets()
        clean, starts = r.u64(clean_off), r.u64(starts_off)
        report["clean"] = clean
        r.store(starts_off, starts + 1)
        r.store(clean_off, 0)
        r.persist(0, 4096)
        fresh = r.load(g.seq_addr(0)) == 0
        if fresh:
            for c in range(g.n_classes):
                r.store(g.seq_addr(c), 1)
            r.store(g.free_seq_addr, 1)
            r.store(g.global_epoch_addr, 1)
            for f in range(1, g.free_slots + 1):
                r.store(g.free_addr(f), make_key(f, OPEN))
            r.persist(0, g.control_size)
        # owner table -> busy, heads, freeing
        u = 0
        while u < g.n_units:
            e = OWNER_ENTRY.unpack_from(r.buf, g.owner_addr(u))
            state, node, volume, index, cls, gen, fepoch, csum = e
            if state in (UNIT_OWNED, UNIT_FREEING):
                ok = (csum == owner_checksum(state, node, volume, index, cls, gen, fepoch)
                      and cls < g.n_classes and u + g.class_units[cls] <= g.n_units)
                if not ok:
                    report["torn"] += 1
                    log.warning("owner entry of unit %d is torn; dropping it (an ack will "
                                "replay it if it was acknowledged)", u)
                    self._scrub(u, 1)
                    self._clear_owner(u, 1)
                    u += 1
                    continue
                n = g.class_units[cls]
                for k in range(u + 1, u + n):  # a crash between head and continuations
                    if OWNER_ENTRY.unpack_from(r.buf, g.owner_addr(k))[0] != UNIT_CONT:
                        r.write(g.owner_addr(k), OWNER_ENTRY.pack(UNIT_CONT, node, 0, u, cls,
                                                                  0, 0, 0))
                        report["cont_fixed"] = report.get("cont_fixed", 0) + 1
                r.persist(g.owner_addr(u), 64 * n)
                self.heads[u] = OwnedSlab(u, cls, node, volume, index, gen)
                if state == UNIT_OWNED:
                    self.busy[u:u + n] = bytes([B_OWNED]) * n
                    for k in range(u, u + n):
                        self.unit_owner[k] = node
                    report["owned"] += 1
                else:
                    self.busy[u:u + n] = bytes([B_FREEING]) * n
                    self.freeing[u] = fepoch
                    report["freeing"] += 1
                u += n
                continue
            if state == UNIT_CONT:  # orphan continuation (its head was torn)
                self._clear_owner(u, 1)
            u += 1
        # rings: replay acks, find stocked and outstanding tickets
        now = self.clock()
        for c in range(g.n_classes):
            seq = r.load(g.seq_addr(c))
            top = 0
            for slot in range(g.ring_slots):
                ticket, unit = RING_ENTRY.unpack_from(r.buf, g.off_ring + (c * g.ring_slots + slot) * 16)
                kt, state = split_key(r.load(g.ack_addr(c, slot)))
                if ticket == 0 or kt != ticket:
                    continue  # never stocked, or caught mid-stock: the slot is free
                top = max(top, ticket)
                if state == ACKED:
                    report["replayed_acks"] += 1
                    self._commit_ack(c, ticket, replay=True)
                elif state in (OPEN, CLAIMED):
                    if not self._unit_run_ok(unit, c) or any(self.busy[unit:unit + g.class_units[c]]):
                        log.warning("ring slot %d/%d names unit %d that is not free; voiding",
                                    c, slot, unit)
                        r.store(g.ack_addr(c, ticket), make_key(ticket, DONE))
                        continue
                    self._reserve(unit, c)
                    taken = ticket < seq
                    self.pending[c][ticket] = now if taken else None
                    report["outstanding"] += int(taken)
            self.next_stock[c] = max(top + 1, 1)
        # free ring
        fseq = r.load(g.free_seq_addr)
        for slot in range(g.free_slots):
            key = r.load(g.off_free + slot * 64)
            f, state = split_key(key)
            if f == 0:
                continue
            if state == ACKED:
                report["replayed_frees"] += 1
                self._process_free(f)
            elif state == DONE:
                r.store(g.free_addr(f), make_key(f + g.free_slots, OPEN))
                self.free_pending[f + g.free_slots] = None
            else:
                self.free_pending[f] = now if f < fseq else None
        # bitmap must equal the owner table
        report["bitmap_fixed"] = self._rewrite_bitmap()
        # epochs: every registered node gets a fresh lease
        for slot in range(g.max_nodes):
            node, epoch, active, hb = EPOCH_ENTRY.unpack_from(r.buf, g.epoch_addr(slot))
            if node and active:
                self.epoch_seen[slot] = (hb, now)
        r.persist(0, g.control_size)
        self._publish()
        self._stock()
        return report

    def _unit_run_ok(self, unit: int, c: int) -> bool:
        return 0 <= unit and unit + self.geo.class_units[c] <= self.geo.n_units

    def _rewrite_bitmap(self) -> int:
        """Recompute the bitmap from the owner table; return how many bytes differed."""
        g, r = self.geo, self.region
        want = bytearray(g.bitmap_bytes)
        for u, st in enumerate(self.busy):
            if st in (B_OWNED, B_FREEING):
                want[u >> 3] |= 1 << (u & 7)
        have = r.read(g.off_bitmap, g.bitmap_bytes)
        diff = sum(1 for a, b in zip(want, have, strict=True) if a != b)
        if diff:
            log.warning("bitmap disagreed with the owner table in %d bytes; rewritten", diff)
            r.write(g.off_bitmap, bytes(want))
            r.persist(g.off_bitmap, g.bitmap_bytes)
        return diff

    def mark_clean_shutdown(self) -> None:
        with self.lock:
            off, _ = Geometry.superblock_flag_offsets()
            self.region.store(off, 1)
            self.region.persist(0, self.geo.control_size)

    # ================================================================ unit bookkeeping
    def _reserve(self, unit: int, c: int) -> None:
        n = self.geo.class_units[c]
        self.busy[unit:unit + n] = bytes([B_RESERVED]) * n

    def _release(self, unit: int, c: int) -> None:
        n = self.geo.class_units[c]
        self.busy[unit:unit + n] = bytes(n)

    def _find_run(self, n: int) -> int:
        """A run of n free units, searched from a rotating cursor (spreads wear)."""
        pat = bytes(n)
        i = self.busy.find(pat, self.cursor)
        if i < 0:
            i = self.busy.find(pat, 0)
        if i >= 0:
            self.cursor = (i + n) % max(1, self.geo.n_units)
        return i

    def _set_bits(self, unit: int, n: int, value: bool) -> None:
        g, r = self.geo, self.region
        lo, hi = unit >> 3, (unit + n - 1) >> 3
        chunk = bytearray(r.read(g.off_bitmap + lo, hi - lo + 1))
        for u in range(unit, unit + n):
            if value:
                chunk[(u >> 3) - lo] |= 1 << (u & 7)
            else:
                chunk[(u >> 3) - lo] &= ~(1 << (u & 7)) & 0xFF
        r.write(g.off_bitmap + lo, bytes(chunk))
        r.persist(g.off_bitmap + lo, len(chunk))

    def _write_owner(self, unit: int, state: int, node: int, volume: int, index: int,
                     c: int, gen: int, fepoch: int) -> None:
        g, r = self.geo, self.region
        n = g.class_units[c]
        csum = owner_checksum(state, node, volume, index, c, gen, fepoch)
        r.write(g.owner_addr(unit), OWNER_ENTRY.pack(state, node, volume, index, c, gen,
                                                     fepoch, csum))
        if state == UNIT_OWNED:
            for k in range(unit + 1, unit + n):
                r.write(g.owner_addr(k), OWNER_ENTRY.pack(UNIT_CONT, node, 0, unit, c, 0, 0, 0))
        r.persist(g.owner_addr(unit), 64 * n)

    def _clear_owner(self, unit: int, n: int) -> None:
        g, r = self.geo, self.region
        gen = OWNER_ENTRY.unpack_from(r.buf, g.owner_addr(unit))[5]
        r.write(g.owner_addr(unit), OWNER_ENTRY.pack(UNIT_FREE, 0, 0, 0, 0, gen, 0, 0))
        for k in range(unit + 1, unit + n):
            r.write(g.owner_addr(k), bytes(64))
        r.persist(g.owner_addr(unit), 64 * n)

    def _publish(self) -> None:
        """Publish the free unit count, so a node can tell 'full' from 'not stocked yet'."""
        g, r = self.geo, self.region
        free = self.busy.count(B_FREE)
        untaken = 0
        for c in range(g.n_classes):
            seq = r.load(g.seq_addr(c))
            untaken += sum(g.class_units[c] for t in self.pending[c] if t >= seq)
        r.store(g.free_units_addr, free + untaken)

    # ================================================================ ring stocking
    def _stock(self) -> None:
        g, r = self.geo, self.region
        for c in range(g.n_classes):
            seq = r.load(g.seq_addr(c))
            n = g.class_units[c]
            while self.next_stock[c] < seq + self.ahead[c]:
                t = self.next_stock[c]
                key_addr = g.ack_addr(c, t)
                key = r.load(key_addr)
                kt, state = split_key(key)
                if kt == t and state == DONE:
                    self.next_stock[c] = t + 1  # its taker gave up before we stocked it
                    continue
                if kt and kt != t and state != DONE:
                    break  # slot still busy with ticket t - R (outstanding)
                unit = self._find_run(n)
                if unit < 0 and t < seq:
                    # someone is waiting on ticket t: take back untaken stock of other classes
                    self._void_untaken(except_class=c)
                    unit = self._find_run(n)
                if unit < 0:
                    break
                self._reserve(unit, c)
                if r.compare_swap(key_addr, key, make_key(t, OPEN)) != key:
                    self._release(unit, c)  # cancelled this very moment: look again
                    continue
                ring = g.ring_addr(c, t)
                r.store(ring + 8, unit)
                r.store(ring, t)
                r.persist(ring, 16)
                r.persist(g.ack_addr(c, t), 8)
                self.pending[c][t] = self.clock() if t < seq else None
                self.next_stock[c] = t + 1
        self._publish()

    def _void_untaken(self, except_class: int) -> None:
        g, r = self.geo, self.region
        for c in range(g.n_classes):
            if c == except_class:
                continue
            seq = r.load(g.seq_addr(c))
            for t in sorted(self.pending[c], reverse=True):
                if t < seq:
                    continue
                key = make_key(t, OPEN)
                if r.compare_swap(g.ack_addr(c, t), key, make_key(t, DONE)) == key:
                    unit = r.u64(g.ring_addr(c, t) + 8)
                    self._release(unit, c)
                    del self.pending[c][t]

    # ================================================================ acks
    def on_ack(self, c: int, ticket: int) -> bool:
        """A node CASed ticket's ack key to ACKED (tcp server calls this inline)."""
        with self.lock:
            ok = self._commit_ack(c, ticket)
            self._stock()
            return ok

    def _commit_ack(self, c: int, t: int, replay: bool = False) -> bool:
        g, r = self.geo, self.region
        key_addr = g.ack_addr(c, t)
        kt, state = split_key(r.load(key_addr))
        if kt != t or state != ACKED:
            return False
        node, volume, index, unit = ACK_BODY.unpack_from(r.buf, key_addr + 8)
        rt, runit = RING_ENTRY.unpack_from(r.buf, g.ring_addr(c, t))
        n = g.class_units[c]
        if rt != t or runit != unit or node == 0:
            log.warning("ack %d/%d names unit %d, ring says %d (node %x): rejected",
                        c, t, unit, runit, node)
            self.counters["rejected"] += 1
            r.store(key_addr, make_key(t, DONE))
            if rt == t and self.busy[runit] == B_RESERVED:
                self._release(runit, c)
            self.pending[c].pop(t, None)
            return False
        head = OWNER_ENTRY.unpack_from(r.buf, g.owner_addr(unit))
        already = (head[0] == UNIT_OWNED and head[1] == node and head[2] == volume
                   and head[3] == index and head[4] == c)
        gen = head[5] if already else head[5] + 1
        if not already:
            self._write_owner(unit, UNIT_OWNED, node, volume, index, c, gen, 0)
            self._set_bits(unit, n, True)
        self.busy[unit:unit + n] = bytes([B_OWNED]) * n
        for k in range(unit, unit + n):
            self.unit_owner[k] = node
        self.heads[unit] = OwnedSlab(unit, c, node, volume, index, gen)
        r.store(key_addr, make_key(t, DONE))
        r.persist(key_addr, 8)
        self.pending[c].pop(t, None)
        self.counters["allocs"] += 1
        if not replay:
            log.debug("slab %d (class %d) -> node %x vol %x idx %d", unit, c, node, volume, index)
        return True

    def catch_up(self) -> None:
        """Record now what shm nodes acked or freed since the last tick, so a query or an
        access check does not see the region a tick behind."""
        with self.lock:
            self._commit_all_acked()
            g, r = self.geo, self.region
            fseq = r.load(g.free_seq_addr)
            for f in [f for f in self.free_pending if f < fseq]:
                if split_key(r.load(g.free_addr(f))) == (f, ACKED):
                    self._process_free(f)

    def _commit_all_acked(self) -> None:
        g, r = self.geo, self.region
        for c in range(g.n_classes):
            for t in list(self.pending[c]):
                if split_key(r.load(g.ack_addr(c, t))) == (t, ACKED):
                    self._commit_ack(c, t)

    # ================================================================ frees
    def on_free(self, f: int) -> bool:
        with self.lock:
            ok = self._process_free(f)
            self._publish()
            return ok

    def _process_free(self, f: int) -> bool:
        g, r = self.geo, self.region
        addr = g.free_addr(f)
        kt, state = split_key(r.load(addr))
        if kt != f or state != ACKED:
            return False
        node, unit, epoch = FREE_BODY.unpack_from(r.buf, addr + 8)
        slab = self.heads.get(unit)
        if slab is None:
            # a shm node may ack and free within one of our ticks: record its acks first
            self._commit_all_acked()
            slab = self.heads.get(unit)
        replayed = slab is not None and slab.node == node and unit in self.freeing
        ok = slab is not None and slab.node == node and unit not in self.freeing
        if ok:
            assert slab is not None
            n = g.class_units[slab.size_class]
            self._write_owner(unit, UNIT_FREEING, slab.node, slab.volume, slab.index,
                              slab.size_class, slab.generation, epoch)
            self.busy[unit:unit + n] = bytes([B_FREEING]) * n
            for k in range(unit, unit + n):
                self.unit_owner[k] = 0
            self.freeing[unit] = epoch
            self.counters["frees"] += 1
        elif not replayed:  # (a replay after a crash finds the free already recorded)
            self.counters["rejected"] += 1
            log.warning("free request %d from node %x for unit %d refused (not its slab)",
                        f, node, unit)
        r.store(addr, make_key(f, DONE))
        r.store(addr, make_key(f + g.free_slots, OPEN))
        r.persist(addr, 8)
        self.free_pending.pop(f, None)
        self.free_pending[f + g.free_slots] = None
        return ok

    # ================================================================ epochs
    def register_node(self, node: int, epoch: int | None = None) -> int:
        """Give ``node`` an epoch slot (its old one if it had one). Returns the slot index.

        ``epoch``: a node that re-registers while it holds pins announces its oldest pinned
        epoch at once, so nothing freed since is reclaimed under it.

        Raises:
            RuntimeError: every slot is held by an active node.
        """
        g, r = self.geo, self.region
        with self.lock:
            E = r.load(g.global_epoch_addr)
            if epoch is not None:
                E = min(E, max(epoch, 1))
            chosen = -1
            for slot in range(g.max_nodes):
                n, _, active, _ = EPOCH_ENTRY.unpack_from(r.buf, g.epoch_addr(slot))
                if n == node:
                    chosen = slot
                    break
                if chosen < 0 and (n == 0 or not active):
                    chosen = slot
            if chosen < 0:
                raise RuntimeError("no free epoch slot (too many nodes)")
            addr = g.epoch_addr(chosen)
            hb = r.u64(addr + 24) + 1
            r.write(addr, EPOCH_ENTRY.pack(node, E, 1, hb))
            r.persist(addr, 32)
            self.epoch_seen[chosen] = (hb, self.clock())
            return chosen

    def _epochs(self, now: float) -> None:
        g, r = self.geo, self.region
        E = r.load(g.global_epoch_addr)
        low = E
        all_current = True
        table = r.buf[g.off_epochs:g.off_epochs + 64 * g.max_nodes]
        for slot, (node, epoch, active, hb) in enumerate(_EPOCH_ROW.iter_unpack(table)):
            if not node or not active:
                continue
            seen = self.epoch_seen.get(slot)
            if seen is None or seen[0] != hb:
                self.epoch_seen[slot] = (hb, now)
            elif now - seen[1] > self.node_lease:
                log.warning("node %x stopped heartbeating its epoch; it no longer holds "
                            "back reclamation", node)
                r.store(g.epoch_addr(slot) + 16, 0)
                self.epoch_seen.pop(slot, None)
                continue
            low = min(low, epoch)
            all_current &= epoch >= E
        if all_current:
            r.store(g.global_epoch_addr, E + 1)
        for unit, fepoch in list(self.freeing.items()):
            if fepoch < low:
                self._reclaim(unit)

    def _scrub(self, unit: int, n: int) -> None:
        """Zero a slab before anyone else can get it: a node must never see the bytes of
        the last owner, and a fresh slab reads as zeros (the block device relies on it).
        Done before the owner entry is cleared, so a crash in between scrubs again."""
        g, r = self.geo, self.region
        if self._zero_unit is None:
            self._zero_unit = bytes(g.unit_size)
        for k in range(unit, unit + n):
            r.write(g.unit_addr(k), self._zero_unit)
        r.persist(g.unit_addr(unit), n * g.unit_size)

    def _reclaim(self, unit: int) -> None:
        slab = self.heads.pop(unit)
        n = self.geo.class_units[slab.size_class]
        self._scrub(unit, n)
        self._clear_owner(unit, n)
        self._set_bits(unit, n, False)
        self.busy[unit:unit + n] = bytes(n)
        del self.freeing[unit]
        self.counters["reclaims"] += 1

    # ================================================================ the ticker
    def tick(self, epochs: bool = True) -> bool:
        """One round of background work: acks and frees done by shm nodes, leases, epochs,
        reclamation, restocking. Returns True if nodes look active (tickets or frees in
        flight), so the daemon can tick fast while busy and slowly while idle."""
        g, r = self.geo, self.region
        with self.lock:
            now = self.clock()
            before = (self.counters["allocs"], self.counters["frees"], self.counters["reclaims"])
            waiting = False
            for c in range(g.n_classes):
                seq = r.load(g.seq_addr(c))
                pend = self.pending[c]
                # untaken stock (t >= seq) cannot change under us: look only at taken tickets
                for t in [t for t in pend if t < seq]:
                    since = pend[t]
                    kt, state = split_key(r.load(g.ack_addr(c, t)))
                    if kt != t:
                        self.pending[c].pop(t, None)
                        continue
                    if state == ACKED:
                        self._commit_ack(c, t)
                    elif state == DONE:
                        self.pending[c].pop(t, None)
                    else:
                        waiting = True
                        if since is None:
                            self.pending[c][t] = now
                        elif now - since > self.lease:
                            self._expire_ticket(c, t, state)
            fseq = r.load(g.free_seq_addr)
            for f, since in list(self.free_pending.items()):
                if f >= fseq:
                    continue  # opened, not issued yet: nothing to look at
                kt, state = split_key(r.load(g.free_addr(f)))
                if kt != f:
                    self.free_pending.pop(f, None)
                elif state == ACKED:
                    self._process_free(f)
                else:
                    waiting = True
                    if since is None:
                        self.free_pending[f] = now
                    elif now - since > self.lease:
                        key = make_key(f, state)
                        if r.compare_swap(g.free_addr(f), key, make_key(f + g.free_slots, OPEN)) == key:
                            log.info("free ticket %d never completed; slot reopened", f)
                            self.free_pending.pop(f, None)
                            self.free_pending[f + g.free_slots] = None
            if epochs:
                self._epochs(now)
            self._stock()
            after = (self.counters["allocs"], self.counters["frees"], self.counters["reclaims"])
            return after != before or waiting or bool(self.freeing)

    def _expire_ticket(self, c: int, t: int, state: int) -> None:
        g, r = self.geo, self.region
        key = make_key(t, state)
        if r.compare_swap(g.ack_addr(c, t), key, make_key(t, DONE)) != key:
            return  # the node acked just now; the next tick commits it
        unit = r.u64(g.ring_addr(c, t) + 8)
        if state == CLAIMED:
            self._scrub(unit, g.class_units[c])
        self._release(unit, c)
        self.pending[c].pop(t, None)
        self.counters["expired"] += 1
        log.info("ticket %d (class %d) not acked within %.1fs: slab %d taken back",
                 t, c, self.lease, unit)

    # ================================================================ queries
    def owned_by(self, node: int, volume: int | None = None) -> list[OwnedSlab]:
        with self.lock:
            return [s for u, s in sorted(self.heads.items())
                    if s.node == node and u not in self.freeing
                    and (volume is None or s.volume == volume)]

    def stats(self) -> dict[str, int]:
        g = self.geo
        with self.lock:
            used_units = self.busy.count(B_OWNED) + self.busy.count(B_FREEING)
            return {
                "capacity_bytes": g.n_units * g.unit_size,
                "used_bytes": used_units * g.unit_size,
                "slabs_total": g.n_units,
                "slabs_used": used_units,
                "slabs_owned": len(self.heads) - len(self.freeing),
                "slabs_freeing": len(self.freeing),
                "units_reserved": self.busy.count(B_RESERVED),
                **self.counters,
            }

    def check_consistency(self) -> list[str]:
        """Compare bitmap, owner table and memory; a list of disagreements (empty = fine)."""
        g, r = self.geo, self.region
        problems = []
        with self.lock:
            bitmap = r.read(g.off_bitmap, g.bitmap_bytes)
            for u in range(g.n_units):
                bit = bool(bitmap[u >> 3] & (1 << (u & 7)))
                state = r.u64(g.owner_addr(u))
                if bit != (state in (UNIT_OWNED, UNIT_FREEING, UNIT_CONT)):
                    problems.append(f"unit {u}: bitmap {int(bit)} owner state {state}")
        return problems
