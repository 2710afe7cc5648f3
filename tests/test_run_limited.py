"""``ralloc run``: a real memory cgroup (v1 or v2) around a real command.

Needs root and a memory cgroup controller; in CI their absence fails the tests.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from conftest import PY, ROOT, need

pytestmark = pytest.mark.system


def _cgroup_ok() -> tuple[bool, str]:
    try:
        from ralloc.cgroup import find_hierarchy

        find_hierarchy()
        return True, ""
    except Exception as e:  # noqa: BLE001
        return False, str(e)


@pytest.fixture(autouse=True)
def _needs_root_and_cgroup() -> None:
    need(os.geteuid() == 0, "ralloc run needs root (it creates memory cgroups)")
    ok, why = _cgroup_ok()
    need(ok, f"no memory cgroup: {why}")


def run(*args: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "ralloc", "run", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, **kw)


def py(code: str) -> list[str]:
    return [PY, "-c", textwrap.dedent(code)]


# the child reports where it runs and what its cgroup's limit is
REPORT_CGROUP = """
    import json
    from ralloc.cgroup import find_hierarchy, limit_of
    h = find_hierarchy()
    path = h.path_of()
    print(json.dumps({"path": path, "limit": limit_of(h, path)}))
"""


@pytest.mark.parametrize("code", [0, 1, 7, 255])
def test_exit_status_is_passed_through(code: int) -> None:
    r = run("--mem-limit", "64M", "--", "sh", "-c", f"exit {code}")
    assert r.returncode == code
    assert r.stderr == ""


def test_death_by_signal_is_passed_through() -> None:
    r = run("--mem-limit", "64M", "--", "sh", "-c", "kill -USR1 $$")
    assert r.returncode == -signal.SIGUSR1, r.stderr


def test_runs_in_a_fresh_limited_cgroup_that_is_removed_afterwards() -> None:
    from ralloc.cgroup import find_hierarchy

    mine = find_hierarchy().path_of()
    r = run("--mem-limit", "96M", "--swappiness", "100", "--", *py(REPORT_CGROUP))
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["limit"] == 96 << 20
    assert info["path"] != mine
    assert os.path.basename(info["path"]).startswith("ralloc-run-")
    assert not os.path.exists(info["path"]), "the cgroup was not removed"
    assert r.stderr == "", "nothing of its own on success"


def test_stdout_is_only_the_commands_and_verbose_goes_to_stderr() -> None:
    r = run("--mem-limit", "64M", "--", "echo", "hello")
    assert (r.returncode, r.stdout, r.stderr) == (0, "hello\n", "")
    r = run("--verbose", "--mem-limit", "64M", "--", "echo", "hello")
    assert (r.returncode, r.stdout) == (0, "hello\n")
    assert "cgroup" in r.stderr and "limit 64M" in r.stderr and "cgroup removed" in r.stderr


def test_stats_json(tmp_path: Path) -> None:
    stats = tmp_path / "stats.json"
    r = run("--mem-limit", "64M", "--stats-json", str(stats), "--",
            *py("b = bytearray(b'x' * (16 << 20))"))
    assert r.returncode == 0, r.stderr
    s = json.loads(stats.read_text())
    assert s["exit_status"] == 0 and s["limit"] == 64 << 20
    assert s["max_usage"] >= 16 << 20
    assert s["oom_kill"] == 0


def test_sigterm_is_forwarded_and_the_cgroup_still_removed(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    child = f"""
        import json, signal, sys, time
        from ralloc.cgroup import find_hierarchy
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(42))
        open({str(ready)!r}, "w").write(find_hierarchy().path_of())
        time.sleep(60)
    """
    proc = subprocess.Popen([PY, "-m", "ralloc", "run", "--mem-limit", "64M", "--", *py(child)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not ready.exists() or not ready.read_text():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the child never started"
            time.sleep(0.05)
        cgroup = ready.read_text()
        assert os.path.isdir(cgroup)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 42, err
    assert not os.path.exists(cgroup)


def test_leftover_grandchildren_are_killed_with_the_cgroup(tmp_path: Path) -> None:
    pidfile = tmp_path / "sleeper.pid"
    child = f"""
        import subprocess
        p = subprocess.Popen(["sleep", "300"], start_new_session=True)
        open({str(pidfile)!r}, "w").write(str(p.pid))
    """
    r = run("--mem-limit", "64M", "--", *py(child))
    assert r.returncode == 0, r.stderr
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the grandchild outlived ralloc run"
        time.sleep(0.05)


def test_memory_beyond_the_limit_without_swap_is_oom_killed_and_reported() -> None:
    from ralloc.attach import swaps
    from ralloc.cgroup import find_hierarchy

    # v1: swappiness 0 keeps the cgroup off swap even when some swap is on (another test's)
    if find_hierarchy().version == 2 and swaps():
        pytest.skip("cgroup v2 has no per-cgroup swappiness and swap is on")
    r = run("--mem-limit", "32M", "--swappiness", "0", "--", *py("b = bytearray(b'x' * (256 << 20))"))
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert "OOM-killed" in r.stderr


@pytest.mark.parametrize("argv, status, message", [
    (["--mem-limit", "64M", "--", "no-such-command-xyz"], 127, "command not found"),
    (["--mem-limit", "64M", "--"], 2, "no command"),
    (["--mem-limit", "lots", "--", "true"], 2, "not a size"),
    (["--mem-limit", "64M", "--swappiness", "300", "--", "true"], 2, "swappiness"),
])
def test_user_errors(argv: list[str], status: int, message: str) -> None:
    r = run(*argv)
    assert r.returncode == status
    assert message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_works_without_double_dash() -> None:
    r = run("--mem-limit", "64M", sys.executable, "-c", "print('x')")
    assert (r.returncode, r.stdout) == (0, "x\n")
