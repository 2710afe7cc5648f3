"""What a node may do to a blade over tcp, and what it may not.

Every connection proves it holds the cluster secret; after that a node may touch only the
slabs it owns and the control words the protocol needs (its own acks and frees, its own
epoch slot, the sequencers through fetch_add). Refusals are error replies on a connection
that stays usable; nothing a node does reaches another node's data.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from blade_helpers import SlabdPool, wait_for

from rallocator import auth
from rallocator.blade_link import BladeLink
from rallocator.layout import (
    ACK_BODY,
    ACKED,
    CLAIMED,
    EPOCH_ENTRY,
    FREE_BODY,
    OPEN,
    OWNER_ENTRY,
    RING_ENTRY,
    make_key,
)
from rallocator.protocol import allocate_slab, free_slab
from rallocator.transport_tcp import AuthFailed, TcpVerbs
from rallocator.verbs import BladeUnreachable
from rallocator.wire import HEADER, HEADER_SIZE, VERSION, Op, Status, VerbError, pack_header

NODE_A, NODE_B = 0xAAAA, 0xBBBB


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One blade for the module (its checks do not depend on each other's leftovers), and
    node B holding one slab full of a pattern."""
    with SlabdPool(tmp_path_factory.mktemp("auth")) as pool:
        blade = pool.start("b", capacity="32M", lease=1)
        b = BladeLink("b", blade.address, pool.secret, NODE_B, transport="tcp")
        g = b.run(allocate_slab(b.geometry, 0, NODE_B, 7, 0))
        with b.verbs() as v:
            v.write(g.addr, b"B" * g.size)
        yield pool, blade, b, g
        b.close()


def expect(status: Status, fn: Any, *args: Any) -> VerbError:
    with pytest.raises(VerbError) as info:
        fn(*args)
    assert info.value.status == status, f"{fn.__name__}{args}: {info.value}"
    return info.value


def still_works(v: TcpVerbs) -> None:
    """The connection survived the refusal."""
    assert not v.broken
    assert v.call({"op": "ping"}) == {"ok": True}


# ====================================================================== authentication


def test_wrong_secret_is_refused(env, tmp_path: Path):
    pool, blade, _, _ = env
    with pytest.raises(AuthFailed, match="refused"):
        TcpVerbs(blade.address, b"not-the-cluster-secret-at-all", NODE_A)
    with pytest.raises(AuthFailed):
        TcpVerbs(blade.address, pool.secret + b"x", NODE_A)
    with pytest.raises(AuthFailed):  # node id 0 is nobody
        TcpVerbs(blade.address, pool.secret, 0)
    v = pool.connect(blade, NODE_A)  # and the right one still gets in
    still_works(v)
    v.close()


def test_a_blade_without_the_secret_is_not_trusted(env):
    """The node checks the blade's proof too: an impostor that accepts any node and answers
    with a made-up proof (and a plausible superblock) is refused by the node."""
    pool, blade, _, _ = env
    real_sb = pool.connect(blade, NODE_A)
    superblock = real_sb.superblock
    real_sb.close()
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def impostor() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(pack_header(Op.HELLO, a=VERSION, payload_len=auth.NONCE)
                         + auth.new_nonce())
            h = HEADER.unpack(conn.recv(HEADER_SIZE, socket.MSG_WAITALL))
            conn.recv(h[0], socket.MSG_WAITALL)
            body = os.urandom(auth.MAC) + superblock
            conn.sendall(pack_header(Op.HELLO, req_id=h[3], payload_len=len(body)) + body)
            conn.recv(1)  # until the node hangs up

    t = threading.Thread(target=impostor, daemon=True)
    t.start()
    try:
        with pytest.raises(AuthFailed, match="does not hold the cluster secret"):
            TcpVerbs(f"127.0.0.1:{port}", pool.secret, NODE_A)
    finally:
        t.join(timeout=5)
        listener.close()


# ====================================================================== other nodes' slabs


