"""report.md for ``hpipe experiment paper``: the paper's figures beside ours, one sentence each.

Works on the experiment's plain-data summary. Each comparison sentence is chosen by the sign and
size of the difference, so the text stays true when the planner or cost model changes.
"""

from __future__ import annotations

from pathlib import Path

from hpipe.report import paper

MAIN = ("llama-7b", "gpt3-2.7b")


def _m(data: dict, model: str, method: str) -> dict:
    return data["models"][model]["methods"][method]


def _both_run(a: dict, b: dict) -> bool:
    return bool(a.get("runs") and b.get("runs"))


def headline(data: dict) -> dict:
    """HPipe's ratios against Base, GPipe and TeraPipe, energy, and the bound, per model."""
    out: dict = {"vs_base_latency_x": {}, "vs_gpipe_throughput_x": {},
                 "vs_gpipe_latency_reduction": {}, "vs_terapipe_latency_reduction": {},
                 "dyn_energy_reduction_vs_next_best": {}, "dyn_energy_reduction_vs_mean": {},
                 "beats_every_baseline": {}}
    for model in MAIN:
        if model not in data.get("models", {}):
            continue
        hp = _m(data, model, "hpipe")
        ms = data["models"][model]["methods"]
        for ref, key, fn in (
            ("base", "vs_base_latency_x", lambda r, hp=hp: r["latency_s"] / hp["latency_s"]),
            ("gpipe", "vs_gpipe_throughput_x",
             lambda r, hp=hp: hp["throughput_tok_s"] / r["throughput_tok_s"]),
            ("gpipe", "vs_gpipe_latency_reduction", lambda r, hp=hp: 1 - hp["latency_s"] / r["latency_s"]),
            ("terapipe", "vs_terapipe_latency_reduction",
             lambda r, hp=hp: 1 - hp["latency_s"] / r["latency_s"]),
        ):
            out[key][model] = fn(ms[ref]) if _both_run(ms[ref], hp) else None
        others = [r for m, r in ms.items() if m != "hpipe" and r.get("runs")]
        if hp.get("runs") and others:
            dyn = [r["dyn_energy_j"] for r in others]
            out["dyn_energy_reduction_vs_next_best"][model] = 1 - hp["dyn_energy_j"] / min(dyn)
            out["dyn_energy_reduction_vs_mean"][model] = 1 - hp["dyn_energy_j"] / (sum(dyn) / len(dyn))
            out["beats_every_baseline"][model] = all(hp["latency_s"] < r["latency_s"]
                                                     for r in others)
    if "bound" in data:
        out["bound"] = {k: data["bound"][k] for k in ("model", "bound_s", "hpipe_latency_s", "gap")}
    return out


def _range(values) -> str:
    vals = [v for v in values if v is not None]
    return "-" if not vals else " / ".join(f"{v:.3g}" for v in vals)


def _pct(values) -> str:
    vals = [v for v in values if v is not None]
    return "-" if not vals else " / ".join(f"{100 * v:.1f}%" for v in vals)


def headline_lines(data: dict) -> list[str]:
    """The lines the CLI prints: our ratio beside the paper's, then the bound."""
    h = data["headline"]
    models = [m for m in MAIN if m in data.get("models", {})]
    names = " / ".join(models)
    lo, hi = paper.HPIPE_VS_GPIPE_THROUGHPUT_X
    tlo, thi = paper.HPIPE_VS_TERAPIPE_LATENCY_REDUCTION
    lines = [
        f"HPipe vs Base, latency ({names}): ours {_range(h['vs_base_latency_x'][m] for m in models)}x"
        f"  paper {paper.HPIPE_VS_BASE_LATENCY_X}x (LLaMA-7B; GPT3-2B Base is OOM in the paper)",
        f"HPipe vs GPipe, throughput ({names}): ours "
        f"{_range(h['vs_gpipe_throughput_x'][m] for m in models)}x  paper {lo}-{hi}x",
        f"HPipe vs TeraPipe, latency reduction ({names}): ours "
        f"{_pct(h['vs_terapipe_latency_reduction'][m] for m in models)}  paper "
        f"{100 * tlo:.1f}-{100 * thi:.1f}%",
        f"HPipe dynamic energy below the next-best method ({names}): ours "
        f"{_pct(h['dyn_energy_reduction_vs_next_best'].get(m) for m in models)}  paper "
        f"{100 * paper.HPIPE_DYNAMIC_ENERGY_REDUCTION:.1f}% (vs the others)",
    ]
    if "bound" in data:
        b = data["bound"]
        s = b["shares"]
        lines.append(
            f"HPipe vs lower bound ({b['model']}): {b['hpipe_latency_s']:.3f} s vs "
            f"{b['bound_s']:.3f} s = {b['total_tflops']:.0f} TFLOP / "
            f"{sum(b['rates_tflops_s'].values()):.0f} TFLOP/s (sum of the devices' achievable "
            f"rates); {100 * b['gap']:.0f}% above the bound (aim: within 25%)")
        lines.append(
            f"  of the cluster's FLOP capacity over the run: {100 * s['useful']:.0f}% useful, "
            f"{100 * s['idle']:.0f}% idle, {100 * s['below_rate']:.0f}% busy below the best rate. "
            + bound_explanation(b))
    return lines


