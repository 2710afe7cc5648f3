"""The far-memory filesystem on real mounts: POSIX semantics, errnos, permissions, statfs,
space accounting, ENOSPC, clean unmount on SIGTERM, replicas surviving a dead blade, and the
mount/umount commands' errors."""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Cluster, need, ralloc

from fuse_fs.cli import daemon_pids, mount_entry
from fuse_fs.testing import MountedFs, fuse_available, leftovers, mounted
from rallocator.secret import load_secret
from rallocator.transport_tcp import TcpVerbs
from rallocator.verbs import BladeUnreachable

pytestmark = pytest.mark.system
MiB = 1 << 20


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    ok, why = fuse_available()
    need(ok, why)
    c = Cluster(tmp_path_factory.mktemp("fusefs") / "cluster")
    c.up("--blades", "3", "--capacity", "64M", "--lease", "1")
    yield c
    c.down()


@pytest.fixture(scope="module")
def fs(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MountedFs]:
    with mounted(cluster.dir, tmp_path_factory.mktemp("mnt"), name="basic") as m:
        yield m


@pytest.fixture
def d(fs: MountedFs, request: pytest.FixtureRequest) -> Path:
    """A fresh directory on the shared mount for one test."""
    p = fs.path / request.node.name
    p.mkdir()
    return p


@pytest.fixture(autouse=True, scope="module")
def nothing_left_behind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Torn down last: no mount of ours and no daemon outlive this module's tests."""
    yield
    assert leftovers(tmp_path_factory.getbasetemp()) == []


def errno_of(fn, *args) -> int | None:
    try:
        fn(*args)
    except OSError as e:
        return e.errno
    return None


# ------------------------------------------------------------------ namespace and errnos


def test_errnos_for_user_errors(d: Path) -> None:
    (d / "f").write_bytes(b"x")
    (d / "sub").mkdir()
    (d / "sub" / "g").write_bytes(b"y")
    assert errno_of(os.stat, d / "missing") == errno.ENOENT
    assert errno_of(open, d / "missing" / "x") == errno.ENOENT
    assert errno_of(os.mkdir, d / "f") == errno.EEXIST
    assert errno_of(os.mkdir, d / "sub") == errno.EEXIST
    assert errno_of(os.open, d / "f", os.O_CREAT | os.O_EXCL | os.O_WRONLY) == errno.EEXIST
    assert errno_of(os.unlink, d / "sub") == errno.EISDIR
    assert errno_of(os.open, d / "sub", os.O_WRONLY) == errno.EISDIR
    assert errno_of(os.rmdir, d / "f") == errno.ENOTDIR
    assert errno_of(os.listdir, d / "f") == errno.ENOTDIR
    assert errno_of(os.stat, d / "f" / "x") == errno.ENOTDIR
    assert errno_of(os.rmdir, d / "sub") == errno.ENOTEMPTY
    assert errno_of(os.rename, d / "f", d / "sub") == errno.EISDIR
    (d / "empty").mkdir()
    assert errno_of(os.rename, d / "empty", d / "f") == errno.ENOTDIR
    assert errno_of(os.rename, d / "empty", d / "sub") == errno.ENOTEMPTY
    assert errno_of(os.rename, d / "sub", d / "sub" / "inside") == errno.EINVAL
    long = "n" * 256
    assert errno_of(os.open, d / long, os.O_CREAT | os.O_WRONLY) == errno.ENAMETOOLONG
    assert errno_of(os.mkdir, d / long) == errno.ENAMETOOLONG
    assert errno_of(os.rename, d / "f", d / long) == errno.ENAMETOOLONG
    (d / ("n" * 255)).write_bytes(b"ok")  # 255 is allowed
    assert sorted(os.listdir(d)) == sorted(["f", "sub", "empty", "n" * 255])


def test_mkdir_rmdir_and_link_counts(d: Path) -> None:
    base = os.stat(d).st_nlink
    (d / "a").mkdir()
    (d / "b").mkdir()
    (d / "a" / "x").mkdir()
    assert os.stat(d).st_nlink == base + 2
    assert os.stat(d / "a").st_nlink == 3
    os.rename(d / "a" / "x", d / "b" / "x")
    assert os.stat(d / "a").st_nlink == 2
    assert os.stat(d / "b").st_nlink == 3
    os.rmdir(d / "b" / "x")
    os.rmdir(d / "b")
    os.rmdir(d / "a")
    assert os.stat(d).st_nlink == base
    assert os.listdir(d) == []


