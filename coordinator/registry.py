"""The coordinator's pure state: blade membership, failure detection, hints and shedding.

Nothing here does I/O, sleeps or reads the real clock on its own: the clock is injected so the
unit tests can step time by hand, and the HTTP layer (``http_api.py``) wraps one ``Registry``
in a lock. Every method that changes state returns the events it emitted, so the caller can
log them and wake long-polling clients without the registry knowing about either.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

HIGH_WATERMARK = 0.85
"""Utilisation above which a blade is "hot" and should shed load."""
LOW_WATERMARK = 0.6
"""Utilisation below which a blade is "cool" and may take shed load."""
SHED_COOLDOWN_S = 10.0
"""At most one shed advice per hot blade per this many seconds, so nodes are not stampeded."""
EVENT_KINDS = ("blade_dead", "blade_alive", "shed")
MAX_EVENTS = 4096
"""Events kept for long-polling clients; a client further behind just misses the oldest."""


@dataclass
class Blade:
    """What the coordinator knows about one memory blade."""

    name: str
    address: str
    capacity_bytes: int
    unit_size: int
    slab_sizes: list[int]
    mode: str
    pid: int
    last_heartbeat: float
    alive: bool = True
    used_bytes: int = 0
    slabs_total: int = 0
    slabs_used: int = 0
    host_mem_percent: float = 0.0
    host_mem_available: int = 0
    # Bytes hinted since the last heartbeat: the blade has not reported the allocations they
    # cause yet, so counting them keeps a burst of hints from piling onto one blade.
    pending_bytes: int = 0
    last_shed: float = -math.inf

    def utilisation(self, with_pending: bool = False) -> float:
        """Used fraction of capacity (1.0 for a blade that reports no capacity: never pick it)."""
        if self.capacity_bytes <= 0:
            return 1.0
        used = self.used_bytes + (self.pending_bytes if with_pending else 0)
        return used / self.capacity_bytes


class Registry:
    """Membership and placement state of the cluster; not thread-safe, callers hold a lock.

    Args:
        dead_after: seconds without a heartbeat after which a blade is declared dead.
        clock: monotonic seconds, for ages and timeouts (injected for tests).
        wall: wall-clock seconds, stamped on events so humans can read them.
    """

    def __init__(
        self,
        dead_after: float,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        high_watermark: float = HIGH_WATERMARK,
        low_watermark: float = LOW_WATERMARK,
        shed_cooldown: float = SHED_COOLDOWN_S,
        max_events: int = MAX_EVENTS,
    ) -> None:
        if dead_after <= 0:
            raise ValueError("dead_after must be positive")
        self.dead_after = dead_after
        self.clock = clock
        self.wall = wall
        self.high = high_watermark
        self.low = low_watermark
        self.shed_cooldown = shed_cooldown
        self.blades: dict[str, Blade] = {}
        self.events: deque[dict[str, Any]] = deque(maxlen=max_events)
        self.last_seq = 0
        self.hints_total = 0
        self.event_counts: dict[str, int] = dict.fromkeys(EVENT_KINDS, 0)

    # -- events ---------------------------------------------------------------------------

    def _emit(self, kind: str, blade: str, **extra: Any) -> dict[str, Any]:
        self.last_seq += 1
        event = {"seq": self.last_seq, "time": self.wall(), "kind": kind, "blade": blade, **extra}
        self.events.append(event)
        self.event_counts[kind] = self.event_counts.get(kind, 0) + 1
        return event

    def effective_since(self, since: int) -> int:
        """The cursor to wait from: a cursor from the future means the coordinator restarted
        (sequence numbers began again at 1), so the client has seen none of our events."""
        return 0 if since > self.last_seq else since

    def events_since(self, since: int) -> tuple[list[dict[str, Any]], int]:
        """Events with ``seq > since`` and the cursor to pass next time."""
        since = self.effective_since(since)
        out = [dict(e) for e in self.events if e["seq"] > since]
        return out, (out[-1]["seq"] if out else since)

    # -- membership -----------------------------------------------------------------------

    def register(
        self,
        name: str,
        address: str,
        capacity_bytes: int,
        unit_size: int,
        slab_sizes: list[int],
        mode: str,
        pid: int,
    ) -> list[dict[str, Any]]:
        """Add or replace a blade (a restarted blade registers again) and mark it alive."""
        old = self.blades.get(name)
        self.blades[name] = Blade(
            name=name,
            address=address,
            capacity_bytes=capacity_bytes,
            unit_size=unit_size,
            slab_sizes=list(slab_sizes),
            mode=mode,
            pid=pid,
            last_heartbeat=self.clock(),
        )
        if old is not None and not old.alive:
            return [self._emit("blade_alive", name, address=address)]
        return []

    def heartbeat(
        self,
        name: str,
        used_bytes: int,
        capacity_bytes: int,
        slabs_total: int,
        slabs_used: int,
        host_mem_percent: float,
        host_mem_available: int,
    ) -> tuple[bool, list[dict[str, Any]]]:
        """Record a blade's utilisation; ``False`` if we do not know it (it must register).

        A heartbeat from a blade we declared dead (a healed partition, a stalled process)
        brings it back: it is reachable again, and nodes learn so from a ``blade_alive`` event.
        """
        b = self.blades.get(name)
        if b is None:
            return False, []
        now = self.clock()
        b.used_bytes = used_bytes
        b.capacity_bytes = capacity_bytes
        b.slabs_total = slabs_total
        b.slabs_used = slabs_used
        b.host_mem_percent = host_mem_percent
        b.host_mem_available = host_mem_available
        # The report now accounts for what the hinted nodes allocated: stop double-counting.
        b.pending_bytes = 0
        b.last_heartbeat = now
        events: list[dict[str, Any]] = []
        if not b.alive:
            b.alive = True
            events.append(self._emit("blade_alive", name, address=b.address))
        events.extend(self.tick())
        return True, events

    def tick(self) -> list[dict[str, Any]]:
        """Declare silent blades dead (once each) and give load-shedding advice."""
        now = self.clock()
        events: list[dict[str, Any]] = []
        for b in sorted(self.blades.values(), key=lambda b: b.name):
            if b.alive and now - b.last_heartbeat > self.dead_after:
                b.alive = False
                b.pending_bytes = 0
                events.append(
                    self._emit(
                        "blade_dead",
                        b.name,
                        address=b.address,
                        last_heartbeat_age_s=round(now - b.last_heartbeat, 3),
                    )
                )
        events.extend(self._shed(now))
        return events

    def _shed(self, now: float) -> list[dict[str, Any]]:
        """Advise moving load from each hot blade to the coolest one.

        The amount brings the hot blade down to the midpoint of the watermarks, capped so the
        target does not rise above it either: both end up in the comfortable band, and the
        advice does not just make the target the next hot blade.
        """
        alive = [b for b in self.blades.values() if b.alive and b.capacity_bytes > 0]
        mid = (self.high + self.low) / 2
        events: list[dict[str, Any]] = []
        for hot in sorted(alive, key=lambda b: (-b.utilisation(), b.name)):
            if hot.utilisation() <= self.high:
                break
            if now - hot.last_shed < self.shed_cooldown:
                continue
            cool = [b for b in alive if b is not hot and b.utilisation() < self.low]
            if not cool:
                break
            target = min(cool, key=lambda b: (b.utilisation(), b.name))
            excess = hot.used_bytes - int(mid * hot.capacity_bytes)
            room = int(mid * target.capacity_bytes) - target.used_bytes
            amount = min(excess, room)
            if hot.unit_size > 0:
                amount = -(-amount // hot.unit_size) * hot.unit_size
            if amount <= 0:
                continue
            hot.last_shed = now
            events.append(
                self._emit(
                    "shed",
                    hot.name,
                    target=target.name,
                    target_address=target.address,
                    bytes=amount,
                )
            )
        return events

    # -- placement ------------------------------------------------------------------------

    def hint(self, replicas: int, size: int, exclude: Iterable[str] = ()) -> list[tuple[str, str]]:
        """Up to ``replicas`` distinct alive blades with room for ``size``, least loaded first.

        Each chosen blade is charged ``size`` as pending until its next heartbeat, so the next
        hint in a burst sees it as fuller and picks another blade.
        """
        self.hints_total += 1
        skip = set(exclude)
        candidates = [
            b
            for b in self.blades.values()
            if b.alive
            and b.name not in skip
            and b.capacity_bytes > 0
            and b.capacity_bytes - b.used_bytes - b.pending_bytes >= size
        ]
        candidates.sort(key=lambda b: (b.utilisation(with_pending=True), b.name))
        chosen = candidates[: max(replicas, 0)]
        for b in chosen:
            b.pending_bytes += size
        return [(b.name, b.address) for b in chosen]

    # -- views ----------------------------------------------------------------------------

    def status(self) -> list[dict[str, Any]]:
        """Every known blade, dead ones included, sorted by name."""
        now = self.clock()
        return [
            {
                "name": b.name,
                "address": b.address,
                "pid": b.pid,
                "alive": b.alive,
                "mode": b.mode,
                "capacity_bytes": b.capacity_bytes,
                "used_bytes": b.used_bytes,
                "pending_bytes": b.pending_bytes,
                "unit_size": b.unit_size,
                "slab_sizes": list(b.slab_sizes),
                "slabs_total": b.slabs_total,
                "slabs_used": b.slabs_used,
                "host_mem_percent": b.host_mem_percent,
                "host_mem_available": b.host_mem_available,
                "last_heartbeat_age_s": round(now - b.last_heartbeat, 3),
            }
            for b in sorted(self.blades.values(), key=lambda b: b.name)
        ]
