"""kill -9 an nvm blade in the middle of an alloc/free storm, again and again.

Each round: slabd recovers the region left by the previous kill; the test checks, before any
client touches it, that every slab a node was told it owns (and did not start to free) is
still that node's, that nothing is owned that the node could not know about, and that the
bitmap equals the owner table; then a client storms it (one node over tcp, one over shm,
each logging what it was told, flushed line by line) until both are killed at a random
moment. At the end everything is given back and, after the lease, nothing is leaked.

RALLOC_SOAK=1 runs 200 rounds instead of 20; RALLOC_CRASH_SEED picks the kill timings.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from blade_helpers import PYTHON, REPO, SlabdPool, wait_for
from crash_client import VOLUME, node_id

from rallocator.blade_link import BladeLink
from rallocator.protocol import free_slab
from rallocator.region import Region
from slabd.blade import B_FREEING, B_OWNED, B_RESERVED, Blade

ROUNDS = 200 if os.environ.get("RALLOC_SOAK") == "1" else 20
SEED = int(os.environ.get("RALLOC_CRASH_SEED", str(random.randrange(1 << 30))))
TRANSPORTS = ("tcp", "shm")
LEASE = 1.0
UNIT = 64 << 10


@dataclass
class NodeLog:
    """What one node was told, replayed from its log."""

    owned: dict[int, tuple[int, int]] = field(default_factory=dict)  # unit -> (units, index)
    freeing: set[int] = field(default_factory=set)  # free started, outcome unknown
    inflight: set[int] = field(default_factory=set)  # allocation indices started
    events: int = 0

    @classmethod
    def read(cls, path: Path) -> NodeLog:
        log = cls()
        adopting: dict[int, tuple[int, int]] | None = None
        if not path.exists():
            return log
        for line in path.read_text().splitlines():
            parts = line.split()
            if not parts:
                continue
            log.events += 1
            kind, rest = parts[0], [int(x) for x in parts[1:] if x.isdigit()]
            if kind == "R":  # adoption: counts only once complete (K)
                adopting = {}
            elif kind == "K":
                log.owned = adopting
                log.freeing.clear()
                log.inflight.clear()
                adopting = None
            elif kind == "A" and adopting is not None:
                unit, units, index = rest[:3]
                adopting[unit] = (units, index)
            elif kind == "A":
                unit, units, index = rest[:3]
                log.owned[unit] = (units, index)
                log.inflight.discard(index)
                log.freeing.discard(unit)
            elif kind == "E":
                adopting = None
            elif kind == "S":
                log.inflight.add(rest[0])
            elif kind == "X":
                log.inflight.discard(rest[0])
            elif kind == "F":
                log.freeing.add(rest[0])
            elif kind == "D":
                log.owned.pop(rest[0], None)
                log.freeing.discard(rest[0])
            elif kind == "U":
                log.freeing.discard(rest[0])
        return log

    def check(self, blade_says: dict[int, tuple[int, int]], who: str) -> None:
        """The blade's owner list for this node against what the node knows."""
        for unit, (units, index) in self.owned.items():
            if unit in self.freeing:
                continue
            assert blade_says.get(unit) == (units, index), \
                f"{who}: acked slab {unit} ({units} units, index {index}) lost: blade says " \
                f"{blade_says.get(unit)}"
        for unit, (units, index) in blade_says.items():
            known = self.owned.get(unit) == (units, index) or index in self.inflight
            assert known, f"{who}: blade says the node owns unit {unit} (index {index}), " \
                          f"which it never acknowledged (or had freed)"


