"""BlockVolume (rallocator/blockdev.py) without nbdkit, against real blades.

Layered like the plugin: settings first (no cluster), then the data path on one shared
cluster (a volume per test, so they do not interfere), then failures and restarts on
clusters of their own (they kill blades).
"""

from __future__ import annotations

import os
import signal
import threading
import time

import psutil
import pytest
from conftest import Cluster

from rallocator.blockdev import (
    EXTENT_HOLE,
    EXTENT_ZERO,
    BlockVolume,
    ConfigError,
    SlabLock,
    VolumeConfig,
)
from rallocator.node import WorkingNode, name_id
from rallocator.secret import load_secret
from rallocator.transport_tcp import TcpVerbs

M = 1 << 20
HOLE = EXTENT_HOLE | EXTENT_ZERO


# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Cluster:
    """Three 64 MiB dram blades for the data-path tests (each uses its own volume)."""
    c = Cluster(tmp_path_factory.mktemp("nbdunit") / "cluster")
    c.up("--blades", "3", "--capacity", "64M", "--lease", "1")
    yield c
    c.down()


def open_volume(cluster: Cluster, name: str, size: int = 32 * M, **kw) -> BlockVolume:
    cfg = VolumeConfig(cluster=str(cluster.dir), size=size, volume=name)
    for key, value in kw.items():
        setattr(cfg, key, value)
    return BlockVolume.open(cfg)


def blade_call(cluster: Cluster, blade: str, message: dict, node: str = "nbd-test-probe"):
    """A control call straight to one blade (no epoch slot, nothing left open)."""
    cfg = cluster.config
    entry = next(b for b in cfg.blades if b.name == blade)
    conn = TcpVerbs(entry.address, load_secret(cfg.secret_file), name_id(node), timeout=3,
                    connect_timeout=1)
    try:
        return conn.call(message)
    finally:
        conn.close()


def copies(cluster: Cluster, volume: str) -> dict[int, list[str]]:
    """Which live blades hold a copy of each slab of ``volume`` (from their owner tables)."""
    out: dict[int, list[str]] = {}
    for b in cluster.config.blades:
        try:
            reply = blade_call(cluster, b.name, {"op": "owned", "volume": name_id(volume)},
                               node=f"nbd:{volume}")
        except OSError:
            continue
        for s in reply["slabs"]:
            out.setdefault(s["index"], []).append(b.name)
    return out


