"""The working node: borrows slabs from blades (coarse) and carves them up locally (fine).

``WorkingNode`` is what the swap plugin and the filesystem hold. Coarse grain: it picks
blades (the coordinator's hint, else power-of-two choices), runs the allocation protocol on
each replica's blade, frees through the free ring, and finds its slabs again after a restart.
Fine grain: ``allocate(size)`` / ``free(handle)`` are served from partial slabs with no
network round trip (``finegrained.SlabCarver``); only a slab running out or too many empty
slabs touch the network.
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from rallocator.blade_link import BladeLink
from rallocator.cluster_config import ClusterConfig
from rallocator.coordinator_client import CoordinatorClient, CoordinatorUnavailable
from rallocator.finegrained import Handle, SlabCarver
from rallocator.protocol import AllocationFailed, TicketLost, allocate_slab, free_slab
from rallocator.secret import load_secret
from rallocator.verbs import BladeUnreachable
from rallocator.wire import VerbError

log = logging.getLogger("rallocator.node")


class NoSpace(Exception):
    """No blade (or not enough distinct blades) could give a slab."""


def name_id(text: str) -> int:
    """A stable nonzero 64-bit id for a node or volume name."""
    v = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
    return v or 1


@dataclass
class Replica:
    link: BladeLink
    unit: int
    addr: int


@dataclass
class Slab:
    """One logical slab: ``size`` bytes with a copy on each replica's blade."""

    size: int
    volume: int
    index: int
    replicas: list[Replica] = field(default_factory=list)


