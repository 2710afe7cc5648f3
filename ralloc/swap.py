"""``ralloc swap``: swap to remote memory (the Infiniswap half of the project).

    ralloc swap on     --cluster DIR --size SIZE [--replicas K] [--priority P] [--volume NAME]
                       [--transport auto|tcp|shm] [--attach auto|nbd|fuse] [--discard]
    ralloc swap off    --cluster DIR
    ralloc swap status --cluster DIR [--json]

``on`` starts nbdkit with the block-device plugin (``nbd_plugin/plugin.py``) on a unix
socket in DIR/swap/, turns it into a block device — ``/dev/nbdX`` through the kernel NBD
driver where there is one, else ``nbdfuse`` (DIR/swap/mnt/nbd) plus a direct-I/O loop
device, so swapped pages do not also sit in the local page cache — then ``mkswap`` and
``swapon``. What it attached is recorded step by step in DIR/swap/state.json, so that
``off`` can undo a half-finished ``on`` too. The last line printed is the swap device.

``off`` undoes every step in reverse (swapoff, nbd-client -d / losetup -d, unmount,
stop nbdkit); each step checks first, keeps going when one fails and reports all of them.

Errors are one line on stderr; exit status 2 for bad input, 1 when it did not work.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

from ralloc import attach
from ralloc.attach import AttachError
from rallocator.sizes import format_size, parse_size

STATE_VERSION = 1


class SwapError(Exception):
    """Swap could not be turned on/off; the message is for the user."""


def _say(msg: str) -> None:
    """Progress on stdout; a reader that went away must not undo a working set-up."""
    try:
        print(msg, flush=True)
    except BrokenPipeError:
        pass


# --------------------------------------------------------------------------------------
# DIR/swap/: paths, the state file and its lock


class SwapDir:
    """The files of one cluster's swap under DIR/swap/."""

    def __init__(self, cluster_dir: str) -> None:
        self.cluster = os.path.abspath(cluster_dir)
        self.dir = os.path.join(self.cluster, "swap")
        self.state_file = os.path.join(self.dir, "state.json")
        self.socket = os.path.join(self.dir, "nbdkit.sock")
        self.nbdkit_pidfile = os.path.join(self.dir, "nbdkit.pid")
        self.nbdkit_log = os.path.join(self.dir, "nbdkit.log")
        self.mountpoint = os.path.join(self.dir, "mnt")
        self.fuse_file = os.path.join(self.mountpoint, "nbd")
        self.nbdfuse_pidfile = os.path.join(self.dir, "nbdfuse.pid")
        self.nbdfuse_log = os.path.join(self.dir, "nbdfuse.log")

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Serialise on/off/status for this cluster (a second caller waits)."""
        os.makedirs(self.dir, exist_ok=True)
        with open(os.path.join(self.dir, "lock"), "w") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print("ralloc swap: waiting for another ralloc swap on this cluster...",
                      file=sys.stderr)
                fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def load(self) -> dict[str, Any] | None:
        try:
            with open(self.state_file) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise SwapError(f"cannot read {self.state_file}: {e}") from None

    def save(self, state: dict[str, Any]) -> None:
        tmp = self.state_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump(state, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.state_file)

    def forget(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.state_file)


def _live_parts(sd: SwapDir, st: dict[str, Any]) -> list[str]:
    """What of a recorded swap set-up is still there."""
    live = []
    dev = st.get("swap_device")
    if dev and dev in attach.swaps():
        live.append(f"swap on {dev}")
    nk = st.get("nbdkit") or {}
    if attach.proc_alive(int(nk.get("pid") or attach.read_pidfile(sd.nbdkit_pidfile)),
                         sd.socket):
        live.append("nbdkit")
    if attach.is_mountpoint(sd.mountpoint):
        live.append(f"nbdfuse mount {sd.mountpoint}")
    if attach.loops_backed_by(sd.fuse_file):
        live.append("loop " + ",".join(attach.loops_backed_by(sd.fuse_file)))
    if st.get("nbd_device") and attach.nbd_connected(st["nbd_device"]):
        live.append(st["nbd_device"])
    return live


# --------------------------------------------------------------------------------------
# on


def swap_on(cluster_dir: str, size: int, replicas: int | None = None,
            priority: int | None = None, volume: str | None = None,
            transport: str | None = None, attach_mode: str = "auto",
            backend: str = "plugin", discard: bool = False,
            say=_say) -> str:
    """Turn swap on for the cluster; returns the swap device. See the module doc.

    On failure everything started so far is undone before :class:`SwapError` is raised.
    """
    sd = SwapDir(cluster_dir)
    if size % 4096:
        raise SwapError("--size must be a multiple of 4 KiB")
    if backend == "plugin":
        from rallocator.cluster_config import ClusterConfig

        ClusterConfig.load(sd.cluster)  # a clear error when DIR is no cluster
    with sd.locked():
        old = sd.load()
        if old is not None:
            live = _live_parts(sd, old)
            if live:
                raise SwapError(f"swap is already on for {sd.cluster} ({', '.join(live)}); "
                                f"run: ralloc swap off --cluster {sd.cluster}")
            say("cleaning up what an earlier `ralloc swap on` left behind")
            failed = _off_steps(sd, old, say=lambda m: say("  " + m))
            if failed:
                raise SwapError(f"could not clean up an earlier swap set-up ({', '.join(failed)}"
                                f"); see: ralloc swap status --cluster {sd.cluster}")
        state: dict[str, Any] = {
            "version": STATE_VERSION, "cluster": sd.cluster, "size": size,
            "replicas": replicas, "priority": priority, "volume": volume,
            "transport": transport, "backend": backend, "started": time.time(),
            "mode": None, "nbdkit": None, "nbdfuse": None, "loop": None, "nbd_device": None,
            "swap_device": None, "dio": None, "phase": "starting"}
        sd.save(state)  # from here on, `swap off` knows where to look
        try:
            dev = _on_steps(sd, state, attach_mode, discard, say)
        except (AttachError, OSError, KeyboardInterrupt) as e:
            say(f"swap on failed: {e}; undoing what was started")
            failures = _off_steps(sd, sd.load() or state, say=lambda m: say("  " + m))
            if not failures:
                sd.forget()
            if isinstance(e, KeyboardInterrupt):
                raise
            raise SwapError(str(e)) from None
        return dev


def _on_steps(sd: SwapDir, state: dict[str, Any], attach_mode: str, discard: bool,
              say) -> str:
    preload, how = attach.memlock_preload()
    if preload is None:
        say(f"WARNING: {how}; nbdfuse will not be memory-locked")
    # 1. nbdkit
    if state["backend"] == "memory":
        plugin_args = ["memory", str(state["size"])]
    else:
        plugin = attach.plugin_path()
        if not os.path.exists(plugin):
            raise AttachError(f"the nbdkit plugin {plugin} does not exist yet")
        plugin_args = ["python", plugin, f"cluster={sd.cluster}", f"size={state['size']}"]
        for key in ("volume", "replicas", "transport"):
            if state.get(key) is not None:
                plugin_args.append(f"{key}={state[key]}")
    state["nbdkit"] = {"pid": 0, "socket": sd.socket, "pidfile": sd.nbdkit_pidfile,
                       "log": sd.nbdkit_log}
    sd.save(state)
    nk = attach.start_nbdkit(sd.socket, sd.nbdkit_pidfile, sd.nbdkit_log, plugin_args, preload)
    state["nbdkit"].update(pid=nk.pid, locked_kib=nk.locked_kib)
    sd.save(state)
    say(f"nbdkit pid {nk.pid} on {sd.socket} ({' '.join(plugin_args[:1])} "
        f"{format_size(state['size'])}), memory locked {format_size(nk.locked_kib << 10)}"
        + "".join(f"; {n}" for n in nk.notes))
    # 2. a block device
    usable, why = attach.nbd_driver()
    if attach_mode == "nbd" and not usable:
        raise AttachError(f"--attach nbd: {why}")
    if usable and attach_mode != "fuse":
        state["mode"] = "nbd"
        sd.save(state)
        dev = attach.attach_nbd(sd.socket)
        state["nbd_device"] = dev
        sd.save(state)
        say(f"{dev} connected to nbdkit ({why})")
    else:
        if attach_mode == "auto":
            say(f"no /dev/nbdX here ({why}): using nbdfuse + loop")
        state["mode"] = "fuse"
        state["nbdfuse"] = {"pid": 0, "mountpoint": sd.mountpoint, "file": sd.fuse_file,
                            "pidfile": sd.nbdfuse_pidfile, "log": sd.nbdfuse_log}
        sd.save(state)
        nf = attach.start_nbdfuse(sd.mountpoint, sd.socket, sd.nbdfuse_pidfile, sd.nbdfuse_log,
                                  preload)
        state["nbdfuse"].update(pid=nf.pid, locked_kib=nf.locked_kib)
        sd.save(state)
        say(f"nbdfuse pid {nf.pid}: {sd.fuse_file}, memory locked "
            f"{format_size(nf.locked_kib << 10)}" + "".join(f"; {n}" for n in nf.notes))
        dev, dio = attach.attach_loop(sd.fuse_file)
        state["loop"], state["dio"] = dev, dio
        sd.save(state)
        say(f"{dev} over {sd.fuse_file}, direct I/O "
            + ("on" if dio else "OFF (the kernel refused it: swapped pages also fill the "
                                "local page cache)"))
    # 3. swap
    label = "ralloc-swap"
    attach.make_swap(dev, label)
    state["phase"] = "swapon"
    sd.save(state)
    attach.swap_on(dev, state["priority"], discard)
    state["swap_device"] = dev
    state["phase"] = "on"
    sd.save(state)
    area = attach.swaps().get(dev)
    say(f"swap on: {format_size(state['size'])} of remote memory"
        + (f", priority {area.priority}" if area else ""))
    return dev


# --------------------------------------------------------------------------------------
# off


def swap_off(cluster_dir: str, say=_say) -> list[str]:
    """Undo everything ``swap on`` did (or began). Returns the steps that failed."""
    sd = SwapDir(cluster_dir)
    if not os.path.isdir(sd.dir):
        say(f"swap is not on for {sd.cluster} (no {sd.dir})")
        return []
    with sd.locked():
        st = sd.load()
        if st is None:
            say("no state.json: looking for leftovers anyway")
            st = {}
        failures = _off_steps(sd, st, say)
        if failures:
            st.setdefault("off_failures", []).append({"time": time.time(), "steps": failures})
            sd.save(st)
        else:
            sd.forget()
        return failures


def _off_steps(sd: SwapDir, st: dict[str, Any], say) -> list[str]:
    """Every step of ``off``; each idempotent, all attempted. Returns the failed ones."""
    failures: list[str] = []

    def step(name: str, fn) -> None:
        try:
            say(f"{name}: {fn()}")
        except (AttachError, OSError) as e:
            failures.append(name)
            say(f"{name}: FAILED: {e}")

    devices = [d for d in (st.get("swap_device"), st.get("loop"), st.get("nbd_device")) if d]
    devices += [d for d in attach.loops_backed_by(sd.fuse_file) if d not in devices]
    for dev in dict.fromkeys(devices):
        if dev in attach.swaps():
            step(f"swapoff {dev}", lambda dev=dev: attach.swap_off(dev))
    if st.get("nbd_device"):
        step(f"nbd-client -d {st['nbd_device']}", lambda: attach.detach_nbd(st["nbd_device"]))
    loops = attach.loops_backed_by(sd.fuse_file)
    if st.get("loop") and st["loop"] not in loops:
        say(f"losetup -d {st['loop']}: not attached")
    for dev in loops:
        step(f"losetup -d {dev}", lambda dev=dev: attach.detach_loop(dev, sd.fuse_file))
    nf = st.get("nbdfuse") or {}
    fuse_pid = int(nf.get("pid") or 0) or attach.read_pidfile(sd.nbdfuse_pidfile)
    if nf or attach.is_mountpoint(sd.mountpoint) or attach.proc_alive(fuse_pid, sd.mountpoint):
        step(f"unmount {sd.mountpoint}", lambda: attach.unmount_fuse(sd.mountpoint, fuse_pid))
    nk = st.get("nbdkit") or {}
    kit_pid = int(nk.get("pid") or 0) or attach.read_pidfile(sd.nbdkit_pidfile)
    if nk or attach.proc_alive(kit_pid, sd.socket):
        step(f"stop nbdkit (pid {kit_pid})",
             lambda: "stopped" if attach.stop_process(kit_pid, sd.socket) else "not running")
    if not failures:
        for p in (sd.socket, sd.nbdkit_pidfile, sd.nbdfuse_pidfile):
            with contextlib.suppress(OSError):
                os.unlink(p)
        if not attach.is_mountpoint(sd.mountpoint):
            with contextlib.suppress(OSError):
                os.rmdir(sd.mountpoint)
    return failures


# --------------------------------------------------------------------------------------
# status


def swap_status(cluster_dir: str) -> dict[str, Any]:
    """What is attached for the cluster, with liveness and /proc/swaps usage."""
    sd = SwapDir(cluster_dir)
    st = sd.load() or {}
    out: dict[str, Any] = {"cluster": sd.cluster, "on": False, "state": st}
    if not st:
        return out
    nk = st.get("nbdkit") or {}
    nf = st.get("nbdfuse") or {}
    out["nbdkit_alive"] = attach.proc_alive(int(nk.get("pid") or 0), sd.socket)
    out["nbdkit_locked_kib"] = attach.locked_kib(int(nk.get("pid") or 0)) \
        if out["nbdkit_alive"] else 0
    if st.get("mode") == "fuse":
        out["nbdfuse_alive"] = attach.proc_alive(int(nf.get("pid") or 0), sd.mountpoint)
        out["nbdfuse_locked_kib"] = attach.locked_kib(int(nf.get("pid") or 0)) \
            if out["nbdfuse_alive"] else 0
        out["mounted"] = attach.is_mountpoint(sd.mountpoint)
        out["loops"] = attach.loops_backed_by(sd.fuse_file)
    if st.get("nbd_device"):
        out["nbd_connected"] = attach.nbd_connected(st["nbd_device"])
    dev = st.get("swap_device")
    area = attach.swaps().get(dev) if dev else None
    if area is not None:
        out["on"] = True
        out["swap"] = {"device": area.device, "size_kib": area.size_kib,
                       "used_kib": area.used_kib, "priority": area.priority}
    return out


def _print_status(s: dict[str, Any]) -> None:
    st = s["state"]
    if not st:
        print(f"swap is off for {s['cluster']}")
        return
    yes = {True: "alive", False: "DEAD"}
    print(f"cluster {s['cluster']}: swap {'ON' if s['on'] else 'OFF'} "
          f"({st.get('mode') or '?'} mode, {format_size(int(st.get('size') or 0))}, "
          f"backend {st.get('backend')}, replicas {st.get('replicas') or 'default'})")
    nk = st.get("nbdkit") or {}
    print(f"  nbdkit   pid {nk.get('pid')}: {yes[s['nbdkit_alive']]}, socket {nk.get('socket')}, "
          f"locked {format_size(s['nbdkit_locked_kib'] << 10)}")
    if st.get("mode") == "fuse":
        nf = st.get("nbdfuse") or {}
        print(f"  nbdfuse  pid {nf.get('pid')}: {yes[s['nbdfuse_alive']]}, "
              f"{'mounted' if s['mounted'] else 'NOT mounted'} {nf.get('file')}, "
              f"locked {format_size(s['nbdfuse_locked_kib'] << 10)}")
        print(f"  loop     {', '.join(s['loops']) or 'none'}"
              + (f" (direct I/O {'on' if st.get('dio') else 'off'})" if s["loops"] else ""))
    if st.get("nbd_device"):
        print(f"  nbd      {st['nbd_device']}: "
              f"{'connected' if s.get('nbd_connected') else 'NOT connected'}")
    if s["on"]:
        w = s["swap"]
        pct = 100 * w["used_kib"] / w["size_kib"] if w["size_kib"] else 0
        print(f"  swap     {w['device']}: used {format_size(w['used_kib'] << 10)} of "
              f"{format_size(w['size_kib'] << 10)} ({pct:.1f}%), priority {w['priority']}")
    else:
        print(f"  swap     {st.get('swap_device') or 'none'}: not in /proc/swaps"
              + (f" (stopped at step '{st.get('phase')}')" if st.get("phase") != "on" else ""))
    if st.get("off_failures"):
        print("  last `swap off` failed at: " + ", ".join(st["off_failures"][-1]["steps"]))


# --------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ralloc swap",
                                description="Swap to remote memory lent by the cluster's blades.")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    on = sub.add_parser("on", help="start nbdkit, attach a block device, mkswap + swapon")
    on.add_argument("--cluster", required=True, metavar="DIR")
    on.add_argument("--size", required=True, help="size of the swap device (e.g. 1G)")
    on.add_argument("--replicas", type=int, help="copies of each slab on distinct blades")
    on.add_argument("--priority", type=int, help="swap priority (swapon -p; higher is used first)")
    on.add_argument("--volume", help="volume name on the blades (default: the plugin's)")
    on.add_argument("--transport", choices=("auto", "tcp", "shm"),
                    help="how the plugin reaches the blades (default: the plugin's)")
    on.add_argument("--attach", choices=("auto", "nbd", "fuse"), default="auto",
                    help="nbd: kernel driver + nbd-client; fuse: nbdfuse + loop; "
                         "auto: nbd where the driver exists")
    on.add_argument("--backend", choices=("plugin", "memory"), default="plugin",
                    help="memory: nbdkit's C memory plugin instead of the blades (to test the "
                         "swap plumbing alone)")
    on.add_argument("--discard", action="store_true",
                    help="swapon --discard: freed swap is trimmed, so the plugin can free slabs")
    off = sub.add_parser("off", help="swapoff and detach everything (also after a partial failure)")
    off.add_argument("--cluster", required=True, metavar="DIR")
    st = sub.add_parser("status", help="what is attached, and /proc/swaps usage")
    st.add_argument("--cluster", required=True, metavar="DIR")
    st.add_argument("--json", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    from rallocator.cluster_config import ClusterConfigError

    try:
        if args.action == "status":
            s = swap_status(args.cluster)
            if args.json:
                print(json.dumps(s, indent=2))
            else:
                _print_status(s)
            return 0
        if os.geteuid() != 0:
            raise SwapError("must run as root (mkswap, swapon, losetup, FUSE)")
        if args.action == "on":
            try:
                size = parse_size(args.size)
            except ValueError as e:
                print(f"ralloc swap: {e}", file=sys.stderr)
                return 2
            if args.replicas is not None and args.replicas < 1:
                print("ralloc swap: --replicas must be at least 1", file=sys.stderr)
                return 2
            dev = swap_on(args.cluster, size, replicas=args.replicas, priority=args.priority,
                          volume=args.volume, transport=args.transport,
                          attach_mode=args.attach, backend=args.backend, discard=args.discard)
            print(dev)
            return 0
        failures = swap_off(args.cluster)
        if failures:
            print(f"ralloc swap: swap off incomplete: {', '.join(failures)} failed (see above); "
                  "run it again once the cause is fixed", file=sys.stderr)
            return 1
        return 0
    except ClusterConfigError as e:
        print(f"ralloc swap: {e}", file=sys.stderr)
        return 2
    except (SwapError, AttachError, OSError) as e:
        print(f"ralloc swap: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
