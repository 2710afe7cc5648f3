"""Swap: a verified 1 GiB working set under a memory limit, swapping to five kinds of swap.

    python -m bench.swap_workload [--quick] [--profile]   (RALLOC_BENCH_QUICK=1 = --quick)

The workload is a small C program (compiled with gcc into a temp dir at run time) that
mmaps SIZE bytes and, page by page (4 KiB), writes 512 pseudo-random 64-bit words that
depend on (page, version, seed) -- incompressible, so zram gets no free lunch:

    fill      every page, version 0
    seq       PASSES sequential passes: check every page, rewrite it as version+1
    rand      RMW random read-modify-writes: check a random page, rewrite it as version+1
    verify    check every page

A mismatch anywhere is counted and the run fails. It runs under ``ralloc run --mem-limit``
at 75 % and 50 % fit (768M and 512M for 1 GiB), with swap provided by, one at a time:

    local     no limit, no swap (the program's own speed)
    ours      ralloc swap on --cluster DIR --size 2G   (nbdkit + our plugin, blades 3 x 1G)
    memory    ralloc swap on --backend memory --size 2G (nbdkit's C memory plugin, same
              nbdkit -> nbdfuse -> loop attach path)
    zram      zramctl --find --size 2G; mkswap; swapon
    disk      a 2 GiB swap file under /var/tmp on the root filesystem

The swap under test gets priority 32767. Swap areas this benchmark did not create are
reported (``foreign_swaps``) and never touched. Everything created is swapped off and
removed in ``finally`` blocks. Ratios: every config's wall time / memory's (target: ours
<= 1.3x) and / local's. ``--profile`` samples the nbdkit of ours with py-spy
(nonblocking, --gil: the thread holding the GIL) during each run:
bench/out/swap_workload_profile-*.txt (the numbers of a profiled run are not comparable).
"""

from __future__ import annotations

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

from bench.common import OUT, PY, ROOT, machine, ralloc, save

PRIORITY = 32767
SWAP_SIZE = "2G"
CONFIGS = ["local", "ours", "memory", "zram", "disk"]
TARGET_OURS_VS_MEMORY = 1.3

SOURCE = r"""
/* bench/swap_workload.py: a verified working set, to be swapped. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#define PAGE 4096
#define WORDS (PAGE / 8)

static uint64_t seed;

static inline uint64_t mix(uint64_t x) {
    x += 0x9E3779B97F4A7C15ULL;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}
static inline uint64_t base(uint64_t page, uint32_t ver) {
    return mix(seed ^ (page << 20) ^ ((uint64_t)ver << 52) ^ ver);
}
static void fill(uint64_t *p, uint64_t page, uint32_t ver) {
    uint64_t b = base(page, ver);
    for (int i = 0; i < WORDS; i++) p[i] = mix(b + (uint64_t)i);
}
static int check(const uint64_t *p, uint64_t page, uint32_t ver) {
    uint64_t b = base(page, ver);
    for (int i = 0; i < WORDS; i++)
        if (p[i] != mix(b + (uint64_t)i)) return 0;
    return 1;
}
static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s BYTES PASSES RMW SEED\n", argv[0]);
        return 2;
    }
    uint64_t n = strtoull(argv[1], 0, 10) / PAGE;
    int passes = atoi(argv[2]);
    uint64_t rmw = strtoull(argv[3], 0, 10);
    seed = strtoull(argv[4], 0, 10);
    uint32_t *ver = calloc(n, sizeof *ver);
    char *mem = mmap(0, n * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (!ver || mem == MAP_FAILED) { perror("alloc"); return 1; }
    uint64_t bad = 0, first_bad = ~0ULL;
#define PG(i) ((uint64_t *)(mem + (i) * PAGE))
#define CHECK(i) do { if (!check(PG(i), (i), ver[i])) { bad++; if (first_bad == ~0ULL) first_bad = (i); } } while (0)
    double t0 = now();
    for (uint64_t i = 0; i < n; i++) fill(PG(i), i, 0);
    double t1 = now();
    for (int p = 0; p < passes; p++)
        for (uint64_t i = 0; i < n; i++) { CHECK(i); fill(PG(i), i, ++ver[i]); }
    double t2 = now();
    uint64_t r = seed | 1;
    for (uint64_t k = 0; k < rmw; k++) {
        r ^= r << 13; r ^= r >> 7; r ^= r << 17;  /* xorshift64 */
        uint64_t i = r % n;
        CHECK(i); fill(PG(i), i, ++ver[i]);
    }
    double t3 = now();
    for (uint64_t i = 0; i < n; i++) CHECK(i);
    double t4 = now();
    printf("{\"ok\": %s, \"pages\": %llu, \"bad_pages\": %llu, \"first_bad\": %lld, "
           "\"fill_s\": %.3f, \"seq_s\": %.3f, \"rand_s\": %.3f, \"verify_s\": %.3f, "
           "\"total_s\": %.3f}\n", bad ? "false" : "true", (unsigned long long)n,
           (unsigned long long)bad, bad ? (long long)first_bad : -1LL,
           t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0);
    return bad ? 3 : 0;
}
"""


