"""``hpipe simulate``: plan one method (or all) and time it with the exact simulator.

Prints a readable summary (or ``--json``), and writes the chosen method's timeline as a Chrome
trace (``--trace``) and a PNG Gantt chart (``--png``); with ``--method all`` the table puts
every method side by side and the PNG stacks them on one time axis.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hpipe.commands.settings import (
    add_setting_args,
    in_range,
    int_list,
    load_settings,
    prepare_output,
)
from hpipe.errors import InfeasiblePlanError, PlanMismatchError
from hpipe.spec import METHODS, OBJECTIVES

METHOD_CHOICES = tuple(m for m in METHODS if m != "manual") + ("all",)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("simulate", help="plan a method (or all) and time it exactly",
                              description=__doc__)
    add_setting_args(p)
    p.add_argument("--method", default="hpipe", choices=METHOD_CHOICES)
    p.add_argument("--max-new-tokens", type=in_range(int, 0), default=0,
                   help="also time N output tokens (N - 1 decode steps after the prefill): "
                        "TTFT, time per output token, total")
    p.add_argument("--objective", default="prefill", choices=OBJECTIVES,
                   help="what HPipe's plan minimises; 'latency' and 'throughput' need "
                        "--max-new-tokens")
    p.add_argument("--concurrency", type=in_range(int, 1), default=16,
                   help="requests decoding at once, for --objective throughput")
    p.add_argument("--plan", type=Path,
                   help="time this plan (from 'hpipe plan --json') instead of planning; it "
                        "carries its model, cluster, batch, length and dtype")
    p.add_argument("--layers", type=int_list,
                   help="a manual split: layer count per device, e.g. 8,8,4,4,4,4")
    p.add_argument("--slices", type=int_list,
                   help="a manual slicing of the prompt, e.g. 1024,512,512")
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


def _given_plan(args, steps: int):
    """(cluster, model, {method: result}) for a plan file or a manual --layers/--slices."""
    from hpipe.cost import cost_model
    from hpipe.plan.api import plan_method
    from hpipe.plan.compare import result_from_plan
    from hpipe.plan.plan import read_plan

    if args.method not in ("hpipe", "manual"):
        raise PlanMismatchError(f"--plan, --layers and --slices time one given plan; they do "
                                f"not go with --method {args.method}")
    if args.plan is not None:
        if args.layers or args.slices:
            raise PlanMismatchError("give either --plan or --layers/--slices, not both")
        plan = read_plan(args.plan)
        cost = cost_model(plan.model, plan.cluster, plan.dtype, profile=args.profile)
        args.batch, args.seq_len, args.dtype = plan.batch, plan.seq_len, plan.dtype
    else:
        cluster, model, cost = load_settings(args)
        plan = plan_method("manual", model=model, cluster=cluster, batch=args.batch,
                           seq_len=args.seq_len, dtype=args.dtype, cost=cost,
                           layers=args.layers, slices=args.slices, allow_tp=args.allow_tp)
    args.method = plan.method
    return plan.cluster, plan.model, {plan.method: result_from_plan(plan, cost,
                                                                    num_decode_steps=steps)}


def run(args: argparse.Namespace) -> int:
    from hpipe.plan.compare import PAPER_METHODS, evaluate_methods
    from hpipe.report.gantt import plot_timelines
    from hpipe.report.tables import decode_table, memory_table, performance_table
    from hpipe.report.trace import write_chrome_trace

    prepare_output(args.trace, "--trace")
    prepare_output(args.png, "--png")
    steps = max(0, args.max_new_tokens - 1)
    if args.objective != "prefill" and not args.max_new_tokens:
        raise PlanMismatchError(f"--objective {args.objective} plans for output tokens; give "
                                "--max-new-tokens N")
    if args.plan is not None or args.layers or args.slices:
        cluster, model, results = _given_plan(args, steps)
    else:
        cluster, model, cost = load_settings(args)
        methods = PAPER_METHODS if args.method == "all" else (args.method,)
        results = evaluate_methods(methods, model=model, cluster=cluster, batch=args.batch,
                                   seq_len=args.seq_len, dtype=args.dtype, cost=cost,
                                   grain_tokens=args.grain_tokens, allow_tp=args.allow_tp,
                                   num_decode_steps=steps, objective=args.objective,
                                   concurrency=args.concurrency)
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
    if steps:
        print()
        print(decode_table(results))
    print()
    print(memory_table(results))
    for flag, path in (("trace", args.trace), ("png", args.png)):
        if path:
            print(f"wrote {flag}: {path}")
    return 0