class WorkingNode:
    """A node's view of the cluster.

    Args:
        blades: (name, address) of the blades it may use.
        secret: the cluster secret.
        node_id: who we are to the blades (owner of our slabs).
        coordinator: host:port, or "" to use power-of-two choices only.
        transport: "auto" (shm where the region is mappable), "tcp" or "shm".
        empty_threshold: empty slabs kept for reuse before they go back to the blade.
    """

    def __init__(self, blades: Sequence[tuple[str, str]], secret: bytes, node_id: int,
                 coordinator: str = "", transport: str = "auto", empty_threshold: int = 8,
                 timeout: float = 10.0) -> None:
        self.secret = secret
        self.node_id = node_id
        self.transport = transport
        self.timeout = timeout
        self.blade_addrs = dict(blades)
        self.coordinator = CoordinatorClient(coordinator, secret, timeout=1.0) if coordinator else None
        self.links: dict[str, BladeLink] = {}
        self._lock = threading.Lock()
        self._making: dict[str, threading.Lock] = {}
        self.carver = SlabCarver(self, empty_threshold=empty_threshold)
        # fine grain, bound straight to the carver: one Python frame less per allocation.
        # allocate(size) -> Handle, served from a partial slab when there is one;
        # free(handle) gives it back (the slab goes home only past the empty threshold).
        self.allocate = self.carver.allocate
        self.free = self.carver.free
        self.rng = random.Random()

    @classmethod
    def from_cluster(cls, directory: str, node_name: str | None = None,
                     **kw: object) -> WorkingNode:
        cfg = ClusterConfig.load(directory)
        secret = load_secret(cfg.secret_file)
        import socket

        node_id = name_id(node_name or f"node:{socket.gethostname()}")
        return cls([(b.name, b.address) for b in cfg.blades], secret, node_id,
                   coordinator=cfg.coordinator, **kw)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ links
    def link(self, name: str) -> BladeLink:
        """The link to blade ``name``, made once: two links would share (and one would give
        away, when closed) this node's epoch slot on that blade."""
        with self._lock:
            link = self.links.get(name)
            if link is not None and not link.dead:
                return link
            making = self._making.setdefault(name, threading.Lock())
        with making:  # one connect per blade at a time; others wait for its result
            with self._lock:
                link = self.links.get(name)
                if link is not None and not link.dead:
                    return link
            link = BladeLink(name, self.blade_addrs[name], self.secret, self.node_id,
                             transport=self.transport, timeout=self.timeout)
            with self._lock:
                old = self.links.get(name)
                self.links[name] = link
        if old is not None:
            old.close()
        return link

    def mark_dead(self, name: str) -> None:
        with self._lock:
            link = self.links.get(name)
        if link is not None:
            link.dead = True

    def close(self) -> None:
        with self._lock:
            links, self.links = list(self.links.values()), {}
        for link in links:
            link.close()

    # ------------------------------------------------------------------ placement
    def choose_blades(self, count: int, size: int, exclude: Iterable[str] = ()) -> list[str]:
        """Blades for ``count`` replicas: the coordinator's hint, else power-of-two choices."""
        excluded = set(exclude)
        if self.coordinator is not None:
            try:
                hint = [n for n, _ in self.coordinator.hint(count, size, excluded)
                        if n in self.blade_addrs and n not in excluded]
                if len(hint) >= count:
                    return hint[:count]
            except CoordinatorUnavailable as e:
                log.debug("no hint (%s); power-of-two choices", e)
        chosen: list[str] = []
        candidates = [n for n in self.blade_addrs if n not in excluded]
        while len(chosen) < count and candidates:
            pair = self.rng.sample(candidates, min(2, len(candidates)))
            best = max(pair, key=self._free_units_or_zero)
            chosen.append(best)
            candidates.remove(best)
        return chosen

    def _free_units_or_zero(self, name: str) -> int:
        try:
            link = self.link(name)
            return link.available_units() * link.geometry.unit_size
        except (BladeUnreachable, OSError):
            return -1

    # ------------------------------------------------------------------ coarse grain
    def allocate_slab(self, size: int, volume: int, index: int, replicas: int = 1,
                      exclude: Iterable[str] = ()) -> Slab:
        """A slab of ``size`` bytes with ``replicas`` copies on distinct blades.

        Raises:
            NoSpace: not enough blades could provide one (any partial copies are freed).
        """
        slab = Slab(size, volume, index)
        tried = set(exclude)
        for _ in range(3 * replicas + 3):
            need = replicas - len(slab.replicas)
            if need == 0:
                return slab
            for name in self.choose_blades(need, size, tried):
                tried.add(name)
                rep = self._allocate_on(name, size, volume, index)
                if rep is not None:
                    slab.replicas.append(rep)
            if not self.choose_blades(1, size, tried) and len(slab.replicas) < replicas:
                break
        if len(slab.replicas) < replicas:
            self.free_slab(slab)
            raise NoSpace(f"wanted {replicas} copies of a {size}-byte slab, "
                          f"found room on {len(slab.replicas)} blade(s)")
        return slab

    def _allocate_on(self, name: str, size: int, volume: int, index: int) -> Replica | None:
        try:
            link = self.link(name)
            cls = link.geometry.class_for_size(size)
            for _ in range(4):
                try:
                    grant = link.run(allocate_slab(link.geometry, cls, self.node_id, volume, index))
                    return Replica(link, grant.unit, grant.addr)
                except (TicketLost, VerbError):
                    continue  # VerbError: the blade refused a step (e.g. a lease ran out)
        except (AllocationFailed, ValueError) as e:  # full, or size class not offered here
            log.debug("blade %s: %s", name, e)
        except (BladeUnreachable, OSError) as e:
            log.warning("blade %s unreachable: %s", name, e)
            self.mark_dead(name)
        return None

    def free_slab(self, slab: Slab) -> None:
        """Give every copy back (best effort: a dead blade's copy goes with it)."""
        for rep in slab.replicas:
            self.free_replica(rep)
        slab.replicas.clear()

    def free_replica(self, rep: Replica) -> None:
        try:
            for _ in range(3):
                try:
                    rep.link.run(free_slab(rep.link.geometry, self.node_id, rep.unit))
                    return
                except (TicketLost, VerbError):
                    continue
        except (BladeUnreachable, OSError) as e:
            log.warning("could not free unit %d on %s: %s", rep.unit, rep.link.name, e)

    def owned_slabs(self, volume: int | None = None) -> dict[int, Slab]:
        """Our slabs on every reachable blade, by logical index (after a restart)."""
        found: dict[tuple[int, int], Slab] = {}
        for name in self.blade_addrs:
            try:
                mine = self.owned_on(name, volume)
            except (BladeUnreachable, OSError) as e:
                log.warning("blade %s unreachable while recovering: %s", name, e)
                continue
            for s in mine:
                slab = found.setdefault((s.volume, s.index), Slab(s.size, s.volume, s.index))
                slab.replicas.extend(s.replicas)
        return {index: slab for (_, index), slab in found.items()}

    def owned_on(self, name: str, volume: int | None = None) -> list[Slab]:
        """Our slabs on one blade, each with that blade's copy as its only replica.

        Raises:
            BladeUnreachable: the blade did not answer (so the caller knows it is unscanned).
        """
        link = self.link(name)
        reply = link.call({"op": "owned", "volume": volume})
        return [Slab(s["size"], s["volume"], s["index"], [Replica(link, s["unit"], s["addr"])])
                for s in reply["slabs"]]

    # ------------------------------------------------------------------ fine grain
    def write(self, handle: Handle, data: bytes | memoryview, offset: int = 0) -> None:
        """Write into an allocation, on every live copy; a copy whose blade fails is
        dropped from the slab (its blade marked dead). Raises BladeUnreachable only if no
        copy took the write, ValueError past the end of the allocation."""
        slab, base, size = self.carver.locate(handle)
        if offset < 0 or offset + len(data) > size:
            raise ValueError("write past the end of the allocation")
        written = 0
        for rep in list(slab.replicas):
            try:
                with rep.link.verbs() as v:
                    v.write(rep.addr + base + offset, data)
                written += 1
            except (BladeUnreachable, OSError) as e:
                log.warning("blade %s lost a write (%s); dropping its copy", rep.link.name, e)
                self.mark_dead(rep.link.name)
                slab.replicas.remove(rep)
        if not written:
            raise BladeUnreachable("no copy of the slab could be written")

    def read(self, handle: Handle, length: int, offset: int = 0) -> bytes:
        """Read from an allocation (from the first copy that answers)."""
        slab, base, size = self.carver.locate(handle)
        if offset < 0 or length < 0 or offset + length > size:
            raise ValueError("read past the end of the allocation")
        last: Exception | None = None
        for rep in slab.replicas:
            try:
                with rep.link.verbs() as v:
                    return v.read(rep.addr + base + offset, length)
            except (BladeUnreachable, OSError) as e:
                last = e
        raise BladeUnreachable(f"no copy readable: {last}")

    def slab_sizes(self) -> list[int]:
        """Slab sizes every blade offers (for the carver's tuner)."""
        sizes: set[int] | None = None
        for name in self.blade_addrs:
            try:
                link = self.link(name)
            except (BladeUnreachable, OSError):
                continue
            g = link.geometry
            mine = {g.slab_bytes(c) for c in range(g.n_classes)}
            sizes = mine if sizes is None else sizes & mine
        return sorted(sizes or [])
