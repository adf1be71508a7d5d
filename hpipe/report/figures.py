"""Line charts of the experiment: the slicing ablation and the sequence-length sweep.

Take the experiment's plain-data summaries (not Timelines), write a PNG where asked.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import ScalarFormatter


def plot_ablation(ablation: dict, path: str | Path) -> Path:
    """Per model: latency of uniform slicing vs the number of slices, and HPipe's dynamic line."""
    fig = Figure(figsize=(6 * len(ablation), 4.2), dpi=130)
    axes = fig.subplots(1, len(ablation), squeeze=False)[0]
    for ax, (name, d) in zip(axes, ablation.items()):
        ns = [int(n) for n in d["uniform"]]
        lat = [v["latency_s"] for v in d["uniform"].values()]
        ax.plot(ns, lat, "o-", color="tab:blue", label="uniform slicing (HPipe's layer split)")
        for n, v in zip(ns, d["uniform"].values()):
            if not v["runs"]:
                ax.annotate("OOM", (n, v["latency_s"]), fontsize=7, color="tab:red")
        dyn = d["dynamic_latency_s"]
        ax.axhline(dyn, color="tab:red", linestyle="--",
                   label=f"dynamic slicing ({len(d['dynamic_slices'])} slices): {dyn:.2f} s")
        best = min(lat)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns)
        ax.set_xticklabels([str(n) for n in ns])
        ax.set_xlabel("number of uniform slices")
        ax.set_ylabel("prefill latency (s)")
        rel = 100 * (dyn / best - 1)
        ax.set_title(f"{name}: best uniform {best:.2f} s, dynamic {dyn:.2f} s "
                     f"({abs(rel):.1f}% {'below' if rel < 0 else 'above'} the best uniform)",
                     fontsize=9)
        ax.text(0.02, 0.04, "few slices: pipeline fill/drain bubbles\n"
                "many slices: small GEMMs under-use the GPU", transform=ax.transAxes,
                fontsize=7, color="dimgrey")
        ax.grid(linewidth=0.3, alpha=0.5)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path


def plot_sweep(sweep: dict, path: str | Path, *, title: str) -> Path:
    """Latency and throughput against prompt length for each method (log-log)."""
    fig = Figure(figsize=(11, 4.2), dpi=130)
    ax_lat, ax_tput = fig.subplots(1, 2)
    lengths = [int(n) for n in sweep]
    methods = list(next(iter(sweep.values())))
    for m in methods:
        pts = [(n, sweep[str(n)][m]) for n in lengths if sweep[str(n)][m].get("runs")]
        if not pts:
            continue
        ax_lat.plot([n for n, _ in pts], [r["latency_s"] for _, r in pts], "o-", label=m)
        ax_tput.plot([n for n, _ in pts], [r["throughput_tok_s"] / 1e3 for _, r in pts], "o-",
                     label=m)
    for ax, ylabel in ((ax_lat, "prefill latency (s)"), (ax_tput, "throughput (k tok/s)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths)
        ax.set_xticklabels([f"{n // 1024}k" for n in lengths])
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(linewidth=0.3, alpha=0.5)
        ax.legend(fontsize=7)
    ax_lat.set_yscale("log")
    ax_lat.yaxis.set_major_formatter(ScalarFormatter())
    # Where a method stops fitting, said once below the plots instead of cluttering them.
    missing = []
    for m in methods:
        bad = [n for n in lengths if not sweep[str(n)][m].get("runs")]
        if bad:
            missing.append(f"{m}: " + ", ".join(f"{n // 1024}k" for n in bad))
    note = ("does not fit (OOM / infeasible) at  " + ";  ".join(missing)) if missing else (
        "every method fits at every length")
    fig.suptitle(title, fontsize=10)
    fig.text(0.5, 0.01, note, ha="center", fontsize=8, color="tab:red" if missing else "dimgrey")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    path = Path(path)
    fig.savefig(path)
    return path
