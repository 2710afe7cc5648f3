"""An allocation storm against one real slabd: several processes, several threads each, over
both transports. No unit may ever be handed to two holders at once, and the blade's owner
table must end up saying exactly what the nodes believe they hold."""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest
from blade_helpers import PYTHON, REPO, SlabdPool

from rallocator.blade_link import BladeLink
from rallocator.node import name_id
from rallocator.protocol import AllocationFailed, allocate_slab, free_slab
from rallocator.region import Region
from slabd.blade import B_FREEING, B_OWNED, Blade

STORM_SECONDS = 3.0
# (mode, transport, threads): WorkingNode shared by threads, or a BladeLink per thread
WORKERS = [("node", "tcp", 3), ("node", "shm", 3), ("link", "tcp", 2), ("link", "shm", 2)]


@pytest.fixture
def pool(tmp_path: Path) -> Any:
    with SlabdPool(tmp_path) as p:
        yield p


def run_storm(pool: SlabdPool, blade: Any, tmp_path: Path, workers: list[tuple[str, str, int]],
              seconds: float, hold: int = 4) -> list[dict[str, Any]]:
    procs = []
    for k, (mode, transport, threads) in enumerate(workers):
        out = tmp_path / f"worker{k}.json"
        argv = [PYTHON, str(REPO / "tests" / "storm_worker.py"), "--address", blade.address,
                "--secret-file", str(pool.secret_file), "--mode", mode, "--transport",
                transport, "--threads", str(threads), "--seconds", str(seconds),
                "--hold", str(hold), "--name", f"storm-{k}", "--out", str(out)]
        log = (tmp_path / f"worker{k}.log").open("w")
        procs.append((pool.spawn(argv, stdout=log, stderr=log), out, tmp_path / f"worker{k}.log"))
    results = []
    for p, out, log in procs:
        rc = p.wait(timeout=seconds + 40)
        assert rc == 0, f"worker failed: {log.read_text()[-2000:]}"
        results.append(json.loads(out.read_text()))
    return results


def check_storm(pool: SlabdPool, blade: Any, results: list[dict[str, Any]],
                extra_allocs: int = 0) -> dict[str, int]:
    totals: Counter[str] = Counter()
    live: dict[int, set[tuple[int, int]]] = defaultdict(set)  # node -> {(unit, units)}
    grants_by_unit: dict[int, list[tuple[float, float, int]]] = defaultdict(list)
    for r in results:
        totals.update(r["counters"])
        assert not r["errors"], r["errors"]
        for node, entry in r["nodes"].items():
            for unit, units in entry["live"]:
                live[int(node)].add((unit, units))
            for unit, units, t0, t1 in entry["grants"]:
                for u in range(unit, unit + units):
                    grants_by_unit[u].append((t0, float("inf") if t1 is None else t1, int(node)))
    assert totals["stamp_errors"] == 0 and totals["verb_errors"] == 0
    assert totals["other_errors"] == 0
    # 1. live slabs never share a unit
    covered = Counter(u for slabs in live.values() for unit, n in slabs
                      for u in range(unit, unit + n))
    assert [u for u, k in covered.items() if k > 1] == []
    # 2. nor did any two holds overlap in time (grant .. free started is inside the real hold)
    for u, spans in grants_by_unit.items():
        spans.sort()
        for (_, a1, na), (b0, _, nb) in zip(spans, spans[1:], strict=False):
            assert b0 >= a1, f"unit {u} granted to {nb:x} at {b0} while {na:x} held it until {a1}"
    # 3. the blade's owner table says the same, node by node
    for node, slabs in live.items():
        with _conn(pool, blade, node) as v:
            reply = v.call({"op": "owned"})
        got = {(s["unit"], s["size"] >> 20) for s in reply["slabs"]}
        assert got == slabs, f"node {node:x}: blade says {sorted(got)}, node holds {sorted(slabs)}"
        assert all(s["volume"] == name_id("storm-volume") for s in reply["slabs"])
    with _conn(pool, blade, 0x5EE) as v:
        stats = v.call({"op": "stats"})
    assert stats["slabs_owned"] == sum(len(s) for s in live.values())
    assert stats["allocs"] == totals["grants"] + extra_allocs, \
        "the blade committed grants nobody got"
    assert totals["grants"] >= 60, f"the storm hardly ran: {dict(totals)}"
    return dict(totals)


class _conn:
    """A TcpVerbs as a context manager."""

    def __init__(self, pool: SlabdPool, blade: Any, node: int) -> None:
        self.v = pool.connect(blade, node)

    def __enter__(self) -> Any:
        return self.v

    def __exit__(self, *exc: object) -> None:
        self.v.close()


def check_region_after_stop(blade: Any, results: list[dict[str, Any]]) -> None:
    """Stop the blade cleanly and read its region cold: bitmap == owner table, owners as held."""
    assert blade.stop() == 0
    region = Region.open(str(blade.region))
    try:
        b = Blade(region)
        report = b.recover()
        assert report["clean"] == 1 and report["torn"] == 0 and report["bitmap_fixed"] == 0
        assert b.check_consistency() == []
        held = sum(n for r in results for e in r["nodes"].values() for _, n in e["live"])
        freeing = sum(b.geo.class_units[b.heads[u].size_class] for u in b.freeing)
        assert b.busy.count(B_OWNED) == held
        assert b.busy.count(B_FREEING) == freeing
        for r in results:
            for node, entry in r["nodes"].items():
                assert {(s.unit, b.geo.class_units[s.size_class]) for s in b.owned_by(int(node))} \
                    == {tuple(x) for x in entry["live"]}
    finally:
        region.close()


def test_storm_tcp_and_shm_no_unit_handed_out_twice(pool, tmp_path):
    blade = pool.start("b", shm=True, capacity="96M", lease=2)
    results = run_storm(pool, blade, tmp_path, WORKERS, STORM_SECONDS)
    totals = check_storm(pool, blade, results)
    assert totals["frees"] >= 20
    check_region_after_stop(blade, results)


def test_storm_on_a_nearly_full_blade(pool, tmp_path):
    """Little room: most allocations race for the last units and many fail; the ones that
    succeed must still be exclusive (this is where the blade voids other classes' stock)."""
    blade = pool.start("b", shm=True, capacity="24M", lease=1)
    workers = [("link", "tcp", 3), ("link", "shm", 3)]
    results = run_storm(pool, blade, tmp_path, workers, 2.5, hold=5)
    # the storm is over and most slabs were given back: a newcomer gets one promptly
    link = BladeLink("b", blade.address, pool.secret, 0x1A7E, transport="tcp")
    try:
        deadline = time.monotonic() + 2 + 3.0
        attempts = 0
        while True:
            attempts += 1
            try:
                g = link.run(allocate_slab(link.geometry, 0, link.node_id, 1, attempts))
                break
            except AllocationFailed:
                if time.monotonic() > deadline:
                    with _conn(pool, blade, 0x5EE) as v:
                        stats = v.call({"op": "stats"})
                    pytest.fail(f"no slab for a newcomer 5s after the storm ({attempts} tries; "
                                f"blade {stats})")
                time.sleep(0.1)
        link.run(free_slab(link.geometry, link.node_id, g.unit))
    finally:
        link.close()
    totals = check_storm(pool, blade, results, extra_allocs=1)
    assert totals["full"] > 0, "the blade never filled up; the test is not testing that"
    check_region_after_stop(blade, results)
