"""End-to-end tests: the real coordinator daemon as a subprocess, over real HTTP on loopback."""

from __future__ import annotations

import http.client
import json
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rallocator.coordinator_client import CoordinatorClient, CoordinatorUnavailable
from rallocator.secret import coordinator_token, generate_secret_file, load_secret

REPO = Path(__file__).resolve().parent.parent
PYTHON = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv").exists() else sys.executable
HB = 0.2  # heartbeat interval: dead after 0.6 s
MiB = 1 << 20
GiB = 1 << 30


class Daemon:
    """A running coordinator subprocess and a client for it."""

    def __init__(self, proc: subprocess.Popen[str], address: str, secret: bytes, log: Path):
        self.proc = proc
        self.address = address
        self.secret = secret
        self.log = log
        self.client = CoordinatorClient(address, secret, timeout=2.0)

    def raw(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        token: str | None = "default",
    ) -> tuple[int, Any]:
        """A request with full control over auth and body, for what the client cannot send."""
        host, port = self.address.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=5)
        headers = {}
        if token == "default":
            token = coordinator_token(self.secret)
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        ctype = resp.getheader("Content-Type", "")
        return resp.status, (json.loads(data) if "json" in ctype else data.decode())


def _start(args: list[str], cwd: Path, log: Path) -> tuple[subprocess.Popen[str], str | None]:
    """Start the daemon; return it and the address from its READY line (None if it exited)."""
    proc = subprocess.Popen(
        [PYTHON, "-m", "coordinator", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
    )
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if sel.select(timeout=deadline - time.monotonic()):
            line = proc.stdout.readline()
            if not line:
                return proc, None
            assert line.startswith("READY "), line
            return proc, line.split()[1]
    proc.kill()
    proc.wait()
    raise AssertionError("coordinator did not print READY within 10 s")


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout:
        proc.stdout.close()


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "secret"
    generate_secret_file(str(path))
    return path


@pytest.fixture
def start_daemon(tmp_path: Path, secret_file: Path) -> Iterator[Callable[..., Daemon]]:
    procs: list[subprocess.Popen[str]] = []

    def start(*extra: str) -> Daemon:
        log = tmp_path / f"coordinator{len(procs)}.log"
        args = ["--listen", "127.0.0.1:0", "--secret-file", str(secret_file)]
        args += ["--heartbeat-interval", str(HB), *extra]
        proc, address = _start(args, tmp_path, log)
        procs.append(proc)
        assert address is not None, log.read_text()
        return Daemon(proc, address, load_secret(str(secret_file)), log)

    yield start
    for p in procs:
        _stop(p)


@pytest.fixture
def daemon(start_daemon: Callable[..., Daemon]) -> Daemon:
    return start_daemon()


def blade_fields(name: str, port: int, capacity: int = GiB) -> dict[str, Any]:
    return {
        "name": name,
        "address": f"127.0.0.1:{port}",
        "capacity_bytes": capacity,
        "unit_size": MiB,
        "slab_sizes": [MiB],
        "mode": "dram",
        "pid": 4242,
    }


def hb_fields(name: str, used: int = 0, capacity: int = GiB) -> dict[str, Any]:
    return {
        "name": name,
        "used_bytes": used,
        "capacity_bytes": capacity,
        "slabs_total": capacity // MiB,
        "slabs_used": used // MiB,
        "host_mem_percent": 30.5,
        "host_mem_available": 4 * GiB,
    }


def wait_for(pred: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


# -- tests ---------------------------------------------------------------------------------


def test_auth_required(daemon: Daemon, tmp_path: Path) -> None:
    for token in (None, "0" * 64):
        status, body = daemon.raw("GET", "/v1/status", token=token)
        assert status == 401 and "error" in body
        status, body = daemon.raw(
            "POST", "/v1/blades/register", json.dumps(blade_fields("x", 1)).encode(), token=token
        )
        assert status == 401
    assert daemon.raw("GET", "/v1/status")[0] == 200
    assert daemon.raw("GET", "/v1/nowhere")[0] == 404
    wrong = CoordinatorClient(daemon.address, b"another-secret-entirely-0123456789")
    with pytest.raises(CoordinatorUnavailable, match="secret does not match"):
        wrong.status()
    # /metrics is open to scrapers.
    assert daemon.raw("GET", "/metrics", token=None)[0] == 200


def test_register_heartbeat_status(daemon: Daemon) -> None:
    c = daemon.client
    assert c.register(**blade_fields("b1", 9001)) == {"ok": True, "heartbeat_interval": HB}
    assert c.heartbeat(**hb_fields("b1", used=100 * MiB)) == {"ok": True, "known": True}
    assert c.heartbeat(**hb_fields("stranger")) == {"ok": True, "known": False}
    st = c.status()
    assert st["coordinator"]["address"] == daemon.address
    assert st["coordinator"]["pid"] == daemon.proc.pid and st["coordinator"]["alive"] is True
    (b,) = st["blades"]
    assert b["name"] == "b1" and b["address"] == "127.0.0.1:9001" and b["alive"] is True
    assert b["used_bytes"] == 100 * MiB and b["capacity_bytes"] == GiB
    assert b["slabs_used"] == 100 and b["host_mem_percent"] == 30.5 and b["mode"] == "dram"
    assert 0 <= b["last_heartbeat_age_s"] < 1
    assert "blade b1 registered" in daemon.log.read_text()


def test_hint_spreads_burst_skips_dead(start_daemon: Callable[..., Daemon]) -> None:
    # A roomier dead-after than the default 0.6 s, so a loaded test machine cannot let the
    # live blades expire in the middle of the burst.
    daemon = start_daemon("--dead-after", "1.0")
    c = daemon.client
    live = ["b1", "b2", "b3"]
    for i, n in enumerate([*live, "gone"]):
        c.register(**blade_fields(n, 9100 + i))

    def dead() -> bool:
        for n in live:
            c.heartbeat(**hb_fields(n))
        return not next(b for b in c.status()["blades"] if b["name"] == "gone")["alive"]

    assert wait_for(dead, 4.0)
    for n in live:  # fresh heartbeats: a quiet window of 1 s for the burst
        c.heartbeat(**hb_fields(n))
    picks: Counter[str] = Counter()
    for _ in range(30):
        (pick,) = c.hint(1, 8 * MiB)
        picks[pick[0]] += 1
    assert set(picks) == set(live)
    assert max(picks.values()) - min(picks.values()) <= 1
    for k in (2, 3, 5):
        names = [n for n, _ in c.hint(k, MiB)]
        assert len(names) == len(set(names)) == min(k, 3)
        assert "gone" not in names
    names = [n for n, _ in c.hint(3, MiB, exclude=["b1", "b3"])]
    assert names == ["b2"]
    assert c.hint(2, 4 * GiB) == []  # nobody has room
    assert dict(c.hint(1, MiB, exclude=["b2", "b3"])) == {"b1": "127.0.0.1:9100"}


def test_blade_death_detected_and_announced(daemon: Daemon) -> None:
    c = daemon.client
    c.register(**blade_fields("victim", 9200))
    _, cursor = c.events(0, 0)
    started = time.monotonic()
    events, nxt = c.events(cursor, 5.0)  # long poll: returns when the death is noticed
    elapsed = time.monotonic() - started
    assert [(e["kind"], e["blade"]) for e in events] == [("blade_dead", "victim")]
    assert elapsed < 3 * HB + 1.0
    assert nxt == events[-1]["seq"]
    assert c.status()["blades"][0]["alive"] is False
    assert "victim" in daemon.log.read_text() and "dead" in daemon.log.read_text()
    # A long poll with nothing new waits for its timeout, then answers empty.
    t0 = time.monotonic()
    assert c.events(nxt, 0.4) == ([], nxt)
    assert 0.3 <= time.monotonic() - t0 < 2
    # The blade restarts: it registers again and nodes hear it is back.
    c.register(**blade_fields("victim", 9201))
    events, _ = c.events(nxt, 5.0)
    assert [(e["kind"], e["blade"]) for e in events] == [("blade_alive", "victim")]
    b = c.status()["blades"][0]
    assert b["alive"] is True and b["address"] == "127.0.0.1:9201"


def test_shed_event(daemon: Daemon) -> None:
    c = daemon.client
    c.register(**blade_fields("cool", 9300))
    c.register(**blade_fields("hot", 9301))
    c.heartbeat(**hb_fields("cool", used=GiB // 10))
    c.heartbeat(**hb_fields("hot", used=GiB * 95 // 100))
    events, _ = c.events(0, 2.0)
    shed = [e for e in events if e["kind"] == "shed"]
    assert len(shed) == 1
    assert shed[0]["blade"] == "hot" and shed[0]["target"] == "cool"
    assert 0 < shed[0]["bytes"] <= GiB * 95 // 100 - GiB // 2
    assert "shed advice" in daemon.log.read_text()


def test_malformed_requests_get_400_and_daemon_survives(daemon: Daemon) -> None:
    bad_bodies = [
        b"",
        b"{not json",
        b"[1, 2]",
        json.dumps({"name": "x"}).encode(),  # missing fields
        json.dumps({**blade_fields("x", 1), "capacity_bytes": "lots"}).encode(),
        json.dumps({**blade_fields("x", 1), "mode": "tape"}).encode(),
        json.dumps({**blade_fields("x", 1), "address": "no-port"}).encode(),
        json.dumps({**blade_fields("x", 1), "capacity_bytes": -5}).encode(),
        b"\xff\xfe\x00garbage",
    ]
    for body in bad_bodies:
        status, answer = daemon.raw("POST", "/v1/blades/register", body)
        assert status == 400, body
        assert isinstance(answer["error"], str) and answer["error"]
    status, _ = daemon.raw("POST", "/v1/blades/heartbeat", b'{"name": "x", "used_bytes": 1.5}')
    assert status == 400
    for path in ("/v1/hint?replicas=two", "/v1/hint?size=-1", "/v1/events?since=x"):
        assert daemon.raw("GET", path)[0] == 400, path
    assert daemon.raw("GET", "/v1/blades/register")[0] == 405
    # Still serving, and none of the junk was registered.
    assert daemon.client.status()["blades"] == []
    assert daemon.proc.poll() is None


def test_metrics(daemon: Daemon) -> None:
    c = daemon.client
    c.register(**blade_fields("m1", 9400, capacity=512 * MiB))
    c.heartbeat(**hb_fields("m1", used=64 * MiB, capacity=512 * MiB))
    c.hint(1, MiB)
    status, text = daemon.raw("GET", "/metrics", token=None)
    assert status == 200
    samples = {
        ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1])
        for ln in text.splitlines()
        if ln and not ln.startswith("#")
    }
    assert samples['rallocator_blade_capacity_bytes{blade="m1"}'] == 512 * MiB
    assert samples['rallocator_blade_used_bytes{blade="m1"}'] == 64 * MiB
    assert samples['rallocator_blade_alive{blade="m1"}'] == 1.0
    assert samples["rallocator_coordinator_hints_total"] == 1.0
    assert 'rallocator_coordinator_events_total{kind="blade_dead"}' in samples
    assert 'rallocator_coordinator_events_total{kind="shed"}' in samples


def test_sigterm_exits_zero_quickly_even_with_long_poll(daemon: Daemon) -> None:
    poll_done = threading.Event()

    def long_poll() -> None:
        try:
            daemon.client.events(0, 30)
        except CoordinatorUnavailable:
            pass
        poll_done.set()

    threading.Thread(target=long_poll, daemon=True).start()
    time.sleep(0.2)
    t0 = time.monotonic()
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(timeout=5) == 0
    assert time.monotonic() - t0 < 2
    assert poll_done.wait(3)


def test_sigint_exits_zero(daemon: Daemon) -> None:
    daemon.proc.send_signal(signal.SIGINT)
    assert daemon.proc.wait(timeout=5) == 0
    assert "Traceback" not in daemon.log.read_text()


def test_client_unreachable_is_unavailable() -> None:
    c = CoordinatorClient("127.0.0.1:1", b"x" * 32, timeout=0.5)
    with pytest.raises(CoordinatorUnavailable, match="127.0.0.1:1"):
        c.hint(1, MiB)
    with pytest.raises(ValueError):
        CoordinatorClient("no-port-here", b"x" * 32)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--listen", "nonsense"], "HOST:PORT"),
        (["--listen", "127.0.0.1:99999"], "port"),
        (["--listen", "127.0.0.1:0", "--secret-file", "/nonexistent/secret"], "secret"),
        (["--listen", "127.0.0.1:0", "--heartbeat-interval", "-1"], "heartbeat-interval"),
    ],
)
def test_bad_input_exit_2(tmp_path: Path, secret_file: Path, args: list[str], message: str) -> None:
    if "--secret-file" not in args:
        args = [*args, "--secret-file", str(secret_file)]
    log = tmp_path / "bad.log"
    proc, address = _start(args, tmp_path, log)
    try:
        assert address is None
        assert proc.wait(timeout=5) == 2
    finally:
        _stop(proc)
    err = log.read_text().strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err


def test_secret_readable_by_others_refused(tmp_path: Path, secret_file: Path) -> None:
    os.chmod(secret_file, 0o644)
    log = tmp_path / "bad.log"
    proc, address = _start(
        ["--listen", "127.0.0.1:0", "--secret-file", str(secret_file)], tmp_path, log
    )
    try:
        assert address is None and proc.wait(timeout=5) == 2
    finally:
        _stop(proc)
    assert "readable by others" in log.read_text()
