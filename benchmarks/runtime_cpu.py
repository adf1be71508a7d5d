"""The real runtime on this machine's CPUs: HPipe against Base, torch's ScheduleGPipe, the simulator
and a single process. One run, side by side; every pipeline worker has ONE torch thread, and
HPipe's lone computes (fill and drain) borrow the idle worker's (hpipe/lending.py).

    .venv/bin/python benchmarks/runtime_cpu.py [--tokens 4096] [--batch-tokens 1024]

1. SmolLM2-135M on 2 workers, a 4096-token prompt, batch 1: HPipe's measured prefill latency vs
   Base's (the whole prompt through stage 0, then stage 1). Goal <= 0.55x; ideal 0.5x: with two
   equal stages and fine slices, both workers compute at once. The same plan without lending
   its fill and drain the idle core runs beside it, alternated, for the gain of lending.
2. The same 2-stage split under ``torch.distributed.pipelining.ScheduleGPipe``, batch 4 x 1024
   tokens in 4 micro-batches, vs HPipe's runtime on the same input.
3. HPipe measured vs the simulator's prediction from the analytic cost model (no profile).
4. HPipe planned from the quick calibration that `hpipe run` and the demo use by default
   (hpipe/profile/quick.py, measured here into a fresh cache), and its prediction against the
   measurement. Alternated with the other two in the same launch.
5. The same 4096-token prompt in one process with 2 threads (``generate``): what a user on one
   machine tries first.
6. Where the time goes: each stage's compute, fill, drain and stalls from the measured
   timeline, and its CPU seconds against Base's for the same tokens.
7. Decode, one stream (benchmarks/decode_speed.py): local:2 and local:1 against one process
   and transformers, in tokens/s and GB/s.

The two workers of a 2-core machine only run in parallel when nothing else needs the CPU, so the
load average is printed beside the numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DOCUMENT = REPO / "data" / "metric_system.md"

WAITED_BELOW = 0.9  # CPU / wall of a stage under which it waited for a core


def prompt_ids(tokenizer, num_tokens: int) -> list[int]:
    """The bundled document, repeated until it reaches ``num_tokens`` tokens, then cut."""
    ids = tokenizer.encode(DOCUMENT.read_text())
    while len(ids) < num_tokens:
        ids = ids + ids
    return ids[:num_tokens]


# -- torch.distributed.pipelining -------------------------------------------------------------
class _NoCacheStage(torch.nn.Module):
    """Our stage as a plain tensor -> tensor module for PipelineStage: a fresh KV cache per call
    (one call = one whole micro-batch, so the cache only serves attention within it)."""

    def __init__(self, stage, *, is_last: bool) -> None:
        super().__init__()
        self.stage, self.is_last = stage, is_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cache = self.stage.new_cache(batch=x.shape[0], max_tokens=x.shape[1])
        return self.stage(x, cache, last_only=self.is_last)


def _torch_gpipe_worker(rank: int, port: int, layers: tuple[tuple[int, int], ...], batch: int,
                        tokens: int, ids: list[int], out_file: str) -> None:
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    from hpipe.model.source import open_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    src = open_model("smollm2")
    start, stop = layers[rank]
    stage = src.load_stage(start, stop, has_embedding=rank == 0, has_head=rank == 1)
    module = _NoCacheStage(stage, is_last=rank == 1)
    micro = batch  # one row per micro-batch, as GPipe sweeps would pick for 4 rows here
    hidden = src.spec.hidden
    example_in = (torch.zeros(1, tokens, dtype=torch.int64) if rank == 0
                  else torch.zeros(1, tokens, hidden))
    example_out = (torch.zeros(1, tokens, hidden) if rank == 0
                   else torch.zeros(1, 1, src.spec.vocab_size))
    pstage = PipelineStage(module, rank, 2, torch.device("cpu"), input_args=(example_in,),
                           output_args=example_out)
    schedule = ScheduleGPipe(pstage, n_microbatches=micro)
    x = torch.tensor([ids[:tokens]] * batch, dtype=torch.int64)
    with torch.no_grad():
        dist.barrier()
        t0 = time.perf_counter()
        out = schedule.step(x) if rank == 0 else schedule.step()
        dist.barrier()  # the last stage's finish is the end of the prefill
        latency_s = time.perf_counter() - t0
    if rank == 1:
        Path(out_file).write_text(f"{latency_s} {tuple(out.shape)}")
    dist.destroy_process_group()


def run_torch_gpipe(layers, *, batch: int, tokens: int, ids: list[int]) -> float:
    import tempfile

    import torch.multiprocessing as mp

    from hpipe.runtime.launch import free_port

    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "latency")
        mp.spawn(_torch_gpipe_worker, args=(free_port(), layers, batch, tokens, ids, out_file),
                 nprocs=2, join=True)
        return float(Path(out_file).read_text().split()[0])


# -- what the machine allows --------------------------------------------------------------------
def _stage_compute_worker(queue, layers: tuple[int, int], slices: tuple[int, ...],
                          ids: list[int]) -> None:
    """One stage's prefill compute alone (no communication), in its own process, one thread."""
    from hpipe.model.source import open_model

    torch.set_num_threads(1)
    start, stop = layers
    stage = open_model("smollm2").load_stage(start, stop, has_embedding=start == 0,
                                             has_head=False)
    x = (torch.tensor([ids], dtype=torch.int64) if start == 0
         else torch.randn(1, len(ids), stage.spec.hidden))
    cache = stage.new_cache(batch=1, max_tokens=len(ids))
    t0, prefix = time.perf_counter(), 0
    with torch.inference_mode():
        for tokens in slices:
            stage(x[:, prefix:prefix + tokens], cache)
            prefix += tokens
    queue.put((layers, time.perf_counter() - t0))


