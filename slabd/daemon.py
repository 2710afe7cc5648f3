"""slabd: one memory blade. Maps its region, recovers, serves verbs, heartbeats the coordinator.

    python -m slabd --listen 127.0.0.1:7001 --capacity 1G --region /dev/shm/blade0.region \
        --mode dram --name blade0 --coordinator 127.0.0.1:7000 --secret-file cluster.secret

Prints ``READY <host:port>`` on stdout once it serves. SIGTERM/SIGINT: stop accepting, mark
the region cleanly shut down, exit 0.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

import psutil

from rallocator.coordinator_client import CoordinatorClient, CoordinatorUnavailable
from rallocator.layout import Geometry
from rallocator.region import Region, RegionError
from rallocator.secret import SecretError, load_secret
from rallocator.sizes import parse_size
from rallocator.transport_tcp import split_address
from slabd.blade import Blade
from slabd.server import BladeServer

log = logging.getLogger("slabd")
TICK = 0.001
IDLE_TICK = 0.016
EPOCH_TICK = 0.005
MCL_CURRENT, MCL_FUTURE = 1, 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ralloc slabd",
        description="A memory blade: lends its RAM (dram mode) or a persistent file (nvm "
                    "mode) in slabs through the RAllocator protocol.")
    p.add_argument("--listen", required=True, metavar="HOST:PORT",
                   help="address for node connections (port 0 picks a free one)")
    p.add_argument("--capacity", required=True, metavar="SIZE",
                   help="bytes to lend, e.g. 1G (ignored when the region exists)")
    p.add_argument("--region", required=True, metavar="PATH",
                   help="region file: under /dev/shm for dram, on persistent storage for nvm; "
                        "reopened and recovered if it exists")
    p.add_argument("--mode", choices=("dram", "nvm"), default="dram",
                   help="nvm: msync before an operation counts as done (default dram)")
    p.add_argument("--name", required=True, help="blade name, unique in the cluster")
    p.add_argument("--coordinator", metavar="HOST:PORT",
                   help="coordinator to register and heartbeat with (optional)")
    p.add_argument("--secret-file", required=True, metavar="FILE", help="cluster secret (0600)")
    p.add_argument("--unit-size", default="1M", metavar="SIZE",
                   help="allocation unit: the smallest slab (default 1M)")
    p.add_argument("--slab-sizes", default="1M,4M", metavar="LIST",
                   help="slab size classes, multiples of the unit (default 1M,4M)")
    p.add_argument("--lease", type=float, default=5.0, metavar="SECONDS",
                   help="how long a taken ticket may stay unacknowledged (default 5)")
    p.add_argument("--node-lease", type=float, default=15.0, metavar="SECONDS",
                   help="how long a node may go without heartbeating its epoch before it "
                        "stops holding back reclamation (default 15)")
    p.add_argument("--heartbeat-interval", type=float, default=1.0, metavar="SECONDS",
                   help="seconds between heartbeats to the coordinator (default 1)")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING"))
    return p


class Daemon:
    def __init__(self, args: argparse.Namespace, secret: bytes, region: Region) -> None:
        self.args = args
        self.region = region
        self.blade = Blade(region, lease=args.lease, node_lease=args.node_lease)
        self.stop_event = threading.Event()
        host, port = split_address(args.listen)
        self.info: dict[str, Any] = {
            "name": args.name, "region": os.path.abspath(region.path), "mode": args.mode,
            "capacity_bytes": region.geo.n_units * region.geo.unit_size,
            "unit_size": region.geo.unit_size,
            "slab_sizes": [region.geo.slab_bytes(c) for c in range(region.geo.n_classes)],
            "pid": os.getpid(),
        }
        self.server = BladeServer(self.blade, secret, (host, port), self.info)
        self.secret = secret

    def run(self) -> int:
        report = self.blade.recover()
        log.info("blade %s: region %s (%s, %d x %d B units); %s start; recovered %s",
                 self.args.name, self.region.path, self.args.mode, self.region.geo.n_units,
                 self.region.geo.unit_size, "clean" if report.pop("clean") else "unclean",
                 report)
        threads = [threading.Thread(target=self.server.serve_forever, name="accept", daemon=True),
                   threading.Thread(target=self._ticker, name="ticker", daemon=True)]
        if self.args.coordinator:
            threads.append(threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True))
        for t in threads:
            t.start()
        print(f"READY {self.server.address}", flush=True)
        self.stop_event.wait()
        log.info("blade %s stopping", self.args.name)
        self.server.stop()
        self.blade.mark_clean_shutdown()
        return 0

    def _ticker(self) -> None:
        """Tick every millisecond while nodes are active, backing off to IDLE_TICK when
        nothing happens: an idle blade should cost next to no CPU. Epochs every 5 ms."""
        delay, last_epochs = TICK, 0.0
        while not self.stop_event.is_set():
            now = time.monotonic()
            do_epochs = now - last_epochs >= EPOCH_TICK
            try:
                busy = self.blade.tick(epochs=do_epochs)
            except Exception:
                log.exception("blade tick failed")
                busy = False
                time.sleep(0.1)
            if do_epochs:
                last_epochs = now
            delay = TICK if busy else min(delay * 2, IDLE_TICK)
            time.sleep(delay)

    def _heartbeat(self) -> None:
        client = CoordinatorClient(self.args.coordinator, self.secret, timeout=2.0)
        registered = False
        warned = False
        while not self.stop_event.is_set():
            try:
                if not registered:
                    client.register(name=self.args.name, address=self.server.address,
                                    capacity_bytes=self.info["capacity_bytes"],
                                    unit_size=self.info["unit_size"],
                                    slab_sizes=self.info["slab_sizes"], mode=self.args.mode,
                                    pid=os.getpid())
                    registered = True
                    log.info("registered with coordinator %s", self.args.coordinator)
                s = self.blade.stats()
                vm = psutil.virtual_memory()
                reply = client.heartbeat(name=self.args.name, used_bytes=s["used_bytes"],
                                         capacity_bytes=s["capacity_bytes"],
                                         slabs_total=s["slabs_total"],
                                         slabs_used=s["slabs_used"],
                                         host_mem_percent=vm.percent,
                                         host_mem_available=vm.available)
                registered = bool(reply.get("known", True))
                warned = False
            except CoordinatorUnavailable as e:
                registered = False
                if not warned:
                    log.warning("coordinator unreachable (%s); will keep trying", e)
                    warned = True
            self.stop_event.wait(self.args.heartbeat_interval)


def lock_memory() -> None:
    """Keep the daemon (and a dram region) resident: a blade that swaps defeats the point,
    and on the swap path it could deadlock the kernel's reclaim."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mlockall(MCL_CURRENT | MCL_FUTURE) != 0:
            log.warning("mlockall failed (%s); memory not locked",
                        os.strerror(ctypes.get_errno()))
    except OSError as e:
        log.warning("mlockall unavailable: %s", e)


