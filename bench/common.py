"""Shared bits for benchmarks: a throwaway cluster, the machine description, result files."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
PY = sys.executable


def ralloc(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "ralloc", *args], capture_output=True, text=True,
                          check=check, cwd=ROOT)


@contextlib.contextmanager
def cluster(*args: str) -> Iterator[str]:
    """A cluster for one benchmark, always torn down."""
    d = tempfile.mkdtemp(prefix="rbench-")
    try:
        ralloc("cluster", "up", "--dir", d, *args)
        yield d
    finally:
        ralloc("cluster", "down", "--dir", d, check=False)
        shutil.rmtree(d, ignore_errors=True)


def machine() -> str:
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") >> 30
    return f"{os.cpu_count()} cores ({cpu}), {mem} GiB, Linux {platform.release()}"


def save(name: str, data: dict) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.json"
    path.write_text(json.dumps(data, indent=2))
    return path
