"""The tcp transport, node side: one authenticated connection to one blade.

A connection serves one request at a time (pools give each thread its own). Reads land in
the caller's buffer with ``recv_into``; writes go out with ``sendmsg`` of header + the
caller's memoryview: no copies of slab data in Python.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

import msgspec

from rallocator import auth
from rallocator.layout import PAGE, Geometry
from rallocator.verbs import BladeUnreachable
from rallocator.wire import (
    FLAG_FUA,
    HEADER,
    HEADER_SIZE,
    MAX_PAYLOAD,
    VERSION,
    Op,
    Status,
    VerbError,
    pack_header,
)

_encode = msgspec.msgpack.encode
_decode = msgspec.msgpack.decode


def set_kernel_timeouts(sock: socket.socket, seconds: float) -> None:
    """Blocking socket whose send/recv give up after ``seconds`` (SO_RCVTIMEO/SO_SNDTIMEO,
    surfacing as BlockingIOError): Python's settimeout would add a poll() before every send
    and receive on the hot path."""
    sock.settimeout(None)
    tv = struct.pack("ll", int(seconds), int((seconds % 1) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


def send_frame(sock: socket.socket, header: bytes, payload: memoryview) -> None:
    """Header and payload in one ``sendmsg`` (no copy of the payload), finishing a
    partial send. Raises OSError like ``sendall``."""
    sent = sock.sendmsg([header, payload])
    if sent < len(header):
        sock.sendall(header[sent:])
        sent = len(header)
    if sent - len(header) < len(payload):
        sock.sendall(payload[sent - len(header):])


class AuthFailed(PermissionError):
    """The blade refused our proof, or could not prove it holds the secret."""


def split_address(address: str) -> tuple[str, int]:
    """'host:port' -> (host, port), with a readable error."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address must be HOST:PORT, got {address!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


