"""Timeline -> Chrome trace JSON (the "JSON Object Format"; opens in Perfetto and chrome://tracing).

Layout: one trace *process* per timeline (so a predicted and a measured run, or an even split and
HPipe, sit one above the other), one *thread* per device row for compute, and a second thread
per row for its outgoing sends. Sends get their own track because with overlapped communication
they run concurrently with the next compute, and "X" events on one track must nest.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from hpipe.timeline import Interval, Timeline

US_PER_S = 1e6  # trace timestamps are in microseconds


def timeline_label(tl: Timeline) -> str:
    """e.g. 'hpipe (simulated)' or 'hpipe (measured, emulated)'."""
    tags = [tl.source] + (["emulated"] if tl.emulated else [])
    return f"{tl.method} ({', '.join(tags)})"


def _event_name(iv: Interval) -> str:
    if iv.phase == "decode":
        return f"decode {iv.slice_index}" if iv.kind == "compute" else f"send token {iv.slice_index}"
    what = f"mb{iv.microbatch} slice {iv.slice_index} ({iv.tokens} tok)"
    return what if iv.kind == "compute" else f"send {what}"


def _tids(row: int) -> tuple[int, int]:
    """(compute tid, send tid) of a row: adjacent, so each device's send track sits under it."""
    return 2 * row, 2 * row + 1


def chrome_trace(timelines: Sequence[Timeline], *, labels: Sequence[str] | None = None) -> dict:
    """A trace dict with one process per timeline; ``labels`` name the processes."""
    if labels is not None and len(labels) != len(timelines):
        raise ValueError(f"got {len(labels)} labels for {len(timelines)} timelines; give one each")
    events: list[dict] = []
    meta = []
    for pid, tl in enumerate(timelines):
        label = labels[pid] if labels is not None else timeline_label(tl)
        events.append({"ph": "M", "pid": pid, "name": "process_name", "args": {"name": label}})
        events.append({"ph": "M", "pid": pid, "name": "process_sort_index",
                       "args": {"sort_index": pid}})
        for row, name in enumerate(tl.row_names):
            for tid, suffix in zip(_tids(row), ("", " send")):
                events.append({"ph": "M", "pid": pid, "tid": tid, "name": "thread_name",
                               "args": {"name": f"{row}: {name}{suffix}"}})
                events.append({"ph": "M", "pid": pid, "tid": tid, "name": "thread_sort_index",
                               "args": {"sort_index": tid}})
        for iv in tl.intervals:
            compute_tid, send_tid = _tids(iv.row)
            events.append({
                "ph": "X",
                "pid": pid,
                "tid": compute_tid if iv.kind == "compute" else send_tid,
                "name": _event_name(iv),
                "cat": f"{iv.phase},{iv.kind}",
                "ts": iv.start_s * US_PER_S,
                "dur": iv.duration_s * US_PER_S,
                "args": {"unit": iv.unit, "slice": iv.slice_index, "microbatch": iv.microbatch,
                         "tokens": iv.tokens, "phase": iv.phase, "kind": iv.kind,
                         **({"lent_threads": iv.threads} if iv.threads else {})},
            })
        meta.append({
            "label": label, "source": tl.source, "method": tl.method, "emulated": tl.emulated,
            "predicted": tl.source == "simulated", "batch": tl.batch, "seq_len": tl.seq_len,
            "prefill_latency_s": tl.prefill_latency_s, "latency_s": tl.latency_s,
            "rows": list(tl.row_names),
        })
    # "otherData" is the format's free-form metadata slot; Perfetto shows it under "Info".
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": {"hpipe": meta}}


def write_chrome_trace(
    path: str | Path, timelines: Sequence[Timeline], *, labels: Sequence[str] | None = None
) -> Path:
    """Write ``chrome_trace(timelines)`` to ``path``; returns the path."""
    path = Path(path)
    path.write_text(json.dumps(chrome_trace(timelines, labels=labels)))
    return path
