"""ralloc bench alloc: what the two-level design buys, measured against the naive one.

    ralloc bench alloc --cluster DIR [--json] [--ops N] [--slabs N]

Four numbers from one run against the same blade:

* ``two_level_ops_per_s``: allocate+free pairs (sizes 64 B .. 4 KiB) through the working
  node's fine-grained allocator (partial slabs, no network round trip per allocation);
* ``rpc_per_alloc_ops_per_s``: the same pairs in the design the seeds warn about, where
  every allocate and every free is a round trip to the blade. It is measured as a bare
  ``call`` round trip each (the blade does no work at all), so it is an *upper bound* for
  that design and the ratio we report is conservative;
* ``slab_alloc_tcp_per_s`` / ``slab_alloc_shm_per_s``: whole-slab allocations through the
  RAllocator protocol on each transport.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

from rallocator.cluster_config import ClusterConfig, ClusterConfigError
from rallocator.node import NoSpace, WorkingNode
from rallocator.secret import SecretError, load_secret


def _node(cfg: ClusterConfig, blade: tuple[str, str], transport: str, name: str) -> WorkingNode:
    from rallocator.node import name_id

    return WorkingNode([blade], load_secret(cfg.secret_file), name_id(name),
                       coordinator="", transport=transport)


def bench_two_level(node: WorkingNode, sizes: list[int], batch: int = 512) -> float:
    node.free(node.allocate(64))  # warm: first slab fetched
    ops = 0
    t0 = time.perf_counter()
    i = 0
    while i < len(sizes):
        handles = [node.allocate(s) for s in sizes[i:i + batch]]
        for h in handles:
            node.free(h)
        ops += len(handles)
        i += batch
    return ops / (time.perf_counter() - t0)


def bench_rpc_per_alloc(node: WorkingNode, sizes: list[int]) -> float:
    link = next(iter(node.links.values()))
    with link.tcp() as conn:
        t0 = time.perf_counter()
        for s in sizes:
            conn.call({"op": "ping", "size": s})  # allocate
            conn.call({"op": "ping"})  # free
        return len(sizes) / (time.perf_counter() - t0)


def bench_slab_alloc(node: WorkingNode, size: int, count: int, rounds: int = 3) -> float:
    best = 0.0
    for r in range(rounds):
        slabs = []
        t0 = time.perf_counter()
        try:
            for i in range(count):
                slabs.append(node.allocate_slab(size, volume=0xB3, index=r * count + i))
        except NoSpace:
            pass
        dt = time.perf_counter() - t0
        if slabs:
            best = max(best, len(slabs) / dt)
        for s in slabs:
            node.free_slab(s)
        time.sleep(0.2)  # let epochs pass so the blade reclaims before the next round
    return best


def run(cluster_dir: str, ops: int, slabs: int) -> dict[str, object]:
    cfg = ClusterConfig.load(cluster_dir)
    if not cfg.blades:
        raise ClusterConfigError(f"no blades in {cluster_dir}")
    blade = (cfg.blades[0].name, cfg.blades[0].address)
    rng = random.Random(1)
    sizes = [rng.choice((64, 128, 256, 512, 1024, 2048, 4096)) for _ in range(ops)]
    result: dict[str, object] = {"blade": blade[0], "ops": ops}
    tcp = _node(cfg, blade, "tcp", "bench-tcp")
    try:
        tcp.link(blade[0])
        slab = tcp.links[blade[0]].geometry.slab_bytes(0)
        result["slab_size"] = slab
        result["two_level_ops_per_s"] = bench_two_level(tcp, sizes)
        result["rpc_per_alloc_ops_per_s"] = bench_rpc_per_alloc(tcp, sizes[: max(200, ops // 50)])
        result["slab_alloc_tcp_per_s"] = bench_slab_alloc(tcp, slab, slabs)
    finally:
        tcp.close()
    shm = _node(cfg, blade, "shm", "bench-shm")
    try:
        result["slab_alloc_shm_per_s"] = bench_slab_alloc(shm, slab, slabs)
    finally:
        shm.close()
    result["two_level_vs_rpc"] = result["two_level_ops_per_s"] / result["rpc_per_alloc_ops_per_s"]  # type: ignore[operator]
    result["shm_vs_tcp"] = result["slab_alloc_shm_per_s"] / result["slab_alloc_tcp_per_s"]  # type: ignore[operator]
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ralloc bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    a = sub.add_parser("alloc", help="allocation throughput: two-level vs per-allocation RPC, "
                                     "tcp vs shm")
    a.add_argument("--cluster", required=True, metavar="DIR")
    a.add_argument("--json", action="store_true", help="print one JSON object")
    a.add_argument("--ops", type=int, default=50000, help="allocate+free pairs (default 50000)")
    a.add_argument("--slabs", type=int, default=32, help="slabs per round (default 32)")
    args = p.parse_args(argv)
    try:
        res = run(args.cluster, args.ops, args.slabs)
    except (ClusterConfigError, SecretError, ValueError) as e:
        print(f"ralloc bench: {e}", file=sys.stderr)
        return 2
    except (OSError, NoSpace) as e:
        print(f"ralloc bench: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:28} {v:,.1f}" if isinstance(v, float) else f"{k:28} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