def test_node_cannot_read_or_write_another_nodes_slab(env):
    pool, blade, b, g = env
    v = pool.connect(blade, NODE_A)
    try:
        assert expect(Status.EACCES, v.read, g.addr, 16).status == Status.EACCES
        expect(Status.EACCES, v.read, g.addr + g.size - 1, 1)
        expect(Status.EACCES, v.write, g.addr, b"A" * 4096)
        expect(Status.EACCES, v.write, g.addr + 100, b"A", True)
        # a read that starts in the (readable) control area and runs into the slab
        expect(Status.EACCES, v.read, v.geometry.off_slabs - 8, 16 + g.addr - v.geometry.off_slabs)
        still_works(v)
        with b.verbs() as bv:
            assert bv.read(g.addr, g.size) == b"B" * g.size
    finally:
        v.close()


def test_own_slab_cannot_be_used_to_reach_past_its_edges(env):
    pool, blade, _, _ = env
    a = BladeLink("b", blade.address, pool.secret, NODE_A, transport="tcp")
    try:
        geo = a.geometry
        mine = [a.run(allocate_slab(geo, 0, NODE_A, 1, i)) for i in range(4)]
        units = {m.unit for m in mine}
        checked = 0
        with a.verbs() as v:
            for m in mine:
                v.write(m.addr, b"a" * 64)  # own slab: fine
                assert v.read(m.addr, 64) == b"a" * 64
                # one byte past the end, one byte before the start
                for addr, n, neighbour in ((m.addr, m.size + 1, m.unit + 1),
                                           (m.addr - 1, 2, m.unit - 1)):
                    if not 0 <= neighbour < geo.n_units or neighbour in units:
                        continue
                    expect(Status.EACCES, v.read, addr, n)
                    expect(Status.EACCES, v.write, addr, b"z" * n)
                    checked += 1
            still_works(v)
        assert checked > 0
        for m in mine:
            a.run(free_slab(geo, NODE_A, m.unit))
    finally:
        a.close()


def test_a_freed_slab_is_no_longer_reachable_by_its_old_owner(env):
    pool, blade, _, _ = env
    a = BladeLink("b", blade.address, pool.secret, NODE_A, transport="tcp")
    try:
        g = a.run(allocate_slab(a.geometry, 0, NODE_A, 1, 99))
        with a.verbs() as v:
            v.write(g.addr, b"secret")
            a.run(free_slab(a.geometry, NODE_A, g.unit))
            expect(Status.EACCES, v.read, g.addr, 6)
            expect(Status.EACCES, v.write, g.addr, b"again")
    finally:
        a.close()


def test_stocked_but_untaken_slab_is_not_reachable(env):
    pool, blade, _, _ = env
    v = pool.connect(blade, NODE_A)
    try:
        geo = v.geometry
        seq = int.from_bytes(v.read(geo.seq_addr(0), 8), "little")
        ticket, unit = RING_ENTRY.unpack(v.read(geo.ring_addr(0, seq), 16))
        assert ticket == seq, "the blade keeps slabs stocked ahead"
        expect(Status.EACCES, v.read, geo.unit_addr(unit), 8)
        expect(Status.EACCES, v.write, geo.unit_addr(unit), b"x")
    finally:
        v.close()


def test_free_of_another_nodes_slab_is_refused(env):
    pool, blade, b, g = env
    v = pool.connect(blade, NODE_A)
    try:
        geo = v.geometry
        # A fills in a free request naming B's unit (as A: the body must name A)
        f = v.fetch_add(geo.free_seq_addr, 1)
        key = geo.free_addr(f)
        assert wait_for(lambda: v.compare_swap(key, make_key(f, OPEN), make_key(f, CLAIMED))
                        in (make_key(f, OPEN), make_key(f, CLAIMED)), 3)
        expect(Status.EACCES, v.write, key + 8, FREE_BODY.pack(NODE_B, g.unit, 1))
        v.write(key + 8, FREE_BODY.pack(NODE_A, g.unit, 1))
        assert v.compare_swap(key, make_key(f, CLAIMED), make_key(f, ACKED)) == make_key(f, CLAIMED)
        time.sleep(0.05)
        assert [s["unit"] for s in b.call({"op": "owned"})["slabs"]] == [g.unit]
        with b.verbs() as bv:
            assert bv.read(g.addr, 4) == b"BBBB"
    finally:
        v.close()


