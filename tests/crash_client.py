"""The client side of tests/test_blade_nvm_crash.py: an alloc/free storm that writes down
what it was told, so a test can check the blade kept its word across kill -9.

    python tests/crash_client.py --secret-file F --log-dir D [--transports tcp,shm] ...

It imports, then waits for ``GO host:port`` on stdin (so the test can start it while the
blade is still recovering). It outlives blade crashes: a thread whose blade is gone
reconnects to the same address and adopts what the blade says it owns (a test freezes the
client with SIGSTOP while it inspects the blade, so that inspection sees a quiet node). Each thread is one node (``crash-node-K``) with its own log
``D/nodeK.log``, one line per event, flushed before the next verb:

    R                    adoption starts: the blade's word follows as A lines...
    K                    ...and is complete: from here on, that is all the node owns
    A unit units index   an allocation was acknowledged (or adopted): the slab is ours
    S index              allocation started (in flight until A or X)
    X index              allocation failed cleanly (BladeFull / TicketLost): not ours
    F unit               free started (uncertain until D or U)
    D unit               free acknowledged: not ours any more
    U unit               free failed cleanly (TicketLost): still ours
    E reason             the thread stopped (blade gone)

Prints ``RUNNING`` once every thread has adopted its slabs and starts the storm.
"""

from __future__ import annotations

import argparse
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rallocator.blade_link import BladeLink  # noqa: E402
from rallocator.node import name_id  # noqa: E402
from rallocator.protocol import (  # noqa: E402
    AllocationFailed,
    TicketLost,
    allocate_slab,
    free_slab,
)
from rallocator.secret import load_secret  # noqa: E402

VOLUME = name_id("crash-volume")


def node_id(k: int) -> int:
    return name_id(f"crash-node-{k}")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--secret-file", required=True)
    p.add_argument("--log-dir", required=True)
    p.add_argument("--transports", default="tcp,shm")
    p.add_argument("--hold", type=int, default=6)
    p.add_argument("--min-hold", type=float, default=0.1,
                   help="seconds a slab is held before it may be freed")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    secret = load_secret(args.secret_file)
    line = sys.stdin.readline().split()
    if len(line) != 2 or line[0] != "GO":
        return 0
    address = line[1]
    transports = args.transports.split(",")
    ready = threading.Barrier(len(transports) + 1)

    def thread(k: int, transport: str) -> None:
        rng = random.Random(args.seed * 1000 + k)
        me = node_id(k)
        log = open(Path(args.log_dir) / f"node{k}.log", "a", buffering=1)  # noqa: SIM115

        def note(text: str) -> None:
            log.write(text + "\n")
            log.flush()

        first = True
        while True:  # one pass per blade incarnation: connect, adopt, storm until it dies
            try:
                link = BladeLink("b", address, secret, me, transport=transport, timeout=3.0)
            except Exception:
                time.sleep(0.05)
                continue
            try:
                geo = link.geometry
                held: dict[int, float] = {}
                note("R")
                for s in link.call({"op": "owned"})["slabs"]:
                    note(f"A {s['unit']} {s['size'] // geo.unit_size} {s['index']}")
                    held[s["unit"]] = 0.0
                note("K")
                if first:
                    first = False
                    ready.wait()
                storm(link, geo, held, rng, me, note)
            except threading.BrokenBarrierError:
                return
            except Exception as e:  # the blade went away: reconnect when it is back
                note(f"E {type(e).__name__}")
            link.dead = True  # no goodbye write to a dead blade
            try:
                link.close()
            except Exception:
                pass
            time.sleep(0.02)

    def storm(link: BladeLink, geo: Any, held: dict[int, float], rng: random.Random, me: int,
              note: Any) -> None:
        while True:
            now = time.monotonic()
            ripe = [u for u, t in held.items() if now - t >= args.min_hold]
            if len(held) < args.hold and (rng.random() < 0.55 or not ripe):
                c = 0 if rng.random() < 0.75 else 1
                index = rng.getrandbits(40)
                note(f"S {index}")
                try:
                    g = link.run(allocate_slab(geo, c, me, VOLUME, index))
                except AllocationFailed:
                    note(f"X {index}")
                    time.sleep(0.005)
                    continue
                note(f"A {g.unit} {geo.class_units[c]} {index} t{g.ticket}")
                held[g.unit] = time.monotonic()
            elif ripe:
                unit = rng.choice(ripe)
                note(f"F {unit}")
                for _ in range(3):
                    try:
                        f = link.run(free_slab(geo, me, unit))
                        note(f"D {unit} f{f}")
                        del held[unit]
                        break
                    except TicketLost:
                        continue
                else:
                    note(f"U {unit}")
            else:
                time.sleep(0.005)

    threads = [threading.Thread(target=thread, args=(k, t), daemon=True)
               for k, t in enumerate(transports)]
    for t in threads:
        t.start()
    try:
        ready.wait()
        print("RUNNING", flush=True)
    except threading.BrokenBarrierError:
        print("FAILED", flush=True)
    for t in threads:
        t.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
