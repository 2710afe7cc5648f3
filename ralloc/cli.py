"""ralloc: the command line. Wires the components together; nothing imports it.

    ralloc cluster up --dir DIR [--blades N] [--capacity SIZE] [--mode dram|nvm]
    ralloc cluster down --dir DIR
    ralloc status --cluster DIR [--json]
    ralloc slabd ...          (one blade; see ralloc slabd --help)
    ralloc coordinator ...    (the global manager)
    ralloc bench alloc --cluster DIR [--json]

Errors are one line on stderr and exit status 2 (bad input) or 1 (it did not work).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from rallocator.cluster_config import ClusterConfigError
from rallocator.secret import SecretError
from rallocator.sizes import format_size, parse_size


def _cmd_cluster(args: argparse.Namespace) -> int:
    from ralloc import cluster

    if args.action == "up":
        cfg = cluster.up(args.dir, blades=args.blades,
                         capacity=parse_size(args.capacity) if args.capacity else None,
                         mode=args.mode, slab_sizes=args.slab_sizes, lease=args.lease)
        print(f"cluster up in {cfg.dir}: coordinator {cfg.coordinator}, "
              f"{len(cfg.blades)} blade(s): " + ", ".join(f"{b.name}@{b.address}"
                                                          for b in cfg.blades))
        return 0
    stopped = cluster.down(args.dir)
    print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from ralloc import cluster

    st = cluster.status(args.cluster)
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    c = st["coordinator"]
    console = Console()
    console.print(f"coordinator {c['address']} pid {c['pid']} "
                  f"{'[green]alive[/]' if c['alive'] else '[red]down[/]'}")
    t = Table()
    for col in ("blade", "address", "pid", "mode", "alive", "used", "capacity", "slabs used"):
        t.add_column(col, no_wrap=True)
    for b in st["blades"]:
        t.add_row(b["name"], b["address"], str(b["pid"]), b["mode"],
                  "[green]yes[/]" if b["alive"] else "[red]no[/]", format_size(b["used_bytes"]),
                  format_size(b["capacity_bytes"]), f"{b['slabs_used']}/{b['slabs_total']}")
    console.print(t)
    return 0


def _passthrough(module: str) -> Callable[[list[str]], int]:
    def run(argv: list[str]) -> int:
        import importlib

        return int(importlib.import_module(module).main(argv) or 0)

    return run


PASSTHROUGH = {
    "slabd": ("run one memory blade", _passthrough("slabd.daemon")),
    "coordinator": ("run the global memory manager", _passthrough("coordinator.daemon")),
    "bench": ("benchmarks: ralloc bench alloc --cluster DIR [--json]",
              _passthrough("ralloc.bench_alloc")),
    "swap": ("remote swap: ralloc swap on|off|status --cluster DIR", _passthrough("ralloc.swap")),
    "run": ("run a command in a memory-limited cgroup: ralloc run --mem-limit SIZE -- CMD",
            _passthrough("ralloc.run_limited")),
    "mount": ("mount the far-memory filesystem: ralloc mount --cluster DIR MOUNTPOINT",
              _passthrough("ralloc.mount")),
    "umount": ("unmount it: ralloc umount MOUNTPOINT", _passthrough("ralloc.umount")),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ralloc",
        description="Disaggregated memory for Linux: memory blades lend RAM in slabs; this "
                    "node borrows them for swap and for mmap-able files.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, _) in PASSTHROUGH.items():
        sub.add_parser(name, help=help_text, add_help=False)

    c = sub.add_parser("cluster", help="start or stop the embedded cluster (coordinator + blades)")
    csub = c.add_subparsers(dest="action", required=True, metavar="ACTION")
    u = csub.add_parser("up", help="start whatever is not running; returns when all are ready")
    u.add_argument("--dir", required=True, help="cluster directory (cluster.toml, secret, logs)")
    u.add_argument("--blades", type=int, help="number of blades (default 3; an existing "
                                                "cluster keeps its own)")
    u.add_argument("--capacity", help="capacity of each blade (default 256M)")
    u.add_argument("--mode", choices=("dram", "nvm"),
                   help="dram (default): regions in /dev/shm; nvm: region files in DIR, msync'd")
    u.add_argument("--slab-sizes", default="1M,4M", help="slab size classes (default 1M,4M)")
    u.add_argument("--lease", type=float, default=5.0,
                   help="seconds a taken allocation ticket may stay unacknowledged")
    d = csub.add_parser("down", help="stop every daemon of the cluster")
    d.add_argument("--dir", required=True)

    s = sub.add_parser("status", help="the coordinator and every blade: alive, used, capacity")
    s.add_argument("--cluster", required=True, metavar="DIR")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in PASSTHROUGH:
        return PASSTHROUGH[argv[0]][1](argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from ralloc.cluster import ClusterError

    handlers = {"cluster": _cmd_cluster, "status": _cmd_status}
    try:
        if args.command == "cluster" and args.action == "up" and args.blades is not None \
                and args.blades < 1:
            raise ValueError("--blades must be at least 1")
        return handlers[args.command](args)
    except (ValueError, ClusterConfigError, SecretError) as e:
        print(f"ralloc: {e}", file=sys.stderr)
        return 2
    except (ClusterError, OSError) as e:
        print(f"ralloc: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
