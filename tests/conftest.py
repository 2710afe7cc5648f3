"""Shared fixtures: real daemons as subprocesses, and the CI rule for missing capabilities.

``need(ok, why)``: in CI (CI=true) a missing capability fails the test; on a developer's
machine it skips. System tests must run in CI.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need(ok: bool, why: str) -> None:
    """Skip (developer machine) or fail (CI) when a capability is missing."""
    if ok:
        return
    if IN_CI:
        pytest.fail(f"required capability missing in CI: {why}")
    pytest.skip(why)


def ralloc(*args: str, check: bool = True, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    """Run the real CLI (``python -m ralloc``) and capture its output."""
    return subprocess.run([PY, "-m", "ralloc", *args], capture_output=True, text=True,
                          timeout=timeout, check=check, cwd=ROOT, **kw)


class Cluster:
    """A running embedded cluster in a temporary directory (``ralloc cluster up``)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def up(self, *extra: str) -> None:
        ralloc("cluster", "up", "--dir", str(self.dir), *extra)

    def down(self) -> None:
        ralloc("cluster", "down", "--dir", str(self.dir), check=False)

    @property
    def config(self):
        from rallocator.cluster_config import ClusterConfig

        return ClusterConfig.load(str(self.dir))

    def node(self, node_name: str = "test-node", **kw):
        from rallocator.node import WorkingNode

        return WorkingNode.from_cluster(str(self.dir), node_name=node_name, **kw)


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator:
    """Factory: ``make_cluster("--blades", "2", "--capacity", "64M")``; all are torn down."""
    made: list[Cluster] = []

    def make(*args: str) -> Cluster:
        c = Cluster(tmp_path / f"cluster{len(made)}")
        made.append(c)
        c.up(*args)
        return c

    yield make
    for c in made:
        c.down()


@pytest.fixture
def cluster(make_cluster) -> Cluster:
    """Three 64 MiB dram blades and a coordinator on loopback."""
    return make_cluster("--blades", "3", "--capacity", "64M", "--lease", "1")
