"""PNG Gantt charts of Timelines: one row per device, slices coloured, sends drawn thin.

``plot_timelines`` stacks several panels on one time axis (e.g. even split vs HPipe, so the
shorter makespan is visible at a glance) and overlays a predicted and a measured timeline of
the same run when a panel is given as a ``(predicted, measured)`` pair: predicted outlined and
hatched, measured filled.

Uses ``matplotlib.figure.Figure`` directly (Agg canvas) rather than pyplot, so no global backend
or figure state is touched and it works on headless machines.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.transforms import blended_transform_factory

from hpipe.timeline import Interval, Timeline

Panel = Timeline | tuple[Timeline, Timeline]

# Compute bar occupies the upper part of a row, its sends a thin strip under it.
_COMPUTE_Y, _COMPUTE_H = -0.40, 0.56
_SEND_Y, _SEND_H = 0.20, 0.16
_SEND_COLOR = "#444444"
_DECODE_COLOR = "#bbbbbb"
# Adjacent slices must contrast, so a cyclic qualitative map beats a gradient even at 128 slices.
_CMAP = "tab20"
_MIN_LABEL_FRACTION = 0.03  # label a bar with its token count only if it spans 3% of the axis


def _colour_key(tl: Timeline) -> str:
    """Colour by slice when the prompt is sliced, else by micro-batch (GPipe), else one colour."""
    prefill = [iv for iv in tl.intervals if iv.phase == "prefill"]
    if len({iv.slice_index for iv in prefill}) > 1:
        return "slice"
    if len({iv.microbatch for iv in prefill}) > 1:
        return "microbatch"
    return "slice"


def _colour(iv: Interval, key: str, cmap) -> str | tuple:
    if iv.phase == "decode":
        return _DECODE_COLOR
    return cmap((iv.slice_index if key == "slice" else iv.microbatch) % 20)


def _panel_title(tl: Timeline, title: str | None, measured: Timeline | None) -> str:
    head = title or tl.method
    stats = f"prefill {tl.prefill_latency_s:.3g} s, {tl.prefill_throughput_tok_s / 1e3:.3g}k tok/s"
    if measured is not None:
        stats = (f"predicted {tl.prefill_latency_s:.3g} s vs measured "
                 f"{measured.prefill_latency_s:.3g} s")
    emulated = tl.emulated or (measured is not None and measured.emulated)
    return f"{head}: {stats}" + ("  (emulated)" if emulated else "")


def _draw(ax, tl: Timeline, *, style: str, x_span_s: float) -> None:
    """Draw one timeline's bars; style 'filled', 'measured' or 'outline' (predicted, overlaid).

    Bars are grouped by (row strip, colour) into one ``broken_barh`` call each: a 128-slice,
    6-device timeline has ~1500 bars and one artist per bar makes saving slow.
    """
    cmap = _cmap()
    key = _colour_key(tl)
    groups: dict[tuple[float, float, object], list[tuple[float, float]]] = {}
    for iv in tl.intervals:
        if iv.duration_s <= 0:
            continue
        if iv.kind == "send":
            y, h, colour = iv.row + _SEND_Y, _SEND_H, _SEND_COLOR
        else:
            y, h, colour = iv.row + _COMPUTE_Y, _COMPUTE_H, _colour(iv, key, cmap)
        groups.setdefault((y, h, colour), []).append((iv.start_s, iv.duration_s))
        if (style == "filled" and iv.kind == "compute" and iv.phase == "prefill"
                and iv.duration_s >= _MIN_LABEL_FRACTION * x_span_s):
            ax.text(iv.start_s + iv.duration_s / 2, y + h / 2, str(iv.tokens), ha="center",
                    va="center", fontsize=7, color="white", clip_on=True)
    for (y, h, colour), spans in groups.items():
        if style == "outline":
            ax.broken_barh(spans, (y, h), facecolors="none", edgecolors=[colour],
                           hatch="///", linewidth=0.9)
        else:
            ax.broken_barh(spans, (y, h), facecolors=[colour], edgecolors="white",
                           linewidth=0.3, alpha=0.75 if style == "measured" else 1.0)


def _cmap():
    import matplotlib

    return matplotlib.colormaps[_CMAP]


def _rows(panel: Panel) -> tuple[str, ...]:
    tls = panel if isinstance(panel, tuple) else (panel,)
    return max((t.row_names for t in tls), key=len)


def plot_timelines(
    timelines: Sequence[Panel],
    path: str | Path,
    *,
    titles: Sequence[str] | None = None,
    row_labels: Sequence[Sequence[str] | None] | None = None,
    share_x: bool = True,
    dpi: int = 130,
) -> Path:
    """Write a PNG with one panel per entry of ``timelines``, stacked, and return its path.

    An entry is a Timeline, or a ``(predicted, measured)`` pair to overlay. ``titles`` (one per
    panel) replace the method name in each panel's title. With ``share_x`` all panels use the
    longest makespan, so a faster plan visibly ends earlier. ``row_labels`` (per panel, one per
    row, or None) replace the device names on the y axis, e.g. to add each device's layers.
    """
    if not timelines:
        raise ValueError("plot_timelines needs at least one timeline")
    if titles is not None and len(titles) != len(timelines):
        raise ValueError(f"got {len(titles)} titles for {len(timelines)} panels; give one each")
    for k, labels in enumerate(row_labels or ()):
        if labels is not None and len(labels) != len(_rows(timelines[k])):
            raise ValueError(f"panel {k}: {len(labels)} row labels for "
                             f"{len(_rows(timelines[k]))} rows; give one per device row")
    heights = [max(1, len(_rows(p))) * 0.42 + 0.9 for p in timelines]
    fig = Figure(figsize=(13, sum(heights) + 0.6), dpi=dpi)
    axes = fig.subplots(len(timelines), 1, sharex=share_x, squeeze=False,
                        gridspec_kw={"height_ratios": heights})[:, 0]
    spans = [max(t.latency_s for t in (p if isinstance(p, tuple) else (p,))) for p in timelines]
    for k, (ax, panel) in enumerate(zip(axes, timelines)):
        span = max(spans) if share_x else spans[k]
        span = span if span > 0 else 1.0
        predicted, measured = panel if isinstance(panel, tuple) else (panel, None)
        if measured is None:
            _draw(ax, predicted, style="filled", x_span_s=span)
        else:
            _draw(ax, measured, style="measured", x_span_s=span)
            _draw(ax, predicted, style="outline", x_span_s=span)
        rows = _rows(panel)
        if row_labels is not None and row_labels[k] is not None:
            rows = tuple(row_labels[k])
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels(rows, fontsize=8)
        ax.set_ylim(len(rows) - 0.5, -0.6)  # row 0 at the top: pipeline order reads downward
        ax.set_xlim(0, span * 1.01)
        ax.grid(axis="x", linewidth=0.3, alpha=0.5)
        ax.set_title(_panel_title(predicted, titles[k] if titles else None, measured),
                     fontsize=9, loc="left")
        # Utilisation at the right edge: the number that explains the makespan.
        trans = blended_transform_factory(ax.transAxes, ax.transData)
        for r, u in enumerate(predicted.utilisation()):
            text = f"{100 * u:.0f}% busy"
            if measured is not None and r < len(measured.row_names):
                text = f"{100 * u:.0f}% / {100 * measured.utilisation()[r]:.0f}%\nbusy (pred/meas)"
            ax.text(1.005, r, text, transform=trans, fontsize=7, va="center")
    axes[-1].set_xlabel("time (s)")
    legend = [Patch(facecolor=_cmap()(0), label="compute (colour = slice or micro-batch; "
                    "number = tokens)"),
              Patch(facecolor=_SEND_COLOR, label="send to next device (thin strip)")]
    if any(isinstance(p, tuple) for p in timelines):
        legend += [Patch(facecolor="none", edgecolor="black", hatch="///", label="predicted"),
                   Patch(facecolor="grey", alpha=0.75, label="measured")]
    fig.legend(handles=legend, loc="upper center", ncol=len(legend), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 0.95, 1 - 0.35 / (sum(heights) + 0.6)))
    path = Path(path)
    fig.savefig(path)
    return path
