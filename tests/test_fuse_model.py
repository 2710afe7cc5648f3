"""Model-based test of the far-memory filesystem: random operations against a real mount,
checked step by step against an in-memory reference (hypothesis stateful testing).

Every example works in its own directory. The run repeats until at least MIN_OPERATIONS
operations were done in total; then the filesystem is unmounted and mounted again (the
metadata log is replayed) and every example's final tree must still match its model.
"""

from __future__ import annotations

import errno
import mmap
import os
import random
import time
from pathlib import Path

import pytest
from conftest import Cluster, need
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule, run_state_machine_as_test

from fuse_fs.testing import fuse_available, leftovers, mounted

pytestmark = pytest.mark.system

MIN_OPERATIONS = 2000
NAMES = ("a", "b", "c")
paths = st.lists(st.sampled_from(NAMES), min_size=1, max_size=3).map(tuple)
offsets = st.one_of(st.integers(0, 5000), st.integers(0, 200_000))
lengths = st.one_of(st.integers(0, 3000), st.integers(0, 150_000))


def payload(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


class Tree:
    """The reference: directories as a set of path tuples, files as bytearrays."""

    def __init__(self) -> None:
        self.dirs: set[tuple[str, ...]] = {()}
        self.files: dict[tuple[str, ...], bytearray] = {}

    def kind(self, p: tuple[str, ...]) -> str | None:
        return "dir" if p in self.dirs else "file" if p in self.files else None

    def parent_error(self, p: tuple[str, ...]) -> int | None:
        for i in range(1, len(p)):
            k = self.kind(p[:i])
            if k is None:
                return errno.ENOENT
            if k == "file":
                return errno.ENOTDIR
        return None

    def children(self, d: tuple[str, ...]) -> set[str]:
        n = len(d)
        return {p[n] for p in (*self.dirs, *self.files) if len(p) == n + 1 and p[:n] == d}

    def copy(self) -> Tree:
        t = Tree()
        t.dirs = set(self.dirs)
        t.files = {k: bytearray(v) for k, v in self.files.items()}
        return t


def attempt(fn, *args):
    try:
        return None, fn(*args)
    except OSError as e:
        return e.errno, None


def compare_tree(root: Path, model: Tree) -> None:
    for d in model.dirs:
        real = sorted(os.listdir(root.joinpath(*d)))
        assert real == sorted(model.children(d)), f"listing of {d}"
    for f, data in model.files.items():
        p = root.joinpath(*f)
        assert p.stat().st_size == len(data), f"size of {f}"
        assert p.read_bytes() == bytes(data), f"content of {f}"


class FsMachine(RuleBasedStateMachine):
    mount: Path
    counter = 0
    operations = 0
    finished: list[tuple[Path, Tree]] = []

    @initialize()
    def setup(self) -> None:
        FsMachine.counter += 1
        self.root = self.mount / f"ex{FsMachine.counter}"
        self.root.mkdir()
        self.model = Tree()

    def path(self, p: tuple[str, ...]) -> Path:
        return self.root.joinpath(*p)

    def teardown(self) -> None:
        if hasattr(self, "model"):
            FsMachine.finished.append((self.root, self.model.copy()))

    def _done(self) -> None:
        FsMachine.operations += 1

    # ------------------------------------------------------------------ rules
    @rule(p=paths, off=offsets, n=lengths, seed=st.integers(0, 2**16))
    def write(self, p, off, n, seed) -> None:
        data = payload(seed, n)
        expect = self.model.parent_error(p)
        if expect is None and self.model.kind(p) == "dir":
            expect = errno.EISDIR

        def do() -> None:
            fd = os.open(self.path(p), os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                assert os.pwrite(fd, data, off) == n
            finally:
                os.close(fd)

        err, _ = attempt(do)
        assert err == expect, f"write {p}"
        if err is None:
            f = self.model.files.setdefault(p, bytearray())
            if n:
                if len(f) < off:
                    f.extend(bytes(off - len(f)))
                f[off:off + n] = data
        self._done()

    @rule(p=paths)
    def read(self, p) -> None:
        expect = self.model.parent_error(p)
        kind = self.model.kind(p)
        if expect is None and kind is None:
            expect = errno.ENOENT
        if kind == "dir":
            return
        err, data = attempt(self.path(p).read_bytes)
        assert err == expect, f"read {p}"
        if err is None:
            assert data == bytes(self.model.files[p]), f"content of {p}"
        self._done()

    @rule(p=paths, size=offsets)
    def truncate(self, p, size) -> None:
        expect = self.model.parent_error(p)
        kind = self.model.kind(p)
        if expect is None:
            expect = {None: errno.ENOENT, "dir": errno.EISDIR}.get(kind)
        err, _ = attempt(os.truncate, self.path(p), size)
        assert err == expect, f"truncate {p}"
        if err is None:
            f = self.model.files[p]
            if size < len(f):
                del f[size:]
            else:
                f.extend(bytes(size - len(f)))
        self._done()

    @rule(p=paths)
    def unlink(self, p) -> None:
        expect = self.model.parent_error(p)
        kind = self.model.kind(p)
        if expect is None:
            expect = {None: errno.ENOENT, "dir": errno.EISDIR}.get(kind)
        err, _ = attempt(os.unlink, self.path(p))
        assert err == expect, f"unlink {p}"
        if err is None:
            del self.model.files[p]
        self._done()

    @rule(p=paths)
    def mkdir(self, p) -> None:
        expect = self.model.parent_error(p)
        if expect is None and self.model.kind(p) is not None:
            expect = errno.EEXIST
        err, _ = attempt(os.mkdir, self.path(p))
        assert err == expect, f"mkdir {p}"
        if err is None:
            self.model.dirs.add(p)
        self._done()

    @rule(p=paths)
    def rmdir(self, p) -> None:
        expect = self.model.parent_error(p)
        kind = self.model.kind(p)
        if expect is None:
            if kind is None:
                expect = errno.ENOENT
            elif kind == "file":
                expect = errno.ENOTDIR
            elif self.model.children(p):
                expect = errno.ENOTEMPTY
        err, _ = attempt(os.rmdir, self.path(p))
        assert err == expect, f"rmdir {p}"
        if err is None:
            self.model.dirs.discard(p)
        self._done()

    def _rename_error(self, src, dst) -> int | None:
        m = self.model
        for e in (m.parent_error(src), m.parent_error(dst)):
            if e is not None:
                return e
        ks, kd = m.kind(src), m.kind(dst)
        if ks is None:
            return errno.ENOENT
        if src == dst:
            return None
        if ks == "dir" and dst[:len(src)] == src:
            return errno.EINVAL  # a directory into itself
        if src[:len(dst)] == dst:
            return errno.ENOTEMPTY  # over one of its own ancestors
        if kd is not None:
            if ks == "dir" and kd == "file":
                return errno.ENOTDIR
            if ks == "file" and kd == "dir":
                return errno.EISDIR
            if kd == "dir" and m.children(dst):
                return errno.ENOTEMPTY
        return None

    @rule(src=paths, dst=paths)
    def rename(self, src, dst) -> None:
        expect = self._rename_error(src, dst)
        err, _ = attempt(os.rename, self.path(src), self.path(dst))
        assert err == expect, f"rename {src} -> {dst}"
        if err is None and src != dst:
            m = self.model
            if m.kind(src) == "file":
                m.files[dst] = m.files.pop(src)
            else:
                m.dirs.discard(dst)
                n = len(src)
                m.dirs = {dst + d[n:] if d[:n] == src else d for d in m.dirs}
                m.files = {dst + f[n:] if f[:n] == src else f: v for f, v in m.files.items()}
        self._done()

    @rule(p=paths, off=st.integers(0, 200_000), n=st.integers(1, 5000),
          seed=st.integers(0, 2**16))
    def mmap_write(self, p, off, n, seed) -> None:
        f = self.model.files.get(p)
        if f is None or not len(f):
            return
        off %= len(f)
        n = min(n, len(f) - off)
        data = payload(seed, n)
        fd = os.open(self.path(p), os.O_RDWR)
        try:
            with mmap.mmap(fd, len(f), mmap.MAP_SHARED) as m:
                m[off:off + n] = data
                m.flush()
        finally:
            os.close(fd)
        f[off:off + n] = data
        self._done()

    @rule(p=paths)
    def fsync(self, p) -> None:
        if self.model.kind(p) != "file":
            return
        fd = os.open(self.path(p), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self._done()

    @rule()
    def check_all(self) -> None:
        compare_tree(self.root, self.model)
        st_ = os.stat(self.root)
        assert st_.st_nlink == 2 + sum(1 for d in self.model.dirs if len(d) == 1)
        self._done()


@pytest.fixture(autouse=True)
def nothing_left_behind(tmp_path: Path):
    yield
    assert leftovers(tmp_path) == []


def test_random_operations_match_model(make_cluster, tmp_path: Path) -> None:
    ok, why = fuse_available()
    need(ok, why)
    cluster: Cluster = make_cluster("--blades", "2", "--capacity", "128M")
    FsMachine.counter = FsMachine.operations = 0
    FsMachine.finished = []
    with mounted(cluster.dir, tmp_path / "mnt", name="model") as fs:
        FsMachine.mount = fs.path
        started = time.monotonic()
        runs = 0
        while FsMachine.operations < MIN_OPERATIONS and time.monotonic() - started < 150:
            runs += 1
            run_state_machine_as_test(FsMachine, settings=settings(
                max_examples=25, stateful_step_count=50, deadline=None, database=None,
                suppress_health_check=list(HealthCheck)))
        assert FsMachine.operations >= MIN_OPERATIONS, (
            f"only {FsMachine.operations} operations in {runs} run(s)")
        # everything again after a clean remount: the metadata log replays to the same trees
        fs.remount()
        for root, model in FsMachine.finished:
            compare_tree(root, model)