def quick_mode(argv: list[str] | None = None) -> bool:
    return os.environ.get("RALLOC_BENCH_QUICK") == "1" or "--quick" in (argv or [])


def settings(quick: bool) -> dict:
    mib = 128 if quick else 1024
    return {"size_mib": mib, "passes": 1, "rmw": (mib << 8) // (2 if quick else 1),
            "fits": {"75%": mib * 3 // 4, "50%": mib // 2}}


def build(tmp: str) -> str:
    src, exe = os.path.join(tmp, "swapwl.c"), os.path.join(tmp, "swapwl")
    Path(src).write_text(SOURCE)
    r = subprocess.run(["gcc", "-O2", "-o", exe, src], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"gcc: {r.stderr.strip()[-500:]}")
    return exe


# --------------------------------------------------------------------------------------
# /proc/swaps and the swap providers (each a context manager yielding the device)


def swaps() -> dict[str, dict]:
    out = {}
    with open("/proc/swaps") as f:
        for line in f.read().splitlines()[1:]:
            p = line.split()
            if len(p) >= 5:
                out[p[0]] = {"type": p[1], "size_kib": int(p[2]), "used_kib": int(p[3]),
                             "priority": int(p[4])}
    return out


def _run(argv: list[str], timeout: float = 600) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if r.returncode:
        raise RuntimeError(f"{' '.join(argv)}: {(r.stderr or r.stdout).strip()[-400:]}")
    return r.stdout


def _swapoff(dev: str) -> None:
    if dev in swaps():
        subprocess.run(["swapoff", dev], capture_output=True, text=True, timeout=900)
    if dev in swaps():
        raise RuntimeError(f"swapoff {dev} failed: it is still in /proc/swaps")


@contextlib.contextmanager
def no_swap(tmp: str):
    yield None


@contextlib.contextmanager
def ralloc_swap(tmp: str, backend: str):
    """``ralloc swap on`` with our plugin (on a fresh cluster) or nbdkit's memory plugin."""
    d = tempfile.mkdtemp(prefix=f"rbench-swap-{backend}-")
    cluster_up = False
    try:
        args = ["swap", "on", "--cluster", d, "--size", SWAP_SIZE, "--priority", str(PRIORITY)]
        if backend == "ours":
            ralloc("cluster", "up", "--dir", d, "--blades", "3", "--capacity", "1G")
            cluster_up = True
        else:
            args += ["--backend", "memory"]
        r = ralloc(*args, check=False)
        if r.returncode:
            raise RuntimeError(f"ralloc swap on ({backend}): {(r.stderr or r.stdout).strip()}")
        dev = r.stdout.strip().splitlines()[-1]
        state = json.loads(Path(d, "swap", "state.json").read_text())
        pids = {"nbdkit": int((state.get("nbdkit") or {}).get("pid") or 0),
                "nbdfuse": int((state.get("nbdfuse") or {}).get("pid") or 0)}
        if cluster_up:
            from rallocator.cluster_config import ClusterConfig

            pids["blades"] = [b.pid for b in ClusterConfig.load(d).blades if b.pid]
        yield dev, r.stdout.strip().splitlines()[:-1], pids
    finally:
        off = ralloc("swap", "off", "--cluster", d, check=False)
        if off.returncode:
            print(f"WARNING: ralloc swap off --cluster {d} failed: {off.stderr.strip()}",
                  file=sys.stderr)
        if cluster_up:
            ralloc("cluster", "down", "--dir", d, check=False)
        if off.returncode == 0:
            shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def zram_swap(tmp: str):
    before = {n for n in os.listdir("/sys/block") if n.startswith("zram")}
    dev = _run(["zramctl", "--find", "--size", SWAP_SIZE]).strip()
    try:
        algo = Path(f"/sys/block/{os.path.basename(dev)}/comp_algorithm").read_text().strip()
        _run(["mkswap", "-L", "rbench-zram", dev])
        _run(["swapon", "-p", str(PRIORITY), dev])
        yield dev, [f"{dev} comp_algorithm: {algo}"], {}
    finally:
        try:
            _swapoff(dev)
        finally:
            subprocess.run(["zramctl", "--reset", dev], capture_output=True, timeout=120)
            name = os.path.basename(dev)
            if name not in before and name != "zram0":  # hot-added by --find: remove it
                with contextlib.suppress(OSError, ValueError):
                    Path("/sys/class/zram-control/hot_remove").write_text(name.removeprefix("zram"))


@contextlib.contextmanager
def file_swap(tmp: str):
    path = f"/var/tmp/rbench-swapfile-{os.getpid()}"
    try:
        _run(["fallocate", "-l", SWAP_SIZE, path])
        os.chmod(path, 0o600)
        _run(["mkswap", "-L", "rbench-file", path])
        _run(["swapon", "-p", str(PRIORITY), path])
        fs = _run(["findmnt", "-no", "SOURCE,FSTYPE", "--target", path]).strip()
        yield path, [f"swap file {path} on {fs}"], {}
    finally:
        try:
            _swapoff(path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


PROVIDERS = {"local": no_swap, "ours": lambda t: ralloc_swap(t, "ours"),
             "memory": lambda t: ralloc_swap(t, "memory"), "zram": zram_swap,
             "disk": file_swap}


# --------------------------------------------------------------------------------------
# one run


def vmstat() -> dict[str, int]:
    with open("/proc/vmstat") as f:
        return {k: int(v) for k, v in (ln.split() for ln in f)}


def cpu_s(pids: dict) -> dict[str, float]:
    """CPU seconds used so far by the swap daemons (nbdkit, nbdfuse, blades)."""
    import psutil

    out = {}
    for name, p in pids.items():
        tot = 0.0
        for pid in (p if isinstance(p, list) else [p]):
            with contextlib.suppress(psutil.Error, ValueError):
                t = psutil.Process(pid).cpu_times()
                tot += t.user + t.system
        out[name] = tot
    return out


def run_workload(exe: str, st: dict, limit_mib: int | None, tmp: str, seed: int,
                 pids: dict | None = None, profile_to: str | None = None) -> dict:
    stats_file = os.path.join(tmp, "cg.json")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(stats_file)
    limit = f"{limit_mib}M" if limit_mib else "64G"  # "no limit": a cgroup all the same
    cmd = [PY, "-m", "ralloc", "run", "--mem-limit", limit, "--stats-json", stats_file, "--",
           exe, str(st["size_mib"] << 20), str(st["passes"]), str(st["rmw"]), str(seed)]
    pids = pids or {}
    spy = None
    if profile_to and pids.get("nbdkit"):
        spy = subprocess.Popen([str(Path(PY).parent / "py-spy"), "record", "--pid",
                                str(pids["nbdkit"]), "--format", "raw", "--rate", "200",
                                "--nonblocking", "--gil", "--duration", "3600", "-o",
                                profile_to],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
    c0, v0, t0 = cpu_s(pids), vmstat(), time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=3600)
    except BaseException:  # ralloc run forwards SIGTERM and removes its cgroup
        proc.terminate()
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        raise
    r = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    wall = time.monotonic() - t0
    v1, c1 = vmstat(), cpu_s(pids)
    if spy is not None:
        spy.send_signal(signal.SIGINT)
        try:
            spy.wait(timeout=60)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait()
    try:
        res = json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        res = {"ok": False}
    try:
        cg = json.loads(Path(stats_file).read_text())
    except (OSError, ValueError):
        cg = {}
    out = {"status": r.returncode, "wall_s": round(wall, 2), **res,
           "pswpin": v1.get("pswpin", 0) - v0.get("pswpin", 0),
           "pswpout": v1.get("pswpout", 0) - v0.get("pswpout", 0),
           "daemon_cpu_s": {k: round(c1[k] - c0[k], 2) for k in c0},
           "cgroup": {k: cg.get(k) for k in ("limit", "max_usage", "swap_peak", "swap_peak_memsw", "stat",
                                             "swap_peak_sampled", "failcnt", "oom_kill")
                      if k in cg}}
    if r.returncode or not res.get("ok"):
        out["ok"] = False
        out["stderr"] = r.stderr.strip()[-600:]
    return out


# --------------------------------------------------------------------------------------
# the benchmark


def _terminate(signum, frame) -> None:
    raise SystemExit(f"terminated by signal {signum}: swap off and clean-up first")


def run(argv: list[str] | None = None) -> dict:
    argv = argv or []
    quick = quick_mode(argv)
    st = settings(quick)
    if os.geteuid() != 0:
        raise RuntimeError("needs root (swapon, zram, cgroups)")
    tmp = tempfile.mkdtemp(prefix="rbench-swapwl-")
    t_start = time.monotonic()
    old_term = signal.signal(signal.SIGTERM, _terminate)  # so the finally blocks run
    res: dict = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                 "quick": quick, **st, "swap_size": SWAP_SIZE, "priority": PRIORITY,
                 "target_ours_vs_memory": TARGET_OURS_VS_MEMORY,
                 "command": "python -m bench.swap_workload" + (" --quick" if quick else ""),
                 "page_cluster": Path("/proc/sys/vm/page-cluster").read_text().strip(),
                 "swappiness": Path("/proc/sys/vm/swappiness").read_text().strip(),
                 "foreign_swaps": {}, "runs": {}, "notes": {},
                 "swaps_at_start": swaps()}
    try:
        exe = build(tmp)
        for cfg in CONFIGS:
            foreign = swaps()
            if foreign:
                res["foreign_swaps"][cfg] = foreign
                print(f"  NOTE: swap areas not ours are active: {sorted(foreign)}", flush=True)
            res["runs"][cfg] = {}
            dev = None
            try:
                with PROVIDERS[cfg](tmp) as prov:
                    pids: dict = {}
                    if prov is not None:
                        dev, notes, pids = prov
                        res["notes"][cfg] = [*notes, f"device {dev}"]
                    fits = {"none": None} if cfg == "local" else st["fits"]
                    for fit, lim in fits.items():
                        prof = None
                        if "--profile" in argv and cfg == "ours":
                            prof = str(OUT / f"swap_workload_profile-{cfg}-{fit[:2]}.txt")
                        m = run_workload(exe, st, lim, tmp, seed=1, pids=pids, profile_to=prof)
                        if prof:
                            from bench.nbd_fio import summarise_raw

                            m["profile"] = summarise_raw(prof, "")
                        m["swaps_during"] = {k: v for k, v in swaps().items()}
                        res["runs"][cfg][fit] = m
                        print(f"  {cfg:7s} fit {fit:5s} limit {lim or '-'}M: {m['wall_s']:7.1f}s "
                              f"ok={m['ok']} pswpin {m['pswpin']} pswpout {m['pswpout']}",
                              flush=True)
            except Exception as e:  # noqa: BLE001 - one broken provider must not stop the rest
                res["runs"][cfg]["error"] = f"{type(e).__name__}: {e}"
                print(f"  {cfg}: FAILED: {e}", flush=True)
            if dev is not None and dev in swaps():  # the finally blocks failed: stop here
                raise RuntimeError(f"{cfg}: swap is still on on {dev}; swapoff {dev} by hand")
    finally:
        signal.signal(signal.SIGTERM, old_term)
        shutil.rmtree(tmp, ignore_errors=True)
    res["ratios"], res["verdicts"] = ratios(res["runs"], st["fits"])
    res["wall_s"] = round(time.monotonic() - t_start, 1)
    save("swap_workload", res)
    _plot()
    return {"wall_s": res["wall_s"], "ratios": res["ratios"], "verdicts": res["verdicts"]}


def _plot() -> None:
    try:
        from bench.plot import run as plot

        plot()
    except Exception as e:  # noqa: BLE001 - a plot must not fail the benchmark
        print(f"  (plot failed: {e})", file=sys.stderr)


def ratios(runs: dict, fits: dict) -> tuple[dict, dict]:
    rat: dict = {}
    ver: dict = {}
    local = runs.get("local", {}).get("none", {})
    for fit in fits:
        mem = runs.get("memory", {}).get(fit, {})
        for cfg in CONFIGS[1:]:
            m = runs.get(cfg, {}).get(fit)
            if not m or not m.get("ok"):
                continue
            if mem.get("ok") and cfg != "memory":
                rat[f"{cfg}/memory {fit}"] = round(m["wall_s"] / mem["wall_s"], 3)
            if local.get("ok"):
                rat[f"{cfg}/local {fit}"] = round(m["wall_s"] / local["wall_s"], 3)
        if f"ours/memory {fit}" in rat:
            ver[f"ours/memory {fit}"] = rat[f"ours/memory {fit}"] <= TARGET_OURS_VS_MEMORY
        else:
            ver[f"ours/memory {fit}"] = False
    return rat, ver


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1:]), indent=2))
