"""A block device over remote slabs: the logic behind ``nbd_plugin/plugin.py``.

``BlockVolume`` serves a linear address space of ``size`` bytes cut into slabs of
``slab_size``. Slab ``i`` is mapped on its first write (``allocate_slab(volume=name_id(name),
index=i)``, ``replicas`` copies on distinct blades); until then it reads as zeros and
``extents`` reports it as a hole; a trim or zero covering it whole gives it back. The node
that owns the slabs is named after the volume, so a restarted volume finds them again.

Concurrency (nbdkit's parallel thread model): each slab has a ``SlabLock``. Reads and writes
only register in it (no lock object is taken on the I/O path; see ``SlabLock``), so data I/O
never serialises on anything, and the operations that change what a slab *is* take it
exclusive (they wait for registered I/O; new I/O waits for them): mapping on first write
(two writers racing on a fresh slab map it once), unmapping (trim/zero) and copying it to a new blade (a write during
the copy would be lost). A slab's replica list is replaced, never mutated, so readers take a
snapshot without a lock.

Failures: a write goes to every copy before it is acknowledged; a copy that fails is dropped
from its slab (it is now stale) and its blade is suspected. A background monitor
(``blockdev_health.Monitor``) confirms suspicions with a ping, hears ``blade_dead`` from the
coordinator, drops a dead blade's copies, re-replicates degraded slabs onto other blades,
frees stale copies once their blade answers again, and moves slabs off hot blades when the
coordinator says ``shed``.

Hot path: ``pread``/``pwrite`` take the caller's buffer (nbdkit's memoryview) and hand slices
of it to the verbs: on shm one memcpy straight between the buffer and the blade's mapping, on
tcp ``recv_into``/``sendmsg``. Requests are split only at slab boundaries. A request within
one slab that has one copy on a mapped (shm) blade is served inline in ``pread``/``pwrite``:
register, one slice assignment, unregister.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from rallocator.blockdev_config import (
    DEFAULT_SLAB_SIZE,
    ConfigError,
    VolumeConfig,
    VolumeLock,
    node_name_for,
)
from rallocator.node import NoSpace, Replica, Slab, WorkingNode, name_id
from rallocator.sizes import format_size
from rallocator.verbs import BladeUnreachable
from rallocator.wire import VerbError

__all__ = ["BlockVolume", "ConfigError", "SlabLock", "VolumeConfig", "EXTENT_HOLE",
           "EXTENT_ZERO", "BLOCK_SIZE"]

log = logging.getLogger("rallocator.blockdev")

EXTENT_HOLE = 1  # same values as nbdkit.EXTENT_HOLE / EXTENT_ZERO
EXTENT_ZERO = 2
BLOCK_SIZE = (1, 4096, 64 << 20)  # (minimum, preferred, maximum): nbdkit's request limit
_LINK_ERRORS = (OSError, VerbError)  # BladeUnreachable is an OSError
STARTUP_TRIES = 3  # asks of a blade that does not answer at startup, 0.5 s apart


class SlabLock:
    """Per-slab exclusion that costs the I/O path no lock.

    I/O registers in ``busy`` (``list.append``/``pop`` are single C calls, atomic under the
    GIL), *then* checks ``locked()``: if an exclusive operation holds the slab it unregisters
    and queues on the lock instead (``with lk:``). An exclusive operation takes the lock,
    *then* waits until ``busy`` is empty. Each side publishes its own flag before reading the
    other's (and the GIL makes that order hold), so either the operation sees the I/O and
    waits for it, or the I/O sees the operation and waits for it: never neither.

    New I/O queues behind a held lock, so a repair is not starved by a steady stream of I/O.
    """

    __slots__ = ("busy", "locked", "_lock")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.locked = self._lock.locked
        self.busy: list[None] = []

    def acquire_exclusive(self) -> None:
        self._lock.acquire()
        delay = 0.0
        while self.busy:  # I/O that registered before we took the lock: let it finish
            time.sleep(delay)
            delay = min(delay * 2 or 1e-5, 1e-3)

    def release_exclusive(self) -> None:
        self._lock.release()

    def __enter__(self) -> SlabLock:  # I/O that found the slab held: wait, then go alone
        self._lock.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


@dataclass
class Orphan:
    """A copy we stopped using (its write failed or its blade died) and still own: freed
    once its blade answers, or taken back if its slab has no other copy left."""

    blade: str
    unit: int
    addr: int
    index: int
    slab: Slab


class BlockVolume:
    """``size`` bytes of block device on remote slabs. Thread-safe.

    Args:
        node: the working node that owns the volume's slabs (name it ``nbd:<name>``).
        name: the volume's name (its slabs carry ``name_id(name)``).
        size: bytes; need not be a multiple of ``slab_size``.
        slab_size: a slab size the blades offer (1M and 4M by default).
        replicas: copies of each slab, on distinct blades.
        monitor: run the background health/repair threads (tests may drive them by hand).
        close_node: ``close()`` also closes ``node``.
        lock: a ``VolumeLock`` to release on ``close()``.

    Raises:
        ConfigError: the blades hold slabs of this volume with another slab size.
    """

    def __init__(self, node: WorkingNode, name: str, size: int, *,
                 slab_size: int = DEFAULT_SLAB_SIZE, replicas: int = 1, monitor: bool = True,
                 close_node: bool = False, lock: VolumeLock | None = None) -> None:
        if size <= 0 or slab_size <= 0 or replicas < 1:
            raise ValueError("size, slab_size and replicas must be positive")
        self.node = node
        self.name = name
        self.volume_id = name_id(name)
        self.size = size
        self.slab_size = slab_size
        self.replicas = replicas
        self.block_size = BLOCK_SIZE
        self.nslabs = -(-size // slab_size)
        self._close_node = close_node
        self._lock_file = lock
        self._map: list[Slab | None] = [None] * self.nslabs
        self._locks: list[SlabLock | None] = [None] * self.nslabs
        self._dirty = bytearray(self.nslabs)  # written since the last flush (nvm persist)
        self._touched = bytearray(self.nslabs)  # changed since we started (late blades)
        self._zeros = memoryview(bytes(slab_size))  # calloc'd: costs no memory until read
        self._meta = threading.Lock()  # replica lists, orphans, the sets below
        self.degraded: set[int] = set()  # mapped slabs with fewer than `replicas` copies
        self.dead: set[str] = set()  # blades we stopped using
        self.suspects: set[str] = set()  # blades to ping soon
        self.unscanned: set[str] = set()  # blades that did not answer at startup
        self.orphans: list[Orphan] = []
        self.counters = {"maps": 0, "unmaps": 0, "repairs": 0, "migrations": 0,
                         "orphans_freed": 0, "orphans_adopted": 0, "write_failures": 0,
                         "read_failures": 0}
        self.monitor = None
        self._recover()
        if monitor:
            from rallocator.blockdev_health import Monitor

            self.monitor = Monitor(self)
            self.monitor.start()

    @classmethod
    def open(cls, cfg: VolumeConfig, *, monitor: bool = True,
             lock: VolumeLock | None = None) -> BlockVolume:
        """Join the cluster in ``cfg.cluster`` as node ``nbd:<volume>`` and serve the volume.

        Takes the volume's lock unless ``lock`` (already taken) is given.

        Raises:
            ConfigError: bad settings, the volume is served elsewhere, or blades disagree.
            BladeUnreachable, OSError: the cluster cannot be joined at all.
        """
        cfg.validate()
        lock = lock or cfg.lock()
        lock.refresh()
        try:
            node = WorkingNode.from_cluster(cfg.cluster, node_name=node_name_for(cfg.volume),
                                            transport=cfg.transport)
        except BaseException:
            lock.release()
            raise
        try:
            return cls(node, cfg.volume, cfg.size, slab_size=cfg.slab_size,
                       replicas=cfg.replicas, monitor=monitor, close_node=True, lock=lock)
        except BaseException:
            node.close()
            lock.release()
            raise

    def close(self) -> None:
        """Stop the background threads and let go of the cluster. The slabs stay ours: the
        next ``BlockVolume`` of this name serves the same data."""
        if self.monitor is not None:
            self.monitor.stop()
            self.monitor = None
        if self._close_node:
            self.node.close()
        if self._lock_file is not None:
            self._lock_file.release()
            self._lock_file = None

    def __enter__(self) -> BlockVolume:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ================================================================ the data path
    def pread(self, buf: Any, offset: int) -> None:
        """Fill ``buf`` (a writable buffer) with the bytes at ``offset``.

        Raises:
            OSError(EIO): a mapped slab has no readable copy left.
        """
        if type(buf) is not memoryview:
            buf = memoryview(buf)
        n = len(buf)
        S = self.slab_size
        i, within = divmod(offset, S)
        if within + n <= S:
            # The common case, flat: one slab, one copy, mapped (shm): one slice, no lock.
            lk = self._locks[i]
            if lk is None:  # never mapped: zeros
                buf[:] = self._zeros[:n]
                return
            busy = lk.busy
            busy.append(None)
            try:
                if not lk.locked():
                    slab = self._map[i]
                    if slab is None:
                        buf[:] = self._zeros[:n]
                        return
                    reps = slab.replicas
                    if len(reps) == 1:
                        rep = reps[0]
                        shm = rep.link.shm
                        if shm is not None:
                            a = rep.addr + within
                            try:
                                buf[:] = shm.region.buf[a:a + n]
                                return
                            except ValueError:  # link closed: the general path sorts it out
                                pass
            finally:
                busy.pop()
            self._read_slab(i, within, buf)
            return
        pos = 0
        while pos < n:
            chunk = min(n - pos, S - within)
            self._read_slab(i, within, buf[pos:pos + chunk])
            pos += chunk
            i += 1
            within = 0

    def pwrite(self, buf: Any, offset: int, fua: bool = False) -> None:
        """Write ``buf`` at ``offset`` to every copy; with ``fua`` durable (nvm) on return.

        Raises:
            OSError(ENOSPC): a slab had to be mapped and no blade has room.
            OSError(EIO): no copy of a slab took the write.
        """
        if type(buf) is not memoryview:
            buf = memoryview(buf)
        n = len(buf)
        S = self.slab_size
        i, within = divmod(offset, S)
        if within + n <= S:
            # The common case, flat: one slab, one copy, mapped (shm): one slice, no lock.
            lk = self._locks[i]
            if lk is not None and not fua:
                busy = lk.busy
                busy.append(None)
                try:
                    if not lk.locked():
                        slab = self._map[i]
                        if slab is not None:
                            reps = slab.replicas
                            if len(reps) == 1:
                                rep = reps[0]
                                shm = rep.link.shm
                                if shm is not None:
                                    a = rep.addr + within
                                    try:
                                        shm.region.buf[a:a + n] = buf
                                    except ValueError:  # link closed: the general path
                                        pass
                                    else:
                                        self._touched[i] = 1
                                        self._dirty[i] = 1
                                        return
                finally:
                    busy.pop()
            self._write_slab(i, within, buf, fua)
            return
        pos = 0
        while pos < n:
            chunk = min(n - pos, S - within)
            self._write_slab(i, within, buf[pos:pos + chunk], fua)
            pos += chunk
            i += 1
            within = 0

    def _read_slab(self, i: int, within: int, buf: memoryview) -> None:
        lk = self._locks[i]
        if lk is None:  # never mapped: zeros (racing a first write is a race)
            buf[:] = self._zeros[:len(buf)]
            return
        busy = lk.busy
        busy.append(None)
        try:
            if not lk.locked():
                self._read_mapped(i, within, buf)
                return
        finally:
            busy.pop()
        with lk:  # a remap or copy holds the slab: wait for it
            self._read_mapped(i, within, buf)

    def _read_mapped(self, i: int, within: int, buf: memoryview) -> None:
        """Read from the first copy that answers; the caller keeps slab ``i`` from changing."""
        slab = self._map[i]
        if slab is None:  # never written, or trimmed
            buf[:] = self._zeros[:len(buf)]
            return
        for rep in slab.replicas:
            try:
                shm = rep.link.shm
                if shm is not None:
                    shm.read_into(rep.addr + within, buf)
                else:
                    with rep.link.verbs() as v:
                        v.read_into(rep.addr + within, buf)
                return
            except _LINK_ERRORS as e:
                self._read_failed(i, rep, e)
            except ValueError:  # the link was closed under us (shm mapping released)
                if rep.link.shm is not None and not rep.link.dead:
                    raise
                self._read_failed(i, rep, BladeUnreachable("link closed"))
        raise OSError(errno.EIO, f"volume {self.name}: no readable copy of slab {i}")

    def _write_slab(self, i: int, within: int, data: memoryview, fua: bool) -> None:
        lk = self._locks[i]
        if lk is not None:
            busy = lk.busy
            busy.append(None)
            try:
                if not lk.locked():
                    slab = self._map[i]
                    if slab is not None:
                        self._write_replicas(i, slab, within, data, fua)
                        self._touched[i] = 1
                        if not fua:
                            self._dirty[i] = 1
                        return
            finally:
                busy.pop()
        else:
            lk = self._make_lock(i)
        # First write (map it, once however many race here), or a remap or copy holds it.
        lk.acquire_exclusive()
        try:
            slab = self._map[i]
            if slab is None:
                self._map_slab(i, within, data, fua)
            else:
                self._write_replicas(i, slab, within, data, fua)
            if not fua:
                self._dirty[i] = 1
            self._touched[i] = 1
        finally:
            lk.release_exclusive()

    def _write_replicas(self, i: int, slab: Slab, within: int, data: memoryview,
                        fua: bool) -> None:
        ok = 0
        for rep in slab.replicas:
            try:
                shm = rep.link.shm
                if shm is not None:
                    shm.write(rep.addr + within, data, fua)
                else:
                    with rep.link.verbs() as v:
                        v.write(rep.addr + within, data, fua)
                ok += 1
            except _LINK_ERRORS as e:
                self._write_failed(i, slab, rep, e)
            except ValueError:
                if rep.link.shm is not None and not rep.link.dead:
                    raise
                self._write_failed(i, slab, rep, BladeUnreachable("link closed"))
        if not ok:
            raise OSError(errno.EIO, f"volume {self.name}: no copy of slab {i} took the write")

    def _map_slab(self, i: int, within: int, data: memoryview, fua: bool) -> None:
        """Allocate slab ``i`` and write its first data; the caller holds it exclusive."""
        try:
            slab = self.node.allocate_slab(self.slab_size, self.volume_id, i,
                                           replicas=self.replicas, exclude=self._avoid())
        except NoSpace as e:
            raise OSError(errno.ENOSPC, f"volume {self.name}: {e}") from None
        slab.replicas = self._order(slab.replicas)
        # Blades scrub slabs before handing them out again, so a fresh slab reads as
        # zeros: only the data itself needs writing.
        try:
            for rep in slab.replicas:
                with rep.link.verbs() as v:
                    v.write(rep.addr + within, data, fua)
        except _LINK_ERRORS as e:
            log.warning("volume %s: new slab %d could not be written (%s); giving it back",
                        self.name, i, e)
            self.node.free_slab(slab)
            raise OSError(errno.EIO, f"volume {self.name}: slab {i}: {e}") from None
        self._map[i] = slab
        self.counters["maps"] += 1

    def _make_lock(self, i: int) -> SlabLock:
        with self._meta:
            lk = self._locks[i]
            if lk is None:
                lk = self._locks[i] = SlabLock()
            return lk

    def _avoid(self) -> set[str]:
        with self._meta:
            return self.dead | self.suspects

    def _order(self, reps: Iterable[Replica]) -> list[Replica]:
        """Reads try copies in this order: mapped (shm) first, then over tcp."""
        return sorted(reps, key=lambda r: (r.link.shm is None, r.link.name))

    # ---------------------------------------------------------------- failures on the data path
    def _write_failed(self, i: int, slab: Slab, rep: Replica, e: BaseException) -> None:
        """The copy missed a write: it is stale now, drop it; its blade is suspect."""
        log.warning("volume %s: write to slab %d on blade %s failed: %s",
                    self.name, i, rep.link.name, e)
        self.counters["write_failures"] += 1
        self.drop_replica(i, slab, rep)
        self.suspect(rep.link.name)

    def _read_failed(self, i: int, rep: Replica, e: BaseException) -> None:
        log.warning("volume %s: read of slab %d from blade %s failed: %s",
                    self.name, i, rep.link.name, e)
        self.counters["read_failures"] += 1
        if isinstance(e, VerbError):  # the blade refused: this copy is not ours any more
            slab = self._map[i]
            if slab is not None:
                self.drop_replica(i, slab, rep)
        self.suspect(rep.link.name)

    def suspect(self, blade: str) -> None:
        """Have the monitor ping ``blade`` soon (and drop its copies if it is gone)."""
        with self._meta:
            if blade in self.dead:
                return
            self.suspects.add(blade)
        if self.monitor is not None:
            self.monitor.wake()

    def drop_replica(self, i: int, slab: Slab, rep: Replica) -> bool:
        """Stop using one copy of slab ``i`` (remember it to free later)."""
        with self._meta:
            if not any(r is rep for r in slab.replicas):
                return False
            slab.replicas = [r for r in slab.replicas if r is not rep]
            self.orphans.append(Orphan(rep.link.name, rep.unit, rep.addr, i, slab))
            self.degraded.add(i)
            if not slab.replicas:
                log.error("volume %s: slab %d has no copy left; its I/O fails until a copy "
                          "comes back", self.name, i)
        if self.monitor is not None:
            self.monitor.wake()
        return True

    def blade_dead(self, blade: str) -> int:
        """Stop using every copy on ``blade``. Returns how many slabs lost a copy."""
        with self._meta:
            self.dead.add(blade)
            self.suspects.discard(blade)
        self.node.mark_dead(blade)
        lost = 0
        for i, slab in enumerate(self._map):
            if slab is None:
                continue
            for rep in slab.replicas:
                if rep.link.name == blade and self.drop_replica(i, slab, rep):
                    lost += 1
        if lost:
            log.warning("volume %s: blade %s is gone; %d slab(s) lost a copy, re-replicating",
                        self.name, blade, lost)
        return lost

    # ================================================================ flush, trim, zero, extents
    def flush(self) -> None:
        """Make every write acknowledged so far durable (``persist`` on nvm blades).

        Raises:
            OSError(EIO): no copy of some written slab could be persisted.
        """
        dirty = self._dirty
        i = dirty.find(1)
        while i >= 0:
            dirty[i] = 0  # cleared before persisting: a write landing now marks it again
            slab = self._map[i]
            if slab is not None:
                try:
                    self._persist(i, slab, 0, self.slab_size)
                except OSError:
                    dirty[i] = 1  # still not durable: the next flush tries again
                    raise
            i = dirty.find(1, i + 1)

    def _persist(self, i: int, slab: Slab, start: int, length: int) -> None:
        ok = 0
        reps = slab.replicas
        for rep in reps:
            if not rep.link.geometry.mode_nvm:
                ok += 1
                continue
            try:
                with rep.link.verbs() as v:
                    v.persist(rep.addr + start, length)
                ok += 1
            except _LINK_ERRORS as e:
                self._write_failed(i, slab, rep, e)
        if reps and not ok:
            raise OSError(errno.EIO, f"volume {self.name}: slab {i} could not be persisted")

    def trim(self, count: int, offset: int, fua: bool = False) -> None:
        """Give back the slabs ``[offset, offset+count)`` covers whole (they read as zeros
        after); a partial slab is left as is (trim is advisory)."""
        for i, _, _, whole in self._spans(count, offset):
            if whole:
                self._unmap(i)

    def zero(self, count: int, offset: int, may_trim: bool = True, fua: bool = False) -> None:
        """Make ``[offset, offset+count)`` read as zeros: whole slabs are given back (when
        ``may_trim``), partial ones get zeros written (unmapped ones already are zeros)."""
        for i, within, n, whole in self._spans(count, offset):
            if whole and may_trim:
                self._unmap(i)
            elif self._map[i] is not None:  # (n <= slab_size: our zero buffer covers it)
                self.pwrite(self._zeros[:n], i * self.slab_size + within, fua)

    def extents(self, count: int, offset: int, req_one: bool = False) -> list[tuple[int, int, int]]:
        """``(offset, length, type)`` runs over ``[offset, offset+count)``: type 0 for
        mapped data, ``EXTENT_HOLE | EXTENT_ZERO`` for never-written (or freed) space."""
        out: list[tuple[int, int, int]] = []
        for i, within, n, _ in self._spans(count, offset):
            kind = 0 if self._map[i] is not None else EXTENT_HOLE | EXTENT_ZERO
            if out and out[-1][2] == kind:
                start, length, _ = out[-1]
                out[-1] = (start, length + n, kind)
            else:
                if req_one and out:
                    break
                out.append((i * self.slab_size + within, n, kind))
        return out

    def _spans(self, count: int, offset: int) -> Iterable[tuple[int, int, int, bool]]:
        """(slab, offset in it, length, covers the slab's whole used part) per slab."""
        S = self.slab_size
        end = min(offset + count, self.size)
        pos = offset
        while pos < end:
            i, within = divmod(pos, S)
            n = min(end, (i + 1) * S) - pos
            slab_end = min((i + 1) * S, self.size)
            yield i, within, n, within == 0 and pos + n >= slab_end
            pos += n

    def _unmap(self, i: int) -> None:
        lk = self._locks[i]
        if lk is None or self._map[i] is None:
            return
        lk.acquire_exclusive()  # waits for I/O in flight on the slab to finish
        try:
            slab = self._map[i]
            if slab is None:
                return
            self._map[i] = None
            self._dirty[i] = 0
            self._touched[i] = 1
            with self._meta:
                self.degraded.discard(i)
                reps, slab.replicas = slab.replicas, []
        finally:
            lk.release_exclusive()
        self.counters["unmaps"] += 1
        for rep in reps:  # nobody can reach it any more; epochs guard stragglers on the blade
            self.node.free_replica(rep)

    # ================================================================ copies (repair, migration)
    def add_copies(self, i: int, count: int, *, exclude: Iterable[str] = (),
                   drop: str | None = None, scratch: memoryview | None = None) -> bool:
        """Give slab ``i`` ``count`` more copies on blades not in ``exclude`` (and not used
        by it already), copied from a live copy while the slab is held exclusive; then drop
        the copy on blade ``drop`` if given (a migration). Returns False if it could not.

        Raises:
            NoSpace: no blade has room for a copy.
        """
        slab = self._map[i]
        if slab is None or not slab.replicas or count <= 0:
            return False
        avoid = set(exclude) | {r.link.name for r in slab.replicas} | self._avoid()
        extra = self.node.allocate_slab(self.slab_size, self.volume_id, i, replicas=count,
                                        exclude=avoid)
        buf = scratch if scratch is not None else memoryview(bytearray(self.slab_size))
        lk = self._locks[i] or self._make_lock(i)
        lk.acquire_exclusive()
        try:
            if self._map[i] is not slab or not slab.replicas:
                self.node.free_slab(extra)  # trimmed, or lost its last copy, meanwhile
                return False
            if not self._copy(i, slab, extra.replicas, buf):
                self.node.free_slab(extra)
                return False
            gone = None
            with self._meta:
                keep = list(slab.replicas)
                if drop is not None:
                    gone = next((r for r in keep if r.link.name == drop), None)
                    keep = [r for r in keep if r is not gone]
                slab.replicas = self._order(keep + extra.replicas)
                if len(slab.replicas) >= self.replicas:
                    self.degraded.discard(i)
        finally:
            lk.release_exclusive()
        if gone is not None:
            self.node.free_replica(gone)
        return True

    def _copy(self, i: int, slab: Slab, targets: list[Replica], buf: memoryview) -> bool:
        for src in list(slab.replicas):
            try:
                with src.link.verbs() as v:
                    v.read_into(src.addr, buf)
                break
            except _LINK_ERRORS as e:
                self._read_failed(i, src, e)
        else:
            return False
        try:
            for dst in targets:
                with dst.link.verbs() as v:
                    v.write(dst.addr, buf, fua=dst.link.geometry.mode_nvm)
        except _LINK_ERRORS as e:
            log.warning("volume %s: copying slab %d to %s failed: %s",
                        self.name, i, dst.link.name, e)
            self.suspect(dst.link.name)
            return False
        return True

    def adopt(self, orphan: Orphan) -> bool:
        """Take an orphaned copy back if its slab has no other copy (it is then the best
        there is: every write since it was dropped failed). Otherwise free it. Returns True
        if it was taken back."""
        link = self.node.link(orphan.blade)
        rep = Replica(link, orphan.unit, orphan.addr)
        i, slab = orphan.index, orphan.slab
        lk = self._locks[i] or self._make_lock(i)
        lk.acquire_exclusive()
        try:
            with self._meta:
                self.orphans = [o for o in self.orphans if o is not orphan]
                take = self._map[i] is slab and not slab.replicas
                if take:
                    slab.replicas = [rep]
                    if self.replicas > 1:
                        self.degraded.add(i)
        finally:
            lk.release_exclusive()
        if take:
            self.counters["orphans_adopted"] += 1
            log.warning("volume %s: slab %d is back on blade %s", self.name, i, orphan.blade)
        else:
            self.node.free_replica(rep)
            self.counters["orphans_freed"] += 1
        return take

    # ================================================================ recovery
    def _recover(self) -> None:
        """Find the volume's slabs on the blades (after a restart) and map them again."""
        found: dict[int, list[Slab]] = {}
        for name in self.node.blade_addrs:
            for attempt in range(STARTUP_TRIES):  # a blade may be restarting with us
                try:
                    mine = self.node.owned_on(name, self.volume_id)
                    break
                except (BladeUnreachable, OSError) as e:
                    if attempt + 1 < STARTUP_TRIES:
                        time.sleep(0.5)
                        continue
                    log.warning("volume %s: blade %s does not answer (%s); until it does, "
                                "slabs only it holds read as zeros", self.name, name, e)
                    self.unscanned.add(name)
                    mine = []
            for s in mine:
                found.setdefault(s.index, []).append(s)
        for i, copies in sorted(found.items()):
            sizes = {s.size for s in copies}
            if sizes != {self.slab_size}:
                raise ConfigError(f"volume {self.name!r} was made with slab_size="
                                  f"{format_size(min(sizes))}; pass that slab_size")
            reps = [r for s in copies for r in s.replicas]
            if i >= self.nslabs:
                log.warning("volume %s: slab %d lies past the end (size shrank?); left alone",
                            self.name, i)
                continue
            if len(reps) > self.replicas:
                reps = self._majority(i, reps)
            slab = Slab(self.slab_size, self.volume_id, i, self._order(reps))
            self._locks[i] = SlabLock()
            self._map[i] = slab
            if len(reps) < self.replicas:
                self.degraded.add(i)
        if found:
            log.info("volume %s: recovered %d slab(s), %d short of copies", self.name,
                     sum(m is not None for m in self._map), len(self.degraded))

    def _majority(self, i: int, reps: list[Replica]) -> list[Replica]:
        """More copies than wanted (one was dropped, re-replicated, then its blade came back
        while we were down): keep the copies that agree, free the odd ones out."""
        buf = memoryview(bytearray(self.slab_size))
        groups: dict[bytes, list[Replica]] = {}
        for rep in reps:
            try:
                with rep.link.verbs() as v:
                    v.read_into(rep.addr, buf)
            except _LINK_ERRORS:
                continue
            groups.setdefault(hashlib.blake2b(buf, digest_size=16).digest(), []).append(rep)
        if not groups:
            return reps
        best = max(groups.values(), key=len)
        keep = best[:self.replicas]
        for rep in reps:
            if not any(rep is k for k in keep):
                log.warning("volume %s: slab %d: dropping the copy on %s (%s)", self.name, i,
                            rep.link.name, "outvoted" if len(groups) > 1 else "extra")
                self.node.free_replica(rep)
        return keep

    def join_late_blade(self, blade: str) -> int:
        """A blade that did not answer at startup does now: take its copies of slabs that
        nothing has changed since; free the rest (they are stale). Returns copies taken."""
        mine = self.node.owned_on(blade, self.volume_id)
        taken = 0
        for s in mine:
            rep, i = s.replicas[0], s.index
            if s.size != self.slab_size or i >= self.nslabs:
                continue
            lk = self._locks[i] or self._make_lock(i)
            lk.acquire_exclusive()
            try:
                slab = self._map[i]
                use = not self._touched[i] and (slab is None or len(slab.replicas) < self.replicas)
                if use:
                    with self._meta:
                        if slab is None:
                            slab = Slab(self.slab_size, self.volume_id, i, [rep])
                            self._map[i] = slab
                        else:
                            slab.replicas = self._order([*slab.replicas, rep])
                        if len(slab.replicas) < self.replicas:
                            self.degraded.add(i)
                        else:
                            self.degraded.discard(i)
            finally:
                lk.release_exclusive()
            if use:
                taken += 1
            else:
                self.node.free_replica(rep)
        with self._meta:
            self.unscanned.discard(blade)
        log.info("volume %s: blade %s joined late; took %d copy(ies)", self.name, blade, taken)
        return taken

    # ================================================================ introspection
    def is_mapped(self, i: int) -> bool:
        return self._map[i] is not None

    def mapped_slabs(self) -> list[int]:
        return [i for i, s in enumerate(self._map) if s is not None]

    def blades_of(self, i: int) -> list[str]:
        """Names of the blades holding slab ``i``'s copies (reads try them in this order)."""
        slab = self._map[i]
        return [] if slab is None else [r.link.name for r in slab.replicas]

    def stats(self) -> dict[str, Any]:
        with self._meta:
            return {"volume": self.name, "size": self.size, "slab_size": self.slab_size,
                    "replicas": self.replicas, "slabs": self.nslabs,
                    "mapped": sum(s is not None for s in self._map),
                    "degraded": len(self.degraded),
                    "lost": sum(1 for s in self._map if s is not None and not s.replicas),
                    "orphans": len(self.orphans), "dead_blades": sorted(self.dead),
                    **self.counters}

    def wait_healthy(self, timeout: float = 10.0) -> bool:
        """Wait until every mapped slab has all its copies (tests, ``ralloc``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.degraded and not self.suspects:
                return True
            if self.monitor is not None:
                self.monitor.wake()
            time.sleep(0.05)
        return not self.degraded
