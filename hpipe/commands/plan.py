"""``hpipe plan``: plan one method and print it (devices, layers, memory, slices, latency).

    hpipe plan --cluster paper --model llama-7b --seq-len 2048 --batch 6
    hpipe plan --cluster my.yaml --model ./Llama-2-7b-hf --method manual --layers 4,4,4,4,8,8
    hpipe plan ... --json        # Plan.to_dict() plus a "summary" (a plan file for hpipe run)
    hpipe plan ... --objective throughput --concurrency 16 --max-new-tokens 256

HPipe plans for one objective: "prefill" (the prompt's latency, the paper's), "latency" (time to
the last of --max-new-tokens tokens) or "throughput" (output tokens/s with --concurrency
requests decoding, their KV caches counted). The table under the plan shows HPipe's plan for
each objective and how it does on all of them.

When nothing fits, it says which device runs out of memory by how much and what would fit.
"""

from __future__ import annotations

import argparse
import json

from hpipe.catalog import GIB  # device memory is sold in GiB ("16 GB" P100 = 16 GiB)
from hpipe.commands.settings import add_setting_args, in_range, int_list, load_settings
from hpipe.spec import METHODS, OBJECTIVES


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("plan", help="plan a method: devices, layers, memory, slices",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_setting_args(p)
    p.add_argument("--method", default="hpipe", choices=METHODS)
    p.add_argument("--layers", type=int_list, default=None,
                   help="manual layer counts per device in cluster order, 0 = unused")
    p.add_argument("--slices", type=int_list, default=None,
                   help="manual token slices summing to --seq-len, e.g. 512,512,512,512")
    add_objective_args(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run)
    return p


def add_objective_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--objective", default="prefill", choices=OBJECTIVES,
                   help="what HPipe's plan minimises (default: the prefill's latency)")
    p.add_argument("--max-new-tokens", type=in_range(int, 1), default=256,
                   help="output tokens per request, for 'latency' and 'throughput' "
                        "(default %(default)s)")
    p.add_argument("--concurrency", type=in_range(int, 1), default=16,
                   help="requests decoding at once, for 'throughput' (default %(default)s)")


def summarise(plan, cost) -> dict:
    """Per-stage devices, layers and memory, and the prediction; what the text view prints."""
    from hpipe.lending import lent_threads
    from hpipe.plan.evaluate import plan_memory_bytes

    mem = dict(plan_memory_bytes(plan, cost))
    num_slices = len(plan.slices)  # prefill units go micro-batch by micro-batch
    return {
        "method": plan.method,
        "predicted_latency_s": plan.predicted_latency_s,
        "throughput_tok_s": plan.batch * plan.seq_len / plan.predicted_latency_s,
        "stages": [
            {"devices": [plan.cluster.devices[d].name for d in s.devices],
             "layers": [s.layer_start, s.layer_stop],
             "memory_bytes": mem[j],
             "device_memory_bytes": min(plan.cluster.devices[d].memory_bytes for d in s.devices)}
            for j, s in enumerate(plan.stages)
        ],
        "unused_devices": [d.name for i, d in enumerate(plan.cluster.devices)
                           if all(i not in s.devices for s in plan.stages)],
        "num_slices": len(plan.slices),
        "num_microbatches": plan.num_microbatches,
        "slice_table_lengths": len(plan.slice_table),
        # Prefill computes that run alone on their host, on its idle workers' threads too.
        "lent_computes": [
            {"stage": s, "device": plan.cluster.devices[plan.stages[s].device].name,
             "microbatch": u // num_slices, "slice": u % num_slices, "threads": k}
            for (s, u), k in sorted(lent_threads(plan).items())],
    }


def describe(plan, summary: dict) -> str:
    lines = [f"{plan.method}: {plan.model.name}, batch {plan.batch} x {plan.seq_len} tokens, "
             f"{plan.dtype}, cluster {plan.cluster.name!r}"
             + ("  (emulated devices)" if plan.cluster.emulated else "")]
    for s in summary["stages"]:
        used, cap = s["memory_bytes"], s["device_memory_bytes"]
        lines.append(f"  {'+'.join(s['devices']):<18} layers [{s['layers'][0]:>3}, "
                     f"{s['layers'][1]:>3})  memory {used / GIB:5.1f} / {cap / GIB:5.1f} GiB")
    if summary["unused_devices"]:
        lines.append(f"  unused: {', '.join(summary['unused_devices'])}")
    sl = list(plan.slices)
    shown = sl if len(sl) <= 32 else sl[:32] + ["..."]
    lines.append(f"  slices ({len(sl)}): {shown}"
                 + (f"; {plan.num_microbatches} micro-batches" if plan.num_microbatches > 1
                    else ""))
    lent = summary["lent_computes"]
    if lent:
        shown = ", ".join(f"slice {c['slice']} on {c['device']}"
                          + (f" (micro-batch {c['microbatch']})" if plan.num_microbatches > 1
                             else "") for c in lent[:6]) + (", ..." if len(lent) > 6 else "")
        lines.append(f"  run alone on their host, on {lent[0]['threads']} threads (its idle "
                     f"workers' too): {shown}")
    if plan.slice_table:
        lines.append(f"  slicing schemes stored for {len(plan.slice_table)} prompt lengths "
                     f"({plan.slice_table[0][0]}..{plan.slice_table[-1][0]} tokens)")
    lines.append(f"  predicted latency {plan.predicted_latency_s:.3f} s, "
                 f"{summary['throughput_tok_s']:.0f} tokens/s (simulated)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from hpipe.plan.api import plan_method
    from hpipe.plan.compare import compare_objectives
    from hpipe.report.tables import objectives_table

    cluster, model, cost = load_settings(args)
    manual = args.method == "manual" or args.layers or args.slices
    objective = args.objective if args.method == "hpipe" and not manual else "prefill"
    plan = plan_method(args.method, model=model, cluster=cluster, batch=args.batch,
                       seq_len=args.seq_len, dtype=args.dtype, cost=cost, layers=args.layers,
                       slices=args.slices, grain_tokens=args.grain_tokens,
                       allow_tp=args.allow_tp, objective=objective,
                       max_new_tokens=args.max_new_tokens, concurrency=args.concurrency)
    summary = summarise(plan, cost)
    objectives = None
    if args.method == "hpipe" and not manual:
        objectives = compare_objectives(
            model=model, cluster=cluster, batch=args.batch, seq_len=args.seq_len,
            dtype=args.dtype, cost=cost, max_new_tokens=args.max_new_tokens,
            concurrency=args.concurrency, allow_tp=args.allow_tp,
            grain_tokens=args.grain_tokens)
    if args.json:
        extra = {"objectives": objectives} if objectives is not None else {}
        print(json.dumps({**plan.to_dict(), "summary": summary, **extra}, indent=1))
        return 0
    print(describe(plan, summary))
    if objectives is not None:
        print(f"\nHPipe's plan per objective ({args.max_new_tokens} new tokens; "
              f"tokens/s with {args.concurrency} requests decoding):")
        print(objectives_table(objectives))
    return 0
