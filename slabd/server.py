"""The blade's tcp server: verbs executed on a node's behalf, after checking it may.

One thread per connection. Slab bytes move between the socket and the mapped region with
``recv_into`` / ``sendmsg`` of memoryviews (no copies). Every request is bounds-checked and
permission-checked; a bad request gets an error reply, a frame that cannot be valid closes
that connection only. Nothing a client sends can take the daemon down.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any

import msgspec

from rallocator import auth
from rallocator.layout import ACK_BODY, ACKED, CLAIMED, DONE, FREE_BODY, split_key
from rallocator.transport_tcp import send_frame, set_kernel_timeouts
from rallocator.wire import (
    FLAG_FUA,
    HEADER_SIZE,
    VERSION,
    Op,
    ProtocolError,
    Status,
    pack_header,
    parse_header,
)
from slabd.blade import Blade

log = logging.getLogger("slabd.server")
MAX_CONNECTIONS = 512
FRAME_TIMEOUT = 10.0  # a frame, once started, must arrive within this


class Refused(Exception):
    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status = status


class BladeServer:
    """Accepts node connections and serves verbs against ``blade``.

    Args:
        blade: the engine (its region is what verbs touch).
        secret: the cluster secret.
        info: static facts handed out by the ``info``/``register`` calls (name, region path,
            mode) so shm-capable nodes can find and map the region.
    """

    def __init__(self, blade: Blade, secret: bytes, listen: tuple[str, int],
                 info: dict[str, Any]) -> None:
        self.blade = blade
        self.region = blade.region
        self.geo = blade.geo
        self.secret = secret
        self.info = info
        self.sock = socket.create_server(listen, backlog=128, reuse_port=False)
        host, port = self.sock.getsockname()[:2]
        self.address = f"{host}:{port}"
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self.connections_total = 0
        self._claims: dict[int, int] = {}  # key word address -> node that claimed it

    # ------------------------------------------------------------------ lifecycle
    def serve_forever(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, peer = self.sock.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                continue
            with self._lock:
                if len(self._conns) >= MAX_CONNECTIONS:
                    conn.close()
                    log.warning("refused %s: %d connections already", peer, MAX_CONNECTIONS)
                    continue
                self._conns.add(conn)
                self.connections_total += 1
            threading.Thread(target=self._serve_conn, args=(conn, peer), daemon=True,
                             name=f"conn-{peer[1]}").start()

    def stop(self) -> None:
        self._stopping.set()
        try:
            self.sock.close()
        except OSError:
            pass
        with self._lock:
            for c in list(self._conns):
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    # ------------------------------------------------------------------ connection
    def _serve_conn(self, conn: socket.socket, peer: Any) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        hdr = bytearray(HEADER_SIZE)
        hv = memoryview(hdr)
        node = 0
        try:
            node = self._handshake(conn, hv)
            if node:
                log.debug("node %x connected from %s", node, peer)
                while self._serve_one(conn, hv, node):
                    pass
        except (OSError, ProtocolError) as e:
            if not self._stopping.is_set():
                log.debug("connection %s (node %x) closed: %s", peer, node, e)
        except Exception:  # a bug must cost one connection, never the daemon
            log.exception("connection %s (node %x) failed", peer, node)
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _recv_exact(self, conn: socket.socket, view: memoryview, first_blocking: bool = False) -> bool:
        """Fill view. Returns False on a clean EOF before the first byte.

        The socket is blocking with a kernel receive timeout (SO_RCVTIMEO), not Python's
        settimeout, which would cost a poll() per call on the hot path. Waiting for the
        first byte of a frame may take forever (an idle node); once a frame has started,
        the rest must arrive within FRAME_TIMEOUT.
        """
        got, n = 0, len(view)
        while got < n:
            try:
                r = conn.recv_into(view[got:], n - got)
            except BlockingIOError:  # SO_RCVTIMEO expired
                if got == 0 and first_blocking:
                    continue
                raise TimeoutError("frame not completed in time") from None
            if r == 0:
                if got == 0 and first_blocking:
                    return False
                raise ConnectionResetError("peer closed mid-frame")
            got += r
        return True

    def _drain(self, conn: socket.socket, n: int) -> None:
        scratch = bytearray(min(n, 1 << 20))
        sv = memoryview(scratch)
        while n:
            k = min(n, len(scratch))
            self._recv_exact(conn, sv[:k])
            n -= k

    def _reply(self, conn: socket.socket, op: int, req: int, status: int = 0, a: int = 0,
               payload: bytes | memoryview = b"") -> None:
        h = pack_header(op, status, req, 0, a, 0, len(payload))
        if payload:
            send_frame(conn, h, memoryview(payload))
        else:
            conn.sendall(h)

    def _handshake(self, conn: socket.socket, hv: memoryview) -> int:
        nonce_b = auth.new_nonce()
        set_kernel_timeouts(conn, FRAME_TIMEOUT)
        self._reply(conn, Op.HELLO, 0, a=VERSION, payload=nonce_b)
        if not self._recv_exact(conn, hv):
            return 0
        h = parse_header(hv, request=True)
        if h.op != Op.HELLO or h.payload_len != auth.NONCE + auth.MAC:
            self._reply(conn, Op.HELLO, h.req_id, Status.EAUTH, payload=b"expected HELLO")
            return 0
        body = bytearray(h.payload_len)
        self._recv_exact(conn, memoryview(body))
        nonce_n, mac = bytes(body[:auth.NONCE]), bytes(body[auth.NONCE:])
        node = h.addr
        if node == 0 or not auth.check(auth.node_proof(self.secret, nonce_b, nonce_n, node), mac):
            log.warning("authentication failed for a connection claiming node %x", node)
            self._reply(conn, Op.HELLO, h.req_id, Status.EAUTH,
                        payload=b"authentication failed (wrong cluster secret?)")
            return 0
        proof = auth.blade_proof(self.secret, nonce_n, nonce_b, node)
        self._reply(conn, Op.HELLO, h.req_id, payload=proof + self.region.read(0, 4096))
        return node

    def _serve_one(self, conn: socket.socket, hv: memoryview, node: int) -> bool:
        if not self._recv_exact(conn, hv, first_blocking=True):
            return False
        try:
            h = parse_header(hv, request=True)
        except ProtocolError as e:
            # answer once so the peer knows why, then drop: the stream is out of step
            op = int.from_bytes(hv[4:6], "little")
            self._reply(conn, op if op in Op._value2member_map_ else 0, 0, Status.EINVAL,
                        payload=str(e).encode())
            return False
        try:
            return self._dispatch(conn, h, node)
        except Refused as e:
            self._reply(conn, h.op, h.req_id, e.status, payload=str(e).encode())
            return True

    # ------------------------------------------------------------------ checks
    def _check_range(self, addr: int, length: int) -> None:
        if length < 0 or addr < 0 or addr + length > self.geo.region_size:
            raise Refused(Status.ERANGE, f"[{addr}, +{length}) is outside the region")

    def _check_data(self, node: int, addr: int, length: int) -> None:
        """Slab-area access: every unit touched must be owned by this node."""
        g = self.geo
        self._check_range(addr, length)
        if length == 0:
            return
        if addr < g.off_slabs:
            raise Refused(Status.EACCES, "control structures are not writable by nodes")
        first = g.unit_of(addr)
        last = g.unit_of(addr + max(length, 1) - 1)
        owners = self.blade.unit_owner
        for u in range(first, last + 1):
            if owners[u] != node:
                self.blade.catch_up()  # acked over shm a moment ago? (rare path)
                if owners[u] != node:
                    raise Refused(Status.EACCES, f"unit {u} is not yours")

    def _ack_slot(self, addr: int) -> tuple[int, int] | None:
        """(size class, slot) if addr is an ack key word."""
        g = self.geo
        rel = addr - g.off_ack
        if rel < 0 or rel % 64 or addr >= g.off_free:
            return None
        c, slot = divmod(rel // 64, g.ring_slots)
        return (c, slot) if c < g.n_classes else None

    def _free_slot(self, addr: int) -> int | None:
        g = self.geo
        rel = addr - g.off_free
        if rel < 0 or rel % 64 or addr >= g.off_epochs:
            return None
        return rel // 64

    # ------------------------------------------------------------------ dispatch
    def _dispatch(self, conn: socket.socket, h: Any, node: int) -> bool:
        op, addr, g, region = h.op, h.addr, self.geo, self.region
        if op == Op.READ:
            try:
                self._check_range(addr, h.a)
                if addr + h.a > g.off_slabs:
                    self._check_data(node, max(addr, g.off_slabs), addr + h.a - max(addr, g.off_slabs))
            except Refused as e:
                self._reply(conn, op, h.req_id, e.status, payload=str(e).encode())
                return True
            self._reply(conn, op, h.req_id, payload=region.buf[addr:addr + h.a])
            return True
        if op == Op.WRITE:
            n = h.payload_len
            try:
                if addr >= g.off_slabs:
                    self._check_data(node, addr, n)
                    self._recv_exact(conn, region.buf[addr:addr + n])
                    if h.b & FLAG_FUA:
                        region.persist(addr, n)
                else:
                    body = bytearray(n)
                    self._recv_exact(conn, memoryview(body))
                    self._control_write(node, addr, bytes(body))
            except Refused as e:
                if addr >= g.off_slabs:
                    self._drain(conn, n)
                self._reply(conn, op, h.req_id, e.status, payload=str(e).encode())
                return True
            self._reply(conn, op, h.req_id)
            return True
        if op == Op.FETCH_ADD:
            if addr not in self._seq_words():
                raise Refused(Status.EACCES, "fetch_add only on sequencers")
            if h.a != 1:
                raise Refused(Status.EINVAL, "sequencers advance by 1")
            old = region.fetch_add(addr, 1)
            region.persist(addr, 8)
            self._reply(conn, op, h.req_id, a=old)
            return True
        if op == Op.COMPARE_SWAP:
            return self._cas(conn, h, node)
        if op == Op.PERSIST:
            self._check_range(addr, h.a)
            region.persist(addr, h.a)
            self._reply(conn, op, h.req_id)
            return True
        if op == Op.CALL:
            body = bytearray(h.payload_len)
            self._recv_exact(conn, memoryview(body))
            try:
                msg = msgspec.msgpack.decode(bytes(body))
                if not isinstance(msg, dict):
                    raise ValueError("call message must be a map")
                reply = self._call(node, msg)
            except (ValueError, TypeError, KeyError, RecursionError, msgspec.DecodeError) as e:
                raise Refused(Status.EINVAL, f"bad call: {e}") from None
            self._reply(conn, op, h.req_id, payload=msgspec.msgpack.encode(reply))
            return True
        if op == Op.HELLO:
            self._drain(conn, h.payload_len)  # its payload must not be read as requests
            raise Refused(Status.EINVAL, "already authenticated")
        raise Refused(Status.EINVAL, f"op {op} not served")

    def _seq_words(self) -> set[int]:
        g = self.geo
        return {g.seq_addr(c) for c in range(g.n_classes)} | {g.free_seq_addr}

    def _cas(self, conn: socket.socket, h: Any, node: int) -> bool:
        addr, expected, new = h.addr, h.a, h.b
        region = self.region
        ack = self._ack_slot(addr)
        free = None if ack else self._free_slot(addr)
        if ack is None and free is None:
            raise Refused(Status.EACCES, "compare_swap only on ack and free keys")
        t_new, s_new = split_key(new)
        t_exp, s_exp = split_key(expected)
        cancel = (ack is not None and s_new == DONE and t_exp < t_new
                  and (s_exp == DONE or expected == 0)
                  and t_new % self.geo.ring_slots == ack[1]
                  and t_new < region.load(self.geo.seq_addr(ack[0])))
        if not cancel and (t_new != t_exp or s_new not in (CLAIMED, ACKED)
                           or s_new != s_exp + 1):
            raise Refused(Status.EINVAL, "a node may only move a key OPEN->CLAIMED->ACKED "
                                         "or give back a taken ticket not yet stocked")
        if s_new == ACKED:
            if self._claims.get(addr) != node:
                raise Refused(Status.EACCES, "another node claimed this slot")
            body = ACK_BODY.unpack_from(region.buf, addr + 8) if ack else \
                FREE_BODY.unpack_from(region.buf, addr + 8)
            if body[0] != node:
                raise Refused(Status.EACCES, "the slot body names another node")
        old = region.compare_swap(addr, expected, new)
        region.persist(addr, 64)
        if old == expected:
            if s_new == CLAIMED:
                self._claims[addr] = node
            elif s_new == ACKED:
                self._claims.pop(addr, None)
        if old == expected and s_new == ACKED:
            if ack:
                self.blade.on_ack(ack[0], t_new)
            else:
                self.blade.on_free(t_new)
        self._reply(conn, h.op, h.req_id, a=old)
        return True

    def _control_write(self, node: int, addr: int, body: bytes) -> None:
        g, region = self.geo, self.region
        ack = self._ack_slot(addr - 8)
        if ack is not None and len(body) == ACK_BODY.size:
            if ACK_BODY.unpack(body)[0] != node:
                raise Refused(Status.EACCES, "ack must name your own node")
            if split_key(region.load(addr - 8))[1] != CLAIMED:
                raise Refused(Status.EINVAL, "ack body written before the slot was claimed")
            if self._claims.get(addr - 8) != node:
                raise Refused(Status.EACCES, "another node claimed this slot")
            region.write(addr, body)
            return
        free = self._free_slot(addr - 8)
        if free is not None and len(body) == FREE_BODY.size:
            if FREE_BODY.unpack(body)[0] != node:
                raise Refused(Status.EACCES, "free request must name your own node")
            if split_key(region.load(addr - 8))[1] != CLAIMED:
                raise Refused(Status.EINVAL, "free body written before the slot was claimed")
            if self._claims.get(addr - 8) != node:
                raise Refused(Status.EACCES, "another node claimed this slot")
            region.write(addr, body)
            return
        rel = addr - 8 - g.off_epochs
        if 0 <= rel < g.max_nodes * 64 and rel % 64 == 0 and len(body) == 24:
            if region.u64(addr - 8) != node:
                raise Refused(Status.EACCES, "not your epoch slot")
            region.write(addr, body)
            return
        raise Refused(Status.EACCES, "that control word is not writable by nodes")

    # ------------------------------------------------------------------ calls
    def _call(self, node: int, msg: dict[str, Any]) -> dict[str, Any]:
        op = msg.get("op")
        if op == "register":
            epoch = msg.get("epoch")
            if epoch is not None and not isinstance(epoch, int):
                raise ValueError("epoch must be an integer")
            try:
                slot = self.blade.register_node(node, epoch)
            except RuntimeError as e:
                raise Refused(Status.ENOSPC, str(e)) from None
            return {**self.info, "slot": slot}
        if op == "info":
            return dict(self.info)
        if op == "owned":
            self.blade.catch_up()
            volume = msg.get("volume")
            if volume is not None and not isinstance(volume, int):
                raise ValueError("volume must be an integer")
            slabs = self.blade.owned_by(node, volume)
            g = self.geo
            return {"slabs": [{"unit": s.unit, "addr": g.unit_addr(s.unit),
                               "size": g.slab_bytes(s.size_class), "size_class": s.size_class,
                               "volume": s.volume, "index": s.index,
                               "generation": s.generation} for s in slabs]}
        if op == "stats":
            self.blade.catch_up()
            return self.blade.stats()
        if op == "ping":
            return {"ok": True}
        raise ValueError(f"unknown call {op!r}")