def eventually(check, timeout: float = 10.0) -> None:
    """Poll ``check()`` until true: blades commit acks and frees done over shm on their next
    tick, so their owner tables trail the node a little."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.02)


def kill_blade(cluster: Cluster, name: str) -> None:
    pid = next(b.pid for b in cluster.config.blades if b.name == name)
    os.kill(pid, signal.SIGKILL)
    for _ in range(100):  # gone, or a zombie nobody reaps (its parent was `ralloc`)
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
        time.sleep(0.02)


def read(vol: BlockVolume, offset: int, n: int) -> bytes:
    buf = bytearray(n)
    vol.pread(buf, offset)
    return bytes(buf)


# ---------------------------------------------------------------- settings


def test_config_rejects_bad_keys_and_values() -> None:
    cfg = VolumeConfig()
    for key, value, words in [("bogus", "1", "unknown key"), ("size", "lots", "size=lots"),
                              ("replicas", "0", "replicas=0"), ("replicas", "x", "not a number"),
                              ("slab_size", "3M", "power of two"), ("transport", "rdma", "auto"),
                              ("volume", "", "volume=")]:
        with pytest.raises(ConfigError, match=words) as e:
            cfg.set(key, value)
        assert "\n" not in str(e.value)
    cfg.set("size", "1G")
    cfg.set("slab_size", "1M")
    cfg.set("transport", "tcp")
    assert (cfg.size, cfg.slab_size, cfg.transport) == (1 << 30, M, "tcp")
    with pytest.raises(ConfigError, match="cluster=DIR is required"):
        cfg.validate()
    cfg.set("cluster", "/nonexistent/cluster")
    with pytest.raises(ConfigError, match="no cluster in"):
        cfg.validate()


def test_config_checks_the_cluster(shared: Cluster) -> None:
    cfg = VolumeConfig(cluster=str(shared.dir), size=64 * M)
    cfg.check_cluster()
    cfg.slab_size = 2 * M
    with pytest.raises(ConfigError, match="they offer 1M, 4M"):
        cfg.check_cluster()
    cfg.slab_size, cfg.replicas = 4 * M, 4
    with pytest.raises(ConfigError, match="replicas=4 but the cluster has 3"):
        cfg.validate()


# ---------------------------------------------------------------- the data path


def test_unmapped_reads_zeros_and_extents_report_holes(shared: Cluster) -> None:
    with open_volume(shared, "holes") as vol:
        assert read(vol, 5 * M + 3, 70_000) == bytes(70_000)
        assert vol.extents(vol.size, 0) == [(0, vol.size, HOLE)]
        vol.pwrite(b"x" * 10, 4 * M + 100)
        assert vol.mapped_slabs() == [1]
        assert vol.extents(vol.size, 0) == [(0, 4 * M, HOLE), (4 * M, 4 * M, 0),
                                            (8 * M, 24 * M, HOLE)]
        assert vol.extents(6 * M, M, req_one=True) == [(M, 3 * M, HOLE)]
        # the rest of a freshly mapped slab reads as zeros, whatever the blade held before
        assert read(vol, 4 * M, 4 * M) == bytes(100) + b"x" * 10 + bytes(4 * M - 110)


def test_fresh_slabs_never_show_a_previous_owners_bytes(shared: Cluster) -> None:
    with open_volume(shared, "dirty-owner", size=64 * M) as vol:
        junk = b"\xee" * (4 * M)
        for i in range(8):
            vol.pwrite(junk, i * 4 * M)
        vol.trim(vol.size, 0)
    time.sleep(0.3)  # let the blades reclaim the units (epochs)
    with open_volume(shared, "after-owner", size=64 * M) as vol:
        for i in range(8):
            vol.pwrite(b"ok", i * 4 * M + M)
        for i in range(8):
            assert read(vol, i * 4 * M, 4 * M) == bytes(M) + b"ok" + bytes(3 * M - 2)
        vol.trim(vol.size, 0)


def test_requests_split_at_slab_boundaries(shared: Cluster) -> None:
    with open_volume(shared, "split", size=20 * M) as vol:
        data = os.urandom(9 * M + 12345)
        offset = 3 * M + 777  # spans slabs 0..3, unaligned at both ends
        vol.pwrite(memoryview(data), offset)
        assert read(vol, offset, len(data)) == data
        assert vol.mapped_slabs() == [0, 1, 2, 3]
        assert read(vol, 0, offset) == bytes(offset)
        # last slab is partial (20M = 5 x 4M exactly here; write its very end)
        vol.pwrite(b"end", vol.size - 3)
        assert read(vol, vol.size - 3, 3) == b"end"


def test_trim_and_zero(shared: Cluster) -> None:
    with open_volume(shared, "trim", size=16 * M) as vol:
        vol.pwrite(os.urandom(16 * M), 0)
        owned = lambda: sum(  # noqa: E731
            len(v) for v in copies(shared, "trim").values())
        eventually(lambda: owned() == 4)
        vol.trim(7 * M, 3 * M)  # covers slab 1 whole, slabs 0 and 2 partly
        assert vol.mapped_slabs() == [0, 2, 3]
        eventually(lambda: owned() == 3)
        assert read(vol, 4 * M, 4 * M) == bytes(4 * M)
        vol.zero(100, 8 * M + 50)  # partial: zeros written, slab stays
        assert read(vol, 8 * M + 40, 120)[10:110] == bytes(100)
        assert vol.is_mapped(2)
        vol.zero(4 * M, 12 * M, may_trim=False)  # whole but no hole allowed: zeros written
        assert vol.is_mapped(3) and read(vol, 12 * M, 4 * M) == bytes(4 * M)
        vol.zero(4 * M, 12 * M, may_trim=True)  # now it may go
        assert not vol.is_mapped(3)
        vol.trim(vol.size, 0)
        assert vol.mapped_slabs() == []
        eventually(lambda: owned() == 0)


def test_flush_persists_exactly_the_slabs_written_since(shared: Cluster, monkeypatch) -> None:
    with open_volume(shared, "flush", size=16 * M) as vol:
        persisted: list[int] = []
        monkeypatch.setattr(vol, "_persist", lambda i, slab, start, n: persisted.append(i))
        vol.pwrite(b"a" * 4096, 0)
        vol.pwrite(b"b" * 4096, 8 * M)
        vol.pwrite(b"c" * 4096, 4 * M, fua=True)  # FUA maps slab 1: durable on return
        vol.flush()
        assert persisted == [0, 2]
        persisted.clear()
        vol.pwrite(b"d" * 4096, 4 * M, fua=True)  # durable on return: nothing to flush
        vol.flush()
        assert persisted == []
        vol.pwrite(b"e" * 4096, 8 * M + 4096)
        vol.flush()
        vol.flush()
        assert persisted == [2]
        vol.trim(vol.size, 0)


def test_slab_lock_exclusive_waits_for_registered_io_and_io_then_waits() -> None:
    # The I/O path takes no lock: it registers in `busy`, then checks `locked()`.
    lk = SlabLock()
    lk.busy.append(None)  # an I/O in flight
    got = threading.Event()

    def exclusive() -> None:
        lk.acquire_exclusive()
        got.set()

    t = threading.Thread(target=exclusive)
    t.start()
    assert not got.wait(0.1), "the exclusive side did not wait for the I/O in flight"
    assert lk.locked()  # ...but new I/O already sees it and queues behind it
    lk.busy.pop()
    assert got.wait(2)
    t.join()
    done = threading.Event()

    def io() -> None:
        with lk:
            done.set()

    t = threading.Thread(target=io)
    t.start()
    assert not done.wait(0.1), "I/O ran while the slab was held exclusive"
    lk.release_exclusive()
    assert done.wait(2)
    t.join()
    assert not lk.locked() and not lk.busy


def test_racing_first_writes_map_a_slab_once(shared: Cluster) -> None:
    with open_volume(shared, "race") as vol:
        blocks = [os.urandom(4096) for _ in range(64)]
        start = threading.Barrier(16)

        def writer(k: int) -> None:
            start.wait()
            for j in range(k, 64, 16):
                vol.pwrite(blocks[j], j * 4096)

        threads = [threading.Thread(target=writer, args=(k,)) for k in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert vol.counters["maps"] == 1
        assert read(vol, 0, 64 * 4096) == b"".join(blocks)
        eventually(lambda: len(copies(shared, "race").get(0, [])) == 1)
        vol.trim(vol.size, 0)


def test_restart_serves_the_same_data_and_volumes_are_separate(shared: Cluster) -> None:
    data = os.urandom(6 * M)
    with open_volume(shared, "keep") as vol:
        vol.pwrite(data, 10 * M)
        vol.flush()
        with pytest.raises(ConfigError, match="already served"):
            open_volume(shared, "keep")
    with open_volume(shared, "keep") as vol:
        assert read(vol, 10 * M, len(data)) == data
        assert vol.mapped_slabs() == [2, 3]
    with open_volume(shared, "other") as vol:
        assert read(vol, 10 * M, len(data)) == bytes(len(data))
    with pytest.raises(ConfigError, match="slab_size=4M"):
        open_volume(shared, "keep", slab_size=M)
    with open_volume(shared, "keep") as vol:
        vol.trim(vol.size, 0)


# ---------------------------------------------------------------- replicas and failures


def test_a_killed_blade_is_rebuilt_and_writes_meanwhile_reach_every_copy(make_cluster) -> None:
    cluster = make_cluster("--blades", "3", "--capacity", "64M", "--lease", "1")
    size, bs, nthreads = 16 * M, 64 * 1024, 4
    nblocks = size // bs
    final = [os.urandom(bs) for _ in range(nblocks)]
    stop = threading.Event()
    with open_volume(cluster, "busy", size=size, replicas=2, transport="tcp") as vol:
        vol.pwrite(b"".join(final), 0)
        eventually(lambda: sum(map(len, copies(cluster, "busy").values())) == 8)
        where = copies(cluster, "busy")
        assert len(where) == 4 and all(len(set(b)) == 2 for b in where.values()), where
        victim = where[0][0]
        hit = sum(victim in b for b in where.values())

        pool = [os.urandom(bs) for _ in range(61)]
        rebuilt: set[int] = set()  # a slab is not written after its copy: a lost write shows
        add_copies = vol.add_copies

        def spy(i: int, *args, **kw) -> bool:
            ok = add_copies(i, *args, **kw)
            if ok:
                rebuilt.add(i)
            return ok

        vol.add_copies = spy  # type: ignore[method-assign]

        def writer(k: int) -> None:  # thread k owns blocks k, k+n, ...: the end state is known
            n = k
            while not stop.is_set():
                for j in range(k, nblocks, nthreads):
                    if j * bs // vol.slab_size in rebuilt:
                        continue
                    n += 1
                    block = pool[n % len(pool)]
                    vol.pwrite(block, j * bs)
                    final[j] = block

        threads = [threading.Thread(target=writer, args=(k,)) for k in range(nthreads)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        kill_blade(cluster, victim)
        deadline = time.monotonic() + 15
        while vol.counters["repairs"] < hit and time.monotonic() < deadline:
            time.sleep(0.05)  # keep writing while the slabs are copied
        stop.set()
        for t in threads:
            t.join()
        assert vol.wait_healthy(15), vol.stats()
        assert victim in vol.stats()["dead_blades"] and vol.counters["repairs"] >= hit
        eventually(lambda: all(len(b) == 2 for b in copies(cluster, "busy").values()))
        where = copies(cluster, "busy")
        assert all(len(set(b)) == 2 and victim not in b for b in where.values()), where
        expect = b"".join(final)
        slab = vol.slab_size
        for i in vol.mapped_slabs():  # every copy, not just the one reads go to
            reps = vol._map[i].replicas
            assert len(reps) == 2
            for rep in reps:
                with rep.link.verbs() as v:
                    got = v.read(rep.addr, slab)
                assert got == expect[i * slab:(i + 1) * slab], (i, rep.link.name)
        # lose one more blade: every slab is read from its one remaining copy
        kill_blade(cluster, sorted({b for bs in where.values() for b in bs})[0])
        assert read(vol, 0, size) == expect


def test_extra_copies_are_outvoted_at_startup(shared: Cluster) -> None:
    cluster = shared
    data = os.urandom(4 * M)
    with open_volume(cluster, "vote", size=8 * M, replicas=2) as vol:
        vol.pwrite(data, 0)
        used = vol.blades_of(0)
    # a stale third copy, as if a dead blade came back while the plugin was down
    node = WorkingNode.from_cluster(str(cluster.dir), node_name="nbd:vote")
    try:
        stale = node.allocate_slab(4 * M, name_id("vote"), 0, exclude=used)
        with stale.replicas[0].link.verbs() as v:
            v.write(stale.replicas[0].addr, b"\x01" * (4 * M))
    finally:
        node.close()
    eventually(lambda: len(copies(cluster, "vote").get(0, [])) == 3)
    with open_volume(cluster, "vote", size=8 * M, replicas=2) as vol:
        assert sorted(vol.blades_of(0)) == sorted(used)
        for _ in range(3):  # whichever copy is read first
            assert read(vol, 0, 4 * M) == data
        eventually(lambda: sorted(copies(cluster, "vote")[0]) == sorted(used))
        vol.trim(vol.size, 0)


def test_shed_moves_slabs_to_the_target(shared: Cluster) -> None:
    with open_volume(shared, "shed", size=16 * M) as vol:
        data = os.urandom(16 * M)
        vol.pwrite(data, 0)
        blades = [b.name for b in shared.config.blades]
        hot = vol.blades_of(0)[0]
        target = next(b for b in blades if b != hot)
        assert vol.monitor is not None
        vol.monitor.handle_event({"kind": "shed", "blade": hot, "target": target,
                                  "bytes": 64 * M})
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(
                hot in vol.blades_of(i) for i in vol.mapped_slabs()):
            time.sleep(0.05)
        assert not any(hot in vol.blades_of(i) for i in vol.mapped_slabs())
        assert vol.counters["migrations"] >= 1
        assert read(vol, 0, len(data)) == data
        vol.trim(vol.size, 0)


def test_blade_missing_at_startup_joins_late(shared: Cluster, monkeypatch) -> None:
    monkeypatch.setattr("rallocator.blockdev.STARTUP_TRIES", 1)
    cluster = shared
    data = os.urandom(8 * M)
    with open_volume(cluster, "late", size=8 * M, transport="tcp") as vol:
        vol.pwrite(data, 0)
        on = {vol.blades_of(0)[0], vol.blades_of(1)[0]}
    entry = next(b for b in cluster.config.blades if b.name in on)
    os.kill(entry.pid, signal.SIGSTOP)  # a blade that does not answer at startup
    try:
        cfg = VolumeConfig(cluster=str(cluster.dir), size=8 * M, volume="late",
                           transport="tcp")
        t0 = time.monotonic()
        node = WorkingNode.from_cluster(cfg.cluster, node_name="nbd:late", transport="tcp",
                                        timeout=1.0)
        vol = BlockVolume(node, "late", 8 * M, close_node=True)
        assert time.monotonic() - t0 < 8
        assert entry.name in vol.unscanned
    finally:
        os.kill(entry.pid, signal.SIGCONT)
    try:
        deadline = time.monotonic() + 10
        while entry.name in vol.unscanned and time.monotonic() < deadline:
            time.sleep(0.05)
        assert entry.name not in vol.unscanned
        assert read(vol, 0, len(data)) == data
        vol.trim(vol.size, 0)
    finally:
        vol.close()