def bound_explanation(b: dict) -> str:
    """What keeps HPipe from the bound, from the biggest idle contributors."""
    idle = sorted(b["idle_by_device"].items(), key=lambda kv: -kv[1])
    top = [f"{n} ({100 * v:.0f}% of capacity; {100 * b['utilisation_by_device'][n]:.0f}% busy)"
           for n, v in idle[:3] if v > 0.01]
    unused = [n for n, u in b["utilisation_by_device"].items() if u == 0]
    parts = []
    if top:
        parts.append("Idle capacity is mostly on " + ", ".join(top) + ": pipeline fill/drain "
                     "bubbles and stages waiting on the 1 GbE hop between hosts, which the "
                     "bound ignores")
    if unused:
        parts.append(f"{', '.join(unused)} get no layers yet count in the bound's summed rate")
    if b["shares"]["below_rate"] > 0.02:
        parts.append("busy time below the best rate comes from slices smaller than the whole "
                     "prompt (small GEMMs run below peak), attention over the growing prefix "
                     "and the embedding/head")
    parts.append("the bound also assumes work splits continuously, while layers are whole "
                 "units and the device order is fixed")
    return "; ".join(parts) + "."


# -- report.md ---------------------------------------------------------------------------------
def _lat_s(data: dict, model: str, method: str) -> float | None:
    r = _m(data, model, method)
    return r["latency_s"] if r.get("runs") else None


def _within(ours: float, lo: float, hi: float, tol: float = 0.1) -> bool:
    return lo * (1 - tol) <= ours <= hi * (1 + tol)


