"""Plain-text and markdown tables of method results: latency, throughput, energy, memory.

A cell of a method that cannot run shows why: "OOM" where a device's memory overflows,
"infeasible" where the planner found no arrangement. Numbers keep their units in the headers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from hpipe.plan.compare import MethodResult

MB = 2**20  # the paper's memory table is in MB as nvidia-smi shows them (MiB)


def render(headers: Sequence[str], rows: Sequence[Sequence[str]], *, markdown: bool = False) -> str:
    """Align ``rows`` under ``headers``; a GitHub markdown table when ``markdown``."""
    cells = [list(map(str, headers))] + [list(map(str, r)) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    if markdown:
        line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
        sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
        return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w)  # noqa: E731
                               for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    return "\n".join([line(cells[0]), line(["-" * w for w in widths])] + [line(r) for r in cells[1:]])


def _fmt(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}g}" if abs(x) < 10 ** digits else f"{x:.0f}"


def _cant_run(r: MethodResult) -> str | None:
    """The cell text for a method that cannot run, or None when it runs."""
    if r.oom_devices:
        return "OOM"
    if r.timeline is None or r.error is not None:
        return "infeasible"
    return None


def performance_rows(results: Mapping[str, MethodResult], *, reference: str = "base"
                     ) -> tuple[list[str], list[list[str]]]:
    """Latency, throughput, speedup over ``reference``, energy, peak memory, status per method."""
    ref = results.get(reference)
    ref_lat = ref.timeline.prefill_latency_s if ref is not None and ref.runs else None
    headers = ["method", "latency_s", "throughput_ktok_s", f"speedup_vs_{reference}",
               "dyn_energy_kJ", "total_energy_kJ", "peak_mem_MB", "status"]
    rows = []
    for name, r in results.items():
        bad = _cant_run(r)
        peak = max(r.memory_bytes) if r.memory_bytes else 0
        if bad is not None:
            rows.append([name, bad, bad, "-", "-", "-", "OOM" if r.oom_devices else
                         (str(round(peak / MB)) if peak else "-"), r.status])
            continue
        tl = r.timeline
        lat = tl.prefill_latency_s
        rows.append([
            name, _fmt(lat), _fmt(tl.prefill_throughput_tok_s / 1e3),
            f"{ref_lat / lat:.2f}x" if ref_lat else "-",
            _fmt(tl.dynamic_energy_j() / 1e3), _fmt(tl.total_energy_j() / 1e3),
            str(round(peak / MB)), r.status,
        ])
    return headers, rows


def decode_rows(results: Mapping[str, MethodResult]) -> tuple[list[str], list[list[str]]]:
    """Time to first token, time per output token, decode tokens/s and the whole request."""
    headers = ["method", "ttft_s", "tpot_ms", "decode_tok_s", "total_s", "new_tokens"]
    rows = []
    for name, r in results.items():
        bad = _cant_run(r)
        if bad is not None:
            rows.append([name, bad, bad, bad, bad, "-"])
            continue
        tl = r.timeline
        rows.append([name, _fmt(tl.ttft_s), _fmt(tl.tpot_s * 1e3), _fmt(tl.decode_tok_s),
                     _fmt(tl.latency_s), str(tl.num_decode_steps + 1)])
    return headers, rows


def objectives_rows(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """One line per objective (hpipe.plan.compare.compare_objectives): its plan's layers per
    device and how that plan does on every objective."""
    headers = ["objective", "layers per device", "slices", "ttft_s", "tpot_ms", "total_s",
               "tok_s", "fullest_mem"]
    out = []
    for r in rows:
        if "error" in r:
            out.append([r["objective"], "does not fit", "-", "-", "-", "-", "-", "-"])
            continue
        layers = " ".join(f"{'+'.join(names)}:{n}" for *names, n in r["layers"])
        if len(layers) > 60:
            layers = layers[:57] + "..."
        out.append([r["objective"], layers, str(r["num_slices"]), _fmt(r["ttft_s"]),
                    _fmt(r["tpot_s"] * 1e3), _fmt(r["latency_s"]), _fmt(r["decode_tok_s"]),
                    f"{100 * r['fullest_memory_share']:.0f}%"])
    return headers, out


def objectives_table(rows: list[dict], *, markdown: bool = False) -> str:
    return render(*objectives_rows(rows), markdown=markdown)


def memory_rows(results: Mapping[str, MethodResult]) -> tuple[list[str], list[list[str]]]:
    """MB per device in cluster order; "OOM" where need exceeds capacity, "-" for no layers."""
    first = next(iter(results.values()))
    headers = ["method"] + [f"{n}_MB" for n in first.device_names]
    rows = []
    for name, r in results.items():
        if r.timeline is None:
            rows.append([name] + ["infeasible"] * len(r.device_names))
            continue
        rows.append([name] + ["OOM" if m > c else ("-" if m == 0 else str(round(m / MB)))
                              for m, c in zip(r.memory_bytes, r.capacity_bytes)])
    rows.append(["capacity"] + [str(round(c / MB)) for c in first.capacity_bytes])
    return headers, rows


def energy_rows(results: Mapping[str, MethodResult], *, reference: str = "hpipe"
                ) -> tuple[list[str], list[list[str]]]:
    """Dynamic and total energy of the prefill, and how much more dynamic energy than HPipe."""
    ref = results.get(reference)
    ref_dyn = ref.timeline.dynamic_energy_j() if ref is not None and ref.runs else None
    headers = ["method", "dyn_energy_J", "total_energy_J", f"dyn_vs_{reference}"]
    rows = []
    for name, r in results.items():
        bad = _cant_run(r)
        if bad is not None:
            rows.append([name, bad, bad, "-"])
            continue
        dyn = r.timeline.dynamic_energy_j()
        rows.append([name, _fmt(dyn, 4), _fmt(r.timeline.total_energy_j(), 4),
                     f"{100 * (dyn / ref_dyn - 1):+.0f}%" if ref_dyn else "-"])
    return headers, rows


def performance_table(results: Mapping[str, MethodResult], *, markdown: bool = False) -> str:
    return render(*performance_rows(results), markdown=markdown)


def decode_table(results: Mapping[str, MethodResult], *, markdown: bool = False) -> str:
    return render(*decode_rows(results), markdown=markdown)


def memory_table(results: Mapping[str, MethodResult], *, markdown: bool = False) -> str:
    return render(*memory_rows(results), markdown=markdown)


def energy_table(results: Mapping[str, MethodResult], *, markdown: bool = False) -> str:
    return render(*energy_rows(results), markdown=markdown)
