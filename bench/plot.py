"""Plots of the block-device and swap benchmarks (grouped bars of the ratios).

    python -m bench.plot      reads bench/out/nbd_fio.json and bench/out/swap_workload.json,
                              writes bench/out/nbd_fio.png and bench/out/swap_workload.png
    python -m bench.plot --markdown     prints the tables of bench/RESULTS.md from them

Either input may be missing (that plot is skipped). ``run()`` does the same for
``bench.run_all`` and returns the paths written.
"""

from __future__ import annotations

import json
import sys

from bench.common import OUT

FIO_WORKLOADS = [("randread-4k", "4k randread QD32"), ("randwrite-4k", "4k randwrite QD32"),
                 ("read-1m", "1M read QD8"), ("write-1m", "1M write QD8")]
FIO_BACKENDS = [("ours-tcp", "ours (tcp)", "#1f77b4"), ("ours-shm", "ours (shm)", "#2ca02c"),
                ("null-python", "null Python plugin", "#ff7f0e"),
                ("memory", "nbdkit memory (C)", "#7f7f7f")]
SWAP_CONFIGS = [("ours", "ours (ralloc swap)", "#2ca02c"),
                ("memory", "nbdkit memory, same attach path", "#7f7f7f"),
                ("zram", "zram", "#9467bd"), ("disk", "swap file on local disk", "#8c564b")]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(ax, bars, fmt="{:.2f}", rotation=0) -> None:
    for b in bars:
        h = b.get_height()
        if h == h and h > 0:  # not NaN
            ax.annotate(fmt.format(h), (b.get_x() + b.get_width() / 2, h), ha="center",
                        va="bottom", fontsize=7, xytext=(0, 1), textcoords="offset points",
                        rotation=rotation)