def comparison_sentences(data: dict) -> list[str]:
    """One sentence per headline ratio. A ratio differs from the paper's when our baseline, our
    HPipe, or both differ from the paper's; the paper's ratio and its 2.24 s HPipe imply the
    paper's baseline latency, so each sentence says which side moved."""
    h = data["headline"]
    out = []
    hp = _lat_s(data, "llama-7b", "hpipe")
    p_hp = paper.LLAMA_7B["latency_s"]["hpipe"]
    if hp is None:
        return ["Our HPipe found no runnable plan for LLaMA-7B, so no ratio can be compared."]
    hp_side = (f"our HPipe predicts {hp:.2f} s against the paper's measured {p_hp} s "
               f"({100 * (hp / p_hp - 1):+.0f}%)")
    base = _lat_s(data, "llama-7b", "base")
    ratio = h["vs_base_latency_x"].get("llama-7b")
    if base is not None and ratio is not None:
        p_base = paper.LLAMA_7B["latency_s"]["base"]
        verdict = ("matches" if _within(ratio, paper.HPIPE_VS_BASE_LATENCY_X,
                                        paper.HPIPE_VS_BASE_LATENCY_X)
                   else "is below" if ratio < paper.HPIPE_VS_BASE_LATENCY_X else "is above")
        out.append(
            f"HPipe over Base on LLaMA-7B: ours {ratio:.2f}x {verdict} the paper's "
            f"{paper.HPIPE_VS_BASE_LATENCY_X}x mostly because our Base predicts {base:.1f} s "
            f"against the paper's measured {p_base} s ({100 * (base / p_base - 1):+.0f}%): the "
            "roofline runs each whole-prompt layer at ~70% of spec-sheet peak, which a P100 in "
            f"the paper's Base evidently did not reach; {hp_side}.")
    for key, ref, (lo, hi), what in (
        ("vs_gpipe_latency_reduction", "gpipe", paper.HPIPE_VS_GPIPE_LATENCY_REDUCTION,
         "latency reduction over GPipe"),
        ("vs_terapipe_latency_reduction", "terapipe", paper.HPIPE_VS_TERAPIPE_LATENCY_REDUCTION,
         "latency reduction over TeraPipe"),
    ):
        ours = h[key].get("llama-7b")
        ref_lat = _lat_s(data, "llama-7b", ref)
        if ours is None or ref_lat is None:
            out.append(f"No {what} to compare: {ref} or HPipe did not run.")
            continue
        implied = (p_hp / (1 - lo), p_hp / (1 - hi))  # the paper's ref latency, from its ratio
        verdict = ("matches" if _within(ours, lo, hi) else
                   "is below" if ours < lo else "is above")
        ref_side = ("within" if implied[0] * 0.9 <= ref_lat <= implied[1] * 1.1 else
                    "below" if ref_lat < implied[0] else "above")
        out.append(
            f"HPipe's {what} on LLaMA-7B: ours {100 * ours:.1f}% {verdict} the paper's "
            f"{100 * lo:.0f}-{100 * hi:.0f}%; the paper's figures imply its {ref} took "
            f"{implied[0]:.2f}-{implied[1]:.2f} s and ours predicts {ref_lat:.2f} s ({ref_side} "
            f"that range), while {hp_side}.")
    gp = h["vs_gpipe_throughput_x"]
    if all(v is not None for v in gp.values()):
        lo, hi = paper.HPIPE_VS_GPIPE_THROUGHPUT_X
        vals = " / ".join(f"{v:.2f}x" for v in gp.values())
        ok = all(_within(v, lo, hi) for v in gp.values())
        out.append(f"HPipe over GPipe in throughput: ours {vals} "
                   + ("matches" if ok else "differs from")
                   + f" the paper's {lo}-{hi}x (same latencies as above: throughput is "
                   "batch x tokens over latency, so the ratio is the latency ratio).")
    e = h["dyn_energy_reduction_vs_next_best"].get("llama-7b")
    if e is not None:
        if e > 0:
            out.append(f"HPipe has the lowest dynamic energy on LLaMA-7B in ours too, {100 * e:.1f}% "
                       f"below the next-best method against the paper's {100 * paper.HPIPE_DYNAMIC_ENERGY_REDUCTION:.1f}% "
                       "below the others; our energy is spec-sheet power times simulated busy "
                       "time, not NVML readings.")
        else:
            out.append(
                f"HPipe does not have the lowest dynamic energy in ours ({100 * -e:.1f}% above "
                "the lowest method), unlike the paper's 68.2% reduction: in our model dynamic "
                "energy is (busy - idle power) x busy time, every method does the same FLOPs, "
                "and HPipe does them in smaller slices (below the whole-prompt rate) with more "
                "layers on the 3090s, whose dynamic power (320 W) exceeds the P100's (220 W); "
                "the paper measured with NVML on real GPUs, where idle waiting also burns "
                "power above the idle floor.")
    return out


def _latency_rows(data: dict) -> list[str]:
    rows = ["| model | method | paper latency (s) | ours (s) | paper k tok/s | ours k tok/s |",
            "|---|---|---|---|---|---|"]
    for model in MAIN:
        p = paper.BY_MODEL[model]
        for method in ("base", "gpipe", "terapipe", "hpipe"):
            r = _m(data, model, method)
            plat = p["latency_s"].get(method)
            ptp = p["throughput_tok_s"].get(method)
            ours = f"{r['latency_s']:.3f}" if r.get("runs") else (
                "OOM" if r.get("oom_devices") else "infeasible")
            ours_tp = f"{r['throughput_tok_s'] / 1e3:.2f}" if r.get("runs") else "-"
            rows.append(f"| {model} | {method} | {plat if plat else '-'} | {ours} | "
                        f"{ptp / 1e3 if ptp else '-'} | {ours_tp} |")
    return rows


def _memory_rows(data: dict) -> list[str]:
    names = list(_m(data, "llama-7b", "hpipe")["memory_mb"])
    rows = ["| model | method | source | " + " | ".join(names) + " |",
            "|---|---|---|" + "---|" * len(names)]
    for model in MAIN:
        for method in ("base", "hpipe"):
            pm = paper.BY_MODEL[model]["memory_mb"][method]
            rows.append(f"| {model} | {method} | paper | "
                        + " | ".join("OOM" if v is None else str(v) for v in pm) + " |")
            r = _m(data, model, method)
            oom = set(r.get("oom_devices", []))
            cells = ["OOM" if n in oom else ("-" if v == 0 else str(v))
                     for n, v in r["memory_mb"].items()]
            rows.append(f"| {model} | {method} | ours | " + " | ".join(cells) + " |")
    return rows


