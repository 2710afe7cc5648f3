"""Memory cgroups for ``ralloc run`` (and for keeping the swap daemons out of them).

One class, :class:`MemoryCgroup`, hides the difference between the two hierarchies:

- **v1** (``memory`` controller mounted on its own, e.g. ``/sys/fs/cgroup/memory``):
  ``memory.limit_in_bytes``, ``memory.swappiness``; ``memory.memsw.*`` is read when the
  kernel has it (swap accounting) but never required.
- **v2** (unified): ``memory.max``; swap is allowed (``memory.swap.max`` stays ``max``).
  v2 has no per-cgroup swappiness, so a requested one is reported as not applied.

A new cgroup is created as a child of the caller's own memory cgroup (so the caller keeps
its own memory and the child inherits whatever the caller's container allows). On v2 a
cgroup that holds processes cannot enable controllers for its children; there the new
cgroup becomes a sibling instead (a child of the caller's parent).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import time
from dataclasses import dataclass

V1_UNLIMITED = 1 << 62  # v1 reports "no limit" as a page-rounded LONG_MAX


class CgroupError(Exception):
    """No usable memory cgroup hierarchy, or the kernel refused a cgroup operation."""


@dataclass(frozen=True)
class Hierarchy:
    """Where the memory controller lives and where the calling process sits in it."""

    version: int  # 1 or 2
    mount: str  # e.g. /sys/fs/cgroup/memory (v1) or /sys/fs/cgroup (v2)

    def path_of(self, pid: int | str = "self") -> str:
        """Absolute directory of ``pid``'s memory cgroup."""
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                hid, controllers, rel = line.rstrip("\n").split(":", 2)
                if self.version == 2 and hid == "0":
                    return os.path.join(self.mount, rel.lstrip("/"))
                if self.version == 1 and "memory" in controllers.split(","):
                    return os.path.join(self.mount, rel.lstrip("/"))
        raise CgroupError(f"process {pid} is in no {'v2' if self.version == 2 else 'memory'} "
                          "cgroup")


def find_hierarchy() -> Hierarchy:
    """The host's memory cgroup hierarchy: v2 if it has the memory controller, else v1.

    Raises:
        CgroupError: neither is mounted (or the memory controller is disabled).
    """
    v1 = v2 = None
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) < 4:
                continue
            mnt, fstype, opts = parts[1].replace("\\040", " "), parts[2], parts[3].split(",")
            if fstype == "cgroup2" and v2 is None:
                try:
                    with open(os.path.join(mnt, "cgroup.controllers")) as c:
                        if "memory" in c.read().split():
                            v2 = mnt
                except OSError:
                    pass
            elif fstype == "cgroup" and "memory" in opts and v1 is None:
                v1 = mnt
    if v2 is not None:
        return Hierarchy(2, v2)
    if v1 is not None:
        return Hierarchy(1, v1)
    raise CgroupError("no memory cgroup controller is mounted (need cgroup v1 'memory' or "
                      "cgroup v2 with the memory controller)")


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read_int(path: str) -> int | None:
    try:
        text = _read(path)
    except OSError:
        return None
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _read_kv(path: str) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open(path) as f:
            for line in f:
                k, _, v = line.partition(" ")
                with contextlib.suppress(ValueError):
                    out[k] = int(v)
    except OSError:
        pass
    return out


def procs_of(path: str) -> list[int]:
    """Pids in a cgroup directory (empty if it is gone)."""
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def limit_of(h: Hierarchy, path: str) -> int | None:
    """The memory limit set on one cgroup directory itself (None: unlimited)."""
    if h.version == 1:
        v = _read_int(os.path.join(path, "memory.limit_in_bytes"))
        return None if v is None or v >= V1_UNLIMITED else v
    return _read_int(os.path.join(path, "memory.max"))


def effective_limit(h: Hierarchy, path: str) -> tuple[int | None, str]:
    """The tightest memory limit on ``path`` or any ancestor, and where it is set."""
    best: tuple[int | None, str] = (None, "")
    p = os.path.normpath(path)
    root = os.path.normpath(h.mount)
    while True:
        lim = limit_of(h, p)
        if lim is not None and (best[0] is None or lim < best[0]):
            best = (lim, p)
        if p == root or len(p) <= len(root):
            return best
        p = os.path.dirname(p)


