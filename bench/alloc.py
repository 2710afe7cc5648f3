"""Allocation throughput (issue: two-level >= 100x per-allocation RPC; shm >= 3x tcp)."""

from __future__ import annotations

import json

from bench.common import cluster, ralloc, save


def run() -> dict:
    with cluster("--blades", "1", "--capacity", "512M") as d:
        out = ralloc("bench", "alloc", "--cluster", d, "--json", "--ops", "200000").stdout
    res = json.loads(out)
    res["targets"] = {"two_level_vs_rpc": 100.0, "shm_vs_tcp": 3.0}
    save("alloc", res)
    return res


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
