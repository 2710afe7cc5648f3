"""Helpers for tests that run real slabd processes: start, wait for READY, kill, clean up.

Not a conftest: test files import what they need and define their own small fixtures, so
every blade a test starts is owned (and torn down) by that test.

    with SlabdPool(tmp_path) as pool:
        b = pool.start(capacity="64M", lease=1)
        v = pool.connect(b, node_id=42)

RALLOC_TEST_SLABD_LOG=INFO (or DEBUG) makes the blades log more (their logs are in the
test's tmp_path, NAME.log).
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from rallocator.secret import generate_secret_file, load_secret
from rallocator.transport_tcp import TcpVerbs

REPO = Path(__file__).resolve().parent.parent
PYTHON = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv").exists() else sys.executable
READY_TIMEOUT = 20.0


class SlabdFailed(Exception):
    """slabd exited or did not print READY in time; the message carries its log tail."""


def make_secret(directory: Path, name: str = "cluster.secret") -> Path:
    path = directory / name
    generate_secret_file(str(path))
    return path


class Slabd:
    """One slabd subprocess. ``address`` is its ``host:port`` once started."""

    def __init__(self, region: Path, secret_file: Path, log: Path, *, capacity: str = "64M",
                 mode: str = "dram", name: str = "b", lease: float | None = None,
                 listen: str = "127.0.0.1:0", extra: tuple[str, ...] = ()) -> None:
        self.region = Path(region)
        self.secret_file = Path(secret_file)
        self.log = Path(log)
        self.capacity = capacity
        self.mode = mode
        self.name = name
        self.lease = lease
        self.listen = listen
        self.extra = extra
        self.proc: subprocess.Popen[str] | None = None
        self.address = ""

    @property
    def argv(self) -> list[str]:
        argv = [PYTHON, "-m", "slabd", "--listen", self.listen, "--capacity", self.capacity,
                "--region", str(self.region), "--mode", self.mode, "--name", self.name,
                "--secret-file", str(self.secret_file),
                "--log-level", os.environ.get("RALLOC_TEST_SLABD_LOG", "WARNING")]
        if self.lease is not None:
            argv += ["--lease", str(self.lease)]
        return argv + list(self.extra)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> Slabd:
        """Start and wait for ``READY host:port``. Reuses the last port on a restart."""
        if self.address:
            self.listen = self.address
        with self.log.open("a") as err:
            self.proc = subprocess.Popen(self.argv, cwd=REPO, stdout=subprocess.PIPE,
                                         stderr=err, stdin=subprocess.DEVNULL, text=True)
        assert self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + READY_TIMEOUT
        try:
            while time.monotonic() < deadline:
                if sel.select(timeout=max(0.0, deadline - time.monotonic())):
                    line = self.proc.stdout.readline()
                    if line.startswith("READY "):
                        self.address = line.split()[1]
                        return self
                    if not line:  # EOF: it exited
                        break
            self.kill()
            raise SlabdFailed(f"slabd did not become ready: {self.log_tail()}")
        finally:
            sel.close()

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log.read_text().strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(text[-lines:]) or "(empty log)"

    def kill(self) -> None:
        """SIGKILL (a crash) and reap."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def stop(self) -> int:
        """SIGTERM (clean shutdown) and reap; returns the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode


class SlabdPool:
    """Starts blades for one test and guarantees they are gone (and their regions deleted)
    when it closes."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.secret_file = make_secret(self.dir)
        self.secret = load_secret(str(self.secret_file))
        self.blades: list[Slabd] = []
        self.regions: list[Path] = []
        self.procs: list[subprocess.Popen[Any]] = []

    def __enter__(self) -> SlabdPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def region_path(self, name: str, shm: bool = False) -> Path:
        if shm:
            path = Path(f"/dev/shm/rallocator-test-{uuid.uuid4().hex[:12]}-{name}.region")
        else:
            path = self.dir / f"{name}.region"
        self.regions.append(path)
        return path

    def blade(self, name: str = "b", *, shm: bool = False, region: Path | None = None,
              **kw: Any) -> Slabd:
        """A blade object, not started (so a test can pick its moment)."""
        if region is None:
            region = self.region_path(name, shm=shm)
        else:
            self.regions.append(Path(region))
        b = Slabd(region, self.secret_file, self.dir / f"{name}.log", name=name, **kw)
        self.blades.append(b)
        return b

    def start(self, name: str = "b", **kw: Any) -> Slabd:
        return self.blade(name, **kw).start()

    def spawn(self, argv: list[str], **kw: Any) -> subprocess.Popen[Any]:
        """A helper subprocess this pool kills at the end."""
        p = subprocess.Popen(argv, cwd=REPO, **kw)
        self.procs.append(p)
        return p

    def connect(self, blade: Slabd, node_id: int, timeout: float = 5.0) -> TcpVerbs:
        return TcpVerbs(blade.address, self.secret, node_id, timeout=timeout)

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for b in self.blades:
            try:
                b.kill()
            except Exception:  # keep cleaning up the rest
                pass
        for r in self.regions:
            try:
                os.unlink(r)
            except FileNotFoundError:
                pass


def wait_for(predicate: Any, timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate()`` until it is truthy or ``timeout`` passes; returns the last verdict."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