def write_report(data: dict, path: str | Path) -> Path:
    h = data["headline"]
    L = []  # noqa: N806 (the report's lines)
    L += ["# HPipe paper experiments, reproduced on the simulator", "",
          "Every number of ours is a *prediction*: the plans come from hpipe's planners and are "
          "timed by the exact simulator with the analytic roofline cost model on spec-sheet "
          "figures of the `paper` cluster (4 x P100 + 2 x RTX 3090, PCIe inside hosts, 1 GbE "
          "between). The paper's numbers are measurements on real hardware with PyTorch. "
          "Differences in absolute times are expected; the ratios are the comparison that "
          "matters.", ""]
    L += ["## Headline ratios", "", "| ratio | paper | ours (LLaMA-7B / GPT3-2.7B) |", "|---|---|---|"]
    for key, label, p in (
        ("vs_base_latency_x", "HPipe vs Base, latency", f"{paper.HPIPE_VS_BASE_LATENCY_X}x"),
        ("vs_gpipe_throughput_x", "HPipe vs GPipe, throughput",
         "{}-{}x".format(*paper.HPIPE_VS_GPIPE_THROUGHPUT_X)),
        ("vs_gpipe_latency_reduction", "HPipe vs GPipe, latency reduction", "51-56%"),
        ("vs_terapipe_latency_reduction", "HPipe vs TeraPipe, latency reduction", "33.1-39.3%"),
        ("dyn_energy_reduction_vs_next_best", "HPipe dynamic energy below next-best", "68.2%"),
    ):
        vals = [h[key].get(m) for m in MAIN]
        ours = f"{_range(vals)}x" if key.endswith("_x") else _pct(vals)
        L.append(f"| {label} | {p} | {ours} |")
    L += ["", *[f"- {s}" for s in comparison_sentences(data)], ""]
    L += ["```", *headline_lines(data), "```", ""]
    L += [*tensor_parallel_lines(data), ""]
    L += [*objective_lines(data), ""]
    L += ["## Latency and throughput (all seven methods)", ""]
    for model in MAIN:
        L += [f"### {model} (batch {data['models'][model]['batch']}, 2048 tokens)", "",
              (Path(path).parent / f"{model}_performance.md").read_text(), ""]
    L += ["### Paper beside ours", "", *_latency_rows(data), ""]
    L += ["## Energy", "", "Dynamic = sum over devices of (busy - idle power) x busy time; total "
          "adds idle power over the whole run (algorithms.md section 2).", ""]
    for model in MAIN:
        L += [f"### {model}", "", (Path(path).parent / f"{model}_energy.md").read_text(), ""]
    L += ["## Memory per device (MB)", "", *_memory_rows(data), "",
          *[f"- {s}" for s in memory_sentences(data)], ""]
    for model in MAIN:
        L += [f"### {model}, all methods", "",
              (Path(path).parent / f"{model}_memory.md").read_text(), ""]
    L += ["## Timeline figure: even split vs HPipe", ""]
    for model in MAIN:
        L += [f"![{model} timeline]({model}_timeline.png)", "",
              f"Chrome traces (open in https://ui.perfetto.dev): `{model}_timeline_trace.json` "
              f"(all panels), `{model}_even_uniform_trace.json`, `{model}_hpipe_trace.json`.", ""]
    L += [*[f"- {s}" for s in timeline_sentences(data)], ""]
    L += ["## Slicing ablation: uniform 1..128 slices vs dynamic", "", "![ablation](ablation.png)", ""]
    for model in MAIN:
        L += [f"### {model}", "", (Path(path).parent / f"{model}_ablation.md").read_text(), ""]
    L += [*[f"- {s}" for s in ablation_sentences(data)], ""]
    L += ["## Model scaling", "", (Path(path).parent / "scaling.md").read_text(), "",
          "### Sequence-length sweep (llama-2-7b-32k, batch 1; batch 6 at 32k does not fit "
          "the cluster's memory)", "", (Path(path).parent / "seq_sweep.md").read_text(), "",
          "![sweep](seq_sweep.png)", ""]
    path = Path(path)
    path.write_text("\n".join(L) + "\n")
    return path


