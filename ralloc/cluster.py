"""The embedded cluster: a coordinator and N blades on loopback, as background processes.

``up`` is idempotent: on an existing DIR it restarts only what is not running, at the same
address and with the same region (so nvm blades recover their allocations). ``down`` stops
everything with SIGTERM (SIGKILL after a grace period) and removes dram regions, which would
otherwise keep their memory in /dev/shm.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from typing import Any

import psutil

from rallocator.cluster_config import BladeEntry, ClusterConfig, ClusterConfigError
from rallocator.coordinator_client import CoordinatorClient, CoordinatorUnavailable
from rallocator.layout import Geometry
from rallocator.secret import generate_secret_file, load_secret
from rallocator.sizes import parse_size
from rallocator.transport_tcp import AuthFailed, TcpVerbs
from rallocator.verbs import BladeUnreachable

READY_TIMEOUT = 20.0


class ClusterError(Exception):
    """A daemon would not start or stop; the message says which and points at its log."""


def process_alive(pid: int, marker: str) -> bool:
    """True if ``pid`` runs and its command line mentions ``marker`` (not a recycled pid)."""
    if pid <= 0:
        return False
    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return False
        return marker in " ".join(p.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _spawn(argv: list[str], log_base: str) -> tuple[int, str]:
    """Start a daemon detached; wait for its READY line. Returns (pid, address)."""
    out_path, err_path = log_base + ".out", log_base + ".log"
    with open(out_path, "w") as out, open(err_path, "a") as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                start_new_session=True, close_fds=True)
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        with open(out_path) as f:
            for line in f:
                if line.startswith("READY "):
                    return proc.pid, line.split()[1]
        if proc.poll() is not None:
            tail = _tail(err_path)
            raise ClusterError(f"{argv[2]} exited with status {proc.returncode}: {tail} "
                               f"(log: {err_path})")
        time.sleep(0.05)
    proc.kill()
    raise ClusterError(f"{argv[2]} did not become ready in {READY_TIMEOUT:.0f}s (log: {err_path})")


def _tail(path: str) -> str:
    try:
        with open(path) as f:
            lines = [ln.strip() for ln in f if ln.strip()]
        return lines[-1] if lines else "(no output)"
    except OSError:
        return "(no log)"


def _listen_for(address: str) -> str:
    return address if address else "127.0.0.1:0"


def up(directory: str, blades: int | None = None, capacity: int | None = None,
       mode: str | None = None, slab_sizes: str = "1M,4M", lease: float = 5.0,
       heartbeat: float = 0.5) -> ClusterConfig:
    """Start (or restart what is missing of) the cluster in ``directory``.

    On an existing cluster, options left out keep what it has: a bare ``up`` restarts what
    is not running and changes nothing else; ``--blades`` larger than today adds blades.
    """
    directory = os.path.abspath(directory)
    if capacity is not None:  # bad input fails before anything starts
        Geometry.for_capacity(capacity, slab_sizes=tuple(
            parse_size(x) for x in slab_sizes.split(",") if x.strip()))
    os.makedirs(os.path.join(directory, "logs"), exist_ok=True)
    try:
        cfg = ClusterConfig.load(directory)
    except ClusterConfigError:
        if os.path.exists(os.path.join(directory, "cluster.toml")):
            raise
        secret_file = os.path.join(directory, "cluster.secret")
        generate_secret_file(secret_file)
        cfg = ClusterConfig(dir=directory, secret_file=secret_file)
    load_secret(cfg.secret_file)  # fail early with a clear message
    py = sys.executable
    logs = os.path.join(directory, "logs")
    if not process_alive(cfg.coordinator_pid, "coordinator"):
        cfg.coordinator_pid, cfg.coordinator = _spawn(
            [py, "-m", "coordinator", "--listen", _listen_for(cfg.coordinator),
             "--secret-file", cfg.secret_file, "--heartbeat-interval", str(heartbeat)],
            os.path.join(logs, "coordinator"))
        cfg.save()
    tag = hashlib.blake2b(directory.encode(), digest_size=4).hexdigest()
    existing = {b.name: b for b in cfg.blades}
    first = cfg.blades[0] if cfg.blades else None
    capacity = capacity or (first.capacity if first else 256 << 20)
    mode = mode or (first.mode if first else "dram")
    if blades is not None and blades < len(existing):
        raise ValueError(f"the cluster has {len(existing)} blades; up does not remove any "
                         f"(cluster down, then up in a new directory)")
    want = blades if blades is not None else (len(existing) or 3)
    for i in range(max(want, len(existing))):
        name = f"blade{i}"
        entry = existing.get(name)
        if entry is None:
            region = (f"/dev/shm/rallocator-{tag}-{name}.region" if mode == "dram"
                      else os.path.join(directory, f"{name}.region"))
            entry = BladeEntry(name=name, address="", region=region, capacity=capacity,
                               mode=mode)
            cfg.blades.append(entry)
        if process_alive(entry.pid, entry.region):
            continue
        entry.pid, entry.address = _spawn(
            [py, "-m", "slabd", "--listen", _listen_for(entry.address),
             "--capacity", str(entry.capacity), "--region", entry.region, "--mode", entry.mode,
             "--name", name, "--coordinator", cfg.coordinator,
             "--secret-file", cfg.secret_file, "--slab-sizes", slab_sizes,
             "--lease", str(lease), "--heartbeat-interval", str(heartbeat)],
            os.path.join(logs, name))
        cfg.save()
    return cfg


def _stop(pid: int, marker: str, grace: float = 8.0) -> bool:
    if not process_alive(pid, marker):
        return False
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not process_alive(pid, marker):
            return True
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return True


def down(directory: str) -> list[str]:
    """Stop every daemon of the cluster; returns what was stopped. A cluster directory
    whose ``up`` failed before writing cluster.toml has nothing to stop; a directory that
    does not exist is a mistake (ClusterConfigError), most likely a typo."""
    if os.path.isdir(directory) and not os.path.exists(os.path.join(directory, "cluster.toml")):
        return []
    cfg = ClusterConfig.load(directory)
    stopped = []
    for b in cfg.blades:
        if _stop(b.pid, b.region):
            stopped.append(b.name)
        if b.mode == "dram" and os.path.exists(b.region):
            os.unlink(b.region)
        b.pid = 0
    if _stop(cfg.coordinator_pid, "coordinator"):
        stopped.append("coordinator")
    cfg.coordinator_pid = 0
    cfg.save()
    return stopped


def status(directory: str) -> dict[str, Any]:
    """The cluster as the status command shows it (see README for the JSON form)."""
    cfg = ClusterConfig.load(directory)
    secret = load_secret(cfg.secret_file)
    coord_alive = process_alive(cfg.coordinator_pid, "coordinator")
    seen: dict[str, dict[str, Any]] = {}
    if coord_alive:
        try:
            for b in CoordinatorClient(cfg.coordinator, secret, timeout=2.0).status()["blades"]:
                seen[b["name"]] = b
        except CoordinatorUnavailable:
            coord_alive = False
    blades = []
    for b in cfg.blades:
        alive = process_alive(b.pid, b.region)
        info = seen.get(b.name)
        row: dict[str, Any] = {"name": b.name, "address": b.address, "pid": b.pid,
                               "mode": b.mode, "alive": alive, "capacity_bytes": b.capacity,
                               "used_bytes": 0, "slabs_total": 0, "slabs_used": 0}
        if info is not None:
            row["alive"] = alive and bool(info.get("alive"))
            for k in ("capacity_bytes", "used_bytes", "slabs_total", "slabs_used"):
                row[k] = info.get(k, row[k])
        if alive and (info is None or not coord_alive):
            row.update(_ask_blade(b.address, secret))
        blades.append(row)
    return {"coordinator": {"address": cfg.coordinator, "pid": cfg.coordinator_pid,
                            "alive": coord_alive},
            "blades": blades}


def _ask_blade(address: str, secret: bytes) -> dict[str, Any]:
    """Stats straight from a blade (when the coordinator cannot tell us)."""
    try:
        conn = TcpVerbs(address, secret, node_id=0xC0FFEE, timeout=2.0, connect_timeout=1.0)
    except (BladeUnreachable, AuthFailed, OSError):
        return {"alive": False}
    try:
        s = conn.call({"op": "stats"})
        return {k: s[k] for k in ("capacity_bytes", "used_bytes", "slabs_total", "slabs_used")}
    except (BladeUnreachable, OSError):
        return {"alive": False}
    finally:
        conn.close()
