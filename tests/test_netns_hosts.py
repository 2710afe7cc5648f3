"""A blade on another "host": a network namespace joined to ours by a veth pair.

This is how the daemons run across a rack (tcp only: the node cannot map a region it cannot
see, and here we force tcp since the namespace shares our filesystem). Cutting the host off
must turn into a timeout and a clear error, never a hang; when the link comes back the node
reconnects and finds its data.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, need

from rallocator.node import WorkingNode
from rallocator.secret import generate_secret_file, load_secret
from rallocator.verbs import BladeUnreachable

NODE_IP, BLADE_IP = "10.213.7.1", "10.213.7.2"
M = 1 << 20


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, check=check, timeout=30)


@pytest.fixture
def host() -> Iterator[str]:
    """A namespace 'host' at BLADE_IP, reachable from ours at NODE_IP; removed afterwards."""
    need(shutil.which("ip") is not None and os.geteuid() == 0, "needs root and iproute2")
    ns = f"ralloc-{uuid.uuid4().hex[:8]}"
    a, b = f"rv{ns[-6:]}a", f"rv{ns[-6:]}b"
    made = sh("ip", "netns", "add", ns, check=False)
    need(made.returncode == 0, f"cannot create a network namespace: {made.stderr.strip()}")
    try:
        sh("ip", "link", "add", a, "type", "veth", "peer", "name", b)
        sh("ip", "link", "set", b, "netns", ns)
        sh("ip", "addr", "add", f"{NODE_IP}/24", "dev", a)
        sh("ip", "link", "set", a, "up")
        sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{BLADE_IP}/24", "dev", b)
        sh("ip", "netns", "exec", ns, "ip", "link", "set", b, "up")
        sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        yield ns
    finally:
        sh("ip", "link", "del", a, check=False)
        sh("ip", "netns", "del", ns, check=False)


def test_blade_on_another_host_cut_off_and_back(host: str, tmp_path: Path) -> None:
    secret_file = tmp_path / "cluster.secret"
    generate_secret_file(str(secret_file))
    proc = subprocess.Popen(
        ["ip", "netns", "exec", host, sys.executable, "-m", "slabd", "--listen",
         f"{BLADE_IP}:0", "--capacity", "64M", "--region", str(tmp_path / "b.region"),
         "--mode", "nvm", "--name", "far", "--secret-file", str(secret_file)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    node = None
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("READY "), line
        address = line.split()[1]
        assert address.startswith(BLADE_IP)
        node = WorkingNode([("far", address)], load_secret(str(secret_file)), node_id=0xFA,
                           transport="tcp", timeout=2.0)
        slab = node.allocate_slab(M, volume=1, index=0)
        rep = slab.replicas[0]
        assert rep.link.transport == "tcp"
        data = os.urandom(4096)
        with rep.link.tcp() as v:
            v.write(rep.addr, data)
            assert v.read(rep.addr, 4096) == data
        # cut the host off: the next verb must fail within its timeout, not hang
        sh("ip", "netns", "exec", host, "ip", "link", "set", f"rv{host[-6:]}b", "down")
        t0 = time.monotonic()
        with pytest.raises(BladeUnreachable), rep.link.tcp() as v:
            v.read(rep.addr, 4096)
        assert time.monotonic() - t0 < 10
        # back on the network: a fresh connection finds the same bytes
        sh("ip", "netns", "exec", host, "ip", "link", "set", f"rv{host[-6:]}b", "up")
        deadline = time.monotonic() + 15
        while True:
            try:
                with rep.link.tcp() as v:
                    assert v.read(rep.addr, 4096) == data
                break
            except BladeUnreachable:
                assert time.monotonic() < deadline, "blade not reachable after the link came back"
                time.sleep(0.2)
    finally:
        if node is not None:
            node.close()
        proc.kill()
        proc.wait(timeout=10)
