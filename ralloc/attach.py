"""The pieces ``ralloc swap`` puts together, each one started and stopped on its own.

    nbdkit (plugin, unix socket)  ->  /dev/nbdX            (kernel NBD driver + nbd-client)
                                  ->  nbdfuse file -> loop  (no NBD driver: FUSE + losetup)
    then mkswap + swapon on the resulting block device.

Every ``stop_*``/``detach_*`` function is idempotent (it checks first, so running it again,
or on something half-built, is fine) and returns a short note of what it did; it raises
:class:`AttachError` only when the thing is there and would not go away.

Swap over a user-space server can deadlock: when memory is short the kernel writes pages
to swap, which waits for nbdfuse and nbdkit, which must not need memory that only swapping
can free. So both daemons are memory-locked, marked ``PR_SET_IO_FLUSHER`` (their own
allocations never wait for I/O; needs CAP_SYS_RESOURCE), given ``oom_score_adj = -1000``
(same) and kept out of any memory-limited cgroup.

The lock comes from a tiny LD_PRELOAD library (built with the system C compiler on first
use, cached) whose constructor runs ``mlockall(MCL_CURRENT|MCL_FUTURE|MCL_ONFAULT)`` before
``main``: every page the daemon touches stays resident, and nothing merely reserved is
faulted in. ``nbdkit --swap`` (no MCL_ONFAULT) makes resident both the ~190 MiB of heap
nbdkit reserves at start and the whole 8 MiB stack of each of its dozens of threads, i.e.
0.2-0.7 GiB of RAM on the node that is short of it; it is used only when the preload cannot
be built.

Two nbdkit 1.32 traps, found the hard way: ``--swap`` without ``-f`` locks and *then* forks
into the background, and locks are not inherited across fork, so the daemon is not locked
at all; and ``-f`` arms PR_SET_PDEATHSIG(SIGTERM), so nbdkit quits as soon as the process
that started it exits. Hence :func:`spawn_daemon`: foreground daemons, orphaned before they
exec.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import psutil

from ralloc.cgroup import keep_out_of_limits
from ralloc.cluster import process_alive

READY_TIMEOUT = 60.0
STOP_GRACE = 10.0


class AttachError(Exception):
    """A step of attaching or detaching failed; the message says which and why."""


# --------------------------------------------------------------------------------------
# processes


proc_alive = process_alive  # one definition, shared with the cluster launcher


def read_pidfile(path: str) -> int:
    try:
        with open(path) as f:
            return int(f.read().strip() or 0)
    except (OSError, ValueError):
        return 0


def stop_process(pid: int, marker: str, grace: float = STOP_GRACE) -> bool:
    """SIGTERM, then SIGKILL after ``grace`` seconds. False if it was not running."""
    if not proc_alive(pid, marker):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not proc_alive(pid, marker):
            return True
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while proc_alive(pid, marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    return True


def harden_daemon(pid: int) -> list[str]:
    """oom_score_adj -1000 and out of memory-limited cgroups. Returns notes."""
    notes = []
    try:
        with open(f"/proc/{pid}/oom_score_adj", "w") as f:
            f.write("-1000")
        notes.append("oom_score_adj -1000")
    except OSError as e:
        notes.append(f"oom_score_adj not lowered ({e.strerror}: needs CAP_SYS_RESOURCE)")
    cg = keep_out_of_limits(pid)
    if cg != "not memory-limited":
        notes.append(cg)
    return notes


def _preload_notes(log: str) -> list[str]:
    """What the memlock preload said it could not do (it writes to the daemon's log)."""
    try:
        with open(log, errors="replace") as f:
            said = [ln.strip() for ln in f if ln.startswith("ralloc-memlock:")]
    except OSError:
        return []
    notes = []
    if any("PR_SET_IO_FLUSHER" in ln for ln in said):
        notes.append("PR_SET_IO_FLUSHER unavailable (needs CAP_SYS_RESOURCE)")
    notes += [f"WARNING: {ln}" for ln in said if "mlockall" in ln]
    return notes


def locked_kib(pid: int) -> int:
    """Resident, locked memory of ``pid`` in KiB (``Locked`` of smaps_rollup; VmLck would
    count whole MCL_ONFAULT mappings, touched or not). 0 if unknown."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Locked:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _tail(path: str, n: int = 3) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [ln.rstrip() for ln in f if ln.strip()]
        return " | ".join(lines[-n:]) if lines else "(no output)"
    except OSError:
        return "(no log)"


def spawn_daemon(argv: list[str], log: str, env: dict[str, str] | None = None) -> int:
    """Start ``argv`` as a daemon: its own session, stdin closed, output to ``log``, and
    *orphaned before it execs* (double fork). Returns its pid once it has exec'd.

    Why orphaned first: ``nbdkit -f`` sets PR_SET_PDEATHSIG(SIGTERM), so if its parent were
    this short-lived ``ralloc swap on`` it would quit the moment we exit (and the swap device
    would fail every write). A parent-death signal armed after re-parenting never fires.

    Raises:
        AttachError: the program could not be started (not installed, ...).
    """
    full_env = {**os.environ, **(env or {})}
    logfd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC,
                    0o644)
    nullfd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    r, w = os.pipe()  # close-on-exec: EOF once the daemon has exec'd
    try:
        mid = os.fork()
        if mid == 0:  # intermediate: new session, fork the daemon, exit
            try:
                os.setsid()
                me = os.getpid()
                pid = os.fork()
                if pid:
                    os.write(w, f"{pid}\n".encode())
                    os._exit(0)
                deadline = time.monotonic() + 5  # the daemon: wait to be re-parented
                while os.getppid() == me and time.monotonic() < deadline:
                    time.sleep(0.001)
                keep_out_of_limits(os.getpid())  # before exec: nothing charged to a limit
                os.dup2(nullfd, 0)
                os.dup2(logfd, 1)
                os.dup2(logfd, 2)
                for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT):
                    signal.signal(sig, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_SETMASK, set())
                os.execvpe(argv[0], argv, full_env)
            except BaseException as e:  # noqa: BLE001 - report anything to the parent
                with contextlib.suppress(BaseException):
                    os.write(w, f"E {type(e).__name__}: {e}\n".encode())
            os._exit(127)
        os.close(w)
        w = -1
        os.waitpid(mid, 0)
        data = b""
        while chunk := os.read(r, 4096):
            data += chunk
    finally:
        for fd in (r, w, logfd, nullfd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
    lines = data.decode(errors="replace").splitlines()
    errors = [ln[2:] for ln in lines if ln.startswith("E ")]
    if errors or not lines:
        raise AttachError(f"cannot start {argv[0]}: {errors[0] if errors else 'fork failed'}")
    return int(lines[0])


def wait_ready(pid: int, what: str, ready, log: str, timeout: float = READY_TIMEOUT) -> None:
    """Wait until ``ready()`` is true while ``pid`` lives; raise with the log tail if not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        if not _exists(pid):
            raise AttachError(f"{what} exited: {_tail(log)} (log: {log})")
        time.sleep(0.05)
    raise AttachError(f"{what} was not ready after {timeout:.0f}s: {_tail(log)} (log: {log})")


def _exists(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# --------------------------------------------------------------------------------------
# the memory-lock preload library (for nbdfuse, and IO_FLUSHER for nbdkit)

MEMLOCK_SOURCE = r"""
/* ralloc memlock preload: lock a swap-serving daemon into memory before main().
 * RALLOC_MLOCK=onfault (default): every page is locked once touched and never swapped out
 *                      (MCL_CURRENT|MCL_FUTURE|MCL_ONFAULT), without faulting in what is
 *                      only reserved: nbdkit grows its heap by ~190 MiB it never touches,
 *                      and each thread has an 8 MiB stack;
 *             all:     like `nbdkit --swap` (MCL_CURRENT|MCL_FUTURE: everything resident);
 *             none:    no lock.
 * Always tries PR_SET_IO_FLUSHER (needs CAP_SYS_RESOURCE). */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#ifndef PR_SET_IO_FLUSHER
#define PR_SET_IO_FLUSHER 57
#endif
#ifndef MCL_ONFAULT
#define MCL_ONFAULT 4
#endif
__attribute__((constructor)) static void ralloc_memlock(void) {
    const char *mode = getenv("RALLOC_MLOCK");
    int rc = 0;
    if (!mode || strcmp(mode, "onfault") == 0) {
        rc = mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT);
    } else if (strcmp(mode, "all") == 0) {
        rc = mlockall(MCL_CURRENT | MCL_FUTURE);
    }
    if (rc != 0)
        fprintf(stderr, "ralloc-memlock: mlockall: %s\n", strerror(errno));
    if (prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) != 0)
        fprintf(stderr, "ralloc-memlock: PR_SET_IO_FLUSHER not set: %s\n", strerror(errno));
    /* children (fusermount3, ...) must not inherit it */
    unsetenv("LD_PRELOAD");
    unsetenv("RALLOC_MLOCK");
}
"""


def memlock_preload() -> tuple[str | None, str]:
    """Path of the memlock preload library (built on first use), or None and why not."""
    digest = hashlib.sha256(MEMLOCK_SOURCE.encode()).hexdigest()[:12]
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                         "rallocator")
    lib = os.path.join(cache, f"memlock-{digest}.so")
    if os.path.exists(lib):
        return lib, "cached"
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None, "no C compiler (install gcc) to build the memlock preload library"
    os.makedirs(cache, exist_ok=True)
    src = lib[:-3] + ".c"
    tmp = f"{lib}.{os.getpid()}.tmp"
    with open(src, "w") as f:
        f.write(MEMLOCK_SOURCE)
    r = subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", tmp, src], capture_output=True,
                       text=True)
    if r.returncode != 0:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        return None, f"building the memlock preload failed: {r.stderr.strip()[:200]}"
    os.replace(tmp, lib)
    return lib, "built"