def tensor_parallel_lines(data: dict) -> list[str]:
    """Beyond the paper: what HPipe's search finds when a stage may be a TP pair."""
    tp = data.get("tensor_parallel")
    if not tp:
        return []
    out = ["HPipe above is the paper's: one device per stage. hpipe's search can also give a "
           "stage to a tensor-parallel pair inside a host (the default of `hpipe plan` and "
           "`hpipe simulate`; `--no-tp` gives the paper's method):", ""]
    for model, r in tp.items():
        pure = _m(data, model, "hpipe")
        if not (r.get("runs") and pure.get("runs")):
            out.append(f"- {model}: {_lat_text(r)} with TP pairs allowed.")
            continue
        stages = ", ".join(f"{devs} L{a}-{b - 1}" for devs, (a, b) in r["layers"].items())
        change = 1 - r["latency_s"] / pure["latency_s"]
        out.append(f"- {model}: {r['latency_s']:.3f} s with TP pairs allowed vs "
                   f"{pure['latency_s']:.3f} s as a pure pipeline "
                   + (f"({100 * change:.1f}% less): {stages}." if change > 0
                      else "(it keeps the pure pipeline)."))
    return out


def objective_lines(data: dict) -> list[str]:
    """Beyond the paper: HPipe's plan per objective, and where decode changes it."""
    from hpipe.report.tables import objectives_table

    o = data.get("objectives")
    if not o:
        return []
    rows = {r["objective"]: r for r in o["rows"]}
    out = ["## Planning for decode as well", "",
           f"The paper plans the prefill. A request then decodes {o['max_new_tokens']} tokens, "
           "each step reading every weight (bound by memory bandwidth, not FLOPs), and a "
           "server runs many requests at once. HPipe's plan for each objective, "
           f"{o['model']}, one request of {o['seq_len']} + {o['max_new_tokens']} tokens "
           f"(tokens/s: {o['concurrency']} such requests decoding together):", "",
           objectives_table(o["rows"], markdown=True), ""]
    pre = rows.get("prefill")
    if not pre or "error" in pre:
        return out
    for name, what in (("latency", "one request's whole latency"),
                       ("throughput", f"{o['concurrency']} requests' output tokens/s")):
        r = rows.get(name)
        if not r or "error" in r:
            continue
        if r["layers"] == pre["layers"]:
            out.append(f"- For {what}, the prefill's split is also the best.")
            continue
        split = " ".join(f"{'+'.join(names)}:{n}" for *names, n in r["layers"])
        out.append(
            f"- For {what}, decode changes the plan to {split}: time to first token "
            f"{r['ttft_s']:.3f} s (prefill plan {pre['ttft_s']:.3f} s), "
            f"{r['tpot_s'] * 1e3:.1f} ms per output token ({pre['tpot_s'] * 1e3:.1f} ms), "
            f"{r['latency_s']:.2f} s in all ({pre['latency_s']:.2f} s), "
            f"{r['decode_tok_s']:.0f} tokens/s ({pre['decode_tok_s']:.0f}).")
    return out


def _lat_text(r: dict) -> str:
    return f"{r['latency_s']:.3f} s" if r.get("runs") else "no plan"


