"""The coordinator's JSON-over-HTTP API on top of the pure ``Registry``.

``Coordinator`` makes the registry thread-safe, logs what happens and wakes long-polling
clients; ``CoordinatorHTTPServer`` serves it with one thread per request, so a node parked
in ``/v1/events`` never delays a blade's heartbeat.
"""

from __future__ import annotations

import hmac
import logging
import os
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Annotated, Any, Literal
from urllib.parse import parse_qs, urlsplit

import msgspec
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from coordinator.registry import Registry
from rallocator.sizes import format_size

log = logging.getLogger("coordinator")

MAX_BODY = 1 << 20
"""Largest request body accepted: real messages are a few hundred bytes."""
MAX_EVENTS_TIMEOUT = 30.0
MAX_REPLICAS = 64
REQUEST_SOCKET_TIMEOUT = 10.0
"""A client that stops sending mid-request frees its handler thread after this long."""

# Names travel in the comma-separated ``exclude`` query parameter, so no commas or spaces.
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[^,\s]+$")]
NonNeg = Annotated[int, msgspec.Meta(ge=0)]
Pos = Annotated[int, msgspec.Meta(gt=0)]


class RegisterRequest(msgspec.Struct):
    """Body of ``POST /v1/blades/register``; unknown fields are ignored for forward compat."""

    name: Name
    address: str
    capacity_bytes: NonNeg
    unit_size: NonNeg
    slab_sizes: list[Pos]
    mode: Literal["dram", "nvm"]
    pid: int


class HeartbeatRequest(msgspec.Struct):
    """Body of ``POST /v1/blades/heartbeat``."""

    name: Name
    used_bytes: NonNeg
    capacity_bytes: NonNeg
    slabs_total: NonNeg
    slabs_used: NonNeg
    host_mem_percent: Annotated[float, msgspec.Meta(ge=0, le=100)]
    host_mem_available: NonNeg


class BadRequest(Exception):
    """The request is malformed; the message goes back to the client in a 400."""


