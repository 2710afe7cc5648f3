"""Block device: fio (ioengine=nbd) against nbdkit serving our plugin and two baselines.

    python -m bench.nbd_fio [--quick] [--profile]     (RALLOC_BENCH_QUICK=1 = --quick)

Four nbdkit servers run side by side, all started the same way (``nbdkit -f -U SOCK
PLUGIN ARGS``, children of this process, stopped at the end):

    ours-tcp     nbd_plugin/plugin.py transport=tcp  (blades: 3 x 1G dram cluster)
    ours-shm     nbd_plugin/plugin.py transport=shm  (same cluster, another volume)
    memory       nbdkit's C memory plugin            (the 1M target's baseline)
    null-python  bench/null_copy_plugin.py           (nbdkit + embedded Python doing one
                                                      memcpy per request: the 4k baseline)

Every device is 1 GiB and prefilled with a sequential 1M write, so reads hit mapped slabs.
Then for each workload (4k randread QD32, 4k randwrite QD32, 1M read QD8, 1M write QD8)
every backend runs back to back, ``ROUNDS`` times in rotated order, so that the noise of a
shared machine hits them alike; the reported number is the mean over rounds. Targets:
ours / null-python >= 0.8 on 4k, ours / memory >= 0.7 on 1M.

Besides IOPS and MB/s each run records the CPU time nbdkit (and, for ours, the blades, minus
what they burn idle) used per I/O. ``--profile`` afterwards samples the ours-shm and
ours-tcp servers with py-spy (``--gil``: only the thread holding the GIL, i.e. where the
Python time goes) under 4k randread, 4k randwrite and 1M write; the top frames go into
nbd_fio.json under "profile", the raw stacks to bench/out/nbd_fio_profile-*.txt (needs
``.venv/bin/pip install py-spy``).
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from bench.common import ROOT, cluster, machine, save

PLUGIN = str(ROOT / "nbd_plugin" / "plugin.py")
NULL_PLUGIN = str(ROOT / "bench" / "null_copy_plugin.py")
SIZE = "1G"

WORKLOADS = {  # name: fio options
    "randread-4k": {"rw": "randread", "bs": "4k", "iodepth": "32"},
    "randwrite-4k": {"rw": "randwrite", "bs": "4k", "iodepth": "32"},
    "read-1m": {"rw": "read", "bs": "1M", "iodepth": "8"},
    "write-1m": {"rw": "write", "bs": "1M", "iodepth": "8"},
}
BACKENDS = ["ours-tcp", "ours-shm", "memory", "null-python"]
TARGETS = {"4k_vs_null_python": 0.8, "1m_vs_memory": 0.7}


def quick_mode(argv: list[str] | None = None) -> bool:
    return os.environ.get("RALLOC_BENCH_QUICK") == "1" or "--quick" in (argv or [])


def settings(quick: bool) -> dict:
    if quick:
        return {"runtime_s": 3, "ramp_s": 0, "rounds": 1}
    return {"runtime_s": 4, "ramp_s": 1, "rounds": 3}


# --------------------------------------------------------------------------------------
# servers


class Server:
    """One ``nbdkit -f -U SOCK ...`` child (nbdkit -f dies with its parent: that is us)."""

    def __init__(self, name: str, args: list[str], tmp: str,
                 blade_pids: list[int] | None = None) -> None:
        self.name = name
        self.sock = os.path.join(tmp, f"{name}.sock")
        self.log = os.path.join(tmp, f"{name}.log")
        self.argv = ["nbdkit", "-f", "-U", self.sock, *args]
        self.uri = f"nbd+unix:///?socket={self.sock}"
        self.blade_pids = blade_pids or []
        self.proc: subprocess.Popen | None = None
        self.blade_idle = 0.0  # blade CPU seconds per second with no I/O (tickers, heartbeats)

    def start(self) -> None:
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name}: nbdkit exited: {self.tail()}")
            if os.path.exists(self.sock):
                r = subprocess.run(["nbdinfo", "--size", self.uri], capture_output=True,
                                   text=True, timeout=30)
                if r.returncode == 0:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name}: nbdkit not ready after 60 s: {self.tail()}")

    def tail(self) -> str:
        with contextlib.suppress(OSError):
            return " | ".join(Path(self.log).read_text(errors="replace").splitlines()[-5:])
        return "(no log)"

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def cpu_s(self) -> tuple[float, float]:
        """(nbdkit, blades) CPU seconds used so far."""
        def cpu(pid: int) -> float:
            try:
                t = psutil.Process(pid).cpu_times()
                return t.user + t.system
            except psutil.NoSuchProcess:
                return 0.0
        assert self.proc is not None
        return cpu(self.proc.pid), sum(cpu(p) for p in self.blade_pids)


# --------------------------------------------------------------------------------------
# fio


def fio(uri: str, opts: dict[str, str], runtime: int | None, ramp: int = 0) -> dict:
    """Run one fio job; returns its JSON (fio prints a line before the JSON: skipped)."""
    argv = ["fio", "--name=job", "--ioengine=nbd", f"--uri={uri}", "--output-format=json",
            *(f"--{k}={v}" for k, v in opts.items())]
    if runtime:
        argv += ["--time_based", f"--runtime={runtime}"]
        if ramp:
            argv.append(f"--ramp_time={ramp}")
    r = subprocess.run(argv, capture_output=True, text=True,
                       timeout=(runtime or 0) + ramp + 600)
    out = r.stdout
    start = out.find("{")
    if r.returncode != 0 or start < 0:
        raise RuntimeError(f"fio {opts}: status {r.returncode}: {(r.stderr or out)[-800:]}")
    job = json.loads(out[start:])["jobs"][0]
    if job.get("error"):
        raise RuntimeError(f"fio {opts}: job error {job['error']}")
    return job


def measure(srv: Server, wl: str, runtime: int, ramp: int) -> dict:
    opts = WORKLOADS[wl]
    c0, t0 = srv.cpu_s(), time.monotonic()
    job = fio(srv.uri, opts, runtime, ramp)
    c1, wall = srv.cpu_s(), time.monotonic() - t0
    side = "read" if "read" in opts["rw"] else "write"
    d = job[side]
    ios = max(1, int(d["total_ios"]))
    # CPU covers fio's start, connect and ramp too; fio counts only the I/Os after the ramp
    share = min(1.0, runtime / wall)
    return {"iops": d["iops"], "mb_s": d["bw_bytes"] / 1e6,
            "lat_mean_us": d["clat_ns"]["mean"] / 1e3,
            "lat_p99_us": d["clat_ns"]["percentile"].get("99.000000", 0) / 1e3,
            "nbdkit_cpu_us_per_io": (c1[0] - c0[0]) * share / ios * 1e6,
            "blade_cpu_us_per_io": max(0.0, c1[1] - c0[1] - srv.blade_idle * wall) * share
            / ios * 1e6,
            "nbdkit_cpu_pct": 100 * (c1[0] - c0[0]) / wall,
            "blade_cpu_pct": 100 * (c1[1] - c0[1]) / wall,
            "fio_cpu_pct": job["usr_cpu"] + job["sys_cpu"]}


def prefill(srv: Server) -> dict:
    t0 = time.monotonic()
    job = fio(srv.uri, {"rw": "write", "bs": "1M", "iodepth": "8"}, None)
    return {"s": round(time.monotonic() - t0, 2), "mb_s": job["write"]["bw_bytes"] / 1e6}


# --------------------------------------------------------------------------------------
# py-spy


def profile(servers: dict[str, Server], seconds: int, tmp: str) -> dict:
    """Sample ours-* with py-spy while fio runs; top frames (own and cumulative)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not os.path.exists(spy):
        return {"error": "py-spy not installed (.venv/bin/pip install py-spy)"}
    out: dict = {}
    for name in ("ours-shm", "ours-tcp"):
        srv = servers[name]
        for wl in ("randread-4k", "randwrite-4k", "write-1m"):
            raw = os.path.join(tmp, f"{name}-{wl}.txt")
            spy_proc = subprocess.Popen(
                [spy, "record", "--pid", str(srv.proc.pid), "--format", "raw", "--rate", "250",
                 "--duration", str(seconds), "--nonblocking", "--gil", "-o", raw],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            time.sleep(0.5)
            res = measure(srv, wl, seconds - 1, 0)
            _, err = spy_proc.communicate(timeout=seconds + 60)
            out[f"{name}/{wl}"] = {"fio": res, **summarise_raw(raw, err)}
            with contextlib.suppress(OSError):
                shutil.copy(raw, ROOT / "bench" / "out" / f"nbd_fio_profile-{name}-{wl}.txt")
    return out


def summarise_raw(path: str, err: str) -> dict:
    """py-spy raw output: 'frame;frame;... count' per line (root first)."""
    own: collections.Counter = collections.Counter()
    cum: collections.Counter = collections.Counter()
    total = 0
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return {"error": f"no py-spy output: {err.strip()[-300:]}"}
    for line in lines:
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frames = [f.strip() for f in stack.split(";") if f.strip()]
        if not frames:
            continue
        k = int(n)
        total += k
        own[frames[-1]] += k
        for f in set(frames):
            cum[f] += k
    pct = (lambda c: [(f, round(100 * k / total, 1)) for f, k in c.most_common(12)]) \
        if total else (lambda c: [])
    return {"samples": total, "top_own": pct(own), "top_cumulative": pct(cum)}


# --------------------------------------------------------------------------------------
# the benchmark


def run(argv: list[str] | None = None) -> dict:
    argv = argv or []
    quick = quick_mode(argv)
    st = settings(quick)
    for tool in ("nbdkit", "fio", "nbdinfo"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is not installed (make install)")
    tmp = tempfile.mkdtemp(prefix="rbench-fio-")
    res: dict = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                 "quick": quick, **st, "size": SIZE, "targets": TARGETS,
                 "command": "python -m bench.nbd_fio" + (" --quick" if quick else "")}
    t_start = time.monotonic()
    try:
        with cluster("--blades", "3", "--capacity", "1G") as d:
            from rallocator.cluster_config import ClusterConfig

            blade_pids = [b.pid for b in ClusterConfig.load(d).blades if b.pid]
            servers = {
                "ours-tcp": Server("ours-tcp", ["python", PLUGIN, f"cluster={d}", f"size={SIZE}",
                                                "volume=fio-tcp", "transport=tcp"], tmp,
                                   blade_pids),
                "ours-shm": Server("ours-shm", ["python", PLUGIN, f"cluster={d}", f"size={SIZE}",
                                                "volume=fio-shm", "transport=shm"], tmp,
                                   blade_pids),
                "memory": Server("memory", ["memory", SIZE], tmp),
                "null-python": Server("null-python", ["python", NULL_PLUGIN, f"size={SIZE}"],
                                      tmp),
            }
            try:
                for s in servers.values():
                    s.start()
                res["servers"] = {n: " ".join(s.argv).replace(tmp, "$TMP").replace(d, "$CLUSTER")
                                  for n, s in servers.items()}
                if blade_pids:  # what the blades burn doing nothing, subtracted per I/O
                    c0 = servers["ours-shm"].cpu_s()[1]
                    time.sleep(3)
                    idle = (servers["ours-shm"].cpu_s()[1] - c0) / 3
                    for s in servers.values():
                        s.blade_idle = idle if s.blade_pids else 0.0
                    res["blade_idle_cpu_pct"] = round(100 * idle, 1)
                res["prefill"] = {}
                for n, s in servers.items():
                    res["prefill"][n] = prefill(s)
                    print(f"  prefill {n}: {res['prefill'][n]}", flush=True)
                runs: dict[str, dict[str, list[dict]]] = {b: {w: [] for w in WORKLOADS}
                                                         for b in BACKENDS}
                for wl in WORKLOADS:
                    for rnd in range(st["rounds"]):
                        order = BACKENDS[rnd % len(BACKENDS):] + BACKENDS[:rnd % len(BACKENDS)]
                        for b in order:
                            m = measure(servers[b], wl, st["runtime_s"], st["ramp_s"])
                            runs[b][wl].append(m)
                            print(f"  {wl:13s} {b:12s} {m['iops']:10.0f} IOPS "
                                  f"{m['mb_s']:8.1f} MB/s  nbdkit {m['nbdkit_cpu_us_per_io']:.0f}"
                                  f" us CPU/IO", flush=True)
                res["runs"] = runs
                res["results"] = {b: {w: _mean(runs[b][w]) for w in WORKLOADS} for b in BACKENDS}
                if "--profile" in argv:
                    res["profile"] = profile(servers, 6 if quick else 12, tmp)
            finally:
                for s in servers.values():
                    s.stop()
                res["logs_tail"] = {n: s.tail() for n, s in servers.items()
                                    if s.proc is not None and s.proc.returncode not in (0, None,
                                                                                        -15)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res["ratios"], res["verdicts"] = ratios(res["results"])
    res["wall_s"] = round(time.monotonic() - t_start, 1)
    save("nbd_fio", res)
    _plot()
    return {"wall_s": res["wall_s"], "ratios": res["ratios"], "verdicts": res["verdicts"]}


def _mean(ms: list[dict]) -> dict:
    out = {k: sum(m[k] for m in ms) / len(ms) for k in ms[0]}
    if len(ms) > 1:
        out["iops_spread_pct"] = 100 * (max(m["iops"] for m in ms) - min(m["iops"] for m in ms)) \
            / max(out["iops"], 1e-9)
    return out


def _plot() -> None:
    try:
        from bench.plot import run as plot

        plot()
    except Exception as e:  # noqa: BLE001 - a plot must not fail the benchmark
        print(f"  (plot failed: {e})", file=sys.stderr)


def ratios(r: dict) -> tuple[dict, dict]:
    rat: dict = {}
    ver: dict = {}
    for t in ("tcp", "shm"):
        ours = r[f"ours-{t}"]
        for wl in ("randread-4k", "randwrite-4k"):
            x = ours[wl]["iops"] / max(r["null-python"][wl]["iops"], 1e-9)
            rat[f"ours-{t}/null-python {wl}"] = round(x, 3)
            ver[f"ours-{t}/null-python {wl}"] = x >= TARGETS["4k_vs_null_python"]
        for wl in ("read-1m", "write-1m"):
            x = ours[wl]["mb_s"] / max(r["memory"][wl]["mb_s"], 1e-9)
            rat[f"ours-{t}/memory {wl}"] = round(x, 3)
            ver[f"ours-{t}/memory {wl}"] = x >= TARGETS["1m_vs_memory"]
    for wl in WORKLOADS:  # context: what the Python plugin layer costs on its own
        rat[f"null-python/memory {wl}"] = round(
            r["null-python"][wl]["iops"] / max(r["memory"][wl]["iops"], 1e-9), 3)
    return rat, ver


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1:]), indent=2))