def stage_compute_s(jobs) -> dict:
    """Run each (layers, slices) job in its own process, all at once; seconds per job."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_stage_compute_worker, args=(queue, *job)) for job in jobs]
    for p in procs:
        p.start()
    try:
        out = dict(queue.get(timeout=900) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    bad = [p.exitcode for p in procs if p.exitcode]
    assert not bad, f"a stage-compute process failed with exit codes {bad}"
    return out


def calibrated(spec, cluster, tokens: int):
    """The quick calibration `hpipe run` and the demo plan from (hpipe/profile/quick.py),
    measured now into a fresh cache: (its cost model, seconds it took)."""
    import tempfile

    from hpipe.cost import cost_model
    from hpipe.profile.quick import quick_calibration

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["HPIPE_CACHE_DIR"] = tmp
        try:
            cal = quick_calibration("smollm2", cluster, "float32", prompt_tokens=tokens,
                                    max_seq_len=spec.max_seq_len)
        finally:
            del os.environ["HPIPE_CACHE_DIR"]
    return cost_model(spec, cluster, "float32", profile=cal.profile), cal.measured_s


def breakdown(tl) -> list[str]:
    """Where each stage's prefill time went, from the measured timeline: computing, idle before
    its first compute (fill), idle after its last (drain), idle between computes (stalls:
    waiting for the previous stage), and sends in flight (overlapped with compute)."""
    end = tl.prefill_latency_s
    lines = []
    for row, name in enumerate(tl.row_names):
        comps = sorted((iv for iv in tl.intervals if iv.row == row and iv.kind == "compute"
                        and iv.phase == "prefill"), key=lambda iv: iv.start_s)
        if not comps:
            continue
        compute = sum(iv.end_s - iv.start_s for iv in comps)
        fill, drain = comps[0].start_s, max(0.0, end - comps[-1].end_s)
        stalls = max(0.0, end - compute - fill - drain)
        sends = sum(iv.end_s - iv.start_s for iv in tl.intervals
                    if iv.row == row and iv.kind == "send" and iv.phase == "prefill")
        lent = [iv for iv in comps if iv.threads]
        lent_text = (f"; {len(lent)} lent ({max(iv.threads for iv in lent)} threads) "
                     f"{sum(iv.duration_s for iv in lent):.2f} s" if lent else "")
        lines.append(f"    {name}: compute {compute:6.2f} s ({100 * compute / end:3.0f}%, "
                     f"{1e3 * compute / len(comps):6.1f} ms x {len(comps)}), fill {fill:5.2f}, "
                     f"drain {drain:5.2f}, stalls {stalls:5.2f}; sends in flight {sends:5.2f} s"
                     + lent_text)
    return lines


# -- the benchmark ----------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--batch-tokens", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--no-calibration", action="store_true",
                    help="skip the HPipe plan from the quick calibration")
    ap.add_argument("--no-decode", action="store_true", help="skip the decode comparison")
    ap.add_argument("--repeats", type=int, default=5,
                    help="HPipe and Base 4096-token runs, alternated; medians are compared "
                         "(one run on this shared VM varies by +-20%%, and a slow spell of the "
                         "VM can make one run's computes 2x slower: see [Note: noisy runs])")
    args = ap.parse_args()

    from hpipe.cluster import local_cluster
    from hpipe.model.generate import generate
    from hpipe.model.source import open_model
    from hpipe.plan.api import plan_method
    from hpipe.runtime import RunRequest, check_request, launch_local

    src = open_model("smollm2")
    spec = src.spec
    cluster = local_cluster(2, num_threads=1)
    long_ids = prompt_ids(src.tokenizer, args.tokens)
    short_ids = prompt_ids(src.tokenizer, args.batch_tokens)
    load_before = os.getloadavg()

    # HPipe's rows are its token-level pipeline (allow_tp=False). Its search may also pick a
    # tensor-parallel pair on these two workers; that plan is measured beside it.
    def plan(method, batch, seq_len, allow_tp=False):
        return plan_method(method, model=spec, cluster=cluster, batch=batch, seq_len=seq_len,
                           dtype="float32", allow_tp=allow_tp)

    hp_long = plan("hpipe", 1, args.tokens)
    base_long = plan("base", 1, args.tokens)
    # The same plan with its lone computes on their own thread: what lending the idle core buys.
    from hpipe.cost import cost_model
    from hpipe.sim import simulate

    hp_own = dataclasses.replace(hp_long, lend_idle_threads=False)
    hp_own = dataclasses.replace(hp_own, predicted_latency_s=simulate(
        hp_own, cost_model(spec, cluster, "float32")).prefill_latency_s)
    compared = [("hpipe-4096", hp_long), ("base-4096", base_long), ("hpipe-own-4096", hp_own)]
    hp_tp = plan("hpipe", 1, args.tokens, allow_tp=True)
    if any(len(st.devices) > 1 for st in hp_tp.stages):
        compared.append(("hpipe-tp-4096", hp_tp))
    else:
        hp_tp = None
    hp_prof = cal_cost = None
    if not args.no_calibration:
        cal_cost, cal_s = calibrated(spec, cluster, args.tokens)
        hp_prof = plan_method("hpipe", model=spec, cluster=cluster, batch=1, seq_len=args.tokens,
                              dtype="float32", cost=cal_cost, allow_tp=False)
        compared.append(("hpipe-profiled-4096", hp_prof))
    hp_batch = plan("hpipe", args.batch, args.batch_tokens)
    # The first request of a launch pays gloo's connection set-up and first-touch allocations;
    # an untimed warm-up takes that cost so neither compared method does.
    warm = plan("hpipe", 1, 256)
    reqs = [RunRequest(model="smollm2", plan=p, prompt_ids=rows, max_new_tokens=1,
                       label=label)
            for label, p, rows in (
                ("warm-up", warm, (tuple(short_ids[:256]),)),
                *((f"{name}-{rep}", p, (tuple(long_ids),))
                  for rep in range(args.repeats)
                  for name, p in compared),
                ("hpipe-batch", hp_batch, (tuple(short_ids),) * args.batch))]
    for r in reqs:
        check_request(r, spec)
    t0 = time.perf_counter()
    results = {r.label: r for r in launch_local(reqs)}
    wall_s = time.perf_counter() - t0

    split = tuple((s.layer_start, s.layer_stop) for s in hp_batch.stages)
    torch_gpipe_s = run_torch_gpipe(split, batch=args.batch, tokens=args.batch_tokens,
                                    ids=short_ids)

    # [Note: core contention] The two "cores" of this VM slow each other down when both compute
    # (shared caches / memory / host SMT). Measure it without any pipeline: both stages' sliced
    # compute alone, then both at once. A perfect pipeline can do no better than the slower of
    # the concurrent stages, so that over Base's measured latency is what this machine allows.
    split_long = tuple((s.layer_start, s.layer_stop) for s in hp_long.stages)
    alone = {}
    for layers in split_long:
        alone.update(stage_compute_s([(layers, hp_long.slices, long_ids)]))
    together = stage_compute_s([(layers, hp_long.slices, long_ids) for layers in split_long])

    torch.set_num_threads(2)
    model = src.load_model()
    generate(model, [long_ids[:256]], max_new_tokens=1)  # warm-up: first-touch allocations
    single = generate(model, [long_ids], max_new_tokens=1)
    load_after = os.getloadavg()

    def prefill_s(name: str) -> list[float]:
        return [results[f"{name}-{rep}"].timeline.prefill_latency_s
                for rep in range(args.repeats)]

    hp_runs, base_runs = prefill_s("hpipe-4096"), prefill_s("base-4096")
    hp, base = statistics.median(hp_runs), statistics.median(base_runs)
    own_runs = prefill_s("hpipe-own-4096")
    hp_o = statistics.median(own_runs)
    prof_runs = prefill_s("hpipe-profiled-4096") if hp_prof is not None else None
    hp_p = statistics.median(prof_runs) if prof_runs else None
    tp_runs = prefill_s("hpipe-tp-4096") if hp_tp is not None else None
    hp_t = statistics.median(tp_runs) if tp_runs else None
    hpb = results["hpipe-batch"].timeline.prefill_latency_s
    rows = [
        ("HPipe, 2 workers x 1 thread", f"1 x {args.tokens}", hp_long, hp),
        ("Base, 2 workers x 1 thread", f"1 x {args.tokens}", base_long, base),
        ("HPipe, nothing lent", f"1 x {args.tokens}", hp_own, hp_o),
        *([("HPipe, quick calibration, 2 x 1", f"1 x {args.tokens}", hp_prof, hp_p)]
          if hp_prof is not None else []),
        *([("HPipe's TP-pair pick, 2 x 1 thread", f"1 x {args.tokens}", hp_tp, hp_t)]
          if hp_tp is not None else []),
        ("HPipe, 2 workers x 1 thread", f"{args.batch} x {args.batch_tokens}", hp_batch, hpb),
        ("torch ScheduleGPipe, 2 x 1 thread", f"{args.batch} x {args.batch_tokens}", None,
         torch_gpipe_s),
        ("one process, 2 threads", f"1 x {args.tokens}", None, single.prefill_s),
    ]
    print(f"SmolLM2-135M float32 prefill on {os.cpu_count()} CPU cores; load average "
          f"{load_before[0]:.1f} before, {load_after[0]:.1f} after (2 = both cores busy "
          "elsewhere)")
    print(f"{'run':<36} {'input':>10} {'layers':>10} {'slices':>7} {'measured s':>11} "
          f"{'predicted s':>12}")
    gpipe_layers = "/".join(str(b - a) for a, b in split)
    for name, shape, p, measured in rows:
        if p is not None:
            layers = "/".join(("+".join(f"d{d}" for d in s.devices) + ":" if len(s.devices) > 1
                               else "") + str(s.num_layers) for s in p.stages)
        else:
            layers = gpipe_layers if "ScheduleGPipe" in name else "-"
        slices = str(len(p.slices)) if p else "-"
        pred = f"{p.predicted_latency_s:12.2f}" if p else f"{'-':>12}"
        print(f"{name:<36} {shape:>10} {layers:>10} {slices:>7} {measured:11.2f} {pred}")
    print()
    print(f"HPipe / Base prefill latency ({args.tokens} tokens):  {hp / base:.2f}x   "
          f"(medians of {args.repeats} alternated runs; goal <= 0.55x, ideal 0.5x)")
    print("  per repeat: " + ", ".join(f"{h:.2f}/{b:.2f} s = {h / b:.2f}x"
                                       for h, b in zip(hp_runs, base_runs)))
    print(f"HPipe / the same plan with nothing lent:  {hp / hp_o:.2f}x   per repeat: "
          + ", ".join(f"{h / o:.2f}x" for h, o in zip(hp_runs, own_runs))
          + "   (fill and drain on both cores)")
    if hp_t is not None:
        print(f"HPipe's TP-pair pick / Base:            {hp_t / base:.2f}x   per repeat: "
              + ", ".join(f"{h / b:.2f}x" for h, b in zip(tp_runs, base_runs)))
    if hp_p is not None:
        print(f"HPipe from the quick calibration / Base: {hp_p / base:.2f}x   per repeat: "
              + ", ".join(f"{h / b:.2f}x" for h, b in zip(prof_runs, base_runs)))
        base_pred = simulate(base_long, cal_cost).prefill_latency_s
        print(f"quick calibration ({cal_s:.1f} s): measured / predicted prefill, HPipe "
              f"{hp_p / hp_prof.predicted_latency_s:.2f}x, Base {base / base_pred:.2f}x "
              "(goal within 15%: 0.87-1.15)")
    print(f"HPipe / torch ScheduleGPipe ({args.batch} x {args.batch_tokens}):    "
          f"{hpb / torch_gpipe_s:.2f}x")
    print(f"HPipe measured / simulated (analytic cost): {hp / hp_long.predicted_latency_s:.2f}x")
    print(f"HPipe 2 workers / one process 2 threads:    {hp / single.prefill_s:.2f}x   "
          "(goal < 1)")
    cpu = {name: statistics.median(sum(results[f"{name}-{rep}"].prefill_cpu_s)
                                   for rep in range(args.repeats))
           for name in ("hpipe-4096", "base-4096")}
    print(f"HPipe / Base stage CPU seconds:             {cpu['hpipe-4096'] / cpu['base-4096']:.2f}x   "
          f"({cpu['hpipe-4096']:.1f} vs {cpu['base-4096']:.1f} s, medians; goal <= 1.05x)")
    print("where the prefill time goes (the median-latency repeat of each):")
    for name, runs in (("hpipe-4096", hp_runs), ("hpipe-own-4096", own_runs),
                       ("base-4096", base_runs)):
        rep = sorted(range(args.repeats), key=lambda k: runs[k])[args.repeats // 2]
        print(f"  {name} (repeat {rep}, {runs[rep]:.2f} s):")
        for line in breakdown(results[f"{name}-{rep}"].timeline):
            print(line)
    # [Note: noisy runs] Every repeat of a method does the same work, so its CPU seconds should
    # repeat too. On this shared VM they do not: in one launch, with nothing else running, one
    # stage's computes went 2x slower for several seconds (0.56 -> 1.27 CPU s for the same
    # 256-token slice), and Base's stages took 11.0 to 15.6 CPU s over five repeats. A repeat whose
    # CPU seconds stand out was slowed by the machine, not by the pipeline; hence the medians.
    for label in (*(f"{name}-{rep}" for name in ("hpipe-4096", "base-4096")
                    for rep in range(args.repeats)),
                  *(["hpipe-profiled-4096-0"] if hp_prof is not None else [])):
        res = results[label]
        busy = res.timeline.busy_s("prefill")
        # Only a clear shortfall says the stage waited for a core; 0.99 is timer noise.
        waited = [name for name, b, c in zip(res.timeline.row_names, busy, res.prefill_cpu_s)
                  if b > 0 and c / b < WAITED_BELOW]
        print(f"{label}: stage busy {', '.join(f'{b:.2f}' for b in busy)} s wall, "
              f"{', '.join(f'{c:.2f}' for c in res.prefill_cpu_s)} s CPU"
              + (f" ({', '.join(waited)} waited for a core: CPU/wall < {WAITED_BELOW})"
                 if waited else ""))
    print(f"HPipe slices {list(hp_long.slices)}; launch wall time {wall_s:.1f} s")
    slow_down = max(together[k] / alone[k] for k in alone)
    allowed = max(together.values()) / base
    print(f"core contention: each stage's sliced compute alone {', '.join(f'{alone[k]:.2f}' for k in split_long)} s, "
          f"both at once {', '.join(f'{together[k]:.2f}' for k in split_long)} s "
          f"(up to {slow_down:.2f}x slower)")
    print(f"best HPipe / Base this machine allows with one thread per stage (both stages fully "
          f"overlapped, no bubble, no transfers): {allowed:.2f}x; HPipe reaches {hp / base:.2f}x "
          f"(lent fill and drain can beat it)")
    if not args.no_decode:
        from decode_speed import measure, report

        print()
        report(measure(new_tokens=64, repeats=args.repeats))


if __name__ == "__main__":
    main()