def test_rename_link_symlink(d: Path) -> None:
    (d / "a").write_bytes(b"aaa")
    (d / "b").write_bytes(b"bbb")
    os.rename(d / "a", d / "b")  # over an existing file
    assert (d / "b").read_bytes() == b"aaa" and not (d / "a").exists()
    (d / "dir").mkdir()
    os.rename(d / "b", d / "dir" / "c")
    assert (d / "dir" / "c").read_bytes() == b"aaa"
    os.link(d / "dir" / "c", d / "hard")
    assert os.stat(d / "hard").st_nlink == 2
    assert os.stat(d / "hard").st_ino == os.stat(d / "dir" / "c").st_ino
    os.unlink(d / "dir" / "c")
    assert (d / "hard").read_bytes() == b"aaa" and os.stat(d / "hard").st_nlink == 1
    os.symlink("hard", d / "sym")
    assert os.readlink(d / "sym") == "hard"
    assert (d / "sym").read_bytes() == b"aaa"
    assert stat.S_ISLNK(os.lstat(d / "sym").st_mode)
    # renameat2 flags: RENAME_NOREPLACE and RENAME_EXCHANGE
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd = -100

    def renameat2(a: Path, b: Path, flags: int) -> int:
        r = libc.renameat2(at_fdcwd, str(a).encode(), at_fdcwd, str(b).encode(), flags)
        return 0 if r == 0 else ctypes.get_errno()

    (d / "x").write_bytes(b"xx")
    assert renameat2(d / "x", d / "hard", 1) == errno.EEXIST  # NOREPLACE
    assert renameat2(d / "x", d / "hard", 2) == 0  # EXCHANGE
    assert (d / "x").read_bytes() == b"aaa" and (d / "hard").read_bytes() == b"xx"


def test_open_while_unlinked_keeps_data(d: Path) -> None:
    p = d / "tmp"
    p.write_bytes(b"still here")
    with open(p, "rb") as f:
        os.unlink(p)
        assert not p.exists()
        assert f.read() == b"still here"


# ------------------------------------------------------------------ data


def test_holes_truncate_and_offsets(d: Path) -> None:
    p = d / "sparse"
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.pwrite(fd, b"end", 10 * MiB)
        assert os.fstat(fd).st_size == 10 * MiB + 3
        assert os.pread(fd, 100, 5 * MiB) == bytes(100)  # a hole reads as zeros
        assert os.fstat(fd).st_blocks * 512 < MiB  # and takes no space
        data = os.urandom(300_000)
        os.pwrite(fd, data, 70_000)  # across several 64 KiB blocks
        assert os.pread(fd, len(data), 70_000) == data
        os.ftruncate(fd, 100_000)
        assert os.fstat(fd).st_size == 100_000
        os.ftruncate(fd, 400_000)  # growing again: the cut part is zeros now
        assert os.pread(fd, 30_000, 70_000) == data[:30_000]
        assert os.pread(fd, 300_000, 100_000) == bytes(300_000)
        os.ftruncate(fd, 0)
        assert os.pread(fd, 10, 0) == b""
        os.pwrite(fd, b"small", 0)
        assert os.pread(fd, 100, 0) == b"small"
        os.fsync(fd)
    finally:
        os.close(fd)
    # O_TRUNC through open()
    p.write_bytes(b"new")
    assert p.read_bytes() == b"new"


def test_small_file_grows_through_extent_sizes(d: Path) -> None:
    p = d / "grow"
    expect = b""
    with open(p, "ab") as f:
        for i in range(40):
            chunk = bytes([i]) * (100 + i * 97)
            f.write(chunk)
            f.flush()
            expect += chunk
    assert p.read_bytes() == expect
    big = os.urandom(200_000)
    with open(p, "r+b") as f:
        f.seek(10)
        f.write(big)
    assert p.read_bytes() == expect[:10] + big + expect[10 + len(big):]


