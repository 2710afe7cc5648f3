"""Test helpers: real mounts through the CLI's code, and cleanup that leaves nothing behind.

    with mounted(cluster_dir, mountpoint, name="t") as fs:
        (fs.path / "f").write_bytes(b"...")
        fs.remount()          # clean unmount + mount: the log is replayed
        fs.kill9()            # the daemon dies; the dead mount is detached
        fs.mount()

Every exit path unmounts (``fusermount3 -u``, then ``-z``) and kills the daemon if it is
still there, so a failing test leaves no mount and no process.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from fuse_fs.cli import daemon_pids, mount_entry, umount_main
from fuse_fs.cli import main as cli_main


def fuse_available() -> tuple[bool, str]:
    """Can this machine run FUSE mounts (device, fusermount3, root for allow_other)?"""
    if not os.path.exists("/dev/fuse"):
        return False, "/dev/fuse is missing"
    if shutil.which("fusermount3") is None:
        return False, "fusermount3 is not installed (apt-get install fuse3)"
    if os.geteuid() != 0:
        return False, "FUSE tests mount with allow_other and need root"
    return True, ""


def _run(fn: Callable[..., int], argv: list[str]) -> None:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = fn(argv)
    if code != 0:
        raise RuntimeError(f"{fn.__module__}.{fn.__name__}({' '.join(argv)}) failed "
                           f"({code}): {err.getvalue().strip()}")


def force_unmount(mountpoint: str | os.PathLike[str]) -> None:
    """Best effort: detach the mount and kill any daemon serving it."""
    mp = os.path.abspath(mountpoint)
    for p in daemon_pids(mp):
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGTERM)
    _wait_gone(daemon_pids(mp), 10)
    if mount_entry(mp) is not None:
        subprocess.run(["fusermount3", "-u", mp], capture_output=True)
    if mount_entry(mp) is not None:
        subprocess.run(["fusermount3", "-u", "-z", mp], capture_output=True)
    for p in daemon_pids(mp):
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    _wait_gone(daemon_pids(mp), 5)


def _wait_gone(pids: list[int], timeout: float) -> bool:
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = []
        for p in pids:
            try:
                if psutil.Process(p).status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.NoSuchProcess:
                pass
        if not alive:
            return True
        time.sleep(0.05)
    return False


def leftovers(base: str | os.PathLike[str]) -> list[str]:
    """Mounts under ``base`` and filesystem daemons naming it: what a test left behind."""
    import psutil

    base = os.path.abspath(base)
    found = [f"mount {line.split()[1]}" for line in Path("/proc/mounts").read_text().splitlines()
             if len(line.split()) > 2 and line.split()[1].startswith(base)]
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = p.info.get("cmdline") or []
        daemon = "fuse_fs" in cmd or ("mount" in cmd and any(a.endswith("ralloc") for a in cmd))
        if daemon and p.info["pid"] != os.getpid() and any(base in a for a in cmd):
            found.append(f"process {p.info['pid']}: {' '.join(cmd)}")
    return found


class MountedFs:
    """One filesystem on one mount point, driven through ``ralloc mount/umount``."""

    def __init__(self, cluster: str | os.PathLike[str], mountpoint: str | os.PathLike[str],
                 name: str = "test", replicas: int = 1, extra: tuple[str, ...] = ()) -> None:
        self.cluster = str(cluster)
        self.path = Path(os.path.abspath(mountpoint))
        self.name = name
        self.replicas = replicas
        self.extra = extra
        self.path.mkdir(parents=True, exist_ok=True)

    @property
    def log(self) -> Path:
        return Path(self.cluster) / "logs" / f"fs-{self.name}.log"

    def mount(self) -> None:
        """``ralloc mount`` (in this process: it starts the daemon detached and waits)."""
        _run(cli_main, ["--cluster", self.cluster, str(self.path), "--name", self.name,
                        "--replicas", str(self.replicas), *self.extra])

    def umount(self) -> None:
        """``ralloc umount``: returns once the daemon checkpointed and exited."""
        _run(umount_main, [str(self.path)])

    def remount(self) -> None:
        self.umount()
        self.mount()

    def pid(self) -> int:
        pids = daemon_pids(str(self.path))
        if len(pids) != 1:
            raise RuntimeError(f"expected one daemon for {self.path}, found {pids}")
        return pids[0]

    def kill9(self) -> None:
        """SIGKILL the daemon (a crash), then detach the dead mount."""
        pid = self.pid()
        os.kill(pid, signal.SIGKILL)
        _wait_gone([pid], 10)
        subprocess.run(["fusermount3", "-u", "-z", str(self.path)], capture_output=True)

    def cleanup(self) -> None:
        force_unmount(self.path)


@contextlib.contextmanager
def mounted(cluster: str | os.PathLike[str], mountpoint: str | os.PathLike[str],
            name: str = "test", replicas: int = 1,
            extra: tuple[str, ...] = ()) -> Iterator[MountedFs]:
    fs = MountedFs(cluster, mountpoint, name, replicas, extra)
    try:
        fs.mount()
        yield fs
        if mount_entry(str(fs.path)) is not None:
            fs.umount()
    finally:
        fs.cleanup()
