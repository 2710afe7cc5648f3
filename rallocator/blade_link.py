"""Everything a node keeps per blade: a connection pool, the shm mapping, its epoch slot.

Pools give each thread its own tcp connection (a connection serves one request at a time);
on the shm transport the one-sided verbs go straight to the shared mapping from any thread.
A background thread heartbeats the node's epoch slot so the blade knows which frees it may
reclaim; ``pin()`` holds the announced epoch back while a caller touches slab memory.
"""

from __future__ import annotations

import contextlib
import logging
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

from rallocator.layout import Geometry
from rallocator.protocol import Operation, run_blocking
from rallocator.transport_shm import ShmUnavailable, ShmVerbs
from rallocator.transport_tcp import TcpVerbs
from rallocator.verbs import BladeUnreachable
from rallocator.wire import Status, VerbError

log = logging.getLogger("rallocator.link")
EPOCH_TICK = 0.05  # heartbeat cadence (the blade's node lease is 15 s; frees wait a tick)
EPOCH_REFRESH = 1.0  # the heartbeat is written at least this often even if nothing changed
_U64 = struct.Struct("<Q")


class BladeLink:
    """A node's link to one blade.

    Args:
        name: the blade's name; address: its host:port.
        transport: "tcp", "shm" (fail if the region cannot be mapped) or "auto".
        timeout: per-verb timeout in seconds.

    Raises:
        BladeUnreachable, AuthFailed: from the first connection.
    """

    def __init__(self, name: str, address: str, secret: bytes, node_id: int,
                 transport: str = "auto", timeout: float = 10.0, max_idle: int = 16) -> None:
        self.name = name
        self.address = address
        self.secret = secret
        self.node_id = node_id
        self.timeout = timeout
        self.max_idle = max_idle
        self._idle: list[TcpVerbs] = []
        self._lock = threading.Lock()
        self.dead = False
        first = self._connect()
        self.geometry: Geometry = first.geometry
        self.info = first.call({"op": "register"})
        self.slot: int = self.info["slot"]
        self.shm: ShmVerbs | None = None
        if transport in ("shm", "auto"):
            try:
                self.shm = ShmVerbs(self.info["region"], first.superblock)
            except (ShmUnavailable, KeyError) as e:
                if transport == "shm":
                    first.close()
                    raise ShmUnavailable(f"blade {name}: {e}") from None
        self.transport = "shm" if self.shm else "tcp"
        self._release(first)
        with self.verbs() as v:
            self._epoch_now = _U64.unpack(v.read(self.geometry.global_epoch_addr, 8))[0]
        self._pins: dict[int, int] = {}
        self._pin_seq = 0
        self._hb = 0
        self._stop = threading.Event()
        self._epoch_thread = threading.Thread(target=self._epoch_loop, daemon=True,
                                              name=f"epoch-{name}")
        self._epoch_thread.start()

    # ------------------------------------------------------------------ connections
    def _connect(self) -> TcpVerbs:
        return TcpVerbs(self.address, self.secret, self.node_id, timeout=self.timeout)

    def _acquire(self) -> TcpVerbs:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        if self.dead:
            raise BladeUnreachable(f"blade {self.name} is marked dead")
        return self._connect()

    def _release(self, conn: TcpVerbs) -> None:
        if conn.broken:
            return
        with self._lock:
            if len(self._idle) < self.max_idle:
                self._idle.append(conn)
                return
        conn.close()

    @contextlib.contextmanager
    def verbs(self) -> Iterator[Any]:
        """Verbs for one operation: the shm mapping, or a pooled tcp connection."""
        if self.shm is not None:
            yield self.shm
            return
        conn = self._acquire()
        try:
            yield conn
        except BladeUnreachable:
            conn.broken = True
            raise
        finally:
            self._release(conn)

    @contextlib.contextmanager
    def tcp(self) -> Iterator[TcpVerbs]:
        """A pooled tcp connection, whatever the transport (for calls)."""
        conn = self._acquire()
        try:
            yield conn
        finally:
            self._release(conn)

    def run(self, op: Operation) -> Any:
        with self.verbs() as v:
            return run_blocking(op, v)

    def call(self, message: dict[str, Any]) -> dict[str, Any]:
        with self.tcp() as c:
            return c.call(message)

    def available_units(self) -> int:
        """Free units the blade publishes (for power-of-two choices)."""
        with self.verbs() as v:
            return _U64.unpack(v.read(self.geometry.free_units_addr, 8))[0]

    # ------------------------------------------------------------------ epochs
    @contextlib.contextmanager
    def pin(self) -> Iterator[None]:
        """While inside, the epoch this node announces does not pass the current one, so
        no slab freed from now on is reclaimed under our feet."""
        with self._lock:
            self._pin_seq += 1
            key = self._pin_seq
            self._pins[key] = self._epoch_now
        try:
            yield
        finally:
            with self._lock:
                del self._pins[key]

    _epoch_now = 0

    def _epoch_loop(self) -> None:
        g = self.geometry
        last: tuple[int, int] | None = None  # (slot, epoch) we last announced
        written = 0.0
        while not self._stop.wait(EPOCH_TICK):
            try:
                with self.verbs() as v:
                    self._epoch_now = _U64.unpack(v.read(g.global_epoch_addr, 8))[0]
                    with self._lock:
                        announce = min(self._pins.values(), default=self._epoch_now)
                    slot_addr = g.epoch_addr(self.slot)
                    if _U64.unpack(v.read(slot_addr, 8))[0] != self.node_id:
                        self._reregister(announce)  # our slot was given away: get one back
                        continue
                    now = time.monotonic()
                    if last == (self.slot, announce) and now - written < EPOCH_REFRESH:
                        continue  # nothing changed: skip the write (the GIL is shared)
                    self._hb += 1
                    v.write(slot_addr + 8, struct.pack("<QQQ", announce, 1, self._hb))
                    last, written = (self.slot, announce), now
            except VerbError as e:
                if e.status == Status.EACCES:
                    self._reregister(None)
                else:
                    log.warning("epoch heartbeat to %s: %s", self.name, e)
                    self._stop.wait(0.5)
            except (BladeUnreachable, OSError) as e:
                if not self.dead:
                    log.debug("epoch heartbeat to %s failed: %s", self.name, e)
                self._stop.wait(0.5)
            except Exception as e:  # never let the heartbeat thread die silently
                log.warning("epoch heartbeat to %s: %s", self.name, e)
                self._stop.wait(0.5)

    def _reregister(self, announce: int | None) -> None:
        with self._lock:
            if announce is None:
                announce = min(self._pins.values(), default=self._epoch_now)
        try:
            self.slot = self.call({"op": "register", "epoch": announce})["slot"]
            log.info("blade %s: epoch slot re-registered (%d)", self.name, self.slot)
        except (VerbError, BladeUnreachable, OSError) as e:
            log.warning("blade %s: cannot re-register our epoch slot: %s", self.name, e)
            self._stop.wait(0.5)

    def close(self) -> None:
        """Leave cleanly: our epoch slot goes inactive so it no longer holds back frees."""
        self._stop.set()
        self._epoch_thread.join(timeout=2)
        if not self.dead:
            try:
                with self.verbs() as v:
                    v.write(self.geometry.epoch_addr(self.slot) + 8,
                            struct.pack("<QQQ", self._epoch_now, 0, self._hb + 1))
            except (BladeUnreachable, VerbError, OSError):
                pass
        with self._lock:
            idle, self._idle = self._idle, []
        for c in idle:
            c.close()
        if self.shm is not None:
            self.shm.close()
            self.shm = None
