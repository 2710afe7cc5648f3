"""Fuzzing the tcp framing: the sans-IO decoder in-process, then a live slabd over raw sockets.

The decoder may only ever raise ProtocolError, and returns exactly the frames that were
encoded however the bytes are chunked. The daemon, fed garbage before and after a client
authenticates, must answer or close that one connection, never hang on a closed peer,
never die, and serve the next good client correctly.
"""

from __future__ import annotations

import socket
import struct
from pathlib import Path
from typing import Any

import msgspec
import pytest
from blade_helpers import SlabdPool
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rallocator import auth
from rallocator.blade_link import BladeLink
from rallocator.layout import Geometry
from rallocator.protocol import allocate_slab, free_slab
from rallocator.transport_tcp import TcpVerbs
from rallocator.verbs import BladeUnreachable
from rallocator.wire import (
    HEADER,
    HEADER_SIZE,
    MAX_CALL_PAYLOAD,
    MAX_PAYLOAD,
    VERSION,
    FrameDecoder,
    Op,
    ProtocolError,
    Status,
    VerbError,
    pack_header,
    parse_header,
)

NODE = 0xF0221
U64 = st.integers(0, (1 << 64) - 1)
U32 = st.integers(0, (1 << 32) - 1)
U16 = st.integers(0, (1 << 16) - 1)

# ====================================================================== the decoder


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=2 * HEADER_SIZE), request=st.booleans())
def test_parse_header_only_raises_protocol_error(data: bytes, request: bool):
    try:
        h = parse_header(data, request=request)
    except ProtocolError:
        return
    assert len(data) == HEADER_SIZE
    assert h.op in Op._value2member_map_
    if request:
        assert h.payload_len <= MAX_PAYLOAD
        if Op(h.op) in (Op.READ, Op.FETCH_ADD, Op.COMPARE_SWAP, Op.PERSIST):
            assert h.payload_len == 0
        if Op(h.op) is Op.READ:
            assert h.a <= MAX_PAYLOAD


@settings(max_examples=300, deadline=None)
@given(data=st.binary(min_size=HEADER_SIZE, max_size=HEADER_SIZE), request=st.booleans())
def test_parse_header_accepts_exactly_what_it_returns(data: bytes, request: bool):
    try:
        h = parse_header(data, request=request)
    except ProtocolError:
        return
    assert HEADER.pack(h.payload_len, h.op, h.status, h.req_id, h.addr, h.a, h.b) == data


@settings(max_examples=200, deadline=None)
@given(stream=st.binary(max_size=400), cuts=st.lists(st.integers(0, 400), max_size=12),
       request=st.booleans())
def test_decoder_on_garbage_only_raises_protocol_error_and_stays_failed(stream, cuts, request):
    d = FrameDecoder(request=request)
    pos = 0
    frames: list[tuple[Any, bytes]] = []
    for cut in sorted(cuts) + [len(stream)]:
        d.feed(stream[pos:cut])
        pos = max(pos, cut)
        try:
            while (f := d.next_frame()) is not None:
                frames.append(f)
        except ProtocolError:
            with pytest.raises(ProtocolError):  # no silent resync on a broken stream
                d.next_frame()
            return
    # whatever came out is a prefix of the stream, re-encoded byte for byte
    out = b"".join(pack_header(h.op, h.status, h.req_id, h.addr, h.a, h.b, h.payload_len) + p
                   for h, p in frames)
    assert stream.startswith(out)


def valid_frame(request: bool) -> st.SearchStrategy[tuple[tuple[int, ...], bytes]]:
    def build(op: Op, status: int, req: int, addr: int, a: int, b: int, payload: bytes):
        if request and op in (Op.READ, Op.FETCH_ADD, Op.COMPARE_SWAP, Op.PERSIST):
            payload = b""
        if request and op is Op.READ:
            a %= MAX_PAYLOAD + 1
        return (int(op), status, req, addr, a, b), payload

    return st.builds(build, st.sampled_from(list(Op)), U16, U32, U64, U64, U64,
                     st.binary(max_size=300))