def owned_live(pool: SlabdPool, blade: Any, node: int) -> dict[int, tuple[int, int]]:
    v = pool.connect(blade, node)
    try:
        slabs = v.call({"op": "owned"})["slabs"]
    finally:
        v.close()
    assert all(s["volume"] == VOLUME for s in slabs)
    return {s["unit"]: (s["size"] // UNIT, s["index"]) for s in slabs}


def check_cold_copy(region_path: Path, scratch: Path, logs: list[NodeLog], rnd: Any) -> None:
    """Recover a copy of the crashed region in-process (injected clock): bitmap == owner
    table, owners as logged, and after the lease every unit is owned, freeing, or stocked
    for a ticket nobody has taken."""
    shutil.copyfile(region_path, scratch)
    region = Region.open(str(scratch))
    try:
        now = [0.0]
        b = Blade(region, lease=LEASE, clock=lambda: now[0])
        b.recover()
        assert b.check_consistency() == [], f"round {rnd}: bitmap != owner table"
        for k, log in enumerate(logs):
            mine = {s.unit: (b.geo.class_units[s.size_class], s.index)
                    for s in b.owned_by(node_id(k))}
            log.check(mine, f"round {rnd}, node {k} (cold copy)")
        g = b.geo

        def taken_tickets() -> list[int]:
            return [t for c in range(g.n_classes) for t in b.pending[c]
                    if t < region.load(g.seq_addr(c))]

        # tickets taken while the blade was down are stocked now and leased from now on
        for _ in range(20):
            now[0] += LEASE + 1
            b.tick()
            if not taken_tickets():
                break
        assert taken_tickets() == [], f"round {rnd}: taken tickets outlived their lease"
        untaken = sum(g.class_units[c] for c in range(g.n_classes) for _ in b.pending[c])
        assert b.busy.count(B_RESERVED) == untaken, f"round {rnd}: reserved units leaked"
        heads = sum(g.class_units[s.size_class] for s in b.heads.values())
        assert b.busy.count(B_OWNED) + b.busy.count(B_FREEING) == heads, \
            f"round {rnd}: units in use that no owner entry accounts for"
        assert b.check_consistency() == []
    finally:
        region.close()
        scratch.unlink()


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[SlabdPool]:
    with SlabdPool(tmp_path) as p:
        yield p


def start_client(pool: SlabdPool, logdir: Path, rnd: int) -> subprocess.Popen[str]:
    return pool.spawn([PYTHON, str(REPO / "tests" / "crash_client.py"), "--secret-file",
                       str(pool.secret_file), "--log-dir", str(logdir), "--transports",
                       ",".join(TRANSPORTS), "--seed", str(SEED + rnd)],
                      stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                      stderr=(logdir / "client.err").open("a"), text=True)


@pytest.mark.soak
def test_kill9_storm_keeps_every_acked_slab_and_leaks_nothing(pool, tmp_path):
    rng = random.Random(SEED)
    logdir = tmp_path / "logs"
    logdir.mkdir()
    blade = pool.blade("b", capacity="4M", mode="nvm", lease=LEASE,
                       extra=("--unit-size", "64K", "--slab-sizes", "64K,256K"))
    scratch = tmp_path / "copy.region"
    client = start_client(pool, logdir, 0)  # imports while the blade starts
    events = 0
    for rnd in range(ROUNDS):
        blade.start()
        logs = [NodeLog.read(logdir / f"node{k}.log") for k in range(len(TRANSPORTS))]
        for k, log in enumerate(logs):
            log.check(owned_live(pool, blade, node_id(k)), f"round {rnd}, node {k} (seed {SEED})")
        assert client.stdin is not None and client.stdout is not None
        if rnd == 0:
            client.stdin.write(f"GO {blade.address}\n")
            client.stdin.flush()
            assert client.stdout.readline().strip() == "RUNNING", \
                f"client did not start: {(logdir / 'client.err').read_text()[-1500:]}"
        else:
            client.send_signal(signal.SIGCONT)
        time.sleep(rng.uniform(0.1, 0.5))
        blade.kill()
        time.sleep(rng.choice([0.0, 0.0, rng.uniform(0.0, 0.05)]))  # shm node may go on
        client.send_signal(signal.SIGSTOP)
        time.sleep(0.02)  # let the stop land
        logs = [NodeLog.read(logdir / f"node{k}.log") for k in range(len(TRANSPORTS))]
        check_cold_copy(blade.region, scratch, logs, rnd)
        events = sum(log.events for log in logs)
    client.kill()
    client.wait(timeout=10)
    assert events > 40 * ROUNDS / 20, f"the storm hardly ran ({events} events)"
    # the end: recover once more, give everything back, and wait out lease + epochs
    blade.start()
    logs = [NodeLog.read(logdir / f"node{k}.log") for k in range(len(TRANSPORTS))]
    links = [BladeLink("b", blade.address, pool.secret, node_id(k), transport="tcp")
             for k in range(len(TRANSPORTS))]
    try:
        for k, link in enumerate(links):
            mine = owned_live(pool, blade, node_id(k))
            logs[k].check(mine, f"final, node {k} (seed {SEED})")
            for unit in mine:
                link.run(free_slab(link.geometry, link.node_id, unit))
    finally:
        for link in links:
            link.close()
    v = pool.connect(blade, 0x57A7)
    try:

        def settled() -> bool:
            s = v.call({"op": "stats"})
            return s["slabs_used"] == 0 and s["slabs_freeing"] == 0

        assert wait_for(settled, LEASE + 5.0, 0.1), \
            f"not everything came back after lease and epochs: {v.call({'op': 'stats'})}"
    finally:
        v.close()
    assert blade.stop() == 0
    # cold: nothing owned, and every reserved unit is stock for a ticket nobody took
    check_cold_copy(blade.region, scratch, [NodeLog() for _ in TRANSPORTS], "final")
