"""``hpipe simulate``: plan one method (or all) and time it with the exact simulator.

Prints a readable summary (or ``--json``), and writes the chosen method's timeline as a Chrome
trace (``--trace``) and a PNG Gantt chart (``--png``); with ``--method all`` the table puts
every method side by side and the PNG stacks them on one time axis.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hpipe.commands.settings import add_setting_args, load_settings, prepare_output
from hpipe.errors import InfeasiblePlanError
from hpipe.spec import METHODS

METHOD_CHOICES = tuple(m for m in METHODS if m != "manual") + ("all",)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("simulate", help="plan a method (or all) and time it exactly",
                              description=__doc__)
    add_setting_args(p)
    p.add_argument("--method", default="hpipe", choices=METHOD_CHOICES)
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--trace", type=Path, help="write a Chrome trace (Perfetto) here")
    p.add_argument("--png", type=Path, help="write a Gantt chart PNG here")
    p.set_defaults(func=run)
    return p


def _plan_summary(plan) -> dict:
    return {
        "stages": [{"devices": [plan.cluster.devices[d].name for d in s.devices],
                    "layers": [s.layer_start, s.layer_stop]} for s in plan.stages],
        "slices": list(plan.slices),
        "num_microbatches": plan.num_microbatches,
    }


def _describe(result) -> str:
    plan = result.plan
    lines = [f"{result.method}: {result.status}"]
    if plan is not None:
        for s in plan.stages:
            names = "+".join(plan.cluster.devices[d].name for d in s.devices)
            lines.append(f"  {names:<16} layers [{s.layer_start}, {s.layer_stop})")
        sl = list(plan.slices)
        lines.append(f"  slices ({len(sl)}): {sl if len(sl) <= 24 else sl[:24] + ['...']}"
                     + (f", {plan.num_microbatches} micro-batches" if plan.num_microbatches > 1
                        else ""))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from hpipe.plan.compare import PAPER_METHODS, evaluate_methods
    from hpipe.report.gantt import plot_timelines
    from hpipe.report.tables import memory_table, performance_table
    from hpipe.report.trace import write_chrome_trace

    prepare_output(args.trace, "--trace")
    prepare_output(args.png, "--png")
    cluster, model, cost = load_settings(args)
    methods = PAPER_METHODS if args.method == "all" else (args.method,)
    results = evaluate_methods(methods, model=model, cluster=cluster, batch=args.batch,
                               seq_len=args.seq_len, dtype=args.dtype, cost=cost,
                               grain_tokens=args.grain_tokens, allow_tp=args.allow_tp)
    if args.method != "all" and results[args.method].timeline is None:
        raise InfeasiblePlanError(f"{args.method} is infeasible: {results[args.method].error}")
    drawn = [r for r in results.values() if r.timeline is not None]
    titles = [f"{r.method}" + ("" if r.runs else f" [{r.status.split(':')[0]}]") for r in drawn]
    if args.trace:
        write_chrome_trace(args.trace, [r.timeline for r in drawn], labels=titles)
    if args.png:
        plot_timelines([r.timeline for r in drawn], args.png, titles=titles)

    setting = {"cluster": cluster.name, "model": model.name, "batch": args.batch,
               "seq_len": args.seq_len, "dtype": args.dtype}
    if args.json:
        out = {"setting": setting, "methods": {
            name: {"status": r.status, "runs": r.runs,
                   "plan": _plan_summary(r.plan) if r.plan else None,
                   "memory_bytes": dict(zip(r.device_names, r.memory_bytes)),
                   "summary": r.timeline.summary() if r.timeline else None}
            for name, r in results.items()}}
        print(json.dumps(out, indent=1))
        return 0
    print(f"{model.name}, batch {args.batch} x {args.seq_len} tokens, {args.dtype}, "
          f"cluster {cluster.name!r} ({cluster.num_devices} devices)"
          + ("  (emulated devices)" if cluster.emulated else ""))
    if args.method != "all":
        print(_describe(results[args.method]))
    print()
    print(performance_table(results))
    print()
    print(memory_table(results))
    for flag, path in (("trace", args.trace), ("png", args.png)):
        if path:
            print(f"wrote {flag}: {path}")
    return 0
