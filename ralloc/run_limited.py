"""``ralloc run``: run a command in a fresh memory cgroup so that it swaps.

    ralloc run --mem-limit SIZE [--swappiness N] [--verbose] [--stats-json FILE] -- CMD ...

The command runs in a new memory cgroup (v1 or v2, whichever the host has) created under
ours, with the given limit and unlimited swap. Once the limit is reached the kernel
reclaims the command's own memory: with remote swap on (``ralloc swap on``) its pages go
to the memory blades; without swap it is OOM-killed. The swap daemons are never in this
cgroup.

Behaviour a script can rely on:

- the command's exit status is ours; if it dies of a signal we die of the same signal
  (after cleaning up), so a shell sees exactly what it would have seen;
- SIGINT/SIGTERM/SIGHUP/SIGQUIT/SIGUSR1/SIGUSR2 sent to us are forwarded to the command
  (a Ctrl-C from the terminal reaches it directly and is not sent twice);
- the cgroup is removed afterwards, whatever happened (left-over grandchildren are killed);
- nothing is printed of our own except errors, unless ``--verbose`` (to stderr).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import time

from ralloc.cgroup import CgroupError, MemoryCgroup
from rallocator.sizes import format_size, parse_size

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
             signal.SIGUSR2)
SI_KERNEL = 0x80  # si_code of a signal sent by the kernel (e.g. the terminal's Ctrl-C)
SAMPLE_EVERY = 0.2  # seconds between swap-usage samples while the command runs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ralloc run",
        description="Run CMD in a fresh memory cgroup limited to SIZE, so that beyond the limit "
                    "it swaps (to remote memory when `ralloc swap on` is active).",
        epilog="example: ralloc run --mem-limit 256M -- python3 big_job.py")
    p.add_argument("--mem-limit", required=True, metavar="SIZE",
                   help="memory limit of the cgroup (e.g. 256M, 1G)")
    p.add_argument("--swappiness", type=int, metavar="N",
                   help="cgroup v1 memory.swappiness (0-200); default: inherited")
    p.add_argument("--stats-json", metavar="FILE",
                   help="write the cgroup's memory/swap numbers (peaks, oom kills) and the "
                        "exit status to FILE as JSON when CMD ends")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="say what is done on stderr (cgroup, limit, peaks)")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD ...")
    return p


def _err(msg: str) -> None:
    print(f"ralloc run: {msg}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--" in argv:  # everything after the first "--" is the command, verbatim
        i = argv.index("--")
        opts, cmd = argv[:i], argv[i + 1:]
        args = build_parser().parse_args(opts)
        if args.command:
            _err(f"unexpected arguments before '--': {' '.join(args.command)}")
            return 2
    else:
        args = build_parser().parse_args(argv)
        cmd = args.command
    if not cmd:
        _err("no command given (usage: ralloc run --mem-limit SIZE -- CMD ...)")
        return 2
    try:
        limit = parse_size(args.mem_limit)
    except ValueError as e:
        _err(str(e))
        return 2
    if args.swappiness is not None and not 0 <= args.swappiness <= 200:
        _err("--swappiness must be between 0 and 200")
        return 2
    return run(cmd, limit, swappiness=args.swappiness, verbose=args.verbose,
               stats_json=args.stats_json)


def run(cmd: list[str], limit: int, swappiness: int | None = None, verbose: bool = False,
        stats_json: str | None = None) -> int:
    """Run ``cmd`` in a fresh memory cgroup; returns its exit status (see module doc)."""
    try:
        cg = MemoryCgroup.create(limit, swappiness=swappiness)
    except (CgroupError, OSError) as e:
        _err(str(e))
        return 1
    if verbose:
        _err(f"cgroup v{cg.version} {cg.path}, limit {format_size(limit)}"
             + (f", swappiness {swappiness}" if swappiness is not None else ""))
        for n in cg.notes:
            _err(n)
        if not _swap_devices():
            _err("no swap is on (ralloc swap on): beyond the limit the command is OOM-killed")
    to_wait = set(FORWARDED) | {signal.SIGCHLD}
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, to_wait)

    def child_setup() -> None:  # runs in the child between fork and exec
        cg.join()
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)

    started = time.monotonic()
    try:
        try:
            proc = subprocess.Popen(cmd, preexec_fn=child_setup)  # noqa: PLW1509
        except FileNotFoundError:
            _err(f"{cmd[0]}: command not found")
            return 127
        except PermissionError:
            _err(f"{cmd[0]}: permission denied")
            return 126
        except subprocess.SubprocessError as e:
            _err(f"could not start {cmd[0]} in cgroup {cg.path}: {e}")
            return 1
        status = _wait_forwarding(proc, cg, to_wait)
        elapsed = time.monotonic() - started
        stats = cg.stats()
        stats.update({"command": cmd, "exit_status": status, "elapsed_s": round(elapsed, 3)})
        if stats_json:
            with open(stats_json, "w") as f:
                json.dump(stats, f, indent=2)
        _report(cmd, status, stats, verbose)
    finally:
        try:
            cg.remove()
        except CgroupError as e:
            _err(str(e))
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    if verbose:
        _err("cgroup removed")
    if status < 0:
        _die_like(-status)
        return 128 - status
    return status


def _wait_forwarding(proc: subprocess.Popen, cg: MemoryCgroup, sigs: set[int]) -> int:
    """Wait for ``proc``, forwarding signals to it and sampling the cgroup's swap."""
    same_group = os.getpgid(proc.pid) == os.getpgrp() if proc.poll() is None else False
    while True:
        if proc.poll() is not None:
            return proc.returncode
        with contextlib.suppress(OSError):
            cg.swap_now()
        info = signal.sigtimedwait(sigs, SAMPLE_EVERY)
        if info is None or info.si_signo == signal.SIGCHLD:
            continue
        if info.si_code == SI_KERNEL and same_group:
            continue  # the terminal sent it to the whole process group: CMD has it already
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, info.si_signo)


def _report(cmd: list[str], status: int, stats: dict, verbose: bool) -> None:
    oom = int(stats.get("oom_kill") or 0)
    if oom and status == -signal.SIGKILL:
        _err(f"{cmd[0]} was OOM-killed in its cgroup (limit {format_size(int(stats['limit']))})"
             + ("" if _swap_devices() else "; no swap is on (ralloc swap on --cluster DIR)"))
    if not verbose:
        return
    how = (f"exit status {status}" if status >= 0
           else f"killed by {signal.Signals(-status).name}")
    swap = max(int(stats.get("swap_peak_sampled") or 0), int(stats.get("swap_peak") or 0))
    _err(f"{cmd[0]}: {how} after {stats['elapsed_s']:.1f}s; peak memory "
         f"{format_size(int(stats.get('max_usage') or 0))}, peak swap {format_size(swap)}, "
         f"limit hits {stats.get('failcnt')}, oom kills {oom}")


def _swap_devices() -> list[str]:
    try:
        with open("/proc/swaps") as f:
            return [ln.split()[0] for ln in f.read().splitlines()[1:] if ln.strip()]
    except OSError:
        return []


def _die_like(sig: int) -> None:
    """Terminate this process with signal ``sig`` (after cleanup), as the command did."""
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # its core, if any, was dumped
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        if sig not in (signal.SIGKILL, signal.SIGSTOP):  # these have no handler to reset
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
        os.kill(os.getpid(), sig)
    except (ValueError, OSError):
        return
    time.sleep(0.1)  # a signal whose default is to be ignored leaves us here: 128+N


if __name__ == "__main__":
    sys.exit(main())
