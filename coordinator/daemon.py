"""``python -m coordinator``: the cluster coordinator daemon.

Blades register and heartbeat here; nodes ask it for placement hints and long-poll it for
blade deaths and load-shedding advice. It holds no durable state: after a restart blades
re-register (their heartbeats come back ``known: false``), so running it is cheap and losing
it only costs nodes their hints until it is back.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from types import FrameType
from typing import NoReturn

from coordinator.http_api import Coordinator, CoordinatorHTTPServer, split_host_port
from coordinator.registry import Registry
from rallocator.secret import SecretError, coordinator_token, load_secret

log = logging.getLogger("coordinator")

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (no usage dump) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"coordinator: error: {message}\n")
        sys.exit(EXIT_BAD_INPUT)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m coordinator", description=__doc__.splitlines()[0])
    p.add_argument("--listen", required=True, metavar="HOST:PORT", help="address to serve on")
    p.add_argument("--secret-file", required=True, metavar="FILE", help="cluster secret (0600)")
    p.add_argument(
        "--heartbeat-interval",
        type=_positive_float,
        default=1.0,
        metavar="SECONDS",
        help="how often blades heartbeat (default 1.0)",
    )
    p.add_argument(
        "--dead-after",
        type=_positive_float,
        default=None,
        metavar="SECONDS",
        help="declare a blade dead after this long without heartbeat (default 3 x interval)",
    )
    p.add_argument("--log-file", metavar="FILE", help="also append logs to FILE")
    return p


def _setup_logging(log_file: str | None) -> list[logging.Handler]:
    """Log to stderr (and a file): one line per event, for operators and launchers alike."""
    fmt = logging.Formatter("%(asctime)s coordinator %(levelname)s %(message)s")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        handlers.append(logging.FileHandler(log_file))  # OSError handled by the caller
    for h in handlers:
        h.setFormatter(fmt)
        log.addHandler(h)
    log.setLevel(logging.INFO)
    log.propagate = False
    return handlers


def main(argv: list[str] | None = None) -> int:
    """Run the coordinator until SIGTERM/SIGINT; 0 on clean shutdown, 2 on bad input."""
    args = build_parser().parse_args(argv)
    try:
        host, port = split_host_port(args.listen)
    except ValueError as e:
        print(f"coordinator: error: --listen: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        secret = load_secret(args.secret_file)
    except SecretError as e:
        print(f"coordinator: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    interval: float = args.heartbeat_interval
    dead_after: float = args.dead_after if args.dead_after is not None else 3 * interval
    try:
        handlers = _setup_logging(args.log_file)
    except OSError as e:
        print(
            f"coordinator: error: cannot open log file {args.log_file}: {e.strerror}",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    # Before binding: a launcher may signal us the moment it reads READY.
    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        coord = Coordinator(Registry(dead_after=dead_after), coordinator_token(secret), interval)
        try:
            server = CoordinatorHTTPServer(host, port, coord)
        except (OSError, UnicodeError) as e:
            reason = getattr(e, "strerror", None) or str(e)
            print(f"coordinator: error: cannot listen on {args.listen}: {reason}", file=sys.stderr)
            return EXIT_BAD_INPUT
        serve = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="http", daemon=True
        )
        serve.start()
        log.info(
            "listening on %s (heartbeat %.2fs, dead after %.2fs)",
            coord.address,
            interval,
            dead_after,
        )
        print(f"READY {coord.address}", flush=True)
        # Failure detection needs a clock even when nobody calls: tick well inside dead_after.
        tick = max(0.02, min(interval / 4, dead_after / 10, 0.5))
        while not stop.wait(tick):
            try:
                coord.tick()
            except Exception as e:  # keep detecting failures whatever one tick hit
                log.error("tick failed: %r", e)
        log.info("shutting down")
        coord.stop()
        server.shutdown()
        server.server_close()
        return 0
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
        for h in handlers:
            log.removeHandler(h)
            h.close()