def unlimited_home(h: Hierarchy, pid: int | str = "self") -> str | None:
    """The deepest cgroup on ``pid``'s path with no memory limit on it or above it.

    None when even the hierarchy's root-most cgroup we can see is limited (then a daemon
    cannot be kept out of the limit).
    """
    path = os.path.normpath(h.path_of(pid))
    root = os.path.normpath(h.mount)
    chain = [path]
    while chain[-1] != root and len(chain[-1]) > len(root):
        chain.append(os.path.dirname(chain[-1]))
    home = None
    for p in reversed(chain):  # root first
        if limit_of(h, p) is not None:
            break
        home = p
    return home


def keep_out_of_limits(pid: int) -> str:
    """Move ``pid`` out of any memory-limited cgroup (daemons must never be throttled or
    OOM-killed by a workload's limit). Returns a short note of what was done."""
    try:
        h = find_hierarchy()
        here = os.path.normpath(h.path_of(pid))
        home = unlimited_home(h, pid)
    except (CgroupError, OSError) as e:
        return f"cgroup not checked ({e})"
    if home is None:
        lim, where = effective_limit(h, here)
        return f"WARNING: every cgroup above it is memory-limited ({where}: {lim} bytes)"
    if home == here:
        return "not memory-limited"
    try:
        _write(os.path.join(home, "cgroup.procs"), str(pid))
    except OSError as e:
        return f"WARNING: could not leave limited cgroup {here}: {e}"
    return f"moved out of limited cgroup {here} to {home}"


class MemoryCgroup:
    """A fresh memory cgroup with a limit; remove it with :meth:`remove`.

    Usage::

        cg = MemoryCgroup.create(256 << 20, swappiness=100)
        ... in the child, before exec: cg.join()   (or cg.add(pid))
        stats = cg.stats(); cg.remove()
    """

    def __init__(self, hierarchy: Hierarchy, path: str, limit: int) -> None:
        self.h = hierarchy
        self.path = path
        self.limit = limit
        self.notes: list[str] = []
        self._swap_peak = 0

    @property
    def version(self) -> int:
        return self.h.version

    @classmethod
    def create(cls, limit: int, swappiness: int | None = None,
               name: str | None = None) -> MemoryCgroup:
        """Create ``ralloc-run-<pid>`` (or ``name``) with memory limit ``limit`` bytes.

        Raises:
            CgroupError: no memory cgroup, no permission, or the limit was refused.
        """
        h = find_hierarchy()
        name = name or f"ralloc-run-{os.getpid()}"
        base = h.path_of()
        if h.version == 2:
            base = _v2_parent_for_children(base)
        _collect_stale(base)
        path = os.path.join(base, name)
        try:
            os.mkdir(path)
        except FileExistsError:
            if procs_of(path):
                raise CgroupError(f"cgroup {path} already exists and is in use") from None
        except OSError as e:
            raise CgroupError(f"cannot create cgroup {path}: {e.strerror}") from None
        cg = cls(h, path, limit)
        try:
            if h.version == 1:
                _write(os.path.join(path, "memory.limit_in_bytes"), str(limit))
                if swappiness is not None:
                    try:
                        _write(os.path.join(path, "memory.swappiness"), str(swappiness))
                    except OSError as e:
                        cg.notes.append(f"swappiness not applied: {e.strerror}")
            else:
                _write(os.path.join(path, "memory.max"), str(limit))
                with contextlib.suppress(OSError):
                    _write(os.path.join(path, "memory.swap.max"), "max")
                if swappiness is not None:
                    cg.notes.append("swappiness not applied: cgroup v2 has no per-cgroup "
                                    "swappiness (the global vm.swappiness applies)")
        except OSError as e:
            cg.remove()
            raise CgroupError(f"cannot set the memory limit on {path}: {e.strerror}") from None
        return cg

    def join(self) -> None:
        """Move the calling process into the cgroup (call in the child before exec)."""
        _write(os.path.join(self.path, "cgroup.procs"), "0" if self.h.version == 2 else
               str(os.getpid()))

    def add(self, pid: int) -> None:
        _write(os.path.join(self.path, "cgroup.procs"), str(pid))

    def procs(self) -> list[int]:
        return procs_of(self.path)

    def swap_now(self) -> int:
        """Bytes of this cgroup's memory currently in swap."""
        if self.h.version == 1:
            st = _read_kv(os.path.join(self.path, "memory.stat"))
            v = st.get("total_swap", st.get("swap", 0))
        else:
            v = _read_int(os.path.join(self.path, "memory.swap.current")) or 0
        self._swap_peak = max(self._swap_peak, v)
        return v

    def stats(self) -> dict[str, object]:
        """Usage, peaks and swap numbers, read from the kernel (call before :meth:`remove`)."""
        p = self.path
        self.swap_now()
        out: dict[str, object] = {"cgroup": p, "version": self.h.version, "limit": self.limit,
                                  "swap_peak_sampled": self._swap_peak}
        if self.h.version == 1:
            out["usage"] = _read_int(os.path.join(p, "memory.usage_in_bytes"))
            out["max_usage"] = _read_int(os.path.join(p, "memory.max_usage_in_bytes"))
            out["failcnt"] = _read_int(os.path.join(p, "memory.failcnt"))
            ms = _read_int(os.path.join(p, "memory.memsw.max_usage_in_bytes"))
            if ms is not None:
                out["memsw_max_usage"] = ms
                out["memsw_usage"] = _read_int(os.path.join(p, "memory.memsw.usage_in_bytes"))
                if out["max_usage"] is not None:
                    # memory+swap peak minus memory peak: a lower bound on the swap peak
                    out["swap_peak_memsw"] = max(0, ms - int(out["max_usage"]))  # type: ignore[arg-type]
            oom = _read_kv(os.path.join(p, "memory.oom_control"))
            out["oom_kill"] = oom.get("oom_kill", 0)
        else:
            out["usage"] = _read_int(os.path.join(p, "memory.current"))
            out["max_usage"] = _read_int(os.path.join(p, "memory.peak"))
            out["swap_usage"] = _read_int(os.path.join(p, "memory.swap.current"))
            sp = _read_int(os.path.join(p, "memory.swap.peak"))
            if sp is not None:
                out["swap_peak"] = sp
            ev = _read_kv(os.path.join(p, "memory.events"))
            out["oom_kill"] = ev.get("oom_kill", 0)
            out["failcnt"] = ev.get("max", 0)
        st = _read_kv(os.path.join(p, "memory.stat"))
        out["stat"] = {k: v for k, v in st.items()
                       if k in ("swap", "total_swap", "rss", "anon", "cache", "file",
                                "pgmajfault", "total_pgmajfault", "pswpin", "pswpout",
                                "swapcached")}
        return out

    def kill_all(self, timeout: float = 5.0) -> None:
        """SIGKILL whatever is still in the cgroup (left-over grandchildren)."""
        if self.h.version == 2 and os.path.exists(os.path.join(self.path, "cgroup.kill")):
            with contextlib.suppress(OSError):
                _write(os.path.join(self.path, "cgroup.kill"), "1")
        deadline = time.monotonic() + timeout
        while True:
            pids = self.procs()
            if not pids or time.monotonic() > deadline:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.02)

    def remove(self, timeout: float = 10.0) -> None:
        """Kill what is left in the cgroup and delete it (idempotent).

        Raises:
            CgroupError: it would not go away within ``timeout``.
        """
        if not os.path.isdir(self.path):
            return
        self.kill_all()
        deadline = time.monotonic() + timeout
        while True:
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError as e:
                if e.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise CgroupError(f"cannot remove cgroup {self.path}: {e.strerror}") from None
            self.kill_all(timeout=0.5)
            time.sleep(0.05)


