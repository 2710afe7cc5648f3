"""The nbdkit plugin under real nbdkit, driven by the real NBD tools (nbdinfo, nbdcopy,
nbdsh, fio's nbd engine) over a unix socket. In CI a missing tool fails the test."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import ROOT, Cluster, need

from rallocator.node import name_id
from rallocator.secret import load_secret
from rallocator.transport_tcp import TcpVerbs

PLUGIN = ROOT / "nbd_plugin" / "plugin.py"
NULL_PLUGIN = ROOT / "bench" / "null_copy_plugin.py"
SYSTEM_PYTHON = "/usr/bin/python3"  # what nbdkit embeds, with python3-libnbd
M = 1 << 20


def need_tools(*tools: str) -> None:
    for tool in ("nbdkit", *tools):
        need(shutil.which(tool) is not None, f"{tool} is not installed "
             "(scripts/install-system-packages.sh)")
    ok = subprocess.run(["nbdkit", "python", "--version"], capture_output=True).returncode == 0
    need(ok, "nbdkit's python plugin is not installed (nbdkit-plugin-python)")


class Nbdkit:
    """``nbdkit -U SOCK -f python PLUGIN ARGS`` as a child process."""

    def __init__(self, workdir: Path, *args: str, plugin: Path = PLUGIN) -> None:
        self.sock = workdir / "nbd.sock"
        self.log = workdir / "nbdkit.log"
        self.args = [str(a) for a in args]
        self.plugin = plugin
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def start(self, timeout: float = 20.0) -> Nbdkit:
        self.sock.unlink(missing_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                ["nbdkit", "-U", str(self.sock), "-f", "python", str(self.plugin), *self.args],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"nbdkit exited {self.proc.returncode}: {self.log_text()}")
            if self.sock.exists() and subprocess.run(
                    ["nbdinfo", "--size", self.uri], capture_output=True).returncode == 0:
                return self
            time.sleep(0.05)
        raise AssertionError(f"nbdkit did not serve in {timeout}s: {self.log_text()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        self.sock.unlink(missing_ok=True)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A short directory for sockets (unix socket paths are limited to 108 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="nbdt", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def nbdkit(workdir: Path) -> Iterator:
    """Factory for plugin servers; every one is stopped (and its socket removed) after."""
    servers: list[Nbdkit] = []

    def make(*args: str, plugin: Path = PLUGIN) -> Nbdkit:
        sub = workdir / f"s{len(servers)}"
        sub.mkdir()
        server = Nbdkit(sub, *args, plugin=plugin)
        servers.append(server)
        return server

    yield make
    for s in servers:
        s.stop()


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Iterator[Cluster]:
    """Three 64 MiB dram blades; each test serves its own volume."""
    need_tools()
    c = Cluster(tmp_path_factory.mktemp("nbdplug") / "cluster")
    c.up("--blades", "3", "--capacity", "64M", "--lease", "1")
    yield c
    c.down()


def run(*argv: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, **kw)


def nbdsh(server: Nbdkit, code: str) -> None:
    """nbdsh's ``-c CODE``, with the system python that has libnbd's bindings (nbdsh itself
    runs whatever ``python3`` is first on PATH, e.g. a pyenv one without them)."""
    run(SYSTEM_PYTHON, "-m", "nbd", "-u", server.uri, "-c", code, check=True)


def read_all(server: Nbdkit, path: Path) -> bytes:
    run("nbdcopy", server.uri, str(path), check=True)
    return path.read_bytes()


def extents(server: Nbdkit) -> list[tuple[int, int, str]]:
    out = run("nbdinfo", "--map", "--json", server.uri, check=True).stdout
    return [(e["offset"], e["length"], e["description"]) for e in json.loads(out)]


def blade_stats(cluster: Cluster) -> dict[str, dict]:
    cfg = cluster.config
    secret = load_secret(cfg.secret_file)
    out = {}
    for b in cfg.blades:
        try:
            conn = TcpVerbs(b.address, secret, name_id("nbd-test-probe"), timeout=3,
                            connect_timeout=1)
        except OSError:
            continue
        try:
            out[b.name] = conn.call({"op": "stats"})
        finally:
            conn.close()
    return out


def copies(cluster: Cluster, volume: str) -> dict[int, list[str]]:
    """Live blades holding a copy of each slab of ``volume`` (their owner tables)."""
    cfg = cluster.config
    secret = load_secret(cfg.secret_file)
    out: dict[int, list[str]] = {}
    for b in cfg.blades:
        try:
            conn = TcpVerbs(b.address, secret, name_id(f"nbd:{volume}"), timeout=3,
                            connect_timeout=1)
        except OSError:
            continue
        try:
            reply = conn.call({"op": "owned", "volume": name_id(volume)})
        except OSError:
            continue
        finally:
            conn.close()
        for s in reply["slabs"]:
            out.setdefault(s["index"], []).append(b.name)
    return out


def eventually(check, timeout: float = 10.0) -> None:
    """Poll ``check()`` until true (blades commit what nodes did over shm on their next tick,
    so their owner tables trail a little)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.02)


