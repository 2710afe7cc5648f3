"""`ralloc cluster up / status / down` as a new user runs them: the installed `ralloc`
command, real daemons, real files. Bad input is one line on stderr and exit status 2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from blade_helpers import PYTHON, REPO, wait_for

from rallocator.cluster_config import ClusterConfig, ClusterConfigError
from rallocator.node import WorkingNode, name_id

RALLOC = REPO / ".venv" / "bin" / "ralloc"
MiB = 1 << 20


def ralloc(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    argv = [str(RALLOC)] if RALLOC.exists() else [PYTHON, "-m", "ralloc"]
    return subprocess.run(argv + list(args), capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)


def status(d: Path) -> dict[str, Any]:
    r = ralloc("status", "--cluster", str(d), "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def pid_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def cluster_pids(d: Path) -> list[int]:
    try:
        cfg = ClusterConfig.load(str(d))
    except ClusterConfigError:
        return []
    return [p for p in [cfg.coordinator_pid] + [b.pid for b in cfg.blades] if p]


def one_line_error(r: subprocess.CompletedProcess[str], code: int = 2) -> str:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"want one line of error, got: {r.stderr!r}"
    return lines[0]


@pytest.fixture
def cdir(tmp_path: Path) -> Iterator[Path]:
    """A cluster directory that is torn down whatever happens: `cluster down`, then a kill
    of anything it left, then its region files removed."""
    d = tmp_path / "cluster"
    seen: set[int] = set()
    yield d
    seen.update(cluster_pids(d))
    regions = []
    try:
        regions = [b.region for b in ClusterConfig.load(str(d)).blades]
    except ClusterConfigError:
        pass
    if (d / "cluster.toml").exists():
        ralloc("cluster", "down", "--dir", str(d))
    seen.update(cluster_pids(d))
    for pid in seen:
        if pid_alive(pid) and any(str(d) in a for a in psutil.Process(pid).cmdline()):
            os.kill(pid, signal.SIGKILL)
    for r in regions:
        try:
            os.unlink(r)
        except FileNotFoundError:
            pass


# ====================================================================== help and bad input


def test_help_works():
    r = ralloc("--help")
    assert r.returncode == 0 and "cluster" in r.stdout and "status" in r.stdout, r.stderr
    r = ralloc("cluster", "up", "--help")
    assert r.returncode == 0, r.stderr
    for flag in ("--dir", "--blades", "--capacity", "--mode", "--lease"):
        assert flag in r.stdout
    r = ralloc("status", "--help")
    assert r.returncode == 0 and "--json" in r.stdout


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path):
    d = tmp_path / "c"
    line = one_line_error(ralloc("cluster", "up", "--dir", str(d), "--blades", "0"))
    assert line.startswith("ralloc:") and "--blades" in line
    assert not (d / "cluster.toml").exists() and cluster_pids(d) == []
    one_line_error(ralloc("cluster", "up", "--dir", str(d), "--blades", "-2"))
    one_line_error(ralloc("cluster", "up", "--dir", str(d), "--capacity", "banana"))
    one_line_error(ralloc("cluster", "up", "--dir", str(d), "--capacity", "0"))
    assert cluster_pids(d) == []
    missing = tmp_path / "no-such-dir"
    line = one_line_error(ralloc("status", "--cluster", str(missing)))
    assert str(missing) in line
    one_line_error(ralloc("status", "--cluster", str(missing), "--json"))
    one_line_error(ralloc("cluster", "down", "--dir", str(missing)))
    # argparse's own errors: exit 2, no traceback (usage line + error line)
    for args in (("cluster", "up"), ("cluster", "up", "--dir", str(d), "--blades", "two"),
                 ("cluster", "sideways", "--dir", str(d)), ("status",)):
        r = ralloc(*args)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (args, r.stderr)


def test_failed_up_leaves_nothing_after_down(cdir: Path):
    """A capacity smaller than one slab: the blade cannot start; the user gets one line,
    and `cluster down` stops whatever did start."""
    r = ralloc("cluster", "up", "--dir", str(cdir), "--blades", "1", "--capacity", "100K")
    assert r.returncode == 2 and "Traceback" not in r.stderr  # bad input: caught up front
    assert len([ln for ln in r.stderr.splitlines() if ln.strip()]) == 1, r.stderr
    pids = cluster_pids(cdir)
    assert not cdir.exists() or not pids  # bad input is caught before anything starts
    cdir.mkdir(parents=True, exist_ok=True)  # a directory with no cluster: nothing to stop
    d = ralloc("cluster", "down", "--dir", str(cdir))
    assert d.returncode == 0, d.stderr
    assert not [p for p in pids if pid_alive(p)]


# ====================================================================== the life of a cluster


def check_shape(st: dict[str, Any], blades: int) -> None:
    assert set(st) >= {"coordinator", "blades"}
    c = st["coordinator"]
    assert set(c) >= {"address", "pid", "alive"}
    assert isinstance(c["address"], str) and c["address"].rsplit(":", 1)[1].isdigit()
    assert isinstance(c["pid"], int) and isinstance(c["alive"], bool)
    assert len(st["blades"]) == blades
    for b in st["blades"]:
        assert set(b) >= {"name", "address", "pid", "alive", "capacity_bytes", "used_bytes",
                          "slabs_total", "slabs_used"}
        assert isinstance(b["name"], str) and isinstance(b["address"], str)
        assert isinstance(b["alive"], bool)
        for k in ("pid", "capacity_bytes", "used_bytes", "slabs_total", "slabs_used"):
            assert isinstance(b[k], int) and b[k] >= 0, (k, b)


def test_up_status_kill_up_again_down_nvm(cdir: Path):
    args = ("cluster", "up", "--dir", str(cdir), "--blades", "2", "--capacity", "16M",
            "--mode", "nvm", "--lease", "1")
    r = ralloc(*args)
    assert r.returncode == 0, r.stderr
    assert "blade0" in r.stdout and "blade1" in r.stdout
    st = status(cdir)
    check_shape(st, 2)
    assert st["coordinator"]["alive"] and all(b["alive"] for b in st["blades"])
    assert {b["name"] for b in st["blades"]} == {"blade0", "blade1"}
    assert all(b["capacity_bytes"] == 16 * MiB and b["slabs_total"] == 16 for b in st["blades"])
    assert all(Path(b.region).parent == cdir for b in ClusterConfig.load(str(cdir)).blades)
    # a node borrows slabs and writes to them
    vol = name_id("cli-volume")
    node = WorkingNode.from_cluster(str(cdir), node_name="cli-node", transport="tcp")
    try:
        slabs = [node.allocate_slab(MiB, vol, i) for i in range(4)]
        for s in slabs:
            rep = s.replicas[0]
            with rep.link.verbs() as v:
                v.write(rep.addr, f"slab {s.index} on {rep.link.name}".encode(), fua=True)
    finally:
        node.close()
    on0 = [s for s in slabs if s.replicas[0].link.name == "blade0"]
    assert wait_for(lambda: sum(b["slabs_used"] for b in status(cdir)["blades"]) == 4, 6.0, 0.3)
    # kill -9 blade0: status says so within a few heartbeats
    victim = next(b for b in st["blades"] if b["name"] == "blade0")
    os.kill(victim["pid"], signal.SIGKILL)
    assert wait_for(lambda: not next(b for b in status(cdir)["blades"]
                                     if b["name"] == "blade0")["alive"], 3.0, 0.2)
    assert next(b for b in status(cdir)["blades"] if b["name"] == "blade1")["alive"]
    # `cluster up` again restarts it on its region, at its address
    r = ralloc(*args)
    assert r.returncode == 0, r.stderr
    st2 = status(cdir)
    check_shape(st2, 2)
    b0 = next(b for b in st2["blades"] if b["name"] == "blade0")
    assert b0["alive"] and b0["pid"] != victim["pid"] and b0["address"] == victim["address"]
    assert next(b for b in st2["blades"] if b["name"] == "blade1")["pid"] == \
        next(b for b in st["blades"] if b["name"] == "blade1")["pid"], "restarted a live blade"
    node = WorkingNode.from_cluster(str(cdir), node_name="cli-node", transport="tcp")
    try:
        found = node.owned_slabs(vol)
        assert sorted(found) == [0, 1, 2, 3], "an nvm blade lost slabs over kill -9 + up"
        for s in on0:
            rep = found[s.index].replicas[0]
            assert rep.link.name == "blade0" and rep.unit == s.replicas[0].unit
            with rep.link.verbs() as v:
                text = f"slab {s.index} on blade0".encode()
                assert v.read(rep.addr, len(text)) == text
    finally:
        node.close()
    # down: nothing left running; nvm regions stay (they are the data)
    pids = cluster_pids(cdir)
    r = ralloc("cluster", "down", "--dir", str(cdir))
    assert r.returncode == 0, r.stderr
    assert "blade0" in r.stdout and "coordinator" in r.stdout
    assert not [p for p in pids if pid_alive(p)], "cluster down left processes behind"
    st3 = status(cdir)
    assert not st3["coordinator"]["alive"] and not any(b["alive"] for b in st3["blades"])
    assert all(Path(b.region).exists() for b in ClusterConfig.load(str(cdir)).blades)


def test_dram_cluster_down_removes_its_shm_regions(cdir: Path):
    r = ralloc("cluster", "up", "--dir", str(cdir), "--blades", "1", "--capacity", "8M")
    assert r.returncode == 0, r.stderr
    regions = [Path(b.region) for b in ClusterConfig.load(str(cdir)).blades]
    assert all(str(p).startswith("/dev/shm/rallocator-") and p.exists() for p in regions)
    pids = cluster_pids(cdir)
    r = ralloc("status", "--cluster", str(cdir))  # the human table works too
    assert r.returncode == 0 and "blade0" in r.stdout, r.stderr
    assert ralloc("cluster", "down", "--dir", str(cdir)).returncode == 0
    assert not [p for p in pids if pid_alive(p)]
    assert not [p for p in regions if p.exists()], "dram regions left in /dev/shm"
    r = ralloc("cluster", "down", "--dir", str(cdir))  # twice is fine
    assert r.returncode == 0 and "nothing was running" in r.stdout


def test_up_again_with_no_flags_restarts_what_is_down_without_growing(cdir: Path):
    """`up` is documented as idempotent: on an existing DIR it restarts only what is not
    running. Run bare on a one-blade cluster, it must not add blades (with its own default
    capacity and mode)."""
    r = ralloc("cluster", "up", "--dir", str(cdir), "--blades", "1", "--capacity", "8M")
    assert r.returncode == 0, r.stderr
    r = ralloc("cluster", "up", "--dir", str(cdir))
    assert r.returncode == 0, r.stderr
    blades = ClusterConfig.load(str(cdir)).blades
    assert [b.name for b in blades] == ["blade0"], \
        f"a bare `cluster up` grew the cluster to {[(b.name, b.capacity) for b in blades]}"