def _v2_parent_for_children(base: str) -> str:
    """Where a new v2 cgroup with the memory controller can go: under ``base`` when its
    ``memory`` controller can be enabled for children, else beside it."""
    sub = os.path.join(base, "cgroup.subtree_control")
    try:
        if "memory" in _read(sub).split():
            return base
        _write(sub, "+memory")
        return base
    except OSError:
        parent = os.path.dirname(base)
        try:
            if "memory" in _read(os.path.join(parent, "cgroup.subtree_control")).split():
                return parent
        except OSError:
            pass
    raise CgroupError(f"cannot enable the memory controller for a child of {base} (it holds "
                      "processes) nor beside it; run from a cgroup that delegates 'memory'")


_STALE = re.compile(r"^ralloc-run-(\d+)$")


def _collect_stale(base: str) -> None:
    """Remove ``ralloc-run-<pid>`` cgroups left by a ``ralloc run`` that was SIGKILLed."""
    try:
        names = os.listdir(base)
    except OSError:
        return
    for n in names:
        m = _STALE.match(n)
        if not m:
            continue
        pid = int(m.group(1))
        if pid == os.getpid() or os.path.exists(f"/proc/{pid}"):
            continue
        path = os.path.join(base, n)
        if not procs_of(path):
            with contextlib.suppress(OSError):
                os.rmdir(path)
