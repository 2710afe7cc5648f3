"""Client for the coordinator's HTTP API, used by blades (register, heartbeat) and working
nodes (hints, blade-death events, status).

The coordinator is advisory: nodes keep working without it (power-of-two choices), so every
failure here -- refused connection, timeout, bad status, garbage -- surfaces as one exception,
``CoordinatorUnavailable``, that callers catch and fall back on. Calls never hang longer than
the timeout, and each call uses its own connection, so one client is safe to share between
threads.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlencode

from rallocator.secret import coordinator_token

__all__ = ["CoordinatorClient", "CoordinatorUnavailable"]


class CoordinatorUnavailable(Exception):
    """The coordinator could not be reached or did not answer sensibly (message says why)."""


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port_s = address.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_s.isdigit() or not 0 < int(port_s) <= 65535:
        raise ValueError(f"coordinator address must be HOST:PORT, got {address!r}")
    return host, int(port_s)


class CoordinatorClient:
    """Talks JSON over HTTP to the coordinator at ``address`` ("host:port").

    Args:
        address: where the coordinator listens.
        secret: the cluster secret; only a token derived from it is sent.
        timeout: seconds for connecting and for each read (long polls add their own wait).

    Raises:
        ValueError: ``address`` is not ``host:port``.
    """

    def __init__(self, address: str, secret: bytes, timeout: float = 2.0) -> None:
        self.address = address
        self.host, self.port = _split_address(address)
        self.timeout = timeout
        self._auth = f"Bearer {coordinator_token(secret)}"

    def __repr__(self) -> str:
        return f"CoordinatorClient({self.address!r})"

    def _request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        read_timeout: float | None = None,
    ) -> dict[str, Any]:
        """One request on a fresh connection; every failure becomes CoordinatorUnavailable."""
        where = f"coordinator {self.address}"
        headers = {"Authorization": self._auth, "Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            conn.connect()
            if read_timeout is not None and conn.sock is not None:
                conn.sock.settimeout(read_timeout)  # a long poll waits longer than a connect
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        except TimeoutError:
            raise CoordinatorUnavailable(f"{where}: timed out") from None
        except ConnectionRefusedError:
            raise CoordinatorUnavailable(f"{where}: connection refused (not running?)") from None
        except (OSError, http.client.HTTPException) as e:
            reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
            raise CoordinatorUnavailable(f"{where}: {reason}") from None
        finally:
            conn.close()
        try:
            payload = json.loads(raw) if raw else {}
        except (ValueError, UnicodeDecodeError):
            payload = None
        if resp.status == 401:
            raise CoordinatorUnavailable(
                f"{where} refused our token: the secret does not match the coordinator's"
            )
        if not 200 <= resp.status < 300:
            detail = payload.get("error") if isinstance(payload, dict) else None
            raise CoordinatorUnavailable(
                f"{where}: HTTP {resp.status} on {path.split('?')[0]}"
                + (f": {detail}" if detail else "")
            )
        if not isinstance(payload, dict):
            raise CoordinatorUnavailable(f"{where}: answer is not a JSON object")
        return payload

    def register(self, **fields: Any) -> dict[str, Any]:
        """Register a blade (name, address, capacity_bytes, unit_size, slab_sizes, mode, pid);
        returns ``{"ok": True, "heartbeat_interval": float}``."""
        return self._request("POST", "/v1/blades/register", fields)

    def heartbeat(self, **fields: Any) -> dict[str, Any]:
        """Report a blade's utilisation; ``{"known": False}`` means register again."""
        return self._request("POST", "/v1/blades/heartbeat", fields)

    def hint(self, replicas: int, size: int, exclude: Iterable[str] = ()) -> list[tuple[str, str]]:
        """Up to ``replicas`` (name, address) pairs of blades to place ``size`` bytes on,
        least loaded first; possibly fewer, possibly none."""
        query: dict[str, str | int] = {"replicas": int(replicas), "size": int(size)}
        excluded = ",".join(exclude)
        if excluded:
            query["exclude"] = excluded
        payload = self._request("GET", "/v1/hint?" + urlencode(query))
        try:
            return [(str(b["name"]), str(b["address"])) for b in payload["blades"]]
        except (KeyError, TypeError) as e:
            raise CoordinatorUnavailable(
                f"coordinator {self.address}: malformed hint answer ({e!r})"
            ) from None

    def status(self) -> dict[str, Any]:
        """The coordinator and every known blade (see ``GET /v1/status``)."""
        return self._request("GET", "/v1/status")

    def events(self, since: int, timeout: float) -> tuple[list[dict[str, Any]], int]:
        """Long-poll for events after ``since`` for up to ``timeout`` seconds (server caps at
        30); returns the events and the cursor to pass next time."""
        query = urlencode({"since": int(since), "timeout": max(0.0, float(timeout))})
        wait = min(max(0.0, float(timeout)), 30.0)
        payload = self._request("GET", "/v1/events?" + query, read_timeout=self.timeout + wait)
        try:
            events = payload["events"]
            nxt = int(payload["next"])
            if not isinstance(events, list):
                raise TypeError("events is not a list")
        except (KeyError, TypeError, ValueError) as e:
            raise CoordinatorUnavailable(
                f"coordinator {self.address}: malformed events answer ({e!r})"
            ) from None
        return events, nxt