def test_times_and_sizes(d: Path) -> None:
    p = d / "t"
    p.write_bytes(b"1")
    st1 = os.stat(p)
    assert st1.st_size == 1 and st1.st_uid == os.getuid()
    time.sleep(0.02)
    with open(p, "ab") as f:
        f.write(b"23")
    st2 = os.stat(p)
    assert st2.st_size == 3
    assert st2.st_mtime_ns > st1.st_mtime_ns
    os.utime(p, ns=(1_000_000_000, 2_000_000_000))
    st3 = os.stat(p)
    assert (st3.st_atime_ns, st3.st_mtime_ns) == (1_000_000_000, 2_000_000_000)
    os.chmod(p, 0o600)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    dst = os.stat(d)
    (d / "new").write_bytes(b"")
    assert os.stat(d).st_mtime_ns >= dst.st_mtime_ns


def test_permissions_are_enforced(d: Path) -> None:
    """default_permissions: the kernel checks modes; allow_other: others may enter."""
    nobody = 65534
    os.chmod(d, 0o755)
    (d / "private").write_bytes(b"secret")
    os.chmod(d / "private", 0o600)
    (d / "public").write_bytes(b"hello")
    os.chmod(d / "public", 0o644)
    (d / "open").mkdir()
    os.chmod(d / "open", 0o777)

    # /tmp/pytest-of-root is 0700: hand the child our directory as an open descriptor
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    code = """
import errno, os, sys
D = int(sys.argv[1])
def err(fn, *a, **k):
    try:
        fn(*a, **k)
    except OSError as e:
        return e.errno
fd = os.open("public", os.O_RDONLY, dir_fd=D)
print(os.read(fd, 100).decode())
print(err(os.open, "private", os.O_RDONLY, dir_fd=D) == errno.EACCES)
print(err(os.open, "public", os.O_WRONLY, dir_fd=D) == errno.EACCES)
print(err(os.chmod, "public", 0o666, dir_fd=D) == errno.EPERM)
print(err(os.mkdir, "nope", dir_fd=D) == errno.EACCES)
fd = os.open("open/mine", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=D)
os.write(fd, b"mine")
"""
    try:
        r = subprocess.run([sys.executable, "-c", code, str(dfd)], user=nobody, group=nobody,
                           extra_groups=[], pass_fds=(dfd,), capture_output=True, text=True,
                           timeout=30, cwd="/")
    finally:
        os.close(dfd)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["hello", "True", "True", "True", "True"]
    st = os.stat(d / "open" / "mine")
    assert (st.st_uid, st.st_gid) == (nobody, nobody)


# ------------------------------------------------------------------ space


def blade_usage(cluster: Cluster) -> int:
    """Bytes of slabs the blades count as used (asked directly: no coordinator lag)."""
    cfg = cluster.config
    secret = load_secret(cfg.secret_file)
    total = 0
    for b in cfg.blades:
        try:
            conn = TcpVerbs(b.address, secret, node_id=0xB0B, timeout=2.0)
        except (BladeUnreachable, OSError):
            continue
        try:
            total += conn.call({"op": "stats"})["used_bytes"]
        finally:
            conn.close()
    return total


def settled_usage(cluster: Cluster) -> int:
    """Blade usage once it stops moving (slabs freed earlier are reclaimed by epochs)."""
    last = blade_usage(cluster)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = blade_usage(cluster)
        if now == last:
            return now
        last = now
    return last


