"""Memory-mapped files on the far-memory filesystem: shared writable mappings across
processes, fio's mmap engine with checksummed verification, and LMDB (an unmodified
mmap-based key-value store) keeping 100,000 records across a remount."""

from __future__ import annotations

import importlib.util
import json
import mmap
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest
from conftest import Cluster, need

from fuse_fs.testing import MountedFs, fuse_available, leftovers, mounted

pytestmark = pytest.mark.system
MiB = 1 << 20


@pytest.fixture(autouse=True, scope="module")
def nothing_left_behind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    yield
    assert leftovers(tmp_path_factory.getbasetemp()) == []


@pytest.fixture(scope="module")
def fs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MountedFs]:
    ok, why = fuse_available()
    need(ok, why)
    c = Cluster(tmp_path_factory.mktemp("fusemmap") / "cluster")
    c.up("--blades", "3", "--capacity", "64M", "--lease", "1")
    try:
        with mounted(c.dir, tmp_path_factory.mktemp("mnt"), name="mmap") as m:
            yield m
    finally:
        c.down()


def run_py(code: str, *args: str, timeout: float = 120) -> str:
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args],
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_shared_mapping_across_processes(fs: MountedFs) -> None:
    size = 4 * MiB
    path = fs.path / "shared"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    os.ftruncate(fd, size)
    mine = mmap.mmap(fd, size, mmap.MAP_SHARED)
    try:
        offsets = [0, 4095, 65_530, 1_000_000, size - 10]
        for i, off in enumerate(offsets):
            mine[off:off + 10] = bytes([65 + i]) * 10
        mine.flush()  # msync
        # another process maps the same file: it sees our bytes, and writes its own
        out = run_py("""
            import mmap, os, sys
            fd = os.open(sys.argv[1], os.O_RDWR)
            m = mmap.mmap(fd, int(sys.argv[2]), mmap.MAP_SHARED)
            print(",".join(m[o:o + 10].decode() for o in map(int, sys.argv[3].split(","))))
            m[2_000_000:2_000_008] = b"from-two"
            m.flush()
            m.close()
            os.close(fd)
        """, str(path), str(size), ",".join(map(str, offsets)))
        assert out.strip().split(",") == [chr(65 + i) * 10 for i in range(len(offsets))]
        assert mine[2_000_000:2_000_008] == b"from-two"  # seen through our mapping
        os.fsync(fd)
    finally:
        mine.close()
        os.close(fd)
    # the bytes are on the blades, not only in our page cache: drop it and read again
    with open(path, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        data = f.read()
    assert data[2_000_000:2_000_008] == b"from-two" and data[4095:4105] == b"B" * 10
    fs.remount()
    data = path.read_bytes()
    assert len(data) == size
    assert data[1_000_000:1_000_010] == b"D" * 10 and data[2_000_000:2_000_008] == b"from-two"


def test_fio_mmap_engine_verifies(fs: MountedFs) -> None:
    need(shutil.which("fio") is not None, "fio is not installed")
    work = fs.path / "fio"
    work.mkdir()
    r = subprocess.run(["fio", "--name=mmapverify", f"--directory={work}", "--ioengine=mmap",
                        "--rw=randwrite", "--bs=4k", "--size=16M", "--verify=crc32c",
                        "--do_verify=1", "--verify_fatal=1", "--fsync_on_close=1",
                        "--output-format=json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] >= 16 * MiB and job["read"]["io_bytes"] >= 16 * MiB


LMDB_WRITE = """
    import lmdb, sys
    env = lmdb.open(sys.argv[1], map_size=256 << 20, writemap=sys.argv[2] == "1")
    with env.begin(write=True) as txn:
        for i in range(100_000):
            txn.put(b"key%08d" % i, b"value-%d-" % i * 8)
    env.sync(True)
    env.close()
"""

LMDB_READ = """
    import lmdb, sys
    env = lmdb.open(sys.argv[1], map_size=256 << 20, readonly=True, lock=False)
    with env.begin() as txn:
        assert txn.stat()["entries"] == 100_000
        for i in range(100_000):
            assert txn.get(b"key%08d" % i) == b"value-%d-" % i * 8, i
    env.close()
    print("ok")
"""


def test_lmdb_100k_records_survive_remount(fs: MountedFs) -> None:
    need(importlib.util.find_spec("lmdb") is not None, "lmdb is not installed (pip: lmdb)")
    dbs = {"plain": "0", "writemap": "1"}  # writes by pwrite / by stores into the mapping
    for name, writemap in dbs.items():
        (fs.path / name).mkdir()
        run_py(LMDB_WRITE, str(fs.path / name), writemap)
    fs.remount()
    for name in dbs:
        assert run_py(LMDB_READ, str(fs.path / name)).strip() == "ok"