def memory_sentences(data: dict) -> list[str]:
    out = []
    llama_base = _m(data, "llama-7b", "base")
    gpt_base = _m(data, "gpt3-2.7b", "base")
    p_base = paper.LLAMA_7B["memory_mb"]["base"]
    ours = [v for v in llama_base["memory_mb"].values() if v]
    if ours:
        out.append(
            f"LLaMA-7B Base: ours {min(ours)}-{max(ours)} MB per device vs the paper's "
            f"{min(p_base)}-{max(p_base)} MB; ours counts weights, the bs x L KV cache and the "
            "largest workspace by formula, while the paper's nvidia-smi figures include the "
            "PyTorch caching allocator's reserve and fragmentation.")
    if gpt_base.get("oom_devices"):
        out.append(f"GPT3-2.7B Base is OOM on {', '.join(gpt_base['oom_devices'])} in ours, as "
                   "in the paper: batch 12 x 2048 tokens of whole-prompt attention workspace does "
                   "not fit a 16 GB P100.")
    else:
        peak = max(gpt_base["memory_mb"].values())
        out.append(f"GPT3-2.7B Base fits in our memory model (peak {peak} MB of a 16384 MB "
                   "P100) although the paper reports OOM: our formula for weights, KV cache and "
                   "whole-prompt attention workspace leaves out the PyTorch allocator's reserve "
                   "and fragmentation, which the paper's run paid.")
    hp = _m(data, "llama-7b", "hpipe")
    layers = {n: b - a for n, (a, b) in hp.get("layers", {}).items()}
    rtx = sum(v for n, v in layers.items() if n.startswith("3090"))
    if layers:
        out.append(
            f"LLaMA-7B HPipe: our workload DP gives the two 3090s {rtx} of "
            f"{sum(layers.values())} layers ({', '.join(f'{n} {v}' for n, v in layers.items())}),"
            " so their memory is higher than the P100s' as in the paper (8713 and 10087 MB vs "
            "1873-3143 MB), but less lopsided: the paper's 3090s hold nearly 4x the P100s' "
            "memory, i.e. far more layers, because its measured P100s were slower relative to "
            "the 3090s than the spec-sheet ratio our roofline uses.")
    return out


def timeline_sentences(data: dict) -> list[str]:
    out = []
    for model, panels in data.get("timeline", {}).items():
        even = next(v for k, v in panels.items() if k.startswith("even"))
        hp = next(v for k, v in panels.items() if k.startswith("HPipe"))
        rtx_even = [u for n, u in even["utilisation"].items() if n.startswith("3090")]
        rtx_hp = [u for n, u in hp["utilisation"].items() if n.startswith("3090")]
        if rtx_even and rtx_hp:
            out.append(
                f"{model}: with the even split the 3090s are busy "
                f"{100 * max(rtx_even):.0f}% of the time at most (waiting for the P100s, as in the "
                f"paper's figure); HPipe raises that to {100 * min(rtx_hp):.0f}%+ and cuts latency "
                f"from {even['latency_s']:.2f} s to {hp['latency_s']:.2f} s.")
        sl = data["models"][model]["methods"]["hpipe"].get("slices", [])
        if sl:
            tapering = sl[0] > 1.2 * sl[-1]
            out.append(
                f"{model}: HPipe's {len(sl)} slices run from {sl[0]} to {sl[-1]} tokens; "
                + ("longer first and shorter later, as in the paper's figure." if tapering else
                   "nearly uniform, not the paper's clearly shrinking slices: at 2k tokens our "
                   "cost model makes a slice's cost grow only a little with its prefix "
                   "(attention is a small share of the FLOPs there), so the DP gains "
                   "little by tapering and the achievable-rate curve favours equal, "
                   "tile-friendly slices."))
    return out


def ablation_sentences(data: dict) -> list[str]:
    out = []
    for model, d in data.get("ablation", {}).items():
        best_n = min(d["uniform"], key=lambda n: d["uniform"][n]["latency_s"])
        best = d["uniform"][best_n]["latency_s"]
        dyn = d["dynamic_latency_s"]
        verdict = ("beats" if dyn < best * 0.999 else
                   "ties" if dyn <= best * 1.001 else "loses to")
        out.append(f"{model}: dynamic slicing ({len(d['dynamic_slices'])} slices, {dyn:.3f} s) "
                   f"{verdict} the best uniform setting ({best_n} slices, {best:.3f} s)"
                   + (", as the paper finds" if verdict == "beats" else
                      ", where the paper finds dynamic strictly better") + "; the U shape "
                   "(bubbles at few slices, under-used GPUs at many) is the paper's.")
        anyc = d.get("best_any_count")
        if anyc:
            gain = 1 - dyn / anyc["latency_s"]
            sizes = sorted(set(d["dynamic_slices"]))
            kind = ("equal slices" if len(sizes) <= 2 and sizes[-1] - sizes[0] <= 1 else
                    f"slices of {sizes[0]}-{sizes[-1]} tokens")
            out.append(
                f"{model}, against every count of equal slices from 1 to 128: the best is "
                f"{anyc['num_slices']} slices at {anyc['latency_s']:.3f} s; HPipe's plan "
                f"({kind}) "
                + (f"is {100 * gain:.1f}% faster." if gain > 0.0005 else
                   "equals it: the planner keeps an equal slicing wherever one wins, so the "
                   "DP's own advantage here is nil."))
    return out