def fsync_dir(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def test_statfs_reports_cluster_capacity(fs: MountedFs) -> None:
    st = os.statvfs(fs.path)
    assert st.f_blocks * st.f_frsize == 3 * 64 * MiB
    assert 0 < st.f_bavail * st.f_frsize <= 3 * 64 * MiB
    assert st.f_namemax == 255


def test_small_files_share_slabs_and_unlink_frees(d: Path, cluster: Cluster) -> None:
    fsync_dir(d)
    before = settled_usage(cluster)
    for i in range(200):
        (d / f"s{i}").write_bytes(os.urandom(1000 + i))
    fsync_dir(d)
    grown = blade_usage(cluster) - before
    assert grown <= 2 * MiB, f"200 small files took {grown} bytes of slabs"
    for i in range(200):
        assert len((d / f"s{i}").read_bytes()) == 1000 + i
    big = d / "big"
    with open(big, "wb") as f:
        for _ in range(12):
            f.write(os.urandom(MiB))
        os.fsync(f.fileno())
    # the blades count our slabs as used (less up to two empties we already held)
    assert blade_usage(cluster) - before >= 10 * MiB
    big.unlink()
    for i in range(200):
        (d / f"s{i}").unlink()
    fsync_dir(d)
    deadline = time.monotonic() + 20  # blades reclaim once every node's epoch moved on
    while blade_usage(cluster) - before > 4 * MiB and time.monotonic() < deadline:
        time.sleep(0.2)
    assert blade_usage(cluster) - before <= 4 * MiB


def test_enospc_when_the_cluster_is_full(tmp_path: Path) -> None:
    small = Cluster(tmp_path / "small")
    small.up("--blades", "1", "--capacity", "16M", "--lease", "1")
    try:
        with mounted(small.dir, tmp_path / "m", name="full") as m:
            p = m.path / "fill"
            fd = os.open(p, os.O_CREAT | os.O_WRONLY, 0o644)
            chunk = os.urandom(MiB)
            written, err = 0, None
            try:
                for _ in range(64):
                    written += os.write(fd, chunk)
            except OSError as e:
                err = e.errno
            finally:
                os.close(fd)
            assert err == errno.ENOSPC
            assert 8 * MiB <= written < 16 * MiB
            assert os.stat(p).st_size == written
            assert errno_of((m.path / "more").write_bytes, chunk) == errno.ENOSPC
            # deleting makes room again (the log keeps a spare segment for exactly this)
            p.unlink()
            (m.path / "more").unlink(missing_ok=True)
            fsync_dir(m.path)
            (m.path / "again").write_bytes(chunk * 4)
            assert (m.path / "again").read_bytes() == chunk * 4
    finally:
        small.down()


# ------------------------------------------------------------------ lifecycle


def test_sigterm_unmounts_cleanly_and_data_survives(cluster: Cluster, tmp_path: Path) -> None:
    m = MountedFs(cluster.dir, tmp_path / "m", name="sigterm")
    try:
        m.mount()
        (m.path / "keep").write_bytes(b"kept")  # no fsync: a clean stop commits it
        pid = m.pid()
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while daemon_pids(str(m.path)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not daemon_pids(str(m.path))
        assert mount_entry(str(m.path)) is None
        assert "metadata checkpointed" in m.log.read_text()
        m.mount()
        assert (m.path / "keep").read_bytes() == b"kept"
        m.umount()
        assert mount_entry(str(m.path)) is None and not daemon_pids(str(m.path))
    finally:
        m.cleanup()


def test_mount_and_umount_errors(cluster: Cluster, fs: MountedFs, tmp_path: Path) -> None:
    r = ralloc("mount", "--cluster", str(cluster.dir), str(tmp_path / "nodir"), check=False)
    assert r.returncode == 1 and "not a directory" in r.stderr
    (tmp_path / "mp").mkdir()
    r = ralloc("mount", "--cluster", str(tmp_path), str(tmp_path / "mp"), check=False)
    assert r.returncode == 1 and "not a cluster directory" in r.stderr
    r = ralloc("mount", "--cluster", str(cluster.dir), str(tmp_path / "mp"), "--name",
               fs.name, check=False)
    assert r.returncode == 1 and "already mounted" in r.stderr
    r = ralloc("mount", "--cluster", str(cluster.dir), str(fs.path), check=False)
    assert r.returncode == 1 and "already a mount point" in r.stderr
    r = ralloc("umount", str(tmp_path / "mp"), check=False)
    assert r.returncode == 1 and "not mounted" in r.stderr
    r = subprocess.run([sys.executable, "-m", "fuse_fs", "--help"], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0 and "--replicas" in r.stdout
    assert mount_entry(str(tmp_path / "mp")) is None


def test_replicas_survive_a_dead_blade(tmp_path: Path) -> None:
    c = Cluster(tmp_path / "rep")
    c.up("--blades", "3", "--capacity", "32M", "--lease", "1")
    try:
        with mounted(c.dir, tmp_path / "m", name="rep", replicas=2,
                     extra=("--transport", "tcp")) as m:
            data = os.urandom(3 * MiB + 12345)
            with open(m.path / "f", "wb") as f:
                f.write(data)
                os.fsync(f.fileno())
            assert blade_usage(c) >= 2 * len(data)  # two copies of every data slab
            victim = c.config.blades[0]
            os.kill(victim.pid, signal.SIGKILL)
            with open(m.path / "f", "rb") as f:  # drop our cached pages: read the blades
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                assert f.read() == data
            (m.path / "after").write_bytes(b"still writable")
            assert (m.path / "after").read_bytes() == b"still writable"
    finally:
        c.down()