@settings(max_examples=200, deadline=None)
@given(request=st.booleans(), data=st.data())
def test_decoder_round_trips_valid_frames_however_chunked(request, data):
    frames = data.draw(st.lists(valid_frame(request), max_size=8))
    wire = b"".join(pack_header(*h, payload_len=len(p)) + p for h, p in frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=10)))
    d = FrameDecoder(request=request)
    got = []
    pos = 0
    for cut in cuts + [len(wire)]:
        d.feed(wire[pos:cut])
        pos = max(pos, cut)
        while (f := d.next_frame()) is not None:
            got.append(((f[0].op, f[0].status, f[0].req_id, f[0].addr, f[0].a, f[0].b), f[1]))
    assert got == frames
    assert d.next_frame() is None


def test_decoder_limits():
    for op, plen in ((Op.WRITE, MAX_PAYLOAD + 1), (Op.CALL, MAX_CALL_PAYLOAD + 1),
                     (Op.HELLO, MAX_CALL_PAYLOAD + 1), (Op.READ, 1), (Op.PERSIST, 8)):
        d = FrameDecoder(request=True)
        d.feed(pack_header(op, payload_len=plen))
        with pytest.raises(ProtocolError):
            d.next_frame()
    d = FrameDecoder(request=True)
    d.feed(pack_header(Op.READ, a=MAX_PAYLOAD + 1))
    with pytest.raises(ProtocolError):
        d.next_frame()
    d = FrameDecoder(request=True)
    d.feed(pack_header(Op.WRITE, payload_len=MAX_PAYLOAD)[:-1])
    assert d.next_frame() is None  # half a header: wait for more


# ====================================================================== a live blade