def kill9(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    for _ in range(200):
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
        time.sleep(0.01)


def fio(server: Nbdkit, *args: str, timeout: float = 90) -> dict:
    """Run fio's nbd engine; returns its JSON (minus the engine's greeting line)."""
    p = run("fio", "--name=nbd", "--ioengine=nbd", f"--uri={server.uri}",
            "--output-format=json", "--verify_state_save=0", *args, timeout=timeout,
            cwd=server.sock.parent)
    text = p.stdout
    text = text[text.index("{"):] if "{" in text else text  # "fio: connected to NBD server"
    assert p.returncode == 0, f"fio failed: {p.stderr}\n{text[-2000:]}\n{server.log_text()}"
    return json.loads(text)


# ---------------------------------------------------------------- startup


def test_dump_plugin_and_one_line_errors(workdir: Path) -> None:
    need_tools()
    p = run("nbdkit", "python", str(PLUGIN), "--dump-plugin", cwd="/")
    assert p.returncode == 0, p.stderr
    assert "rallocator_keys=cluster,size,volume,replicas,slab_size,transport" in p.stdout
    assert "thread_model=parallel" in p.stdout
    for args, words in [(["size=1G", "colour=blue"], "unknown key 'colour'"),
                        (["cluster=" + str(workdir), "size=huge"], "size=huge"),
                        (["size=1G", "replicas=-1"], "replicas=-1"),
                        (["cluster=" + str(workdir), "size=1G"], "no cluster in"),
                        (["size=1G"], "cluster=DIR is required")]:
        p = run("nbdkit", "-f", "python", str(PLUGIN), *args, cwd="/")
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert p.returncode != 0
        assert len(lines) == 1 and words in lines[0] and "Traceback" not in p.stderr, p.stderr


def test_bad_slab_size_and_double_serving_fail_at_startup(shared: Cluster, nbdkit) -> None:
    base = [f"cluster={shared.dir}", "size=16M", "volume=twice"]
    p = run("nbdkit", "-f", "python", str(PLUGIN), *base, "slab_size=2M")
    assert p.returncode != 0 and "they offer 1M, 4M" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    nbdkit(*base).start()
    p = run("nbdkit", "-f", "python", str(PLUGIN), *base)
    assert p.returncode != 0 and "already served" in p.stderr, p.stderr


def test_nbdinfo_shows_size_and_flags(shared: Cluster, nbdkit) -> None:
    need_tools("nbdinfo")
    server = nbdkit(f"cluster={shared.dir}", "size=48M", "volume=info").start()
    info = json.loads(run("nbdinfo", "--json", server.uri, check=True).stdout)
    export = info["exports"][0]
    assert export["export-size"] == 48 * M
    for flag in ("can_multi_conn", "can_flush", "can_fua", "can_trim", "can_zero",
                 "can_fast_zero"):
        assert export[flag] is True, flag
    assert export["is_read_only"] is False
    assert export["block_size_minimum"] == 1 and export["block_size_preferred"] == 4096
    assert export["block_size_maximum"] == 64 * M
    assert "base:allocation" in export["contexts"]


# ---------------------------------------------------------------- data


@pytest.mark.parametrize("bs", ["4k", "1M"])
def test_fio_randwrite_then_verify(shared: Cluster, nbdkit, bs: str) -> None:
    need_tools("fio")
    server = nbdkit(f"cluster={shared.dir}", "size=32M", f"volume=fio{bs}").start()
    out = fio(server, "--rw=randwrite", f"--bs={bs}", "--size=32M", "--iodepth=8",
              "--verify=crc32c", "--verify_fatal=1")
    job = out["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == 32 * M
    assert job["read"]["io_bytes"] == 32 * M  # the verify pass read everything back
    nbdsh(server, f"h.trim({32 * M}, 0)")


def test_nbdcopy_round_trip_holes_and_trim(shared: Cluster, nbdkit, workdir: Path) -> None:
    need_tools("nbdcopy", "nbdinfo")
    need(run(SYSTEM_PYTHON, "-c", "import nbd").returncode == 0, "python3-libnbd is missing")
    server = nbdkit(f"cluster={shared.dir}", "size=32M", "volume=copy").start()
    image = workdir / "image.bin"
    data = os.urandom(12 * M)
    image.write_bytes(data)
    before = sum(s["slabs_owned"] for s in blade_stats(shared).values())
    run("nbdcopy", str(image), server.uri, check=True)
    back = read_all(server, workdir / "back.bin")
    assert back[:12 * M] == data and back[12 * M:] == bytes(20 * M)
    assert extents(server) == [(0, 12 * M, "data"), (12 * M, 20 * M, "hole,zero")]
    eventually(lambda: sum(s["slabs_owned"] for s in blade_stats(shared).values())
               == before + 3)
    used = sum(s["slabs_used"] for s in blade_stats(shared).values())

    nbdsh(server, f"h.trim({8 * M}, 0)")
    assert extents(server)[0] == (0, 8 * M, "hole,zero")
    back = read_all(server, workdir / "back.bin")
    assert back[:8 * M] == bytes(8 * M) and back[8 * M:12 * M] == data[8 * M:]
    deadline = time.monotonic() + 10  # the blades reclaim freed slabs once epochs pass
    while sum(s["slabs_used"] for s in blade_stats(shared).values()) > used - 8:
        assert time.monotonic() < deadline, blade_stats(shared)
        time.sleep(0.05)

    # zero: a partial range gets zeros, the slab stays mapped
    nbdsh(server, f"h.zero(4096, {8 * M + 100})")
    back = read_all(server, workdir / "back.bin")
    assert back[8 * M + 100:8 * M + 4196] == bytes(4096)
    assert back[8 * M:8 * M + 100] == data[8 * M:8 * M + 100]
    nbdsh(server, f"h.trim({32 * M}, 0)")


def test_restart_serves_the_same_data(shared: Cluster, nbdkit, workdir: Path) -> None:
    need_tools("nbdcopy")
    args = (f"cluster={shared.dir}", "size=16M", "volume=again")
    image = workdir / "image.bin"
    image.write_bytes(os.urandom(10 * M))
    server = nbdkit(*args).start()
    run("nbdcopy", str(image), server.uri, check=True)
    server.stop()  # SIGTERM: a clean exit keeps the slabs
    server = nbdkit(*args).start()
    assert read_all(server, workdir / "b1.bin")[:10 * M] == image.read_bytes()
    assert server.proc is not None
    kill9(server.proc.pid)  # a crash keeps them too (and frees the volume's lock)
    server.stop()
    server = nbdkit(*args).start()
    assert read_all(server, workdir / "b2.bin")[:10 * M] == image.read_bytes()
    nbdsh(server, f"h.trim({16 * M}, 0)")


def test_null_copy_plugin_serves(nbdkit, workdir: Path) -> None:
    need_tools("nbdcopy")
    server = nbdkit("size=8M", plugin=NULL_PLUGIN).start()
    image = workdir / "w.bin"
    image.write_bytes(os.urandom(8 * M))
    run("nbdcopy", str(image), server.uri, check=True)
    assert read_all(server, workdir / "z.bin") == bytes(8 * M)


# ---------------------------------------------------------------- failures


def test_replicas_survive_killing_a_blade_during_io(make_cluster, nbdkit,
                                                   workdir: Path) -> None:
    need_tools("fio", "nbdcopy")
    cluster = make_cluster("--blades", "3", "--capacity", "64M", "--lease", "1")
    server = nbdkit(f"cluster={cluster.dir}", "size=40M", "volume=rep", "replicas=2").start()
    image = workdir / "image.bin"
    data = os.urandom(24 * M)
    image.write_bytes(data)
    run("nbdcopy", str(image), server.uri, check=True)
    eventually(lambda: sum(map(len, copies(cluster, "rep").values())) == 12)
    where = copies(cluster, "rep")
    assert len(where) == 6 and all(len(set(b)) == 2 for b in where.values()), where

    job = ("--rw=randwrite", "--bs=4k", "--offset=24M", "--size=16M", "--iodepth=4",
           "--verify=crc32c", "--verify_fatal=1", "--randseed=7")
    fio_proc = subprocess.Popen(
        ["fio", "--name=nbd", "--ioengine=nbd", f"--uri={server.uri}", "--rate_iops=5000",
         "--output-format=json", "--verify_state_save=0", *job], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, cwd=workdir)
    time.sleep(0.4)
    victim = max(["blade0", "blade1", "blade2"],
                 key=lambda b: sum(b in bs for bs in where.values()))
    kill9(next(b.pid for b in cluster.config.blades if b.name == victim))
    out, err = fio_proc.communicate(timeout=90)
    assert fio_proc.returncode == 0, err + server.log_text()
    result = json.loads(out[out.index("{"):])["jobs"][0]
    assert result["error"] == 0 and result["read"]["io_bytes"] == 16 * M

    assert read_all(server, workdir / "b1.bin")[:24 * M] == data
    deadline = time.monotonic() + 20  # re-replicated onto the other blades
    while True:
        where = copies(cluster, "rep")
        healthy = len(where) == 10 and all(len(set(b)) == 2 for b in where.values())
        if healthy:
            break
        assert time.monotonic() < deadline, (where, server.log_text())
        time.sleep(0.1)
    assert not any(victim in b for b in where.values())
    assert "re-replicating" in server.log_text()

    # the new copies hold the data: lose one more blade, so every slab is read from the last
    last = sorted({b for bs in where.values() for b in bs})
    kill9(next(b.pid for b in cluster.config.blades if b.name == last[0]))
    assert read_all(server, workdir / "b2.bin")[:24 * M] == data
    out = fio(server, *job, "--verify_only=1")
    assert out["jobs"][0]["error"] == 0 and out["jobs"][0]["read"]["io_bytes"] == 16 * M


def test_nvm_data_survives_killing_plugin_and_blades(make_cluster, nbdkit,
                                                     workdir: Path) -> None:
    need_tools("nbdcopy")
    shape = ("--blades", "2", "--capacity", "32M", "--mode", "nvm", "--lease", "1")
    cluster = make_cluster(*shape)
    args = (f"cluster={cluster.dir}", "size=16M", "volume=durable")
    image = workdir / "image.bin"
    image.write_bytes(os.urandom(14 * M))
    server = nbdkit(*args).start()
    run("nbdcopy", "--flush", str(image), server.uri, check=True)
    assert server.proc is not None
    kill9(server.proc.pid)
    server.stop()
    for b in cluster.config.blades:
        kill9(b.pid)
    cluster.up(*shape)  # restarts the blades on their regions, at their addresses
    assert sum(s["slabs_owned"] for s in blade_stats(cluster).values()) == 4
    server = nbdkit(*args).start()
    assert read_all(server, workdir / "back.bin")[:14 * M] == image.read_bytes()
