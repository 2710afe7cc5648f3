"""``ralloc swap`` on a real kernel: nbdkit + (nbd-client | nbdfuse + loop) + mkswap + swapon,
and memory-limited workloads (``ralloc run``) that really swap to the blades.

System tests: root, FUSE, loop devices, swapon and a memory cgroup are required (missing
ones fail in CI). Every test that turns swap on does it through the ``swap`` fixture, whose
finalizer runs ``ralloc swap off`` and then scrubs by hand anything still attached under
the test's directory, so no test leaves swap enabled on a device it created.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from conftest import PY, ROOT, Cluster, need, ralloc

from ralloc import attach

pytestmark = pytest.mark.system

MiB = 1 << 20


@pytest.fixture(autouse=True)
def _needs_swap_capabilities() -> None:
    need(os.geteuid() == 0, "swap tests need root")
    for tool in ("nbdkit", "nbdfuse", "losetup", "mkswap", "swapon", "swapoff", "fusermount3"):
        need(shutil.which(tool) is not None,
             f"{tool} is not installed (scripts/install-system-packages.sh)")
    need(os.path.exists("/dev/fuse"), "no /dev/fuse")
    need(os.path.exists("/dev/loop-control"), "no loop devices (/dev/loop-control)")
    try:
        from ralloc.cgroup import find_hierarchy

        find_hierarchy()
    except Exception as e:  # noqa: BLE001
        need(False, f"no memory cgroup: {e}")


# --------------------------------------------------------------------------------------
# helpers


def vm(key: str) -> int:
    with open("/proc/vmstat") as f:
        for line in f:
            k, v = line.split()
            if k == key:
                return int(v)
    return 0


def state_of(directory: Path) -> dict:
    path = directory / "swap" / "state.json"
    return json.loads(path.read_text()) if path.exists() else {}


def attached_under(directory: Path) -> list[str]:
    """Everything of a swap set-up under ``directory`` that is still there."""
    d = str(directory.resolve())
    left = []
    for dev in attach.swaps():
        backing = ""
        with contextlib.suppress(OSError):
            backing = Path(f"/sys/block/{os.path.basename(dev)}/loop/backing_file").read_text()
        if backing.startswith(d):
            left.append(f"swap {dev}")
    losetup = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    left += [f"loop {ln}" for ln in losetup.splitlines() if d in ln]
    mounts = subprocess.run(["mount"], capture_output=True, text=True).stdout
    left += [f"mount {ln}" for ln in mounts.splitlines() if "fuse" in ln and d in ln]
    for p in psutil.process_iter(["pid", "name", "cmdline", "status"]):
        with contextlib.suppress(psutil.Error):
            cmd = " ".join(p.info["cmdline"] or [])
            if (p.info["name"] in ("nbdkit", "nbdfuse") and d in cmd
                    and p.info["status"] != psutil.STATUS_ZOMBIE):
                left.append(f"process {p.info['pid']} {cmd}")
    st = state_of(directory)
    if st.get("nbd_device") and attach.nbd_connected(st["nbd_device"]):
        left.append(f"nbd {st['nbd_device']}")
    return left


def scrub(directory: Path) -> list[str]:
    """Last resort after ``swap off``: detach by hand whatever is still there."""
    left = attached_under(directory)
    d = str(directory.resolve())
    for dev, _ in list(attach.swaps().items()):
        if any(item == f"swap {dev}" for item in left):
            subprocess.run(["swapoff", dev], capture_output=True)
    st = state_of(directory)
    if st.get("nbd_device"):
        subprocess.run(["nbd-client", "-d", st["nbd_device"]], capture_output=True)
    for item in left:
        if item.startswith("loop "):
            subprocess.run(["losetup", "-d", item.split()[1].rstrip(":")], capture_output=True)
    mnt = directory / "swap" / "mnt"
    if attach.is_mountpoint(str(mnt)):
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
    for p in psutil.process_iter(["name", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            if p.info["name"] in ("nbdkit", "nbdfuse") and d in " ".join(p.info["cmdline"] or []):
                p.kill()
    return left


Swap = Callable[..., str]


@pytest.fixture
def swap() -> Iterator[Swap]:
    """``swap(cluster_dir, *args)`` runs ``ralloc swap on`` and returns the device; every
    cluster it was used on gets ``swap off`` + a scrub at the end, whatever happened."""
    used: list[Path] = []

    def on(directory: Path, *args: str) -> str:
        used.append(directory)
        r = ralloc("swap", "on", "--cluster", str(directory), *args, check=False)
        assert r.returncode == 0, f"swap on failed: {r.stderr}\n{r.stdout}"
        return r.stdout.strip().splitlines()[-1]

    yield on
    problems = []
    for directory in used:
        r = ralloc("swap", "off", "--cluster", str(directory), check=False, timeout=300)
        left = scrub(directory)
        if r.returncode != 0 or left:
            problems.append(f"{directory}: swap off status {r.returncode} {r.stderr.strip()}; "
                            f"scrubbed by hand: {left}")
    assert not problems, problems


def workload(size: str, limit: str, stats: Path | None = None,
             **kw) -> subprocess.Popen[str]:
    """``ralloc run --mem-limit LIMIT -- python -m ralloc.demo workload SIZE``, started."""
    extra = ["--stats-json", str(stats)] if stats else []
    return subprocess.Popen([PY, "-m", "ralloc", "run", "--mem-limit", limit, *extra, "--",
                             PY, "-m", "ralloc.demo", "workload", size],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **kw)


def finish(proc: subprocess.Popen[str], timeout: float = 150) -> dict:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # ralloc run forwards it and removes its cgroup
        out, err = proc.communicate(timeout=30)
        pytest.fail(f"workload did not finish in {timeout}s: {err}")
    assert proc.returncode == 0, f"workload status {proc.returncode}: {err}\n{out}"
    result = json.loads(out.strip().splitlines()[-1])
    assert result["ok"], result
    return result


def need_plugin() -> None:
    need((ROOT / "nbd_plugin" / "plugin.py").exists(), "nbd_plugin/plugin.py does not exist yet")
    ok = subprocess.run(["nbdkit", "python", "--version"], capture_output=True).returncode == 0
    need(ok, "nbdkit's python plugin is not installed (nbdkit-plugin-python)")


# --------------------------------------------------------------------------------------
# the tests


def test_swap_to_blades_under_a_memory_limit(make_cluster, swap, tmp_path: Path) -> None:
    """The whole path: remote swap on, a workload twice its limit swaps to the blades and
    gets every byte back, then swap off leaves nothing behind."""
    need_plugin()
    c: Cluster = make_cluster("--blades", "2", "--capacity", "512M", "--lease", "1")
    dev = swap(c.dir, "--size", "512M", "--priority", "1000")
    area = attach.swaps()[dev]
    assert (area.size_kib + 4) * 1024 == 512 * MiB and area.priority == 1000
    st = state_of(c.dir)
    assert st["swap_device"] == dev and st["phase"] == "on"
    if st["mode"] == "fuse":
        assert st["dio"] is True, "the loop device must do direct I/O"
    status = ralloc("swap", "status", "--cluster", str(c.dir))
    assert "swap ON" in status.stdout and dev in status.stdout

    again = ralloc("swap", "on", "--cluster", str(c.dir), "--size", "512M", check=False)
    assert again.returncode == 1 and "already on" in again.stderr
    assert dev in attach.swaps(), "a refused second `swap on` must not disturb the first"

    out_before = vm("pswpout")
    stats = tmp_path / "cgroup.json"
    finish(workload("256M", "128M", stats))
    assert vm("pswpout") > out_before, "nothing was swapped out"
    cg = json.loads(stats.read_text())
    assert max(cg.get("swap_peak_sampled") or 0, cg.get("swap_peak") or 0) > 64 * MiB, cg
    used = ralloc("status", "--cluster", str(c.dir), "--json")
    assert sum(b["slabs_used"] for b in json.loads(used.stdout)["blades"]) > 0

    off = ralloc("swap", "off", "--cluster", str(c.dir), timeout=300)
    assert "swapoff" in off.stdout
    assert attached_under(c.dir) == []
    assert dev not in attach.swaps()
    assert not (c.dir / "swap" / "state.json").exists()
    assert not psutil.pid_exists(st["nbdkit"]["pid"]) or \
        psutil.Process(st["nbdkit"]["pid"]).status() == psutil.STATUS_ZOMBIE
    again = ralloc("swap", "off", "--cluster", str(c.dir))  # idempotent
    assert again.returncode == 0


def test_blade_killed_mid_workload_with_two_replicas(make_cluster, swap) -> None:
    """The issue's scenario: replicas=2, kill -9 a blade while pages are being swapped; the
    workload completes and every page it reads back is right."""
    need_plugin()
    c: Cluster = make_cluster("--blades", "3", "--capacity", "512M", "--lease", "1")
    dev = swap(c.dir, "--size", "512M", "--replicas", "2", "--priority", "1000")
    proc = workload("256M", "96M")
    try:
        deadline = time.monotonic() + 90
        while attach.swaps()[dev].used_kib < 48 * 1024:  # well into swapping
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the workload never swapped"
            time.sleep(0.1)
        while True:  # status reports what the coordinator last heard: up to a heartbeat late
            blades = json.loads(ralloc("status", "--cluster", str(c.dir), "--json").stdout)
            victim = max(blades["blades"], key=lambda b: b["slabs_used"])
            if victim["slabs_used"] > 0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert victim["slabs_used"] > 0
        os.kill(victim["pid"], signal.SIGKILL)
        finish(proc)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    log = (c.dir / "swap" / "nbdkit.log").read_text()
    assert victim["name"] in log, "the plugin never noticed the dead blade"


def test_swap_on_refuses_and_leaves_nothing_when_nbdkit_cannot_start(make_cluster,
                                                                   swap) -> None:
    need_plugin()
    c: Cluster = make_cluster("--blades", "1", "--capacity", "64M")
    c.down()  # no blades: the plugin refuses to start
    try:
        r = ralloc("swap", "on", "--cluster", str(c.dir), "--size", "64M", check=False)
        assert r.returncode == 1
        assert "nbdkit" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert attached_under(c.dir) == []
        assert not (c.dir / "swap" / "state.json").exists()
    finally:
        scrub(c.dir)


@pytest.mark.parametrize("victim", ["nbdkit", "nbdfuse"])
def test_swap_off_after_a_daemon_died(tmp_path: Path, swap, victim: str) -> None:
    """Partial failure: a daemon of the chain is gone (kill -9); `swap off` still detaches
    the rest and reports it. nbdkit's memory plugin: this is about the plumbing."""
    d = tmp_path / "cl"
    d.mkdir()
    dev = swap(d, "--size", "64M", "--backend", "memory", "--attach", "fuse")
    st = state_of(d)
    need(st["mode"] == "fuse", "fuse mode")
    os.kill(st[victim]["pid"], signal.SIGKILL)
    r = ralloc("swap", "status", "--cluster", str(d))
    assert "DEAD" in r.stdout
    r = ralloc("swap", "off", "--cluster", str(d), check=False, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"swapoff {dev}" in r.stdout
    assert attached_under(d) == []
    assert ralloc("swap", "status", "--cluster", str(d)).stdout.startswith("swap is off")


def test_swap_off_cleans_up_after_an_interrupted_swap_on(tmp_path: Path, swap) -> None:
    """`swap on` killed half-way (here: after the loop device, before mkswap) leaves a
    state.json that `swap off` follows; a later `swap on` works again."""
    d = tmp_path / "cl"
    d.mkdir()
    swap(d, "--size", "64M", "--backend", "memory", "--attach", "fuse")
    st = state_of(d)
    subprocess.run(["swapoff", st["swap_device"]], check=True)  # as if swapon never ran
    st["swap_device"], st["phase"] = None, "swapon"
    (d / "swap" / "state.json").write_text(json.dumps(st))
    r = ralloc("swap", "on", "--cluster", str(d), "--size", "64M", "--backend", "memory",
               check=False)
    assert r.returncode == 1 and "already on" in r.stderr  # nbdkit, loop... still there
    r = ralloc("swap", "off", "--cluster", str(d))
    assert "losetup -d" in r.stdout and "stop nbdkit" in r.stdout
    assert attached_under(d) == []
    dev = swap(d, "--size", "64M", "--backend", "memory")
    assert dev in attach.swaps()


def test_swap_needs_a_cluster(tmp_path: Path) -> None:
    r = ralloc("swap", "on", "--cluster", str(tmp_path), "--size", "64M", check=False)
    assert r.returncode == 2 and "no cluster" in r.stderr
    assert not (tmp_path / "swap").exists()
    r = ralloc("swap", "on", "--cluster", str(tmp_path), "--size", "huge", check=False)
    assert r.returncode == 2
    r = ralloc("swap", "status", "--cluster", str(tmp_path))
    assert r.stdout.startswith("swap is off")