def plot_fio(res: dict) -> str:
    plt = _plt()
    r = res["results"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), gridspec_kw={"width_ratios": [1, 1]})
    # left: every backend normalised to the 4k / 1M baseline the targets name
    ax = axes[0]
    w = 0.2
    for k, (b, name, color) in enumerate(FIO_BACKENDS):
        vals = []
        for wl, _ in FIO_WORKLOADS:
            base = "null-python" if wl.endswith("4k") else "memory"
            vals.append(r[b][wl]["iops"] / max(r[base][wl]["iops"], 1e-9))
        bars = ax.bar([i + (k - 1.5) * w for i in range(len(FIO_WORKLOADS))], vals, w,
                      label=name, color=color)
        _label(ax, bars)
    ax.axhline(1.0, color="black", lw=0.6)
    for i, (wl, _) in enumerate(FIO_WORKLOADS):
        tgt = res["targets"]["4k_vs_null_python" if wl.endswith("4k") else "1m_vs_memory"]
        ax.hlines(tgt, i - 2 * w, i + 2 * w, colors="red", linestyles="dashed", lw=1.2,
                  label="target" if i == 0 else None)
    ax.set_xticks(range(len(FIO_WORKLOADS)))
    ax.set_xticklabels([f"{lab}\n(vs {'null Python' if wl.endswith('4k') else 'memory'})"
                        for wl, lab in FIO_WORKLOADS], fontsize=8)
    ax.set_ylabel("throughput / baseline (same run)")
    ax.set_title("fio over NBD: ratio to the target's baseline")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.08)
    # right: absolute numbers (log scale), so the ratios can be read against them
    ax = axes[1]
    for k, (b, name, color) in enumerate(FIO_BACKENDS):
        vals = [r[b][wl]["iops"] if wl.endswith("4k") else r[b][wl]["mb_s"]
                for wl, _ in FIO_WORKLOADS]
        bars = ax.bar([i + (k - 1.5) * w for i in range(len(FIO_WORKLOADS))], vals, w,
                      label=name, color=color)
        _label(ax, bars, "{:.0f}", rotation=90)
    ax.set_yscale("log")
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo, hi * 2.5)  # room for the rotated labels
    ax.set_xticks(range(len(FIO_WORKLOADS)))
    ax.set_xticklabels([f"{lab}\n({'IOPS' if wl.endswith('4k') else 'MB/s'})"
                        for wl, lab in FIO_WORKLOADS], fontsize=8)
    ax.set_title("absolute: IOPS (4k) and MB/s (1M)")
    fig.suptitle(f"{res['machine']} — {res['date']}" + (" (quick)" if res.get("quick") else ""),
                 fontsize=8)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    path = OUT / "nbd_fio.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def plot_swap(res: dict) -> str:
    plt = _plt()
    runs = res["runs"]
    fits = list(res["fits"])
    local = (runs.get("local") or {}).get("none") or {}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    w = 0.2
    for ax, base, title in ((axes[0], "memory", "wall time / nbdkit memory (same attach path)"),
                            (axes[1], "local", "wall time / all in local memory (no limit)")):
        for k, (c, name, color) in enumerate(SWAP_CONFIGS):
            vals = []
            for fit in fits:
                m = (runs.get(c) or {}).get(fit) or {}
                b = local if base == "local" else (runs.get("memory") or {}).get(fit) or {}
                ok = m.get("ok") and b.get("ok")
                vals.append(m["wall_s"] / b["wall_s"] if ok else float("nan"))
            bars = ax.bar([i + (k - 1.5) * w for i in range(len(fits))], vals, w, label=name,
                          color=color)
            _label(ax, bars)
        ax.axhline(1.0, color="black", lw=0.6)
        if base == "memory":
            ax.axhline(res["target_ours_vs_memory"], color="red", ls="--", lw=1.2,
                       label=f"target for ours (<= {res['target_ours_vs_memory']}x)")
        ax.set_xticks(range(len(fits)))
        ax.set_xticklabels([f"{fit} fit (limit {res['fits'][fit]}M)" for fit in fits])
        ax.set_ylabel("ratio (lower is better)")
        ax.set_title(title, fontsize=10)
        ax.set_ylim(0, ax.get_ylim()[1] * 1.08)
    fig.suptitle(f"swap workload: {res['size_mib']} MiB working set, verified — "
                 f"{res['machine']} — {res['date']}" + (" (quick)" if res.get("quick") else ""),
                 fontsize=8)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    path = OUT / "swap_workload.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


# --------------------------------------------------------------------------------------
# markdown tables for bench/RESULTS.md


