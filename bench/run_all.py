"""make bench: run every benchmark in this folder, then write the tables into RESULTS.md.

Each benchmark module has ``run() -> dict`` and saves bench/out/NAME.json; ratios against
baselines measured in the same run are what RESULTS.md reports (these machines are noisy).
"""

from __future__ import annotations

import importlib
import sys
import time
import traceback

from bench.common import machine

BENCHES = ["alloc", "nbd_fio", "swap_workload", "fuse_mmap"]


def main() -> int:
    print(f"machine: {machine()}")
    failed = []
    for name in BENCHES:
        try:
            mod = importlib.import_module(f"bench.{name}")
        except ModuleNotFoundError:
            print(f"[{name}] not present, skipped")
            continue
        t0 = time.monotonic()
        try:
            res = mod.run()
            print(f"[{name}] done in {time.monotonic() - t0:.0f}s: {res}")
        except Exception:
            traceback.print_exc()
            failed.append(name)
    if failed:
        print("failed: " + ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
