"""The block device's background care: notice dead blades, re-replicate, tidy up, shed load.

One thread (``nbd-health``) runs rounds, every ``ROUND`` seconds or at once when woken:

1. **probe**: ping every blade now and then, suspected and dead ones every round. A blade
   that does not answer is dead to us (``BlockVolume.blade_dead`` drops its copies); a dead
   one that answers again is back (its orphaned copies can be freed); one that did not answer
   at startup joins late (``join_late_blade``). Pings go over tcp, so a killed blade is seen
   even on the shm transport, where the mapping outlives the process.
2. **orphans**: copies we stopped using are freed (or taken back, if their slab has no other
   copy) once their blade answers.
3. **repair**: a degraded slab gets new copies on other blades (``add_copies``: allocate,
   then copy under the slab's exclusive lock, so no write is lost).
4. **shed**: the coordinator asked to move load off a hot blade: migrate slabs to its target.

A second thread (``nbd-events``) long-polls the coordinator. Its ``blade_dead`` only makes
the blade a suspect (the ping decides: a slow heartbeat must not cost a copy), ``blade_alive``
wakes the probe, ``shed`` queues a migration. Without a coordinator the pings still work.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from rallocator.coordinator_client import CoordinatorUnavailable
from rallocator.node import NoSpace
from rallocator.verbs import BladeUnreachable
from rallocator.wire import VerbError

if TYPE_CHECKING:
    from rallocator.blockdev import BlockVolume

log = logging.getLogger("rallocator.blockdev")

ROUND = 0.5  # seconds between rounds when nothing wakes us (each round takes the GIL)
PING_HEALTHY = 2.0  # how often a blade in good standing is pinged (failed I/O pings at once)
PING_DEAD = 1.0  # how often a dead one is asked whether it is back
EVENT_POLL = 2.0  # coordinator long-poll (bounded so stopping is quick)
MAX_SHED_SLABS = 64  # slabs moved per shed advice


class Monitor:
    """Background health and repair for one ``BlockVolume`` (see the module doc)."""

    def __init__(self, volume: BlockVolume) -> None:
        self.vol = volume
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._last_ping: dict[str, float] = {}
        self._shed: deque[tuple[str, str, int]] = deque()
        self._scratch: memoryview | None = None
        self._short = False  # logged "no room for a copy" already

    def start(self) -> None:
        self._threads = [threading.Thread(target=self._run, name="nbd-health", daemon=True)]
        if self.vol.node.coordinator is not None:
            self._threads.append(threading.Thread(target=self._events, name="nbd-events",
                                                  daemon=True))
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            t.join(timeout=EVENT_POLL + 3 if t.name == "nbd-health" else 0.2)

    def wake(self) -> None:
        self._wake.set()

    # ---------------------------------------------------------------- the rounds
    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(ROUND)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self.round()
            except Exception:  # never let the repairer die quietly
                log.exception("volume %s: health round failed", self.vol.name)
                self._stop.wait(1.0)

    def round(self) -> None:
        """One pass of probe, orphans, repair, shed (tests call it directly)."""
        self.probe()
        self.tidy_orphans()
        self.repair()
        self.shed()

    def probe(self) -> None:
        vol = self.vol
        with vol._meta:
            urgent = vol.suspects | vol.unscanned
            dead = set(vol.dead)
        now = time.monotonic()
        for name in list(vol.node.blade_addrs):
            if self._stop.is_set():
                return
            every = PING_DEAD if name in dead else PING_HEALTHY
            if name not in urgent and now - self._last_ping.get(name, 0.0) < every:
                continue
            self._last_ping[name] = now
            alive = self.ping(name)
            if alive is None:
                continue
            if alive:
                with vol._meta:
                    vol.suspects.discard(name)
                    back = name in vol.dead
                    vol.dead.discard(name)
                    late = name in vol.unscanned
                if back:
                    log.warning("volume %s: blade %s answers again", vol.name, name)
                if late:
                    try:
                        vol.join_late_blade(name)
                    except (BladeUnreachable, OSError, VerbError) as e:
                        log.warning("volume %s: blade %s: %s", vol.name, name, e)
            elif name not in dead:
                vol.blade_dead(name)
            else:
                with vol._meta:
                    vol.suspects.discard(name)

    def ping(self, name: str) -> bool | None:
        """True if ``name`` answers, False if it does not, None if we could not tell."""
        try:
            self.vol.node.link(name).call({"op": "ping"})
            return True
        except (BladeUnreachable, OSError, VerbError):
            return False
        except Exception as e:  # e.g. an old link torn down under a reader: ask again later
            log.warning("volume %s: could not ping %s: %r", self.vol.name, name, e)
            return None

    def tidy_orphans(self) -> None:
        vol = self.vol
        with vol._meta:
            orphans = list(vol.orphans)
            waiting = vol.dead | vol.suspects
        for o in orphans:
            if self._stop.is_set():
                return
            if o.blade in waiting:
                continue
            try:
                vol.adopt(o)
            except (BladeUnreachable, OSError, VerbError) as e:
                log.debug("orphan on %s: %s", o.blade, e)
                vol.suspect(o.blade)

    def repair(self) -> None:
        vol = self.vol
        with vol._meta:
            todo = sorted(vol.degraded)
        for i in todo:
            if self._stop.is_set():
                return
            slab = vol._map[i]
            if slab is None:
                with vol._meta:
                    vol.degraded.discard(i)
                continue
            need = vol.replicas - len(slab.replicas)
            if need <= 0:
                with vol._meta:
                    vol.degraded.discard(i)
                continue
            if not slab.replicas:
                continue  # nothing to copy from; adopt() brings a copy back if one returns
            try:
                if vol.add_copies(i, need, scratch=self._buffer()):
                    vol.counters["repairs"] += 1
                    self._short = False
            except NoSpace as e:
                if not self._short:
                    log.warning("volume %s: cannot re-replicate yet: %s", vol.name, e)
                    self._short = True
                return

    def shed(self) -> None:
        vol = self.vol
        while self._shed and not self._stop.is_set():
            hot, target, nbytes = self._shed.popleft()
            if target not in vol.node.blade_addrs or target in vol._avoid():
                continue
            others = set(vol.node.blade_addrs) - {target}
            moved = 0
            for i in vol.mapped_slabs():
                if moved >= nbytes or moved >= MAX_SHED_SLABS * vol.slab_size:
                    break
                names = vol.blades_of(i)
                if hot not in names or target in names:
                    continue
                try:
                    if vol.add_copies(i, 1, exclude=others, drop=hot, scratch=self._buffer()):
                        moved += vol.slab_size
                        vol.counters["migrations"] += 1
                except NoSpace:
                    break
            if moved:
                log.info("volume %s: moved %d slab(s) from %s to %s", vol.name,
                         moved // vol.slab_size, hot, target)

    def _buffer(self) -> memoryview:
        if self._scratch is None:
            self._scratch = memoryview(bytearray(self.vol.slab_size))
        return self._scratch

    # ---------------------------------------------------------------- coordinator events
    def handle_event(self, event: dict[str, Any]) -> None:
        """Act on one coordinator event (see ``CoordinatorClient.events``)."""
        kind, blade = event.get("kind"), event.get("blade")
        if blade not in self.vol.node.blade_addrs:
            return
        if kind == "blade_dead":
            self.vol.suspect(blade)
        elif kind == "blade_alive":
            self._last_ping.pop(blade, None)
            self.wake()
        elif kind == "shed" and event.get("target"):
            self._shed.append((blade, str(event["target"]), int(event.get("bytes", 0))))
            self.wake()

    def _events(self) -> None:
        coord = self.vol.node.coordinator
        assert coord is not None
        cursor: int | None = None
        while not self._stop.is_set():
            try:
                if cursor is None:  # start from now: the probes tell us how things stand
                    _, cursor = coord.events(0, 0)
                events, cursor = coord.events(cursor, EVENT_POLL)
            except CoordinatorUnavailable as e:
                log.debug("coordinator: %s", e)
                self._stop.wait(2.0)
                continue
            for e in events:
                try:
                    self.handle_event(e)
                except Exception:
                    log.exception("volume %s: event %r", self.vol.name, e)