# ====================================================================== control words


def test_node_cannot_write_or_cas_control_words(env):
    pool, blade, b, g = env
    v = pool.connect(blade, NODE_A)
    try:
        geo = v.geometry
        seq0 = v.read(geo.seq_addr(0), 8)
        words = {
            "superblock": 0,
            "sequencer": geo.seq_addr(0),
            "free sequencer": geo.free_seq_addr,
            "global epoch": geo.global_epoch_addr,
            "published free units": geo.free_units_addr,
            "ring entry": geo.ring_addr(0, 5),
            "bitmap": geo.off_bitmap,
            "owner table (B's slab)": geo.owner_addr(g.unit),
            "owner table (free unit)": geo.owner_addr(geo.n_units - 1),
        }
        for what, addr in words.items():
            e = expect(Status.EACCES, v.write, addr, (1 << 40).to_bytes(8, "little"))
            assert e.status == Status.EACCES, what
            current = int.from_bytes(v.read(addr, 8), "little")
            expect(Status.EACCES, v.compare_swap, addr, current, 12345)
        owner = OWNER_ENTRY.pack(1, NODE_A, 7, 0, 0, 1, 0, 0)
        expect(Status.EACCES, v.write, geo.owner_addr(g.unit), owner)
        expect(Status.EACCES, v.fetch_add, geo.global_epoch_addr, 1)
        expect(Status.EACCES, v.fetch_add, geo.owner_addr(0), 1)
        expect(Status.EINVAL, v.fetch_add, geo.seq_addr(0), 1000)
        assert v.read(geo.seq_addr(0), 8) == seq0
        still_works(v)
        assert [s["unit"] for s in b.call({"op": "owned"})["slabs"]] == [g.unit]
    finally:
        v.close()


def test_node_cannot_touch_another_nodes_epoch_slot(env):
    pool, blade, b, _ = env
    v = pool.connect(blade, NODE_A)
    try:
        geo = v.geometry
        slot = b.slot
        addr = geo.epoch_addr(slot)
        assert EPOCH_ENTRY.unpack(v.read(addr, 32))[0] == NODE_B
        expect(Status.EACCES, v.write, addr + 8, EPOCH_ENTRY.pack(0, 0, 0, 0)[8:])  # park B
        expect(Status.EACCES, v.write, addr, EPOCH_ENTRY.pack(NODE_A, 1, 1, 1))  # take it
        expect(Status.EACCES, v.compare_swap, addr + 16, 1, 0)
        assert EPOCH_ENTRY.unpack(v.read(addr, 32))[0] == NODE_B
        # its own slot is writable (what the heartbeat does)
        mine = v.call({"op": "register"})["slot"]
        assert mine != slot
        e = int.from_bytes(v.read(geo.global_epoch_addr, 8), "little")
        v.write(geo.epoch_addr(mine) + 8, EPOCH_ENTRY.pack(0, e, 0, 9)[8:])
        still_works(v)
    finally:
        v.close()


def claim_a_ticket(v: TcpVerbs, node: int) -> tuple[int, int, int]:
    """Take a ticket and claim its slot by hand (the first half of allocate_slab)."""
    geo = v.geometry
    t = v.fetch_add(geo.seq_addr(0), 1)
    assert wait_for(lambda: RING_ENTRY.unpack(v.read(geo.ring_addr(0, t), 16))[0] == t, 3)
    unit = RING_ENTRY.unpack(v.read(geo.ring_addr(0, t), 16))[1]
    key = geo.ack_addr(0, t)
    assert v.compare_swap(key, make_key(t, OPEN), make_key(t, CLAIMED)) == make_key(t, OPEN)
    v.write(key + 8, ACK_BODY.pack(node, 7, 1, unit))
    return t, key, unit


