"""Mount and unmount the far-memory filesystem (``ralloc mount``/``ralloc umount``,
``python -m fuse_fs``).

    ralloc mount --cluster DIR MOUNTPOINT [--name NAME] [--replicas K] [--foreground]
    ralloc umount MOUNTPOINT [--lazy]

Without ``--foreground`` the daemon is started detached (``python -m fuse_fs ...
--foreground``, log in DIR/logs/fs-NAME.log) and the command returns once the mount shows
in /proc/mounts. The daemon recovers the filesystem from its slabs before it mounts, so a
mount that appears is ready. SIGTERM/SIGINT unmount it cleanly; so does ``ralloc umount``,
which then waits for the daemon to write its final checkpoint and exit.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("fuse_fs")

MCL_CURRENT, MCL_FUTURE, MCL_ONFAULT = 1, 2, 4
FSTYPE = "fuse.ralloc"


class MountError(Exception):
    """A message for the user (exit status 1)."""


# ------------------------------------------------------------------ /proc/mounts


def _unescape(field: str) -> str:
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_entry(mountpoint: str) -> tuple[str, str] | None:
    """(source, fstype) of what is mounted at ``mountpoint``, or None."""
    target = os.path.abspath(mountpoint)
    found = None
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and _unescape(parts[1]) == target:
                    found = (_unescape(parts[0]), parts[2])
    except OSError:
        return None
    return found


def is_ours(mountpoint: str) -> bool:
    e = mount_entry(mountpoint)
    return e is not None and e[1] == FSTYPE


def _running(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def daemon_pids(mountpoint: str) -> list[int]:
    """Filesystem daemons serving ``mountpoint`` (matched on their command line)."""
    import psutil

    target = os.path.abspath(mountpoint)
    pids = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = p.info.get("cmdline") or []
        if p.info["pid"] == os.getpid() or target not in cmd:
            continue
        if "fuse_fs" in cmd or ("mount" in cmd and any(a.endswith("ralloc") for a in cmd)):
            pids.append(p.info["pid"])
    return pids


# ------------------------------------------------------------------ memory locking


def lock_memory() -> None:
    """mlockall: the kernel writes back dirty mmap'd pages through this daemon, so the
    daemon must never need reclaim (and so wait on that writeback) to run. ONFAULT: lock
    pages as they are touched, not whole reservations."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if os.geteuid() != 0 and soft != resource.RLIM_INFINITY:
        # MCL_FUTURE under a finite limit would make later allocations fail outright
        log.warning("not locking memory: RLIMIT_MEMLOCK is %d bytes (run as root or raise "
                    "it with ulimit -l unlimited)", soft)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) != 0:
        err = ctypes.get_errno()
        log.warning("mlockall failed (%s): the daemon's memory may be reclaimed",
                    os.strerror(err))


def unlock_regions(node: Any, done: set[int]) -> None:
    """munlock the blade regions mapped by the shm transport: they are the blades' memory
    (remote memory, in principle), not the daemon's, and can be far bigger than it."""
    libc = ctypes.CDLL(None, use_errno=True)
    for link in list(getattr(node, "links", {}).values()):
        shm = getattr(link, "shm", None)
        if shm is None or id(shm) in done:
            continue
        buf = shm.region.buf
        c = ctypes.c_char.from_buffer(buf)
        addr = ctypes.addressof(c)
        del c
        libc.munlock(ctypes.c_void_p(addr), ctypes.c_size_t(len(buf)))
        done.add(id(shm))


# ------------------------------------------------------------------ arguments


def build_parser(prog: str = "ralloc mount") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Mount a filesystem whose files live in remote memory slabs.")
    p.add_argument("--cluster", required=True, metavar="DIR", help="cluster directory")
    p.add_argument("mountpoint", help="an existing empty directory")
    p.add_argument("--name", default="default",
                   help="filesystem name: the same name finds the same files again "
                        "(default: %(default)s)")
    p.add_argument("--replicas", type=int, default=1, metavar="K",
                   help="copies of every slab on distinct blades (default 1)")
    p.add_argument("--foreground", action="store_true", help="do not detach")
    p.add_argument("--transport", choices=("auto", "tcp", "shm"), default="auto",
                   help="how to reach the blades (default auto: shm where mappable)")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds to wait for the mount to appear (default 60)")
    p.add_argument("--threads", type=int, default=8,
                   help="worker threads for slab I/O (default 8)")
    p.add_argument("--reformat", action="store_true",
                   help="discard everything the blades hold for this name and start empty")
    p.add_argument("--no-mlock", action="store_true",
                   help="do not lock the daemon's memory (see lock_memory)")
    p.add_argument("--debug", action="store_true", help="debug logging")
    return p


