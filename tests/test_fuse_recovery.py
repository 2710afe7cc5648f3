"""Crash recovery on nvm blades: kill -9 the filesystem daemon, mount again, and every
fsynced file is back with its data -- including fsynced renames, unlinks and truncates --
twice in a row (recovering a recovered log), then after a clean remount too."""

from __future__ import annotations

import mmap
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Cluster, need

from fuse_fs.cli import mount_entry
from fuse_fs.testing import MountedFs, fuse_available, leftovers, mounted

pytestmark = pytest.mark.system
MiB = 1 << 20
UNSYNCED = "unsynced"  # made just before each crash: may or may not come back


@pytest.fixture(autouse=True, scope="module")
def nothing_left_behind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    yield
    assert leftovers(tmp_path_factory.getbasetemp()) == []


@pytest.fixture
def nvm_cluster(tmp_path: Path) -> Iterator[Cluster]:
    ok, why = fuse_available()
    need(ok, why)
    c = Cluster(tmp_path / "nvm")
    c.up("--blades", "2", "--capacity", "64M", "--mode", "nvm", "--lease", "1")
    yield c
    c.down()


def write_synced(p: Path, data: bytes) -> None:
    fd = os.open(p, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under root: file contents, or None for a directory."""
    out: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        for d in dirnames:
            out[os.path.normpath(os.path.join(rel, d))] = None
        for f in filenames:
            if f != UNSYNCED:
                out[os.path.normpath(os.path.join(rel, f))] = Path(dirpath, f).read_bytes()
    return out


def crash(fs: MountedFs) -> None:
    (fs.path / UNSYNCED).write_bytes(b"never fsynced")
    fs.kill9()
    assert mount_entry(str(fs.path)) is None


def test_kill9_then_remount_shows_every_fsynced_file(nvm_cluster: Cluster,
                                                     tmp_path: Path) -> None:
    rng = random.Random(7)
    with mounted(nvm_cluster.dir, tmp_path / "mnt", name="crash") as fs:
        root = fs.path
        (root / "docs").mkdir()
        (root / "docs" / "deep").mkdir()
        (root / "trash").mkdir()
        sizes = [0, 1, 511, 4096, 65_536, 65_537, 300_000, 2 * MiB + 3]
        for i, n in enumerate(sizes):
            write_synced(root / "docs" / f"f{i}", rng.randbytes(n))
        write_synced(root / "docs" / "deep" / "note", b"deep note")
        write_synced(root / "trash" / "x", rng.randbytes(100_000))
        write_synced(root / "old-name", b"renamed later")
        os.rename(root / "old-name", root / "docs" / "new-name")
        os.unlink(root / "trash" / "x")
        os.rmdir(root / "trash")
        os.link(root / "docs" / "f1", root / "hardlink")
        fsync_dir(root)
        with open(root / "docs" / "f6", "r+b") as f:  # truncate, fsynced
            f.truncate(70_000)
            os.fsync(f.fileno())
        fd = os.open(root / "docs" / "f7", os.O_RDWR)  # a store through a mapping
        with mmap.mmap(fd, 0, mmap.MAP_SHARED) as m:
            m[100_000:100_009] = b"via mmap!"
            m.flush()
        os.fsync(fd)
        os.close(fd)
        expected = snapshot(root)

        crash(fs)
        fs.mount()
        assert snapshot(root) == expected
        assert os.stat(root / "hardlink").st_nlink == 2
        assert (root / "docs" / "f7").read_bytes()[100_000:100_009] == b"via mmap!"

        # second round on the recovered filesystem: more changes, another crash
        os.rename(root / "docs" / "deep", root / "deep-moved")
        os.unlink(root / "docs" / "f0")
        write_synced(root / "deep-moved" / "late", rng.randbytes(150_000))
        with open(root / "docs" / "f3", "r+b") as f:
            f.seek(1000)
            f.write(b"patched")
            os.fsync(f.fileno())
        fsync_dir(root)
        expected = snapshot(root)
        crash(fs)
        fs.mount()
        assert snapshot(root) == expected

        # and a clean unmount / mount of the same state
        fs.remount()
        assert snapshot(root) == expected