def open_region(args: argparse.Namespace) -> Region:
    if os.path.exists(args.region):
        region = Region.open(args.region)
        if region.geo.mode_nvm != (args.mode == "nvm"):
            region.close()
            raise RegionError(f"region {args.region} was created in "
                              f"{'nvm' if region.geo.mode_nvm else 'dram'} mode")
        return region
    unit = parse_size(args.unit_size)
    sizes = tuple(parse_size(s) for s in args.slab_sizes.split(",") if s.strip())
    geo = Geometry.for_capacity(parse_size(args.capacity), unit_size=unit, slab_sizes=sizes,
                                mode_nvm=args.mode == "nvm")
    return Region.create(args.region, geo)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format=f"%(asctime)s slabd[{args.name}] %(levelname)s %(message)s")
    try:
        split_address(args.listen)
        if args.coordinator:
            split_address(args.coordinator)
        secret = load_secret(args.secret_file)
        region = open_region(args)
        daemon = Daemon(args, secret, region)
    except (ValueError, SecretError, RegionError, OSError) as e:
        print(f"slabd: {e}", file=sys.stderr)
        return 2
    lock_memory()

    def on_signal(signum: int, _frame: Any) -> None:
        daemon.stop_event.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return daemon.run()


if __name__ == "__main__":
    sys.exit(main())
