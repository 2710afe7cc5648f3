"""``make demo``: remote memory, end to end, on one machine, in about half a minute.

    python -m ralloc.demo [--workload 512M] [--limit 256M] [--swap-size 1G] [--replicas 2]
                          [--blades 3] [--capacity 768M]
    python -m ralloc.demo workload SIZE [--seed N]      (the memory-hungry program itself)

Part 1 (swap): an embedded cluster in a temporary directory, ``ralloc swap on``, then a
program that writes a pattern over twice as much memory as its cgroup may hold (``ralloc
run --mem-limit``) and verifies every byte of every page. It prints how long that took,
the swap traffic (pswpin/pswpout from /proc/vmstat, and the cgroup's own numbers) and how
many slabs each blade lends.

Part 2 (file view): if ``ralloc mount`` is available, an application ``mmap``s a file on the
far-memory filesystem, writes through the mapping, and reads it back from a fresh open.

Everything is torn down at the end (swap off, unmount, cluster down), also on failure or
Ctrl-C. Run as root (swapon, losetup, FUSE, cgroups).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

PAGE = 4096
_MIX = 0x9E3779B97F4A7C15
_MASK = (1 << 64) - 1


# --------------------------------------------------------------------------------------
# the workload: stdlib only, so it starts small inside its memory limit


def _page(i: int, seed: int) -> bytes:
    return (((i * _MIX) ^ seed) & _MASK).to_bytes(8, "little") * (PAGE // 8)


def workload(size: int, seed: int = 1) -> dict:
    """Write a distinct pattern into every page of ``size`` bytes, then check every byte."""
    n = size // PAGE
    buf = bytearray(n * PAGE)
    mv = memoryview(buf)
    t0 = time.monotonic()
    for i in range(n):
        mv[i * PAGE:(i + 1) * PAGE] = _page(i, seed)
    t1 = time.monotonic()
    bad = [i for i in range(n) if mv[i * PAGE:(i + 1) * PAGE] != _page(i, seed)]
    t2 = time.monotonic()
    return {"ok": not bad, "pages": n, "bad_pages": len(bad), "first_bad": bad[:5],
            "write_s": round(t1 - t0, 3), "verify_s": round(t2 - t1, 3)}


def _workload_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m ralloc.demo workload")
    p.add_argument("size")
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args(argv)
    from rallocator.sizes import parse_size

    r = workload(parse_size(a.size), a.seed)
    print(json.dumps(r), flush=True)
    return 0 if r["ok"] else 1


def mmap_app(path: str, size: int, seed: int = 7) -> dict:
    """Write a pattern through a shared writable mapping of ``path``; read it back with
    plain reads after closing, and again through a new mapping."""
    import mmap

    n = size // PAGE
    t0 = time.monotonic()
    with open(path, "w+b") as f:
        f.truncate(n * PAGE)
        with mmap.mmap(f.fileno(), n * PAGE, mmap.MAP_SHARED,
                       mmap.PROT_READ | mmap.PROT_WRITE) as m:
            for i in range(n):
                m[i * PAGE:(i + 1) * PAGE] = _page(i, seed)
            m.flush()
        os.fsync(f.fileno())
    t1 = time.monotonic()
    bad = 0
    with open(path, "rb") as f:
        for i in range(n):
            if f.read(PAGE) != _page(i, seed):
                bad += 1
    with open(path, "rb") as f, mmap.mmap(f.fileno(), n * PAGE, mmap.MAP_SHARED,
                                          mmap.PROT_READ) as m:
        bad += sum(1 for i in range(n) if m[i * PAGE:(i + 1) * PAGE] != _page(i, seed))
    t2 = time.monotonic()
    return {"ok": bad == 0, "pages": n, "bad_pages": bad, "write_s": round(t1 - t0, 3),
            "verify_s": round(t2 - t1, 3)}


def _mmap_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m ralloc.demo mmap")
    p.add_argument("path")
    p.add_argument("size")
    a = p.parse_args(argv)
    from rallocator.sizes import parse_size

    r = mmap_app(a.path, parse_size(a.size))
    print(json.dumps(r), flush=True)
    return 0 if r["ok"] else 1


# --------------------------------------------------------------------------------------
# the demo


def vmstat() -> dict[str, int]:
    with open("/proc/vmstat") as f:
        return {k: int(v) for k, v in (ln.split() for ln in f)}


class Demo:
    def __init__(self, args: argparse.Namespace) -> None:
        from rich.console import Console

        from rallocator.sizes import parse_size

        self.args = args
        self.console = Console()
        self.workload_size = parse_size(args.workload)
        self.limit = parse_size(args.limit)
        self.dir = ""
        self.timings: list[tuple[str, float]] = []
        self.results: dict[str, object] = {}
        self.cleanup_notes: list[str] = []
        self.mountpoint = ""

    # helpers ---------------------------------------------------------------------------

    def ralloc(self, *argv: str, timeout: float = 300, check: bool = True):
        import subprocess

        r = subprocess.run([sys.executable, "-m", "ralloc", *argv], capture_output=True,
                           text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"ralloc {' '.join(argv[:2])} failed (status {r.returncode}): "
                               f"{(r.stderr or r.stdout).strip()[-800:]}")
        return r

    def step(self, title: str, fn):
        t0 = time.monotonic()
        with self.console.status(f"[bold]{title}[/]..."):
            out = fn()
        dt = time.monotonic() - t0
        self.timings.append((title, dt))
        self.console.print(f"[green]✓[/] {title} [dim]({dt:.1f}s)[/]")
        return out

    def run_limited(self, cmd: list[str], stats_file: str):
        """``ralloc run`` in its own session: a Ctrl-C reaches us only, and we ask it to
        stop (SIGTERM, which it forwards) so it still removes its cgroup."""
        import signal
        import subprocess

        proc = subprocess.Popen([sys.executable, "-m", "ralloc", "run", "--mem-limit",
                                 str(self.limit), "--stats-json", stats_file, "--", *cmd],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            out, err = proc.communicate()
        except BaseException:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
        return proc.returncode, out, err

    # parts -----------------------------------------------------------------------------

    def preflight(self) -> None:
        import shutil

        missing = [t for t in ("nbdkit", "nbdfuse", "losetup", "mkswap", "swapon", "swapoff",
                               "fusermount3") if shutil.which(t) is None]
        if os.geteuid() != 0:
            raise RuntimeError("the demo needs root (swapon, losetup, FUSE, cgroups): "
                               "sudo make demo")
        if missing:
            raise RuntimeError(f"missing tools: {', '.join(missing)} (make install installs "
                               "them)")
        if not os.path.exists("/dev/fuse"):
            raise RuntimeError("no /dev/fuse (modprobe fuse)")
        from ralloc.cgroup import find_hierarchy

        find_hierarchy()

    def part_swap(self) -> None:
        a = self.args
        self.step(f"cluster up: {a.blades} blades x {a.capacity}", lambda: self.ralloc(
            "cluster", "up", "--dir", self.dir, "--blades", str(a.blades), "--capacity",
            a.capacity))
        out = self.step(f"swap on: {a.swap_size} of remote memory, {a.replicas} replica(s)",
                        lambda: self.ralloc("swap", "on", "--cluster", self.dir, "--size",
                                            a.swap_size, "--replicas", str(a.replicas),
                                            "--priority", "100"))
        self.results["swap_device"] = out.stdout.strip().splitlines()[-1]
        self.results["swap_on_log"] = out.stdout.strip().splitlines()[:-1]
        stats_file = os.path.join(self.dir, "workload-cgroup.json")
        before = vmstat()
        t0 = time.monotonic()
        status, out, err = self.step(
            f"workload: {a.workload} of data under a {a.limit} memory limit, every page checked",
            lambda: self.run_limited([sys.executable, "-m", "ralloc.demo", "workload",
                                      a.workload], stats_file))
        elapsed = time.monotonic() - t0
        after = vmstat()
        try:
            result = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            result = {"ok": False, "error": (err or out).strip()[-500:]}
        try:
            with open(stats_file) as f:
                cg = json.load(f)
        except (OSError, ValueError):
            cg = {}
        swap_status = json.loads(self.ralloc("swap", "status", "--cluster", self.dir,
                                             "--json").stdout)
        cluster = json.loads(self.ralloc("status", "--cluster", self.dir, "--json").stdout)
        self.results.update(workload=result, workload_status=status, workload_elapsed=elapsed,
                            pswpin=after.get("pswpin", 0) - before.get("pswpin", 0),
                            pswpout=after.get("pswpout", 0) - before.get("pswpout", 0),
                            cgroup=cg, swap_status=swap_status, cluster=cluster)
        if status != 0 or not result.get("ok"):
            raise RuntimeError(f"the workload failed (status {status}): "
                               f"{result.get('error') or result}")

    def part_mount(self) -> None:
        import importlib.util

        if importlib.util.find_spec("ralloc.mount") is None:
            self.results["mount"] = "skipped: `ralloc mount` is not available in this checkout"
            return
        self.mountpoint = os.path.join(self.dir, "fs")
        os.makedirs(self.mountpoint, exist_ok=True)
        self.step("mount the far-memory filesystem", lambda: self.ralloc(
            "mount", "--cluster", self.dir, self.mountpoint, timeout=60))
        path = os.path.join(self.mountpoint, "mapped.bin")
        status, out, err = self.step(
            "mmap app: 64M written through a shared mapping on the FUSE view, read back",
            lambda: self._run([sys.executable, "-m", "ralloc.demo", "mmap", path, "64M"]))
        try:
            r = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            r = {"ok": False, "error": (err or out).strip()[-500:]}
        self.results["mount"] = r
        if status != 0 or not r.get("ok"):
            raise RuntimeError(f"the mmap app failed: {r.get('error') or r}")

    @staticmethod
    def _run(cmd: list[str]):
        import subprocess

        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        return r.returncode, r.stdout, r.stderr

    def teardown(self) -> None:
        import shutil

        if not self.dir:
            return
        if self.mountpoint:
            r = self.ralloc("umount", self.mountpoint, check=False, timeout=60)
            if r.returncode != 0:
                self.cleanup_notes.append(f"umount: {(r.stderr or r.stdout).strip()}")
                self._run(["fusermount3", "-u", "-z", self.mountpoint])
        if os.path.exists(os.path.join(self.dir, "swap")):
            r = self.ralloc("swap", "off", "--cluster", self.dir, check=False)
            if r.returncode != 0:
                self.cleanup_notes.append(f"swap off: {(r.stderr or r.stdout).strip()}")
        if os.path.exists(os.path.join(self.dir, "cluster.toml")):
            r = self.ralloc("cluster", "down", "--dir", self.dir, check=False)
            if r.returncode != 0:
                self.cleanup_notes.append(f"cluster down: {(r.stderr or r.stdout).strip()}")
        if not self.cleanup_notes:
            shutil.rmtree(self.dir, ignore_errors=True)

    # report ----------------------------------------------------------------------------

    def report(self, total: float, error: str | None) -> None:
        from rich.panel import Panel
        from rich.table import Table

        from rallocator.sizes import format_size

        c = self.console
        r = self.results
        c.print()
        if "workload" in r:
            w = r["workload"]
            cg = r.get("cgroup") or {}
            t = Table(title="Part 1: swap to remote memory", show_header=False, box=None,
                      pad_edge=False)
            t.add_column(style="bold")
            t.add_column()
            ok = w.get("ok")
            t.add_row("workload", f"{self.args.workload} under a {self.args.limit} limit: "
                      + ("[green]every page verified[/]" if ok else
                         f"[red]FAILED[/] {w.get('bad_pages', '?')} bad page(s) "
                         f"{w.get('error', '')}"))
            t.add_row("time", f"{r['workload_elapsed']:.1f}s (write {w.get('write_s', '?')}s, "
                      f"verify {w.get('verify_s', '?')}s)")
            t.add_row("swap device", f"{r.get('swap_device')} "
                      f"({(r.get('swap_status') or {}).get('state', {}).get('mode')} mode)")
            t.add_row("swap traffic", f"pswpout {r['pswpout']:,} pages "
                      f"({format_size(r['pswpout'] * PAGE)}), pswpin {r['pswpin']:,} pages "
                      f"({format_size(r['pswpin'] * PAGE)})  [dim](/proc/vmstat, whole host)[/]")
            peak_swap = max(int(cg.get("swap_peak_sampled") or 0), int(cg.get("swap_peak") or 0))
            line = (f"peak memory {format_size(int(cg.get('max_usage') or 0))}, "
                    f"peak swap {format_size(peak_swap)}")
            if cg.get("memsw_max_usage") is not None:
                line += f", memory+swap peak {format_size(int(cg['memsw_max_usage']))}"
            line += f", limit hits {cg.get('failcnt', '?')}, oom kills {cg.get('oom_kill', '?')}"
            t.add_row(f"cgroup v{cg.get('version', '?')}", line)
            c.print(t)
            blades = Table("blade", "alive", "slabs used", "used", "capacity",
                           title="slab usage per blade (ralloc status)")
            for b in (r.get("cluster") or {}).get("blades", []):
                blades.add_row(b["name"], "[green]yes[/]" if b["alive"] else "[red]no[/]",
                               f"{b['slabs_used']}/{b['slabs_total']}",
                               format_size(b["used_bytes"]), format_size(b["capacity_bytes"]))
            c.print(blades)
        m = r.get("mount")
        if isinstance(m, str):
            c.print(f"[bold]Part 2: mmap on the far-memory filesystem[/]: [yellow]{m}[/]")
        elif isinstance(m, dict):
            c.print("[bold]Part 2: mmap on the far-memory filesystem[/]: "
                    + (f"[green]64M verified[/] (write {m.get('write_s')}s, "
                       f"read back {m.get('verify_s')}s)" if m.get("ok") else
                       f"[red]FAILED[/] {m}"))
        steps = ", ".join(f"{name.split(':')[0]} {dt:.1f}s" for name, dt in self.timings)
        c.print(f"[dim]steps: {steps}[/]")
        for note in self.cleanup_notes:
            c.print(f"[red]cleanup problem:[/] {note}")
        if self.cleanup_notes:
            c.print(f"[red]left in place for inspection: {self.dir}[/]")
        if error:
            c.print(Panel(f"[red]{error}[/]", title="demo FAILED", border_style="red"))
        else:
            c.print(Panel(f"demo passed in {total:.1f}s", border_style="green"))

    def run(self) -> int:
        import signal
        import tempfile

        def on_term(signum, frame):
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
        t0 = time.monotonic()
        error = None
        try:
            self.preflight()
            self.dir = tempfile.mkdtemp(prefix="ralloc-demo-")
            self.console.print(f"[bold]rallocator demo[/] [dim](cluster in {self.dir})[/]")
            self.part_swap()
            self.part_mount()
        except KeyboardInterrupt:
            error = "interrupted"
        except Exception as e:  # noqa: BLE001 - the demo reports anything, then cleans up
            error = str(e)
        finally:
            try:
                self.step("teardown: swap off, unmount, cluster down", self.teardown)
            except KeyboardInterrupt:
                self.teardown()
            except Exception as e:  # noqa: BLE001
                self.cleanup_notes.append(str(e))
        self.report(time.monotonic() - t0, error)
        return 0 if error is None and not self.cleanup_notes else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["workload"]:
        return _workload_main(argv[1:])
    if argv[:1] == ["mmap"]:
        return _mmap_main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m ralloc.demo", description=__doc__.split("\n")[0])
    p.add_argument("--workload", default="512M", help="memory the workload writes (512M)")
    p.add_argument("--limit", default="256M", help="its cgroup memory limit (256M)")
    p.add_argument("--swap-size", default="1G", help="size of the remote swap device (1G)")
    p.add_argument("--replicas", type=int, default=2, help="copies of each slab (2)")
    p.add_argument("--blades", type=int, default=3, help="memory blades (3)")
    p.add_argument("--capacity", default="768M", help="memory each blade lends (768M)")
    return Demo(p.parse_args(argv)).run()


if __name__ == "__main__":
    sys.exit(main())