def _check(args: argparse.Namespace) -> None:
    if args.replicas < 1:
        raise ValueError("--replicas must be at least 1")
    if not args.name or "/" in args.name:
        raise ValueError("--name must be a non-empty name without '/'")
    if not os.path.isdir(args.mountpoint):
        raise MountError(f"mount point {args.mountpoint} is not a directory")
    if not os.path.isfile(os.path.join(args.cluster, "cluster.toml")):
        raise MountError(f"{args.cluster} is not a cluster directory (no cluster.toml; "
                         "start one with: ralloc cluster up --dir DIR)")
    from rallocator.cluster_config import ClusterConfig, ClusterConfigError

    try:
        blades = len(ClusterConfig.load(args.cluster).blades)
    except ClusterConfigError as e:
        raise MountError(f"cannot read the cluster in {args.cluster}: {e}") from None
    if args.replicas > blades:
        raise ValueError(f"--replicas {args.replicas} needs as many blades; the cluster has "
                         f"{blades}")
    entry = mount_entry(args.mountpoint)
    if entry is not None:
        raise MountError(f"{args.mountpoint} is already a mount point ({entry[0]}, "
                         f"{entry[1]}); unmount it first: ralloc umount {args.mountpoint}")


def main(argv: list[str] | None = None, prog: str = "ralloc mount") -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(prog).parse_args(argv)
    args.mountpoint = os.path.abspath(args.mountpoint)
    args.cluster = os.path.abspath(args.cluster)
    try:
        _check(args)
        if args.foreground:
            return run_foreground(args)
        return run_background(args)
    except ValueError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    except MountError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


# ------------------------------------------------------------------ background


def log_path(cluster: str, name: str) -> str:
    return os.path.join(cluster, "logs", f"fs-{name}.log")


def _tail(path: str, n: int = 5) -> str:
    try:
        lines = [ln.rstrip() for ln in Path(path).read_text(errors="replace").splitlines()
                 if ln.strip()]
    except OSError:
        return "(no log)"
    return "\n  ".join(lines[-n:]) if lines else "(empty log)"


def run_background(args: argparse.Namespace) -> int:
    logfile = log_path(args.cluster, args.name)
    os.makedirs(os.path.dirname(logfile), exist_ok=True)
    cmd = [sys.executable, "-m", "fuse_fs", "--cluster", args.cluster, args.mountpoint,
           "--name", args.name, "--replicas", str(args.replicas), "--transport",
           args.transport, "--threads", str(args.threads), "--foreground"]
    cmd += ["--debug"] if args.debug else []
    cmd += ["--no-mlock"] if args.no_mlock else []
    cmd += ["--reformat"] if args.reformat else []
    with open(logfile, "a") as out:
        out.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} mounting {args.mountpoint}\n")
        out.flush()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True, close_fds=True,
                                cwd="/", env={**os.environ, "PYTHONPATH": _pythonpath()})
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        if is_ours(args.mountpoint):
            print(f"mounted {args.name} at {args.mountpoint} (pid {proc.pid}, log {logfile})")
            return 0
        if proc.poll() is not None:
            raise MountError(f"the filesystem daemon exited with status {proc.returncode}:"
                             f"\n  {_tail(logfile)}\n(log: {logfile})")
        time.sleep(0.05)
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    raise MountError(f"{args.mountpoint} did not appear in /proc/mounts within "
                     f"{args.timeout:.0f}s (log: {logfile})")


def _pythonpath() -> str:
    """The child must import our packages even when started from elsewhere (cwd=/)."""
    root = str(Path(__file__).resolve().parent.parent)
    old = os.environ.get("PYTHONPATH", "")
    return root + (os.pathsep + old if old else "")


# ------------------------------------------------------------------ foreground: the daemon


def _take_lock(cluster: str, name: str) -> int:
    """One daemon per filesystem name: two would corrupt each other's log."""
    d = os.path.join(cluster, "fs")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, f"{name}.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise MountError(f"filesystem {name!r} is already mounted (daemon pid {holder})") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _mount_options(name: str) -> set[str]:
    opts = {f"fsname=ralloc:{name}", "subtype=ralloc", "default_permissions"}
    if os.geteuid() == 0 or _user_allow_other():
        opts.add("allow_other")
    return opts


def _user_allow_other() -> bool:
    try:
        return any(ln.strip() == "user_allow_other" for ln in open("/etc/fuse.conf"))
    except OSError:
        return False