class TcpVerbs:
    """Verbs over one tcp connection to a blade.

    Raises (from every verb):
        BladeUnreachable: timeout or broken connection (the object is then unusable).
        VerbError: the blade refused the verb (the connection stays usable).
    """

    def __init__(self, address: str, secret: bytes, node_id: int, timeout: float = 10.0,
                 connect_timeout: float = 3.0) -> None:
        self.address = address
        self.node_id = node_id
        self._hdr = bytearray(HEADER_SIZE)
        self._hdr_view = memoryview(self._hdr)
        self._req = 0
        self.broken = False
        host, port = split_address(address)
        try:
            self._sock = socket.create_connection((host, port), timeout=connect_timeout)
        except OSError as e:
            raise BladeUnreachable(f"blade {address}: {e}") from None
        set_kernel_timeouts(self._sock, timeout)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            self.geometry, self.superblock = self._handshake(secret)
        except BaseException:
            self._sock.close()
            raise

    # -- plumbing ----------------------------------------------------------------------
    def _handshake(self, secret: bytes) -> tuple[Geometry, bytes]:
        _, nonce_b = self._recv_reply(Op.HELLO)
        if len(nonce_b) != auth.NONCE:
            raise AuthFailed(f"blade {self.address} sent a malformed challenge")
        nonce_n = auth.new_nonce()
        proof = auth.node_proof(secret, nonce_b, nonce_n, self.node_id)
        self._send(Op.HELLO, addr=self.node_id, a=VERSION, payload=nonce_n + proof)
        status, body = self._recv_reply(Op.HELLO, raise_status=False)
        if status != Status.OK:
            raise AuthFailed(f"blade {self.address} refused us: {body.decode(errors='replace')}")
        expect = auth.blade_proof(secret, nonce_n, nonce_b, self.node_id)
        if not auth.check(expect, body[:auth.MAC]):
            raise AuthFailed(f"blade {self.address} does not hold the cluster secret")
        sb = body[auth.MAC:]
        return Geometry.from_superblock(sb), sb[:PAGE]

    def _send(self, op: int, addr: int = 0, a: int = 0, b: int = 0,
              payload: bytes | memoryview = b"") -> None:
        if payload:
            self._sendall(op, addr, a, b, memoryview(payload))
            return
        self._req = (self._req + 1) & 0xFFFFFFFF
        try:
            self._sock.sendall(pack_header(op, 0, self._req, addr, a, b, 0))
        except OSError as e:
            self._fail(e)

    def _sendall(self, op: int, addr: int, a: int, b: int, payload: memoryview) -> None:
        self._req = (self._req + 1) & 0xFFFFFFFF
        hdr = pack_header(op, 0, self._req, addr, a, b, len(payload))
        try:
            send_frame(self._sock, hdr, payload)
        except OSError as e:
            self._fail(e)

    def _fail(self, e: BaseException) -> None:
        self.broken = True
        self._sock.close()
        raise BladeUnreachable(f"blade {self.address}: {e or type(e).__name__}") from None

    def _recv_exact(self, view: memoryview) -> None:
        got, n = 0, len(view)
        try:
            while got < n:
                r = self._sock.recv_into(view[got:], n - got)
                if r == 0:
                    raise ConnectionResetError("connection closed by blade")
                got += r
        except OSError as e:
            self._fail(e)

    def _recv_header(self, op: int) -> tuple[int, int, int]:
        self._recv_exact(self._hdr_view)
        plen, rop, status, req, addr, a, b = HEADER.unpack(self._hdr)
        if rop != op or plen > MAX_PAYLOAD:
            self._fail(ConnectionError(f"reply out of step (op {rop}, want {op})"))
        return plen, status, a

    def _recv_reply(self, op: int, raise_status: bool = True) -> tuple[int, bytes]:
        """(status, payload) of a reply that carries a message payload."""
        plen, status, _ = self._recv_header(op)
        if raise_status and status != Status.OK:
            raise self._error(status, plen)
        body = bytearray(plen)
        if plen:
            self._recv_exact(memoryview(body))
        return status, bytes(body)

    def _error(self, status: int, plen: int) -> VerbError:
        body = bytearray(plen)
        if plen:
            self._recv_exact(memoryview(body))
        return VerbError(Status(status), body.decode(errors="replace"))

    # -- verbs -------------------------------------------------------------------------
    def read_into(self, addr: int, buf: memoryview) -> None:
        pos, n = 0, len(buf)
        while pos < n:
            chunk = min(n - pos, MAX_PAYLOAD)
            self._send(Op.READ, addr + pos, chunk)
            plen, status, _ = self._recv_header(Op.READ)
            if status != Status.OK:
                raise self._error(status, plen)
            if plen != chunk:
                self._fail(ConnectionError(f"short read reply ({plen} of {chunk})"))
            self._recv_exact(buf[pos:pos + chunk])
            pos += chunk

    def read(self, addr: int, length: int) -> bytes:
        out = bytearray(length)
        self.read_into(addr, memoryview(out))
        return bytes(out)

    def write(self, addr: int, data: bytes | memoryview, fua: bool = False) -> None:
        view = memoryview(data).cast("B")
        pos, n = 0, len(view)
        while True:  # at least once: a zero-length write is still checked by the blade
            chunk = min(n - pos, MAX_PAYLOAD)
            self._sendall(Op.WRITE, addr + pos, 0, FLAG_FUA if fua else 0,
                          view[pos:pos + chunk])
            plen, status, _ = self._recv_header(Op.WRITE)
            if status != Status.OK:
                raise self._error(status, plen)
            pos += chunk
            if pos >= n:
                return

    def _word(self, op: int, addr: int, a: int, b: int = 0) -> int:
        self._send(op, addr, a, b)
        plen, status, value = self._recv_header(op)
        if status != Status.OK:
            raise self._error(status, plen)
        return value

    def fetch_add(self, addr: int, delta: int) -> int:
        return self._word(Op.FETCH_ADD, addr, delta & 0xFFFFFFFFFFFFFFFF)

    def compare_swap(self, addr: int, expected: int, new: int) -> int:
        return self._word(Op.COMPARE_SWAP, addr, expected, new)

    def persist(self, addr: int, length: int) -> None:
        self._word(Op.PERSIST, addr, length)

    def call(self, message: dict[str, Any]) -> dict[str, Any]:
        self._send(Op.CALL, payload=_encode(message))
        _, body = self._recv_reply(Op.CALL)
        reply = _decode(body)
        if not isinstance(reply, dict):
            self._fail(ConnectionError("call reply is not a message"))
        return reply

    def close(self) -> None:
        self.broken = True
        self._sock.close()