# --------------------------------------------------------------------------------------
# nbdkit


def plugin_path() -> str:
    """The nbdkit Python plugin of this checkout (nbd_plugin/plugin.py)."""
    import nbd_plugin

    return os.path.join(os.path.dirname(os.path.abspath(nbd_plugin.__file__)), "plugin.py")


def _python_path() -> str:
    """PYTHONPATH for the plugin's embedded interpreter: this checkout and our packages."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = [root] + [p for p in sys.path if p.endswith("site-packages") and os.path.isdir(p)]
    old = os.environ.get("PYTHONPATH")
    return os.pathsep.join(paths + ([old] if old else []))


@dataclass
class Daemon:
    pid: int
    marker: str  # a string in its command line, to never signal a recycled pid
    log: str
    locked_kib: int = 0
    notes: tuple[str, ...] = ()


def start_nbdkit(socket: str, pidfile: str, log: str, plugin_args: list[str],
                 preload: str | None) -> Daemon:
    """Serve ``plugin_args`` (e.g. ``["python", PLUGIN, "cluster=DIR", "size=1G"]`` or
    ``["memory", "1G"]``) on a unix socket, memory-locked (see the module doc)."""
    for p in (socket, pidfile):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)
    env = {"PYTHONPATH": _python_path(), "PYTHONUNBUFFERED": "1"}
    if preload:  # locked (on fault) and PR_SET_IO_FLUSHER by the preload
        argv = ["nbdkit", "-f", "-U", socket, "-P", pidfile, *plugin_args]
        env.update({"LD_PRELOAD": preload, "RALLOC_MLOCK": "onfault"})
    else:  # nbdkit locks itself, every page of every thread stack included
        argv = ["nbdkit", "--swap", "-f", "-U", socket, "-P", pidfile, *plugin_args]
    pid = spawn_daemon(argv, log, env)
    wait_ready(pid, "nbdkit", lambda: read_pidfile(pidfile) == pid and os.path.exists(socket),
               log)
    notes = harden_daemon(pid) + _preload_notes(log)
    return Daemon(pid=pid, marker=socket, log=log, locked_kib=locked_kib(pid),
                  notes=tuple(notes))


# --------------------------------------------------------------------------------------
# nbdfuse


def is_mountpoint(path: str) -> bool:
    path = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                if line.split()[4].replace("\\040", " ") == path:
                    return True
    except OSError:
        pass
    return False


def start_nbdfuse(mountpoint: str, socket: str, pidfile: str, log: str,
                  preload: str | None) -> Daemon:
    """Expose the export as ``mountpoint/nbd`` through FUSE, memory-locked by the preload."""
    os.makedirs(mountpoint, exist_ok=True)
    if is_mountpoint(mountpoint):
        raise AttachError(f"{mountpoint} is already a mount point")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(pidfile)
    env = {"LD_PRELOAD": preload, "RALLOC_MLOCK": "onfault"} if preload else {}
    pid = spawn_daemon(["nbdfuse", "-P", pidfile, os.path.join(mountpoint, "nbd"),
                        "--unix", socket], log, env)
    wait_ready(pid, "nbdfuse", lambda: read_pidfile(pidfile) == pid and is_mountpoint(mountpoint),
               log)
    notes = harden_daemon(pid) + _preload_notes(log)
    if not preload:
        notes.append("WARNING: not memory-locked (no preload library)")
    return Daemon(pid=pid, marker=mountpoint, log=log, locked_kib=locked_kib(pid),
                  notes=tuple(notes))


def unmount_fuse(mountpoint: str, pid: int, timeout: float = 15.0) -> str:
    """Unmount the nbdfuse mount (lazily if it stays busy) and wait for nbdfuse to exit."""
    notes = []
    if is_mountpoint(mountpoint):
        r = subprocess.run(["fusermount3", "-u", mountpoint], capture_output=True, text=True)
        if r.returncode != 0 and is_mountpoint(mountpoint):
            r2 = subprocess.run(["fusermount3", "-u", "-z", mountpoint], capture_output=True,
                                text=True)
            if r2.returncode != 0 and is_mountpoint(mountpoint):
                raise AttachError(f"cannot unmount {mountpoint}: {r.stderr.strip()} / "
                                  f"{r2.stderr.strip()}")
            notes.append("unmounted lazily (it was busy)")
        else:
            notes.append("unmounted")
    else:
        notes.append("not mounted")
    deadline = time.monotonic() + timeout
    while proc_alive(pid, mountpoint) and time.monotonic() < deadline:
        time.sleep(0.05)
    if stop_process(pid, mountpoint, grace=2.0):
        notes.append("nbdfuse had to be killed")
    return ", ".join(notes)


# --------------------------------------------------------------------------------------
# loop devices


def loops_backed_by(path: str) -> list[str]:
    """Loop devices whose backing file is ``path`` (from sysfs: no guessing by number)."""
    path = os.path.realpath(path)
    out = []
    with contextlib.suppress(OSError):
        for name in sorted(os.listdir("/sys/block")):
            if not name.startswith("loop"):
                continue
            with contextlib.suppress(OSError), \
                    open(f"/sys/block/{name}/loop/backing_file") as f:
                bf = f.read().strip().removesuffix(" (deleted)")
                if bf == path:
                    out.append(f"/dev/{name}")
    return out


def attach_loop(path: str) -> tuple[str, bool]:
    """``losetup --direct-io=on`` over ``path``. Returns (device, direct I/O really on)."""
    r = subprocess.run(["losetup", "--direct-io=on", "--show", "-f", path],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise AttachError(f"losetup {path}: {r.stderr.strip() or r.returncode}")
    dev = r.stdout.strip().splitlines()[-1]
    try:
        with open(f"/sys/block/{os.path.basename(dev)}/loop/dio") as f:
            dio = f.read().strip() == "1"
    except OSError:
        dio = False
    return dev, dio


def detach_loop(dev: str, backing: str, timeout: float = 10.0) -> str:
    """Detach ``dev`` if (and only if) it is still backed by ``backing``."""
    if dev not in loops_backed_by(backing):
        return "not attached"
    r = subprocess.run(["losetup", "-d", dev], capture_output=True, text=True)
    if r.returncode != 0 and dev in loops_backed_by(backing):
        raise AttachError(f"losetup -d {dev}: {r.stderr.strip()}")
    deadline = time.monotonic() + timeout  # the kernel detaches once the last user closes
    while dev in loops_backed_by(backing):
        if time.monotonic() > deadline:
            raise AttachError(f"{dev} is still attached after losetup -d (still in use?)")
        time.sleep(0.05)
    return "detached"


# --------------------------------------------------------------------------------------
# kernel NBD driver


def nbd_driver() -> tuple[bool, str]:
    """Whether /dev/nbdX can be used here: (usable, why not / how)."""
    client = shutil.which("nbd-client")
    if not os.path.isdir("/sys/module/nbd"):
        if client is None:
            return False, "no NBD kernel driver (/sys/module/nbd) and no nbd-client"
        subprocess.run(["modprobe", "nbd"], capture_output=True)
        if not os.path.isdir("/sys/module/nbd"):
            return False, "no NBD kernel driver (modprobe nbd failed)"
    if client is None:
        return False, "the NBD driver is loaded but nbd-client is not installed"
    if not any(n.startswith("nbd") for n in os.listdir("/sys/block")):
        return False, "the NBD driver is loaded but has no /dev/nbdX devices"
    return True, "kernel NBD driver + nbd-client"


def free_nbd_device() -> str:
    for name in sorted(os.listdir("/sys/block"), key=lambda n: (len(n), n)):
        if not name.startswith("nbd"):
            continue
        if os.path.exists(f"/sys/block/{name}/pid"):
            continue
        try:
            with open(f"/sys/block/{name}/size") as f:
                if int(f.read().strip()) != 0:
                    continue
        except (OSError, ValueError):
            continue
        return f"/dev/{name}"
    raise AttachError("every /dev/nbdX is in use")


def nbd_connected(dev: str) -> bool:
    name = os.path.basename(dev)
    try:
        with open(f"/sys/block/{name}/size") as f:
            return int(f.read().strip()) != 0 or os.path.exists(f"/sys/block/{name}/pid")
    except (OSError, ValueError):
        return False


def attach_nbd(socket: str) -> str:
    """Connect a free /dev/nbdX to the server on ``socket`` with nbd-client."""
    dev = free_nbd_device()
    r = subprocess.run(["nbd-client", "-unix", socket, dev, "-b", "4096", "-swap"],
                       capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise AttachError(f"nbd-client {dev}: {(r.stderr or r.stdout).strip()}")
    deadline = time.monotonic() + 10
    while not nbd_connected(dev):
        if time.monotonic() > deadline:
            raise AttachError(f"nbd-client returned but {dev} has no size")
        time.sleep(0.05)
    return dev


def detach_nbd(dev: str) -> str:
    if not nbd_connected(dev):
        return "not connected"
    r = subprocess.run(["nbd-client", "-d", dev], capture_output=True, text=True, timeout=60)
    if r.returncode != 0 and nbd_connected(dev):
        raise AttachError(f"nbd-client -d {dev}: {(r.stderr or r.stdout).strip()}")
    return "disconnected"


# --------------------------------------------------------------------------------------
# swap


@dataclass(frozen=True)
class SwapArea:
    device: str
    kind: str
    size_kib: int
    used_kib: int
    priority: int


def swaps() -> dict[str, SwapArea]:
    """Active swap areas (/proc/swaps) by device path."""
    out = {}
    with open("/proc/swaps") as f:
        for line in f.read().splitlines()[1:]:
            p = line.split()
            if len(p) >= 5:
                dev = p[0].replace("\\040", " ")
                out[dev] = SwapArea(dev, p[1], int(p[2]), int(p[3]), int(p[4]))
    return out


def make_swap(dev: str, label: str) -> None:
    r = subprocess.run(["mkswap", "-L", label[:15], dev], capture_output=True, text=True)
    if r.returncode != 0:
        raise AttachError(f"mkswap {dev}: {r.stderr.strip()}")


def swap_on(dev: str, priority: int | None, discard: bool) -> None:
    argv = ["swapon"]
    if priority is not None:
        argv += ["-p", str(priority)]
    if discard:
        argv.append("--discard")
    r = subprocess.run([*argv, dev], capture_output=True, text=True)
    if r.returncode != 0:
        raise AttachError(f"swapon {dev}: {r.stderr.strip()}")


def swap_off(dev: str) -> str:
    """swapoff ``dev`` if active. This reads every swapped page back: it can take a while."""
    if dev not in swaps():
        return "not active"
    r = subprocess.run(["swapoff", dev], capture_output=True, text=True)
    if r.returncode != 0 and dev in swaps():
        raise AttachError(f"swapoff {dev}: {r.stderr.strip()} (pages still in swap there "
                          "could not be read back)")
    return "swapped off"
