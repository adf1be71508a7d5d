"""``hpipe run``: plan, then really run a model pipelined over worker processes, and report.

    hpipe run --model smollm2 --cluster local:2 --prompt-file doc.txt --question "..." \\
              --max-new-tokens 64 --compare base --trace run.json --png run.png

Everything a user can get wrong (model path, cluster, prompt length, a plan for another model or
dtype, slices that do not add up) is refused here, before any worker process starts. Under
``torchrun`` this process is one rank of a job across hosts (hpipe/runtime/job.py): rank 0
plans, opens the sessions and prints; every other rank serves them.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from hpipe.commands.settings import (
    add_calibration_argument,
    add_profile_argument,
    in_range,
    int_list,
    positive,
    prepare_output,
    read_prompt_file,
)
from hpipe.cost import cost_model
from hpipe.cost.memory import achieved_gb_s
from hpipe.errors import HPipeError, PlanMismatchError, WorkerFailedError
from hpipe.runtime.liveness import DEFAULT_LIVENESS_S
from hpipe.spec import DTYPES, METHODS, dtype_bytes


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("run", help="run a model pipelined over worker processes",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF model dir, .gguf file, or 'smollm2'")
    p.add_argument("--cluster", default=None,
                   help="'local:N' (N CPU workers here) or a cluster YAML file (default: the "
                        "--plan's cluster, else local:2)")
    p.add_argument("--method", default=None, choices=METHODS,
                   help="the planner to run (default hpipe); megatron and tpt put tensor-"
                        "parallel pairs on stages, which the runtime shards Megatron-style "
                        "(one worker per device)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", type=Path, help="read the prompt (a document) from a file")
    src.add_argument("--prompt-ids",
                     help="token ids, comma-separated; ';' separates rows of a batch")
    p.add_argument("--question",
                   help="with --prompt/--prompt-file: ask this about the text, in the model's "
                        "chat format (instruct models)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap the prompt text (with --question, if any) in the model's chat "
                        "template (default: if it has one, as 'hpipe generate' does)")
    p.add_argument("--max-new-tokens", type=in_range(int, 0), default=64)
    p.add_argument("--batch", type=in_range(int, 1), default=None,
                   help="run the prompt as a batch of B identical rows (default: 1, or the "
                        "rows of --prompt-ids)")
    p.add_argument("--plan", type=Path, help="a plan JSON from 'hpipe plan --json'")
    p.add_argument("--layers", type=int_list,
                   help="layer count per device, e.g. 12,18 (overrides the planner)")
    p.add_argument("--slices", type=int_list,
                   help="token slices, e.g. 1024,512,... (overrides the planner)")
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help="compute and wire dtype (default float32, or the --plan's)")
    p.add_argument("--temperature", type=in_range(float, 0), default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=in_range(float, 0, 1, above=True), default=1.0)
    p.add_argument("--seed", type=in_range(int, 0, 2**64 - 1), default=0)
    p.add_argument("--compare", choices=("base",), help="also run Base for real and compare")
    p.add_argument("--no-tp", dest="allow_tp", action="store_false",
                   help="keep HPipe to a pure pipeline (one device per stage); by default its "
                        "search may also pick tensor-parallel pairs inside a host")
    add_profile_argument(p)
    add_calibration_argument(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--trace", type=Path, help="write the measured timeline as a Chrome trace")
    p.add_argument("--png", type=Path, help="write measured-over-predicted timelines as a PNG")
    p.add_argument("--connect-timeout", type=positive(float), default=60.0,
                   help="seconds a worker waits to join the process group")
    p.add_argument("--liveness", type=positive(float), default=DEFAULT_LIVENESS_S,
                   help="seconds of silence after which a worker is declared stopped "
                        "(default %(default)g)")
    p.set_defaults(func=run)
    return p


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError:
        raise PlanMismatchError(f"{flag} {text!r}: expected comma-separated integers, "
                                "e.g. 12,18") from None


def prompt_rows(args, tokenizer) -> list[list[int]]:
    """The batch of prompt token ids from --prompt / --prompt-file / --prompt-ids."""
    from hpipe.errors import PromptShapeError

    if args.prompt_ids is not None:
        rows = [list(_ints(r, "--prompt-ids")) for r in args.prompt_ids.split(";") if r.strip()]
        if args.question or args.chat:
            raise PromptShapeError(f"{'--question' if args.question else '--chat'} needs text "
                                   "(--prompt or --prompt-file), not --prompt-ids")
    else:
        text = args.prompt if args.prompt is not None else read_prompt_file(args.prompt_file)
        if args.question:
            from hpipe.model.prompts import document_question

            text = document_question(text, args.question)
        # The same default as 'hpipe generate', so both commands feed the model the same ids.
        chat = args.chat if args.chat is not None else bool(tokenizer.chat_template)
        rows = [tokenizer.encode(tokenizer.chat_prompt(text) if chat else text)]
    if args.batch is not None:
        if args.batch < 1:
            raise PromptShapeError(f"--batch must be >= 1, got {args.batch}")
        if len(rows) not in (1, args.batch):
            raise PromptShapeError(f"--prompt-ids gives {len(rows)} rows but --batch is "
                                   f"{args.batch}; give one row or {args.batch}")
        rows = rows * args.batch if len(rows) == 1 else rows
    return rows


def build_plans(args, spec, cluster, *, batch: int, prompt_len: int, cost) -> list:
    """The plan to run (and Base's for --compare), all checked against the model.

    ``cost`` is the fitted model of ``--profile``, else the analytic one."""
    from hpipe.plan.api import plan_method
    from hpipe.plan.plan import read_plan
    from hpipe.runtime.request import fit_plan

    if args.plan is not None:
        if args.layers or args.slices:
            raise PlanMismatchError("give either --plan or --layers/--slices, not both")
        plan = read_plan(args.plan)
        if args.dtype is not None and args.dtype != plan.dtype:
            raise PlanMismatchError(
                f"--dtype {args.dtype} but the plan {str(args.plan)!r} was made for "
                f"{plan.dtype}; drop --dtype or re-plan with --dtype {args.dtype}")
        if args.method is not None and args.method != plan.method:
            raise PlanMismatchError(
                f"--method {args.method} but the plan {str(args.plan)!r} is a {plan.method} "
                f"plan; drop --method to run the plan, or drop --plan to plan {args.method}")
        plan = fit_plan(plan, batch=batch, prompt_len=prompt_len)
    else:
        layers, slices = args.layers, args.slices
        method = args.method or "hpipe"
        if (layers or slices) and method not in ("hpipe", "manual"):
            raise PlanMismatchError(f"--layers/--slices make a manual plan; they do not go "
                                    f"with --method {method}")
        plan = plan_method(method, model=spec, cluster=cluster, batch=batch, seq_len=prompt_len,
                           dtype=args.dtype or "float32", layers=layers, slices=slices,
                           cost=cost, allow_tp=args.allow_tp)
    plans = [plan]
    if args.compare == "base":
        plans.append(plan_method("base", model=spec, cluster=plan.cluster, batch=batch,
                                 seq_len=prompt_len, dtype=plan.dtype, cost=cost))
    return plans


def plan_file_dtype(path: Path) -> str:
    from hpipe.plan.plan import read_plan

    return read_plan(path).dtype


def resolve_cluster(args):
    """--cluster, else the --plan's cluster, else local:2. A --plan runs on the cluster it was
    made for, so a --cluster that differs from it is refused rather than ignored."""
    import dataclasses

    from hpipe.cluster import load_cluster
    from hpipe.plan.plan import read_plan

    if args.plan is None:
        return load_cluster(args.cluster or "local:2")
    planned = read_plan(args.plan).cluster
    if args.cluster is None:
        return planned
    cluster = load_cluster(args.cluster)
    if dataclasses.replace(cluster, name=planned.name) != planned:
        names = ", ".join(d.name for d in planned.devices)
        raise PlanMismatchError(
            f"--cluster {args.cluster!r} is not the cluster the plan {str(args.plan)!r} was "
            f"made for ({planned.name!r}: {names}); drop --cluster to run on the plan's, or "
            f"re-plan with 'hpipe plan --cluster {args.cluster} --json'")
    return cluster


def predicted_timeline(result, plan, cost):
    """The simulator's timeline for the same plan and the decode steps that really ran."""
    from hpipe.sim import simulate

    return simulate(plan, cost, num_decode_steps=result.num_decode_steps)


def result_summary(result, plan, predicted, tokenizer) -> dict:
    """The measured figures of one run, with the prediction beside them."""
    tl = result.timeline
    decode_s = tl.latency_s - tl.ttft_s
    decode_tokens = result.num_decode_steps * tl.batch
    busy_prefill, busy_decode = tl.busy_s("prefill"), tl.busy_s("decode")
    return {
        "method": plan.method,
        "emulated": tl.emulated,
        "batch": tl.batch,
        "prompt_tokens": tl.seq_len,
        "slices": list(plan.slices),
        "num_microbatches": plan.num_microbatches,
        "output": {
            "text": [_decode(tokenizer, row) for row in result.output_ids],
            "ids": [list(row) for row in result.output_ids],
        },
        "latency_s": tl.latency_s,
        "ttft_s": tl.ttft_s,
        "prefill_latency_s": tl.prefill_latency_s,
        "prefill_tok_s": tl.prefill_throughput_tok_s,
        "decode_tok_s": decode_tokens / decode_s if decode_tokens and decode_s > 0 else 0.0,
        "num_decode_steps": result.num_decode_steps,
        "decode_gb_s": achieved_gb_s(plan.model, batch=tl.batch, prompt_tokens=tl.seq_len,
                                     steps=result.num_decode_steps, decode_s=decode_s,
                                     elem_bytes=dtype_bytes(plan.dtype)),
        "predicted_prefill_latency_s": predicted.prefill_latency_s,
        "predicted_latency_s": predicted.latency_s,
        # One entry per device (timeline row): a tensor-parallel stage lists each member.
        "stages": [
            {"device": name, "stage": s, "tp_degree": len(plan.stages[s].devices),
             "layers": [plan.stages[s].layer_start, plan.stages[s].layer_stop],
             "busy_prefill_s": bp, "busy_decode_s": bd, "prefill_cpu_s": cpu,
             "prefill_allreduce_s": ar, "peak_memory_bytes": mem}
            for name, s, bp, bd, cpu, ar, mem in zip(
                tl.row_names, plan.row_stages, busy_prefill, busy_decode,
                result.prefill_cpu_s, result.prefill_allreduce_s, tl.peak_memory_bytes)
        ],
    }


def _decode(tokenizer, ids) -> str | None:
    try:
        return tokenizer.decode(ids)
    except HPipeError:  # a checkpoint without a tokenizer: ids only
        return None


class _Bars:
    """tqdm bars of slices and decoded tokens, on stderr, only on a terminal."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bars: dict = {}

    def __call__(self, kind: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        bar = self.bars.get(kind)
        if bar is None or done < bar.n:  # a new request started
            if bar is not None:
                bar.close()
            unit = "slice" if kind == "prefill" else "tok"
            bar = self.bars[kind] = tqdm(total=total, desc=kind, unit=unit, file=sys.stderr,
                                         leave=False)
        bar.update(done - bar.n)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


@dataclass(frozen=True)
class Prepared:
    """Everything a run needs, checked before any worker starts."""

    source: object  # hpipe.model.source.ModelSource
    plans: list  # the plan to run, then Base's with --compare
    requests: list  # one RunRequest per plan
    cost: object  # fitted to --profile or the quick calibration, else the analytic one
    calibration: object = None  # hpipe.profile.quick.QuickCalibration, when it planned


def prepare(args, *, local: bool) -> Prepared:
    """Parse and check every input, plan, and build the requests; raises HPipeError."""
    from hpipe.model.source import open_model
    from hpipe.runtime.launch import check_local_devices
    from hpipe.runtime.request import RunRequest, check_prompt, check_request

    prepare_output(args.trace, "--trace")
    prepare_output(args.png, "--png")
    source = open_model(args.model)
    spec = source.spec
    cluster = resolve_cluster(args)
    rows = prompt_rows(args, source.tokenizer)
    # The prompt first: the planner would report an empty or too long one as a --seq-len.
    check_prompt(rows, spec, max_new_tokens=args.max_new_tokens)
    # The --plan's dtype when it has one: its predictions must price what it will run.
    dtype = args.dtype or (plan_file_dtype(args.plan) if args.plan else "float32")
    calibration = None
    if args.profile is None and local:
        calibration = calibrate(args, spec, cluster, dtype, prompt_tokens=len(rows[0]))
    cost = cost_model(spec, cluster, dtype,
                      profile=calibration.profile if calibration else args.profile)
    plans = build_plans(args, spec, cluster, batch=len(rows), prompt_len=len(rows[0]), cost=cost)
    requests = [
        RunRequest(model=args.model, plan=plan, prompt_ids=tuple(map(tuple, rows)),
                   max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_p=args.top_p, seed=args.seed,
                   eos_token_ids=tuple(source.tokenizer.eos_token_ids or spec.eos_token_ids),
                   label=plan.method)
        for plan in plans]
    for req in requests:
        check_request(req, spec)
    if local:  # local workers: their devices are this machine's
        check_local_devices(plans)
    return Prepared(source=source, plans=plans, requests=requests, cost=cost,
                    calibration=calibration)


def calibrate(args, spec, cluster, dtype: str, *, prompt_tokens: int):
    """A quick calibration of local CPU workers (hpipe/profile/quick.py), measured or read from
    the cache; None when turned off, not possible, or failed (then the analytic model plans)."""
    from hpipe.profile import MIN_PROFILE_TOKENS
    from hpipe.profile.quick import (
        calibration_wanted,
        can_calibrate,
        quick_calibration,
        refresh_wanted,
    )

    if (not calibration_wanted(args.no_calibration) or not can_calibrate(cluster)
            or spec.max_seq_len < MIN_PROFILE_TOKENS):
        return None
    try:
        found = quick_calibration(args.model, cluster, dtype, prompt_tokens=prompt_tokens,
                                  max_seq_len=spec.max_seq_len,
                                  on_notice=lambda text: print(text, file=sys.stderr, flush=True),
                                  refresh=refresh_wanted(getattr(args, "recalibrate", False)))
    except (HPipeError, WorkerFailedError) as e:  # the run will say what is wrong, its own way
        print(f"hpipe run: the quick calibration failed ({e}); planning from catalog figures",
              file=sys.stderr)
        return None
    print(found.describe(), file=sys.stderr)
    return found


def run_in_sessions(args, prep: Prepared, bars, *, job=None) -> list:
    """Each plan on its own session (a session holds one plan's stages): open, submit, close.
    ``job``: the torchrun job this process is rank 0 of (None: local workers)."""
    from hpipe.session import Progress, Request, Session

    results = []
    for plan, req in zip(prep.plans, prep.requests):
        with Session.open(model=args.model, plan=plan, connect_timeout_s=args.connect_timeout,
                          liveness_s=args.liveness, job=job) as session:
            stream = session.submit(Request(
                prompt_ids=req.prompt_ids, max_new_tokens=req.max_new_tokens,
                temperature=req.temperature, top_p=req.top_p, seed=req.seed, label=req.label))
            for event in stream:
                if isinstance(event, Progress):
                    bars(event.kind, event.done, event.total)
            results.append(stream.result().result)
    return results


def run(args: argparse.Namespace) -> int:
    from hpipe.runtime.launch import torchrun_env

    env = torchrun_env()
    job = None
    if env is not None:  # this process is one rank of a job across hosts
        from hpipe.runtime.job import TorchrunJob
        from hpipe.runtime.job_worker import serve_job

        job = TorchrunJob.join(env, connect_timeout_s=args.connect_timeout,
                               liveness_s=args.liveness)
        if job.rank != 0:
            serve_job(job, args.model)  # until rank 0 has run every session
            return 0
    bars = _Bars(enabled=sys.stderr.isatty())
    try:  # a failure, Ctrl-C or SIGTERM leaves the session's block: every worker has ended
        prep = prepare(args, local=env is None)  # every check before any worker starts
        results = run_in_sessions(args, prep, bars, job=job)
    except BaseException as e:
        if job is not None:
            job.end(error=e)  # the other ranks exit saying why
        raise
    finally:
        bars.close()
    if job is not None:
        job.end()
    predicted = [predicted_timeline(r, p, prep.cost) for r, p in zip(results, prep.plans)]
    report = build_report(prep, results, predicted)
    # The report first: if a file cannot be written after all, the figures are already out.
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(format_report(report))
    if prep.calibration is not None:
        from hpipe.profile.quick import stale_hint

        hint = stale_hint(prep.calibration, report["prefill_latency_s"],
                          report["predicted_prefill_latency_s"])
        if hint:
            print(f"hpipe run: {hint}", file=sys.stderr)
    return _write_artifacts(args, results, predicted)


def build_report(prep: Prepared, results: list, predicted: list) -> dict:
    """The run's report: the main plan's figures beside ``predicted`` (its simulated
    timelines), and the comparison with Base."""
    summaries = [result_summary(r, p, pr, prep.source.tokenizer)
                 for r, p, pr in zip(results, prep.plans, predicted)]
    main = summaries[0]
    report = {"model": prep.source.spec.name, "cluster": prep.plans[0].cluster.name,
              "cost_model": cost_model_name(prep), **main}
    if len(summaries) > 1:
        base = summaries[1]
        report["compare"] = {
            "method": base["method"],
            "prefill_latency_s": base["prefill_latency_s"],
            "predicted_prefill_latency_s": base["predicted_prefill_latency_s"],
            "latency_s": base["latency_s"],
            "prefill_ratio": main["prefill_latency_s"] / base["prefill_latency_s"],
            "same_output": base["output"]["ids"] == main["output"]["ids"],
        }
    return report


def cost_model_name(prep: Prepared) -> str:
    """What the predictions were priced with: "quick calibration", "profile" or "analytic"."""
    if prep.calibration is not None:
        return "quick calibration"
    from hpipe.cost.fitted import FittedCost

    return "profile" if isinstance(prep.cost, FittedCost) else "analytic"


def _write_artifacts(args, results, predicted) -> int:
    """--trace and --png; 1 (after saying so) if one could not be written after all."""
    from hpipe.report.gantt import plot_timelines
    from hpipe.report.trace import write_chrome_trace

    titles = [f"{r.label} (measured over predicted)" for r in results]
    writers = {
        "--trace": (args.trace, lambda path: write_chrome_trace(
            path, [r.timeline for r in results], labels=[f"{r.label} measured" for r in results])),
        "--png": (args.png, lambda path: plot_timelines(
            [(p, r.timeline) for r, p in zip(results, predicted)], path, titles=titles)),
    }
    code = 0
    for flag, (path, write) in writers.items():
        if path is None:
            continue
        try:
            write(path)
        except OSError as e:
            print(f"hpipe run: could not write {flag} {str(path)!r} ({e.strerror or e}); the "
                  "run's figures are in the report above", file=sys.stderr)
            code = 1
    return code


def format_report(rep: dict) -> str:
    lines = []
    for text, ids in zip(rep["output"]["text"], rep["output"]["ids"]):
        # Without a tokenizer the ids are the output, as 'hpipe generate' prints them.
        lines.append(text if text is not None else " ".join(map(str, ids)))
        lines.append("")
    emu = "  [emulated device speeds]" if rep["emulated"] else ""
    lines.append(f"{rep['model']} on {rep['cluster']}, method {rep['method']}, batch "
                 f"{rep['batch']} x {rep['prompt_tokens']} prompt tokens, "
                 f"{len(rep['slices'])} slices{emu}")
    lines.append(f"  prefill    {rep['prefill_latency_s']:8.3f} s measured   "
                 f"{rep['predicted_prefill_latency_s']:8.3f} s predicted ({rep['cost_model']})   "
                 f"{rep['prefill_tok_s']:8.0f} tok/s")
    lines.append(f"  first tok  {rep['ttft_s']:8.3f} s      decode {rep['decode_tok_s']:.1f} "
                 f"tok/s ({rep['decode_gb_s']:.1f} GB/s read) over {rep['num_decode_steps']} "
                 f"steps      total {rep['latency_s']:.3f} s")
    for st in rep["stages"]:
        tp = (f"  (TP x{st['tp_degree']}, all-reduce {st['prefill_allreduce_s']:.3f} s)"
              if st["tp_degree"] > 1 else "")
        lines.append(f"  {st['device']:<10} layers [{st['layers'][0]:>3}, {st['layers'][1]:>3})  "
                     f"busy prefill {st['busy_prefill_s']:7.3f} s  decode "
                     f"{st['busy_decode_s']:6.3f} s  peak RSS {st['peak_memory_bytes'] / 2**20:7.0f} MiB"
                     + tp)
    if "compare" in rep:
        c = rep["compare"]
        lines.append(f"  vs {c['method']}: prefill {c['prefill_latency_s']:.3f} s measured "
                     f"({c['predicted_prefill_latency_s']:.3f} s predicted); "
                     f"{rep['method']}/{c['method']} = {c['prefill_ratio']:.2f}x"
                     + ("" if c["same_output"] else "  (outputs differ)"))
    return "\n".join(lines)