class Raw:
    """A raw socket speaking (or not) the blade's protocol."""

    def __init__(self, address: str, timeout: float = 5.0) -> None:
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)

    def recv_exact(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise EOFError(f"closed after {len(out)} of {n} bytes")
            out += chunk
        return bytes(out)

    def reply(self) -> tuple[Any, bytes]:
        h = HEADER.unpack(self.recv_exact(HEADER_SIZE))
        return h, self.recv_exact(h[0])

    def hello(self) -> bytes:
        h, nonce = self.reply()
        assert h[1] == Op.HELLO and h[4] == 0 and len(nonce) == auth.NONCE
        return nonce

    def authenticate(self, secret: bytes, node: int = NODE) -> Geometry:
        nonce_b = self.hello()
        nonce_n = auth.new_nonce()
        mac = auth.node_proof(secret, nonce_b, nonce_n, node)
        self.sock.sendall(pack_header(Op.HELLO, 0, 1, node, VERSION, 0, 64) + nonce_n + mac)
        h, body = self.reply()
        assert h[2] == Status.OK, body
        return Geometry.from_superblock(body[auth.MAC:])

    def send(self, op: int, addr: int = 0, a: int = 0, b: int = 0, payload: bytes = b"",
             payload_len: int | None = None, req: int = 7) -> None:
        plen = len(payload) if payload_len is None else payload_len
        try:
            self.sock.sendall(HEADER.pack(plen, op, 0, req, addr, a, b) + payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the blade may close a connection whose stream cannot be valid

    def finish(self, timeout: float = 5.0) -> tuple[list[tuple[Any, bytes]], bool]:
        """Half-close, read every reply until the blade closes. (replies, closed_in_time)"""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.sock.settimeout(timeout)
        replies = []
        try:
            while True:
                replies.append(self.reply())
        except EOFError:
            return replies, True
        except TimeoutError:
            return replies, False
        except ConnectionResetError:
            return replies, True
        finally:
            self.sock.close()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with SlabdPool(tmp_path_factory.mktemp("fuzz")) as pool:
        blade = pool.start("b", capacity="8M", lease=1)
        yield pool, blade


def assert_healthy(pool: SlabdPool, blade: Any) -> None:
    """The daemon lives and a well-behaved node gets correct service."""
    assert blade.alive, f"slabd died: {blade.log_tail()}"
    link = BladeLink("b", blade.address, pool.secret, 0x600D, transport="tcp")
    try:
        g = link.run(allocate_slab(link.geometry, 0, link.node_id, 1, 1))
        data = bytes(range(256)) * 16
        with link.verbs() as v:
            v.write(g.addr + 4096, data, fua=True)
            assert v.read(g.addr + 4096, len(data)) == data
        assert [s["unit"] for s in link.call({"op": "owned"})["slabs"]] == [g.unit]
        link.run(free_slab(link.geometry, link.node_id, g.unit))
        assert link.call({"op": "owned"})["slabs"] == []
    finally:
        link.close()


def check_replies(replies: list[tuple[Any, bytes]]) -> None:
    for h, body in replies:
        plen, status = h[0], h[2]
        assert plen == len(body)
        assert status in Status._value2member_map_, f"unknown status {status}"
        if status != Status.OK:
            body.decode()  # error messages are UTF-8 text


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(junk=st.binary(max_size=200))
def test_garbage_before_authentication(live, junk):
    pool, blade = live
    r = Raw(blade.address)
    r.sock.sendall(junk)
    replies, closed = r.finish()
    assert closed, "the blade kept a half-closed, unauthenticated connection open"
    check_replies(replies)
    assert blade.alive


def frame_strategy(geo: Geometry) -> st.SearchStrategy[tuple[Any, ...]]:
    size = geo.region_size
    addrs = st.one_of(st.integers(0, geo.off_slabs + 64), st.integers(0, size + 8),
                      st.sampled_from([0, geo.off_slabs, size - 1, size, 1 << 63,
                                       (1 << 64) - 1]),
                      U64)
    words = st.one_of(st.integers(0, 64), st.sampled_from([MAX_PAYLOAD, MAX_PAYLOAD + 1,
                                                           (1 << 64) - 1]), U64)
    ops = st.one_of(st.sampled_from([int(o) for o in Op]), st.sampled_from([0, 8, 255]), U16)
    lens = st.sampled_from(["exact", "exact", "short", "long", "huge"])
    return st.tuples(ops, addrs, words, words, st.binary(max_size=48), lens)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_garbage_after_authentication(live, data):
    pool, blade = live
    r = Raw(blade.address)
    geo = r.authenticate(pool.secret)
    frames = data.draw(st.lists(frame_strategy(geo), min_size=1, max_size=4))
    for op, addr, a, b, payload, lens in frames:
        if op == Op.READ and a <= MAX_PAYLOAD and addr + a <= geo.region_size:
            a %= 1 << 16  # keep in-range reads small
        plen = {"exact": len(payload), "short": len(payload) + 5, "long": max(0, len(payload) - 3),
                "huge": MAX_PAYLOAD + 1}[lens]
        r.send(op, addr, a, b, payload, payload_len=plen)
    replies, closed = r.finish()
    assert closed, f"the blade hung on a closed peer after {frames}"
    check_replies(replies)
    assert blade.alive, f"slabd died: {blade.log_tail()}"


def test_the_blade_survives_and_serves_after_the_fuzz(live):
    pool, blade = live
    assert_healthy(pool, blade)


# ---------------------------------------------------------------------- specific frames


@pytest.mark.parametrize("name,frame,keeps_connection", [
    ("unknown op", dict(op=99), False),
    ("op zero", dict(op=0), False),
    ("write over the payload limit", dict(op=Op.WRITE, payload_len=MAX_PAYLOAD + 1), False),
    ("call over its limit", dict(op=Op.CALL, payload_len=MAX_CALL_PAYLOAD + 1), False),
    ("read over the limit", dict(op=Op.READ, a=MAX_PAYLOAD + 1), False),
    ("read with a payload", dict(op=Op.READ, a=8, payload=b"12345678"), False),
    # a refused frame's payload must never be read as requests: here it is a READ
    ("hello again, smuggling a read", dict(op=Op.HELLO, payload=pack_header(
        Op.READ, 0, 66, 0, 8)), True),
    ("read past the end", dict(op=Op.READ, addr="size", a=8), True),
    ("read at 2^64-8", dict(op=Op.READ, addr=(1 << 64) - 8, a=8), True),
    ("zero-length read at the end", dict(op=Op.READ, addr="size", a=0), True),
    ("write past the end", dict(op=Op.WRITE, addr="size", payload=b"y" * 100), True),
    ("zero-length write at the end", dict(op=Op.WRITE, addr="size", payload=b""), True),
    ("persist past the end", dict(op=Op.PERSIST, addr="size", a=4096), True),
    ("fetch_add on the bitmap", dict(op=Op.FETCH_ADD, addr="bitmap", a=1), True),
    ("cas on the superblock", dict(op=Op.COMPARE_SWAP, addr=0, a=1, b=2), True),
    ("call: not msgpack", dict(op=Op.CALL, payload=b"\xc1\xc1\xc1"), True),
    ("call: not a map", dict(op=Op.CALL, payload=msgspec.msgpack.encode([1, 2])), True),
    ("call: unknown op", dict(op=Op.CALL, payload=msgspec.msgpack.encode({"op": "rm -rf"})), True),
    ("call: bad volume", dict(op=Op.CALL, payload=msgspec.msgpack.encode(
        {"op": "owned", "volume": "x"})), True),
    ("call: deeply nested", dict(op=Op.CALL, payload=b"\x91" * 5000 + b"\xc0"), True),
])
def test_specific_bad_frames(live, name, frame, keeps_connection):
    pool, blade = live
    r = Raw(blade.address)
    geo = r.authenticate(pool.secret)
    frame = dict(frame)
    frame["addr"] = {"size": geo.region_size, "bitmap": geo.off_bitmap}.get(
        frame.get("addr"), frame.get("addr", 0))
    r.send(**frame)
    try:
        h, body = r.reply()  # every bad frame is answered once...
    except (EOFError, ConnectionResetError):
        pytest.fail(f"{name}: connection dropped without an answer")
    assert h[2] != Status.OK or name.startswith("zero-length"), f"{name}: accepted"
    # ...and then the connection is either dropped (stream out of step) or still usable
    r.send(Op.CALL, payload=msgspec.msgpack.encode({"op": "ping"}), req=8)
    if keeps_connection:
        try:
            h, body = r.reply()
        except (EOFError, ConnectionResetError):
            pytest.fail(f"{name}: answered, then the connection was dropped")
        assert (h[1], h[2], h[3]) == (Op.CALL, Status.OK, 8), \
            f"{name}: the next reply is not the ping's: op {h[1]} status {h[2]} req {h[3]}"
        assert msgspec.msgpack.decode(body) == {"ok": True}
        r.sock.close()
    else:
        replies, closed = r.finish()
        assert closed and replies == [], f"{name}: the blade went on reading a broken stream"
    assert blade.alive


def test_register_when_the_epoch_table_is_full_is_an_error_reply(tmp_path: Path):
    """max_nodes nodes have registered (and not gone quiet long enough to be dropped): the
    next registration must be refused with an error, not by dropping the connection."""
    with SlabdPool(tmp_path) as pool:
        blade = pool.start("b", capacity="8M")
        conns = [pool.connect(blade, 0x1000 + i) for i in range(3)]
        geo = conns[0].geometry
        for c in conns:
            c.close()
        for i in range(geo.max_nodes):
            v = pool.connect(blade, 0x1000 + i)
            v.call({"op": "register"})
            v.close()
        v = pool.connect(blade, 0x9999)
        try:
            with pytest.raises(VerbError):
                v.call({"op": "register"})
        except BladeUnreachable as e:
            pytest.fail(f"a full epoch table dropped the connection: {e}")
        finally:
            v.close()
        assert blade.alive
        v2 = pool.connect(blade, 0x1000)  # an already registered node still gets its slot
        assert v2.call({"op": "register"})["slot"] == 0
        v2.close()


def test_many_connections_that_never_authenticate_do_not_starve_good_clients(live):
    pool, blade = live
    idle = [Raw(blade.address) for _ in range(40)]
    try:
        v = TcpVerbs(blade.address, pool.secret, 0x1234, timeout=5)
        assert v.call({"op": "ping"}) == {"ok": True}
        v.close()
    finally:
        for r in idle:
            r.sock.close()
    assert_healthy(pool, blade)


def test_u64_struct_sanity():
    # the raw helpers above pack the same header TcpVerbs does
    assert HEADER.size == HEADER_SIZE == struct.calcsize("<IHHIQQQ")
