"""Calibration: one real pipelined prefill on the profiled workers, measured against the fit.

[Note: why calibrate] The grid profile times a two-block stage called in a loop, every worker
busy at once. A running pipeline is not that loop: on this 2-core VM each stage's compute
took ~15-20 % longer inside a pipeline of SmolLM2 than the same calls in the profiler (and
than the same slices in a plain process), without a cause we could pin (denormals, core
pinning, slice count, masks and the communication calls were each ruled out). Three workers on two cores go the other way: the profile keeps all three computing
together, a pipeline does not. So after the grid, the profiler runs what the planner's
predictions are about, a real pipelined prefill, on the same workers, and records each
device's measured compute against the uncalibrated fit's prediction for the same actions.
``FittedCost`` then multiplies that device's compute by the ratio.

The calibration plan is fixed and is not a plan the planner would pick: every device in
cluster order with an even share of the layers, the prompt cut into ``NUM_SLICES`` equal
slices, one row. Equal slices put every device to work at once, as a pipeline does, and
cover early and late positions. The ratio is per device, not per plan, so it carries to
other splits and slicings; ``benchmarks/prediction_accuracy.py`` checks that on HPipe's and
TeraPipe's plans, neither of which is the calibration plan.

Compute only: links are measured by the ping-pong, and the ratio does not touch them.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics

from hpipe.cluster import ClusterSpec
from hpipe.cost.profile_file import Calibration, Profile
from hpipe.errors import HPipeError
from hpipe.plan.layers import even_counts
from hpipe.plan.plan import Plan
from hpipe.spec import ModelSpec
from hpipe.timeline import Timeline

log = logging.getLogger(__name__)

NUM_SLICES = 4
NUM_RUNS = 3  # measured runs after one untimed warm-up run; per device, the median (a burst of
# other work on a shared machine spoils one run, which the median drops)


def calibration_tokens(model: ModelSpec, max_tokens: int) -> int:
    """The calibration prompt: the profile's longest prompt, within the model's context."""
    return min(max_tokens, model.max_seq_len)


def calibration_plan(model: ModelSpec, cluster: ClusterSpec, cost, *, tokens: int,
                     dtype: str) -> Plan:
    """Even layers on every device in cluster order, ``NUM_SLICES`` equal slices, batch 1.

    ``cost`` is the uncalibrated fit. Raises InfeasiblePlanError when the even split does not
    fit a device's memory (the caller then skips the calibration and says so)."""
    from hpipe.plan.api import plan_method

    layers = even_counts(model.num_layers, cluster.num_devices)
    n = min(NUM_SLICES, tokens)
    slices = tuple(tokens // n + (k < tokens % n) for k in range(n))
    return plan_method("manual", model=model, cluster=cluster, batch=1, seq_len=tokens,
                       dtype=dtype, cost=cost, layers=layers, slices=slices)


def compute_by_device(timeline: Timeline, plan: Plan) -> tuple[float, ...]:
    """Prefill compute seconds per cluster device (0 where the plan has none). Timeline row r is
    the plan's r-th device in pipeline order, in the simulator's and the runtime's timelines."""
    from hpipe.runtime.rank import rank_devices

    out = [0.0] * plan.cluster.num_devices
    for row, busy in zip(rank_devices(plan), timeline.busy_s("prefill")):
        out[row] += busy
    return tuple(out)


def make_calibration(plan: Plan, cost, measured: list[Timeline]) -> Calibration:
    """Pure: the calibration record from the plan, the uncalibrated fit and the measured runs."""
    from hpipe.sim import simulate

    predicted = simulate(plan, cost)
    per_run = [compute_by_device(t, plan) for t in measured]
    counts = [0] * plan.cluster.num_devices
    for st in plan.stages:
        for d in st.devices:
            counts[d] = st.layer_stop - st.layer_start
    return Calibration(
        layer_counts=tuple(counts), slices=plan.slices, batch=plan.batch,
        predicted_compute_s=compute_by_device(predicted, plan),
        measured_compute_s=tuple(statistics.median(r[d] for r in per_run)
                                 for d in range(plan.cluster.num_devices)),
        predicted_latency_s=predicted.prefill_latency_s,
        measured_latency_s=statistics.median(t.prefill_latency_s for t in measured))


def calibrate_rank(job, profile: Profile | None, ctx) -> Profile | None:
    """Every rank: run the calibration plan; rank 0 returns ``profile`` with its calibration.

    Rank 0 alone has the gathered profile, so it plans and broadcasts the plan (or None when
    the even split does not fit, which every rank then skips together).
    """
    import torch
    import torch.distributed as dist

    from hpipe.cost.fitted import FittedCost
    from hpipe.model.source import open_model
    from hpipe.runtime.rank import run_requests
    from hpipe.runtime.request import RunRequest

    spec = open_model(job.model).spec
    box: list = [None]
    fit = None  # rank 0: the uncalibrated fit, to plan with and to compare against
    if ctx.rank == 0:
        assert profile is not None
        try:
            fit = FittedCost(profile, spec, job.cluster, job.dtype, calibrated=False)
            box[0] = (calibration_plan(spec, job.cluster, fit,
                                       tokens=calibration_tokens(spec, job.grid.max_tokens),
                                       dtype=job.dtype), None)
        except HPipeError as e:
            box[0] = (None, f"{type(e).__name__}: {e}")
    dist.broadcast_object_list(box, src=0, group=ctx.ctrl_group)
    plan, why = box[0]
    if plan is None:
        log.warning("calibration skipped: the even split does not fit (%s); the profile's "
                    "predictions are the grid fit alone", why)
        return profile
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, spec.vocab_size, (1, plan.seq_len), generator=gen)
    prompt = (tuple(int(t) for t in ids[0]),)
    reqs = [RunRequest(model=job.model, plan=plan, prompt_ids=prompt, max_new_tokens=1,
                       stop_at_eos=False, label=f"calibration {k}")
            for k in range(NUM_RUNS + 1)]  # the first is the untimed warm-up
    rank_of = ctx.rank_of_device or {d: d for d in range(ctx.world_size)}
    if ctx.progress is not None and ctx.rank == 0:
        ctx.progress("calibration", 0, 1)
    results = run_requests(reqs, rank=ctx.rank, world_size=ctx.world_size,
                           data_group=ctx.data_group, ctrl_group=ctx.ctrl_group,
                           backend=ctx.backend, rank_of_device=rank_of)
    if ctx.rank != 0:
        return None
    if ctx.progress is not None:
        ctx.progress("calibration", 1, 1)
    assert results is not None and profile is not None and fit is not None
    cal = make_calibration(plan, fit, [r.timeline for r in results[1:]])
    return dataclasses.replace(profile, calibration=cal)