def run_foreground(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    from rallocator.cluster_config import ClusterConfigError
    from rallocator.node import WorkingNode
    from rallocator.secret import SecretError

    lock_fd = _take_lock(args.cluster, args.name)
    try:
        if not args.no_mlock:
            lock_memory()
        try:
            node = WorkingNode.from_cluster(args.cluster, node_name=f"fs:{args.name}",
                                            transport=args.transport)
        except (ClusterConfigError, SecretError, OSError) as e:
            raise MountError(f"cannot join the cluster in {args.cluster}: {e}") from None
        try:
            return _serve(args, node)
        finally:
            node.close()
    finally:
        os.close(lock_fd)


def _serve(args: argparse.Namespace, node: Any) -> int:
    """Recover, mount, serve until unmounted or signalled, checkpoint."""
    import pyfuse3
    import trio

    from fuse_fs.fs import FarFS
    from fuse_fs.slabio import SlabIOError
    from fuse_fs.store import RecoveryError, Store
    from rallocator.node import NoSpace
    from rallocator.verbs import BladeUnreachable

    unlocked: set[int] = set()
    for blade in node.blade_addrs:
        try:
            node.link(blade)
        except Exception as e:  # a dead blade: recovery says what that means
            log.warning("blade %s unreachable: %s", blade, e)
    unlock_regions(node, unlocked)
    try:
        store = Store.open(node, args.name, args.replicas, os.getuid(), os.getgid(),
                           reformat=args.reformat)
    except NoSpace as e:
        raise MountError(f"no room in the cluster for filesystem {args.name!r}: {e}") from None
    except RecoveryError as e:
        raise MountError(str(e)) from None
    except (SlabIOError, BladeUnreachable) as e:
        raise MountError(f"cannot read filesystem {args.name!r} from the blades: {e}") \
            from None
    unlock_regions(node, unlocked)
    ops = FarFS(store)
    log.info("filesystem %r: %d inode(s), %d data slab(s); mounting at %s",
             args.name, len(store.state.inodes), len(store.alloc.slabs), args.mountpoint)
    try:
        pyfuse3.init(ops, args.mountpoint, _mount_options(args.name))
    except RuntimeError as e:
        raise MountError(f"cannot mount {args.mountpoint}: {e}") from None
    closed = False

    def close_session() -> None:
        nonlocal closed
        if not closed:
            closed = True
            pyfuse3.close(unmount=is_ours(args.mountpoint))

    async def watch_signals() -> None:
        """Keep listening until the very end: a second signal during the final checkpoint
        must not kill the daemon half-way (it is logged and ignored)."""
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
            stopping = False
            async for s in sigs:
                if stopping:
                    log.info("signal %d: already unmounting, finishing the checkpoint", s)
                    continue
                stopping = True
                log.info("signal %d: unmounting", s)
                pyfuse3.terminate()

    async def housekeeping() -> None:
        while True:
            await trio.sleep(5)
            unlock_regions(node, unlocked)

    async def serve() -> None:
        async with trio.open_nursery() as signals:
            signals.start_soon(watch_signals)
            async with trio.open_nursery() as outer:
                store.start(outer, threads=args.threads)
                async with trio.open_nursery() as inner:
                    inner.start_soon(store.periodic)
                    inner.start_soon(housekeeping)
                    await pyfuse3.main()
                    inner.cancel_scope.cancel()
                close_session()
                await store.shutdown()
                log.info("unmounted %s; metadata checkpointed", args.mountpoint)
            signals.cancel_scope.cancel()

    try:
        trio.run(serve)
    finally:
        close_session()
    return 0


# ------------------------------------------------------------------ umount


def umount_main(argv: list[str] | None = None, prog: str = "ralloc umount") -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog=prog, description="Unmount a far-memory filesystem and "
                                "wait for its daemon to write its final checkpoint.")
    p.add_argument("mountpoint")
    p.add_argument("--lazy", action="store_true",
                   help="detach even if busy (fusermount3 -u -z)")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds to wait for the daemon to exit (default 60)")
    args = p.parse_args(argv)
    mp = os.path.abspath(args.mountpoint)
    entry = mount_entry(mp)
    pids = daemon_pids(mp)
    if entry is None and not pids:
        print(f"{prog}: {mp} is not mounted", file=sys.stderr)
        return 1
    if entry is not None:
        if entry[1] not in (FSTYPE, "fuse"):
            print(f"{prog}: {mp} is a {entry[1]} mount, not a ralloc filesystem",
                  file=sys.stderr)
            return 1
        attempts = [["fusermount3", "-u", mp], ["umount", mp]]
        if args.lazy:
            attempts.append(["fusermount3", "-u", "-z", mp])
        errors = []
        for cmd in attempts:
            try:
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
            except (OSError, subprocess.TimeoutExpired) as e:
                errors.append(f"{cmd[0]}: {e}")
                continue
            if r.returncode == 0 or mount_entry(mp) is None:
                break
            errors.append((r.stderr or r.stdout).strip() or f"{cmd[0]} failed")
        if mount_entry(mp) is not None:
            print(f"{prog}: could not unmount {mp}: {errors[-1] if errors else '?'}"
                  + ("" if args.lazy else " (files still open? --lazy detaches anyway)"),
                  file=sys.stderr)
            return 1
    deadline = time.monotonic() + args.timeout
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if _running(p)]
        if pids:
            time.sleep(0.05)
    if pids:
        print(f"{prog}: unmounted, but daemon pid(s) {pids} still running after "
              f"{args.timeout:.0f}s", file=sys.stderr)
        return 1
    print(f"unmounted {mp}")
    return 0
