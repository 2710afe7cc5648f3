"""The tcp transport's framing: one fixed header, then an optional payload. No I/O here.

    header  <I H H I Q Q Q>  = 36 bytes
            payload_len  op  status  req_id  addr  a  b

Requests and replies share the header. What ``addr``/``a``/``b`` mean depends on the op:

    HELLO         a=version                      payload: auth material (see auth.py)
    READ          addr, a=length                 reply payload: the bytes
    WRITE         addr, b=flags (FUA)            payload: the bytes
    FETCH_ADD     addr, a=delta                  reply a=old value
    COMPARE_SWAP  addr, a=expected, b=new        reply a=old value
    PERSIST       addr, a=length                 (msync on an NVM blade)
    CALL          payload: msgpack message       reply payload: msgpack message

A reply with status != OK carries a UTF-8 error message as payload.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

HEADER = struct.Struct("<IHHIQQQ")
HEADER_SIZE = HEADER.size
VERSION = 1
MAX_PAYLOAD = 64 << 20  # the largest single read or write; bigger transfers are split
MAX_CALL_PAYLOAD = 1 << 20
FLAG_FUA = 1


class Op(IntEnum):
    HELLO = 1
    READ = 2
    WRITE = 3
    FETCH_ADD = 4
    COMPARE_SWAP = 5
    PERSIST = 6
    CALL = 7


class Status(IntEnum):
    OK = 0
    EACCES = 1  # not your slab / not a word you may touch
    EINVAL = 2  # malformed request
    ERANGE = 3  # outside the region
    EAUTH = 4  # authentication failed
    ETOOBIG = 5  # payload over the limit
    EINTERNAL = 6  # the blade failed; the connection stays usable
    ENOSPC = 7


class ProtocolError(Exception):
    """A frame that cannot be valid. The receiver answers EINVAL or closes the connection."""


class VerbError(Exception):
    """A verb the peer refused; ``status`` says why."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(f"{status.name}: {message}")
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class Header:
    payload_len: int
    op: int
    status: int
    req_id: int
    addr: int
    a: int
    b: int


def pack_header(op: int, status: int = 0, req_id: int = 0, addr: int = 0, a: int = 0,
                b: int = 0, payload_len: int = 0) -> bytes:
    return HEADER.pack(payload_len, op, status, req_id, addr, a, b)


def parse_header(data: bytes | bytearray | memoryview, *, request: bool) -> Header:
    """Decode and sanity-check a header.

    Args:
        data: exactly ``HEADER_SIZE`` bytes.
        request: True on the server side (requests must name a known op and carry payloads
            only where the op takes one).

    Raises:
        ProtocolError: unknown op, payload where none belongs, or a payload over the limit.
    """
    if len(data) != HEADER_SIZE:
        raise ProtocolError(f"header is {len(data)} bytes, want {HEADER_SIZE}")
    h = Header(*HEADER.unpack(data))
    try:
        op = Op(h.op)
    except ValueError:
        raise ProtocolError(f"unknown op {h.op}") from None
    limit = MAX_PAYLOAD
    if request:
        if op in (Op.READ, Op.FETCH_ADD, Op.COMPARE_SWAP, Op.PERSIST) and h.payload_len:
            raise ProtocolError(f"{op.name} takes no payload")
        if op in (Op.CALL, Op.HELLO):
            limit = MAX_CALL_PAYLOAD
        if op is Op.READ and h.a > MAX_PAYLOAD:
            raise ProtocolError(f"read of {h.a} bytes is over the {MAX_PAYLOAD} limit")
    if h.payload_len > limit:
        raise ProtocolError(f"payload of {h.payload_len} bytes is over the {limit} limit")
    return h


class FrameDecoder:
    """Sans-IO frame splitter: feed it bytes as they arrive, take whole frames out.

    The blade's connection loop reads headers and payloads straight into place (no copies);
    this decoder is the same rules for peers that receive in chunks, and the thing fuzz
    tests hammer.
    """

    def __init__(self, *, request: bool) -> None:
        self._buf = bytearray()
        self._request = request
        self._header: Header | None = None

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next_frame(self) -> tuple[Header, bytes] | None:
        """The next whole frame, or None if more bytes are needed.

        Raises:
            ProtocolError: the stream cannot be valid; the caller must drop the connection.
        """
        if self._header is None:
            if len(self._buf) < HEADER_SIZE:
                return None
            self._header = parse_header(bytes(self._buf[:HEADER_SIZE]), request=self._request)
            del self._buf[:HEADER_SIZE]
        n = self._header.payload_len
        if len(self._buf) < n:
            return None
        payload = bytes(self._buf[:n])
        del self._buf[:n]
        header, self._header = self._header, None
        return header, payload
