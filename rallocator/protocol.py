"""The RAllocator protocol, node side, with no I/O in it (sans-IO, as in h11).

Each operation is a generator that yields *requests* (frozen dataclasses naming a verb) and
receives their results. ``run_blocking`` drives it against real verbs from any thread (the
nbdkit plugin's, the filesystem's worker threads); tests drive it step by step against a
region with an injected clock. Another event loop needs only another ten-line driver.

Allocation (one slab of size class c):

    t  = fetch_add(seq[c], 1)                     take a ticket
    wait until ring[c][t].ticket == t             the blade pre-stocked a slab there
      (giving up: compare_swap(ack[t], (t-R,DONE), (t,DONE)) hands the ticket back)
    compare_swap(ack[t], (t,OPEN), (t,CLAIMED))   the slot is ours (not expired, not voided)
    write(ack[t].body, node, volume, index, unit) say who owns it
    compare_swap(ack[t], (t,CLAIMED), (t,ACKED))  done: the blade records the owner
    persist(ack[t])                               durable before we count it (nvm)

Free: the same claim/ack dance on the free ring, stamped with the global epoch read first.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

from rallocator.layout import (
    ACK_BODY,
    ACKED,
    CLAIMED,
    DONE,
    FREE_BODY,
    OPEN,
    RING_ENTRY,
    Geometry,
    make_key,
    split_key,
)

# ------------------------------------------------------------------ requests (events)


@dataclass(frozen=True, slots=True)
class Read:
    addr: int
    length: int


@dataclass(frozen=True, slots=True)
class Write:
    addr: int
    data: bytes


@dataclass(frozen=True, slots=True)
class FetchAdd:
    addr: int
    delta: int


@dataclass(frozen=True, slots=True)
class CompareSwap:
    addr: int
    expected: int
    new: int


@dataclass(frozen=True, slots=True)
class Persist:
    addr: int
    length: int


@dataclass(frozen=True, slots=True)
class Sleep:
    """Back off before polling again (the driver decides how: time.sleep, trio.sleep, a
    fake clock)."""

    seconds: float


Request = Read | Write | FetchAdd | CompareSwap | Persist | Sleep
Operation = Generator[Request, Any, Any]

# ------------------------------------------------------------------ outcomes


class AllocationFailed(Exception):
    """Base of the ways an allocation can fail without harming anyone."""


class BladeFull(AllocationFailed):
    """The blade has no free unit for this size class."""


class TicketLost(AllocationFailed):
    """Our ticket expired or was voided before we claimed it; take another."""


@dataclass(frozen=True, slots=True)
class SlabGrant:
    """A slab now owned by this node on one blade."""

    size_class: int
    unit: int
    addr: int
    size: int
    ticket: int


# ------------------------------------------------------------------ operations

POLL_FIRST = 0.00005
POLL_MAX = 0.005


def allocate_slab(geo: Geometry, size_class: int, node: int, volume: int, index: int,
                  max_polls: int = 2000) -> Operation:
    """Take one slab of ``size_class``. Returns a SlabGrant.

    Raises:
        BladeFull: nothing to stock our ticket with (the ticket is left to its lease).
        TicketLost: the ticket expired or was voided under us.
    """
    units = geo.class_units[size_class]
    t = yield FetchAdd(geo.seq_addr(size_class), 1)
    ring = geo.ring_addr(size_class, t)
    key = geo.ack_addr(size_class, t)
    delay = POLL_FIRST
    polls = 0
    while True:
        raw = yield Read(ring, RING_ENTRY.size)
        ticket, unit = RING_ENTRY.unpack(raw)
        if ticket == t:
            break
        if ticket > t:
            raise TicketLost(f"ticket {t} was skipped")
        avail = yield Read(geo.free_units_addr, 8)
        full = int.from_bytes(avail, "little") < units and delay >= POLL_MAX
        polls += 1
        if full or polls >= max_polls:
            # Give the ticket back before leaving, or the blade would stock it with a slab
            # nobody comes for (held until the lease ends: with a full blade and a retrying
            # node, a livelock).
            cancelled = yield from _cancel_ticket(key, t)
            if cancelled:
                raise BladeFull(f"no free {geo.slab_bytes(size_class)}-byte slab"
                                if full else f"ticket {t} was not stocked in time")
            continue  # stocked this very moment: go and take it
        yield Sleep(delay)
        delay = min(delay * 2, POLL_MAX)
    old = yield CompareSwap(key, make_key(t, OPEN), make_key(t, CLAIMED))
    if old != make_key(t, OPEN):
        raise TicketLost(f"ticket {t} expired before we claimed it")
    yield Write(key + 8, ACK_BODY.pack(node, volume, index, unit))
    old = yield CompareSwap(key, make_key(t, CLAIMED), make_key(t, ACKED))
    if old != make_key(t, CLAIMED):
        raise TicketLost(f"ticket {t} expired while we acknowledged it")
    yield Persist(key, 64)
    return SlabGrant(size_class, unit, geo.unit_addr(unit), geo.slab_bytes(size_class), t)


def _cancel_ticket(key_addr: int, t: int) -> Operation:
    """Mark ticket t given up, if the blade has not stocked it yet. Returns True if so.

    Only over a *finished* previous occupant of the slot (state DONE, or a fresh zero key):
    never over a ticket someone still holds.
    """
    raw = yield Read(key_addr, 8)
    k = int.from_bytes(raw, "little")
    kt, state = split_key(k)
    if kt >= t or not (state == DONE or k == 0):
        return False
    old = yield CompareSwap(key_addr, k, make_key(t, DONE))
    return old == k


def free_slab(geo: Geometry, node: int, unit: int, max_polls: int = 4000) -> Operation:
    """Hand a slab back. The blade reclaims it once every node's epoch has moved past ours.

    Raises:
        TicketLost: the free ring slot never opened for us (blade stuck); retry later.
    """
    epoch_raw = yield Read(geo.global_epoch_addr, 8)
    epoch = int.from_bytes(epoch_raw, "little")
    f = yield FetchAdd(geo.free_seq_addr, 1)
    key = geo.free_addr(f)
    delay = POLL_FIRST
    for _ in range(max_polls):
        old = yield CompareSwap(key, make_key(f, OPEN), make_key(f, CLAIMED))
        if old == make_key(f, OPEN):
            break
        seen, _ = split_key(old)
        if seen > f:
            raise TicketLost(f"free ticket {f} expired")
        yield Sleep(delay)  # the blade has not reopened this slot yet
        delay = min(delay * 2, POLL_MAX)
    else:
        raise TicketLost(f"free ring slot for ticket {f} never opened")
    yield Write(key + 8, FREE_BODY.pack(node, unit, epoch))
    old = yield CompareSwap(key, make_key(f, CLAIMED), make_key(f, ACKED))
    if old != make_key(f, CLAIMED):
        raise TicketLost(f"free ticket {f} expired while we acknowledged it")
    yield Persist(key, 64)
    return f


# ------------------------------------------------------------------ drivers


def step(verbs: Any, req: Request) -> Any:
    """Execute one request against blocking verbs."""
    if isinstance(req, Read):
        return verbs.read(req.addr, req.length)
    if isinstance(req, FetchAdd):
        return verbs.fetch_add(req.addr, req.delta)
    if isinstance(req, CompareSwap):
        return verbs.compare_swap(req.addr, req.expected, req.new)
    if isinstance(req, Write):
        return verbs.write(req.addr, req.data)
    if isinstance(req, Persist):
        return verbs.persist(req.addr, req.length)
    raise TypeError(f"not a verb request: {req!r}")


def run_blocking(op: Operation, verbs: Any) -> Any:
    """Drive an operation with blocking verbs (threads)."""
    import time

    result: Any = None
    try:
        while True:
            req = op.send(result)
            if isinstance(req, Sleep):
                time.sleep(req.seconds)
                result = None
            else:
                result = step(verbs, req)
    except StopIteration as done:
        return done.value