def test_node_cannot_ack_another_nodes_claimed_ticket(env):
    pool, blade, _, _ = env
    a, b = pool.connect(blade, NODE_A), pool.connect(blade, NODE_B)
    try:
        t, key, unit = claim_a_ticket(b, NODE_B)
        # A moves B's key to ACKED: refused, the body names B
        expect(Status.EACCES, a.compare_swap, key, make_key(t, CLAIMED), make_key(t, ACKED))
        still_works(a)
        assert b.compare_swap(key, make_key(t, CLAIMED), make_key(t, ACKED)) == make_key(t, CLAIMED)
        assert unit in [s["unit"] for s in b.call({"op": "owned"})["slabs"]]
        b.call({"op": "ping"})
    finally:
        a.close()
        b.close()


def test_node_cannot_overwrite_the_ack_body_of_another_nodes_claimed_ticket(env):
    """B took ticket t and claimed its slot; A must not be able to rewrite the slot's body
    (the server only checks that the new body names the writer and the slot is CLAIMED).
    If it can, B's own ack is refused (EACCES, a VerbError allocate_slab does not expect)
    and A can ack the slab B was handed."""
    pool, blade, _, _ = env
    a, b = pool.connect(blade, NODE_A), pool.connect(blade, NODE_B)
    try:
        t, key, unit = claim_a_ticket(b, NODE_B)
        try:
            a.write(key + 8, ACK_BODY.pack(NODE_A, 7, 1, unit))
            hijacked = True
        except VerbError as e:
            assert e.status == Status.EACCES
            hijacked = False
        try:
            b_acked = b.compare_swap(key, make_key(t, CLAIMED), make_key(t, ACKED)) \
                == make_key(t, CLAIMED)
        except VerbError:
            b_acked = False
        assert not hijacked and b_acked, \
            f"node A rewrote B's claimed ack slot (ticket {t}); B's own ack " \
            f"{'still worked' if b_acked else 'was then refused'}"
    finally:
        a.close()
        b.close()


# ====================================================================== ranges


def test_out_of_range_gets_erange_and_the_connection_keeps_working(env):
    pool, blade, _, _ = env
    v = pool.connect(blade, NODE_A)
    try:
        size = v.geometry.region_size
        expect(Status.ERANGE, v.read, size, 1)
        expect(Status.ERANGE, v.read, size - 10, 100)
        expect(Status.ERANGE, v.read, (1 << 64) - 8, 8)
        expect(Status.ERANGE, v.read, 1 << 63, 1 << 20)
        expect(Status.ERANGE, v.write, size, b"x" * 5000)  # payload drained, stream in step
        expect(Status.ERANGE, v.write, (1 << 64) - 4, b"abcdefgh")
        expect(Status.ERANGE, v.persist, size - 4, 8)
        expect(Status.ERANGE, v.persist, 1 << 63, 1)
        for _ in range(3):
            still_works(v)
        assert v.read(0, 8) == b"RALLOCv1"
    finally:
        v.close()


def test_zero_length_access_at_the_end_of_the_region_keeps_the_connection(env):
    """A zero-length write (or read) at exactly region_size passes the range check and then
    indexes unit_owner[n_units]: IndexError, and the server drops the connection."""
    pool, blade, _, _ = env
    v = pool.connect(blade, NODE_A)
    try:
        size = v.geometry.region_size
        try:
            v.write(size, b"")
        except VerbError as e:
            assert e.status in (Status.ERANGE, Status.EACCES)
        except BladeUnreachable as e:
            pytest.fail(f"zero-length write at region_size dropped the connection: {e}")
        still_works(v)
    finally:
        v.close()