def md_fio(res: dict) -> str:
    r, rat, ver = res["results"], res["ratios"], res["verdicts"]
    lines = [f"- command: `{res['command']}` ({res['rounds']} round(s) x {res['runtime_s']} s "
             f"+ {res['ramp_s']} s ramp per cell, backends interleaved; total "
             f"{res['wall_s']:.0f} s)",
             f"- machine: {res['machine']}", f"- date: {res['date']}", "",
             "| workload | backend | IOPS | MB/s | mean lat (us) | p99 lat (us) "
             "| nbdkit CPU us/IO | blade CPU us/IO | IOPS spread over rounds |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for wl, lab in FIO_WORKLOADS:
        for b, name, _ in FIO_BACKENDS:
            m = r[b][wl]
            blade = f"{m['blade_cpu_us_per_io']:.0f}" if b.startswith("ours") else "-"
            spread = f"{m['iops_spread_pct']:.0f} %" if "iops_spread_pct" in m else "-"
            lines.append(f"| {lab} | {name} | {m['iops']:.0f} | {m['mb_s']:.1f} | "
                         f"{m['lat_mean_us']:.0f} | {m['lat_p99_us']:.0f} | "
                         f"{m['nbdkit_cpu_us_per_io']:.0f} | {blade} | {spread} |")
    lines += ["", "| ratio (same run) | value | target | met |", "|---|---:|---:|---|"]
    for k, v in rat.items():
        if k in ver:
            tgt = res["targets"]["4k_vs_null_python" if "4k" in k else "1m_vs_memory"]
            lines.append(f"| {k} | {v:.2f} | >= {tgt} | {'yes' if ver[k] else '**no**'} |")
    for k, v in rat.items():
        if k not in ver:
            lines.append(f"| {k} (context) | {v:.2f} | - | - |")
    pre = res.get("prefill") or {}
    if pre:
        lines += ["", "Prefill (1 GiB sequential 1M write, QD8; for ours this maps every slab): "
                  + ", ".join(f"{b} {p['mb_s']:.0f} MB/s" for b, p in pre.items()) + "."]
    return "\n".join(lines)


def md_swap(res: dict) -> str:
    runs, rat, ver = res["runs"], res["ratios"], res["verdicts"]
    lines = [f"- command: `{res['command']}` ({res['size_mib']} MiB working set: fill, "
             f"{res['passes']} sequential pass(es), {res['rmw']} random RMWs, verify; swap "
             f"devices {res['swap_size']}, priority {res['priority']}; total {res['wall_s']:.0f} s)",
             f"- machine: {res['machine']}; vm.swappiness {res['swappiness']}, "
             f"vm.page-cluster {res['page_cluster']}",
             f"- date: {res['date']}",
             "- swap areas not created by the benchmark: "
             + (", ".join(sorted({d for f in res["foreign_swaps"].values() for d in f}))
                or "none"), "",
             "| swap | fit (limit) | wall s | fill s | seq s | rand s | verify s | pswpin | "
             "pswpout | nbdkit CPU s | nbdfuse CPU s | blades CPU s | / memory | / local | ok |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for c in ["local", *[c for c, _, _ in SWAP_CONFIGS]]:
        for fit, m in (runs.get(c) or {}).items():
            if fit == "error":
                lines.append(f"| {c} | - | failed: {m} |" + " |" * 12)
                continue
            cpu = m.get("daemon_cpu_s") or {}
            lim = res["fits"].get(fit)
            fl = f"{fit} ({lim}M)" if lim else "no limit"
            rm, rl = rat.get(f"{c}/memory {fit}"), rat.get(f"{c}/local {fit}")
            lines.append(
                f"| {c} | {fl} | {m['wall_s']:.1f} | {m.get('fill_s', 0):.1f} | "
                f"{m.get('seq_s', 0):.1f} | {m.get('rand_s', 0):.1f} | "
                f"{m.get('verify_s', 0):.1f} | {m['pswpin']} | {m['pswpout']} | "
                + " | ".join(f"{cpu[k]:.1f}" if k in cpu else "-"
                             for k in ("nbdkit", "nbdfuse", "blades"))
                + f" | {f'{rm:.2f}' if rm else '-'} | {f'{rl:.2f}' if rl else '-'} | "
                f"{'yes' if m.get('ok') else '**NO**'} |")
    lines += ["", "| target | value | met |", "|---|---:|---|"]
    for k, v in ver.items():
        val = rat.get(k)
        lines.append(f"| {k} <= {res['target_ours_vs_memory']} | "
                     f"{f'{val:.2f}' if val else 'n/a'} | {'yes' if v else '**no**'} |")
    return "\n".join(lines)


def run() -> dict:
    out = {}
    for name, fn in (("nbd_fio", plot_fio), ("swap_workload", plot_swap)):
        p = OUT / f"{name}.json"
        if p.exists():
            out[name] = fn(json.loads(p.read_text()))
    return out


if __name__ == "__main__":
    if "--markdown" in sys.argv:  # the tables for bench/RESULTS.md
        for name, fn in (("nbd_fio", md_fio), ("swap_workload", md_swap)):
            p = OUT / f"{name}.json"
            if p.exists():
                print(f"<!-- {name} -->\n{fn(json.loads(p.read_text()))}\n")
    else:
        print(json.dumps(run(), indent=2))