def split_host_port(text: str) -> tuple[str, int]:
    """Parse ``host:port`` or ``[v6addr]:port``; ValueError with a user-fit message."""
    host, sep, port_s = text.strip().rpartition(":")
    if not sep or not port_s.isdigit():
        raise ValueError(f"not a HOST:PORT address: {text!r}")
    port = int(port_s)
    if not 0 <= port <= 65535:
        raise ValueError(f"port out of range in {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise ValueError(f"missing host in {text!r}")
    return host, port


def join_host_port(host: str, port: int) -> str:
    """The inverse of ``split_host_port`` (brackets IPv6 literals)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Coordinator:
    """A ``Registry`` behind a lock, with logging and long-poll wake-ups.

    Args:
        registry: the state; only touched with ``self.cond`` held.
        token: the bearer token clients must present (``coordinator_token(secret)``).
        heartbeat_interval: told to blades at registration, so one flag tunes the cluster.
    """

    def __init__(self, registry: Registry, token: str, heartbeat_interval: float) -> None:
        self.registry = registry
        self.token = token
        self.heartbeat_interval = heartbeat_interval
        self.cond = threading.Condition()
        self.started = time.monotonic()
        self.address = ""
        self.stopping = False
        self.metrics_registry = CollectorRegistry(auto_describe=False)
        self.metrics_registry.register(_Collector(self))

    def _publish(self, events: list[dict[str, Any]]) -> None:
        """Log new events and wake long-pollers; caller holds ``self.cond``."""
        for e in events:
            if e["kind"] == "blade_dead":
                log.warning(
                    "blade %s (%s) dead: no heartbeat for %.1fs",
                    e["blade"],
                    e.get("address"),
                    e.get("last_heartbeat_age_s", 0.0),
                )
            elif e["kind"] == "blade_alive":
                log.info("blade %s (%s) back", e["blade"], e.get("address"))
            elif e["kind"] == "shed":
                log.info(
                    "shed advice: move %s from %s to %s",
                    format_size(e["bytes"]),
                    e["blade"],
                    e["target"],
                )
        if events:
            self.cond.notify_all()

    def register(self, req: RegisterRequest) -> dict[str, Any]:
        with self.cond:
            replaced = req.name in self.registry.blades
            events = self.registry.register(
                name=req.name,
                address=req.address,
                capacity_bytes=req.capacity_bytes,
                unit_size=req.unit_size,
                slab_sizes=list(req.slab_sizes),
                mode=req.mode,
                pid=req.pid,
            )
            log.info(
                "blade %s %s at %s (%s, %s, pid %d)",
                req.name,
                "re-registered" if replaced else "registered",
                req.address,
                format_size(req.capacity_bytes) if req.capacity_bytes else "0B",
                req.mode,
                req.pid,
            )
            self._publish(events)
        return {"ok": True, "heartbeat_interval": self.heartbeat_interval}

    def heartbeat(self, req: HeartbeatRequest) -> dict[str, Any]:
        with self.cond:
            known, events = self.registry.heartbeat(
                name=req.name,
                used_bytes=req.used_bytes,
                capacity_bytes=req.capacity_bytes,
                slabs_total=req.slabs_total,
                slabs_used=req.slabs_used,
                host_mem_percent=req.host_mem_percent,
                host_mem_available=req.host_mem_available,
            )
            self._publish(events)
        if not known:
            log.info("heartbeat from unknown blade %s: asking it to register", req.name)
        return {"ok": True, "known": known}

    def tick(self) -> None:
        """Run failure detection and shedding; called by the daemon's ticker."""
        with self.cond:
            self._publish(self.registry.tick())

    def hint(self, replicas: int, size: int, exclude: list[str]) -> dict[str, Any]:
        with self.cond:
            # Detect deaths first, so a blade silent past dead_after is never handed out.
            self._publish(self.registry.tick())
            chosen = self.registry.hint(replicas, size, exclude)
        return {"blades": [{"name": n, "address": a} for n, a in chosen]}

    def status(self) -> dict[str, Any]:
        with self.cond:
            self._publish(self.registry.tick())
            blades = self.registry.status()
        return {
            "coordinator": {
                "address": self.address,
                "pid": os.getpid(),
                "alive": True,
                "uptime_s": round(time.monotonic() - self.started, 3),
            },
            "blades": blades,
        }

    def wait_events(self, since: int, timeout: float) -> dict[str, Any]:
        """Long poll: return as soon as there are events after ``since``, or at ``timeout``."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while not self.stopping:
                if self.registry.last_seq > self.registry.effective_since(since):
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self.cond.wait(remaining)
            events, nxt = self.registry.events_since(since)
        return {"events": events, "next": nxt}

    def stop(self) -> None:
        """Release every long poll so shutdown is not held up by parked clients."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()


class _Collector:
    """Builds the metrics from the registry at scrape time, so gauges of forgotten blades or
    counters never drift from the state they describe."""

    def __init__(self, coord: Coordinator) -> None:
        self.coord = coord

    def collect(self) -> Iterator[Metric]:
        with self.coord.cond:
            blades = [
                (b.name, b.capacity_bytes, b.used_bytes, b.alive)
                for b in self.coord.registry.blades.values()
            ]
            hints = self.coord.registry.hints_total
            counts = dict(self.coord.registry.event_counts)
        cap = GaugeMetricFamily(
            "rallocator_blade_capacity_bytes", "Blade capacity in bytes", labels=["blade"]
        )
        used = GaugeMetricFamily(
            "rallocator_blade_used_bytes", "Blade bytes in use (last heartbeat)", labels=["blade"]
        )
        alive = GaugeMetricFamily(
            "rallocator_blade_alive", "1 if the blade heartbeats, 0 if dead", labels=["blade"]
        )
        for name, c, u, a in sorted(blades):
            cap.add_metric([name], c)
            used.add_metric([name], u)
            alive.add_metric([name], 1.0 if a else 0.0)
        yield cap
        yield used
        yield alive
        yield CounterMetricFamily(
            "rallocator_coordinator_hints", "Placement hint requests served", value=hints
        )
        ev = CounterMetricFamily(
            "rallocator_coordinator_events", "Events emitted, by kind", labels=["kind"]
        )
        for kind, n in sorted(counts.items()):
            ev.add_metric([kind], n)
        yield ev


def _query_int(q: dict[str, list[str]], key: str, default: int | None = None) -> int:
    values = q.get(key)
    if not values:
        if default is None:
            raise BadRequest(f"missing query parameter {key!r}")
        return default
    try:
        value = int(values[-1])
    except ValueError:
        raise BadRequest(f"query parameter {key!r} must be an integer") from None
    if value < 0:
        raise BadRequest(f"query parameter {key!r} must be >= 0")
    return value


def _query_float(q: dict[str, list[str]], key: str, default: float) -> float:
    values = q.get(key)
    if not values:
        return default
    try:
        value = float(values[-1])
    except ValueError:
        raise BadRequest(f"query parameter {key!r} must be a number") from None
    if not value >= 0:  # also rejects NaN
        raise BadRequest(f"query parameter {key!r} must be >= 0")
    return value


class _Handler(BaseHTTPRequestHandler):
    """One request: authenticate, validate, call the coordinator, answer JSON."""

    server: CoordinatorHTTPServer
    protocol_version = "HTTP/1.0"
    timeout = REQUEST_SOCKET_TIMEOUT
    server_version = "rallocator-coordinator/1"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        # Access logs would drown the event lines at heartbeat rate; keep them at debug.
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _send(self, code: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, code: int, obj: Any) -> None:
        self._send(code, msgspec.json.encode(obj))

    def _authorized(self) -> bool:
        header = self.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(token.strip().encode(), self.server.coord.token.encode())

    def _body(self, typ: type[msgspec.Struct]) -> Any:
        length_s = self.headers.get("Content-Length", "0")
        try:
            length = int(length_s)
        except ValueError:
            raise BadRequest("bad Content-Length") from None
        if length < 0 or length > MAX_BODY:
            raise BadRequest(f"body must be 0..{MAX_BODY} bytes")
        data = self.rfile.read(length)
        if len(data) != length:
            raise BadRequest("body shorter than Content-Length")
        try:
            return msgspec.json.decode(data, type=typ)
        except msgspec.ValidationError as e:
            raise BadRequest(f"invalid request: {e}") from None
        except msgspec.DecodeError as e:
            raise BadRequest(f"malformed JSON: {e}") from None

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        route = _ROUTES.get(url.path)
        try:
            if route is None:
                self._json(404, {"error": f"no such endpoint: {url.path}"})
                return
            want, fn, needs_auth = route
            if method != want:
                self._json(405, {"error": f"{url.path} takes {want}"})
                return
            if needs_auth and not self._authorized():
                self._json(401, {"error": "missing or wrong bearer token (secret mismatch?)"})
                return
            fn(self, parse_qs(url.query))
        except BadRequest as e:
            self._json(400, {"error": str(e)})
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass  # the client went away; nothing to answer
        except Exception as e:  # never let one request kill the handler thread silently
            log.error("internal error on %s %s: %r", method, url.path, e)
            try:
                self._json(500, {"error": "internal error"})
            except OSError:
                pass

    # -- endpoints ------------------------------------------------------------------------

    def _register(self, q: dict[str, list[str]]) -> None:
        req: RegisterRequest = self._body(RegisterRequest)
        try:
            split_host_port(req.address)
        except ValueError as e:
            raise BadRequest(str(e)) from None
        self._json(200, self.server.coord.register(req))

    def _heartbeat(self, q: dict[str, list[str]]) -> None:
        req: HeartbeatRequest = self._body(HeartbeatRequest)
        self._json(200, self.server.coord.heartbeat(req))

    def _hint(self, q: dict[str, list[str]]) -> None:
        replicas = _query_int(q, "replicas", 1)
        if replicas > MAX_REPLICAS:
            raise BadRequest(f"replicas must be <= {MAX_REPLICAS}")
        size = _query_int(q, "size", 0)
        exclude = [n for v in q.get("exclude", []) for n in v.split(",") if n]
        self._json(200, self.server.coord.hint(replicas, size, exclude))

    def _status(self, q: dict[str, list[str]]) -> None:
        self._json(200, self.server.coord.status())

    def _events(self, q: dict[str, list[str]]) -> None:
        since = _query_int(q, "since", 0)
        timeout = min(_query_float(q, "timeout", 0.0), MAX_EVENTS_TIMEOUT)
        self._json(200, self.server.coord.wait_events(since, timeout))

    def _metrics(self, q: dict[str, list[str]]) -> None:
        self._send(200, generate_latest(self.server.coord.metrics_registry), CONTENT_TYPE_LATEST)


_Endpoint = Callable[[_Handler, dict[str, list[str]]], None]
_ROUTES: dict[str, tuple[str, _Endpoint, bool]] = {
    "/v1/blades/register": ("POST", _Handler._register, True),
    "/v1/blades/heartbeat": ("POST", _Handler._heartbeat, True),
    "/v1/hint": ("GET", _Handler._hint, True),
    "/v1/status": ("GET", _Handler._status, True),
    "/v1/events": ("GET", _Handler._events, True),
    "/metrics": ("GET", _Handler._metrics, False),
}


class CoordinatorHTTPServer(ThreadingHTTPServer):
    """Threaded HTTP server bound to ``(host, port)``, IPv4 or IPv6 as the host resolves.

    Handler threads are daemons: a long poll in progress must not keep the process alive
    after SIGTERM.
    """

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, host: str, port: int, coord: Coordinator) -> None:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, _, _, _, sockaddr = infos[0]
        self.address_family = family
        self.coord = coord
        super().__init__(sockaddr[:2], _Handler)
        coord.address = join_host_port(*self.bound_address())

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), a reverse DNS lookup that can hang
        # for seconds on hosts without DNS; we never use the name, so skip it.
        socketserver.TCPServer.server_bind(self)
        host, port = self.bound_address()
        self.server_name = host
        self.server_port = port

    def bound_address(self) -> tuple[str, int]:
        """The real (host, port), e.g. the port the kernel picked for ``:0``."""
        addr = self.socket.getsockname()
        return str(addr[0]), int(addr[1])
