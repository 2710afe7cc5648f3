"""One process of an allocation storm against one blade (run by tests/test_blade_storm.py).

    python tests/storm_worker.py --address H:P --secret-file F --mode node|link \
        --transport tcp|shm --threads N --seconds S --name X --out result.json

``node`` mode: one WorkingNode (one node id) shared by every thread. ``link`` mode: each
thread its own BladeLink (its own node id) running the sans-IO protocol directly.
Each thread allocates and frees at random, stamps every slab it gets with (node, serial) and
checks the stamp is intact before freeing it. The result file lists, per node id, every
grant as [unit, units, t_granted, t_free_started or null] (CLOCK_MONOTONIC, comparable
across processes) and the slabs still held at the end, which the worker does not free.
"""

from __future__ import annotations

import argparse
import json
import random
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rallocator.blade_link import BladeLink  # noqa: E402
from rallocator.node import NoSpace, WorkingNode, name_id  # noqa: E402
from rallocator.protocol import (  # noqa: E402
    AllocationFailed,
    BladeFull,
    TicketLost,
    allocate_slab,
    free_slab,
)
from rallocator.secret import load_secret  # noqa: E402
from rallocator.wire import VerbError  # noqa: E402

STAMP = struct.Struct("<QQ")
VOLUME = name_id("storm-volume")


class Holder:
    """A held slab and how to reach it, whichever API handed it out."""

    def __init__(self, unit: int, units: int, addr: int, size: int, link: BladeLink,
                 serial: int, slab: Any = None) -> None:
        self.unit, self.units, self.addr, self.size = unit, units, addr, size
        self.link, self.serial, self.slab = link, serial, slab
        self.record: list[Any] = []


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--address", required=True)
    p.add_argument("--secret-file", required=True)
    p.add_argument("--mode", choices=("node", "link"), required=True)
    p.add_argument("--transport", choices=("tcp", "shm"), required=True)
    p.add_argument("--threads", type=int, default=3)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--hold", type=int, default=4)
    p.add_argument("--name", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    secret = load_secret(args.secret_file)
    lock = threading.Lock()
    results: dict[str, dict[str, Any]] = {}
    counters = {"grants": 0, "frees": 0, "full": 0, "lost": 0, "stamp_errors": 0,
                "verb_errors": 0, "other_errors": 0}
    errors: list[str] = []
    start = threading.Barrier(args.threads)
    shared: WorkingNode | None = None
    if args.mode == "node":
        shared = WorkingNode([("b", args.address)], secret, name_id(args.name),
                             transport=args.transport)
        # connect once before the threads start: WorkingNode.link() is check-then-create,
        # so racing threads would each open (and register) a link of their own — see
        # test_blade_epochs.py::test_reconnect_does_not_give_away_the_nodes_epoch_slot
        shared.link("b")

    def count(key: str, detail: str = "") -> None:
        with lock:
            counters[key] += 1
            if detail and len(errors) < 20:
                errors.append(detail)

    def thread(i: int) -> None:
        rng = random.Random(f"{args.name}-{i}")
        link: BladeLink | None = None
        if shared is not None:
            node_id = shared.node_id
        else:
            node_id = name_id(f"{args.name}-{i}")
            link = BladeLink("b", args.address, secret, node_id, transport=args.transport)
        entry = results.setdefault(str(node_id), {"grants": [], "live": []})
        held: list[Holder] = []
        serial = 0
        start.wait()
        deadline = time.monotonic() + args.seconds
        while time.monotonic() < deadline:
            if len(held) < args.hold and rng.random() < 0.6:
                units = 1 if rng.random() < 0.8 else 4
                serial += 1
                try:
                    if shared is not None:
                        slab = shared.allocate_slab(units << 20, VOLUME, i << 32 | serial)
                        rep = slab.replicas[0]
                        h = Holder(rep.unit, units, rep.addr, slab.size, rep.link, serial, slab)
                    else:
                        assert link is not None
                        g = link.run(allocate_slab(link.geometry, 0 if units == 1 else 1,
                                                   node_id, VOLUME, i << 32 | serial))
                        h = Holder(g.unit, units, g.addr, g.size, link, serial)
                except NoSpace:
                    count("full")
                    continue
                except BladeFull:
                    count("full")
                    continue
                except TicketLost:
                    count("lost")
                    continue
                h.record = [h.unit, units, time.monotonic(), None]
                with lock:
                    entry["grants"].append(h.record)
                count("grants")
                try:
                    with h.link.verbs() as v:
                        v.write(h.addr, STAMP.pack(node_id, serial))
                        v.write(h.addr + h.size - 16, STAMP.pack(node_id, serial))
                except VerbError as e:
                    count("verb_errors", f"stamp write unit {h.unit}: {e}")
                held.append(h)
            elif held:
                h = held.pop(rng.randrange(len(held)))
                try:
                    with h.link.pin(), h.link.verbs() as v:
                        head = STAMP.unpack(v.read(h.addr, 16))
                        tail = STAMP.unpack(v.read(h.addr + h.size - 16, 16))
                    if head != (node_id, h.serial) or tail != (node_id, h.serial):
                        count("stamp_errors", f"unit {h.unit}: stamp {head} {tail}, want "
                                              f"{(node_id, h.serial)}")
                except VerbError as e:
                    count("verb_errors", f"stamp read unit {h.unit}: {e}")
                h.record[3] = time.monotonic()
                if shared is not None:
                    shared.free_slab(h.slab)
                else:
                    assert link is not None
                    for _ in range(3):
                        try:
                            link.run(free_slab(link.geometry, node_id, h.unit))
                            break
                        except AllocationFailed:
                            continue
                    else:
                        count("other_errors", f"free of unit {h.unit} kept failing")
                count("frees")
        with lock:
            entry["live"].extend([h.unit, h.units] for h in held)
        if link is not None:
            link.close()

    def guarded(i: int) -> None:
        try:
            thread(i)
        except Exception as e:  # report, never hang the barrier-less tail
            count("other_errors", f"thread {i}: {type(e).__name__}: {e}")
            start.abort()

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(args.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if shared is not None:
        shared.close()
    Path(args.out).write_text(json.dumps({"nodes": results, "counters": counters,
                                          "errors": errors}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
