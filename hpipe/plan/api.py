"""The front door: one call plans any method, and ``plan_all`` plans them all side by side.

    plan_method("hpipe", model=model_preset("llama-7b"), cluster=load_cluster("paper"),
                batch=6, seq_len=2048)  -> Plan with predicted_latency_s

Pure: the cost model defaults to the analytic roofline; pass a profiled one to plan on
measurements. ``layers`` / ``slices`` are manual overrides (a what-if plan, method "manual").
"""

from __future__ import annotations

import math

from hpipe.cluster import ClusterSpec
from hpipe.cost import cost_model
from hpipe.cost.base import CostModel
from hpipe.errors import InfeasiblePlanError, PlanMismatchError, PromptTooLongError
from hpipe.plan import baselines
from hpipe.plan.evaluate import Problem
from hpipe.plan.feasibility import largest_fitting, split_fits
from hpipe.plan.plan import Plan
from hpipe.plan.search import hpipe_units, plan_hpipe
from hpipe.spec import DTYPES, METHODS, OBJECTIVES, ModelSpec

# Grid points the slicing DP works on: ~256 keep it well under a second; the grain is a power
# of two (tile-aligned, design notes: g = 8..64) of at least 16 tokens.
TARGET_GRID_POINTS = 256
MIN_GRAIN_TOKENS = 16


def default_grain_tokens(seq_len: int) -> int:
    """16 tokens up to 4k, then doubling so the grid stays near 256 points (32k -> 128)."""
    g = MIN_GRAIN_TOKENS
    while seq_len / g > TARGET_GRID_POINTS:
        g *= 2
    return g


_PLANNERS = {
    "hpipe": plan_hpipe,
    "base": baselines.plan_base,
    "gpipe": baselines.plan_gpipe,
    "gpb": baselines.plan_gpb,
    "megatron": baselines.plan_megatron,
    "terapipe": baselines.plan_terapipe,
    "tpt": baselines.plan_tpt,
}


def plan_method(
    method: str,
    *,
    model: ModelSpec,
    cluster: ClusterSpec,
    batch: int,
    seq_len: int,
    dtype: str = "float16",
    cost: CostModel | None = None,
    layers: tuple[int, ...] | None = None,
    slices: tuple[int, ...] | None = None,
    grain_tokens: int | None = None,
    allow_tp: bool = True,
    objective: str = "prefill",
    max_new_tokens: int = 0,
    concurrency: int = 1,
    lend: bool = True,
) -> Plan:
    """Plan ``method`` (one of METHODS) for ``batch`` prompts of ``seq_len`` tokens.

    ``allow_tp=False`` keeps HPipe to pure pipelines (one device per stage), e.g. for a
    runtime without tensor parallelism; the other methods fix their own parallelism.

    ``objective`` "latency" plans for the time to the last of ``max_new_tokens`` output tokens
    (time to first token, then ``max_new_tokens - 1`` decode steps; see [Note: planning for
    decode] in hpipe/plan/evaluate.py); every method's plan is then scored that way.
    "throughput" (HPipe only) plans the split with the most output tokens/s while
    ``concurrency`` requests of ``seq_len + max_new_tokens`` tokens decode, their KV caches
    in the memory check (hpipe/plan/throughput.py).

    ``lend=False``: no compute borrows idle cores (hpipe/lending.py), for runners that never
    lend (a server's interleaved items); HPipe's and manual plans lend by default.

    Raises PromptTooLongError past the model's context, InfeasiblePlanError when nothing fits
    (the message names the device, the shortfall and what would fit), PlanMismatchError for
    bad arguments.
    """
    if method not in METHODS:
        raise PlanMismatchError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    if dtype not in DTYPES:
        raise PlanMismatchError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    if batch < 1 or seq_len < 1:
        raise PlanMismatchError(f"batch {batch} and seq_len {seq_len} must both be >= 1")
    if seq_len > model.max_seq_len:
        raise PromptTooLongError(
            f"seq_len {seq_len} exceeds the context of {model.name!r}, {model.max_seq_len} tokens; "
            f"use --seq-len <= {model.max_seq_len} or a long-context model")
    if grain_tokens is not None and grain_tokens < 1:
        raise PlanMismatchError(f"grain_tokens must be >= 1, got {grain_tokens}")
    overrides = layers is not None or slices is not None
    if overrides and method not in ("hpipe", "manual"):
        raise PlanMismatchError(
            f"--layers/--slices make a manual plan; use method 'manual' (or 'hpipe' to fill "
            f"the rest with HPipe's DPs), not {method!r}")
    if objective not in OBJECTIVES:
        raise PlanMismatchError(f"objective {objective!r} is not one of "
                                f"{', '.join(OBJECTIVES)}")
    if objective != "prefill" and max_new_tokens < 1:
        raise PlanMismatchError(f"objective {objective!r} needs max_new_tokens >= 1, got "
                                f"{max_new_tokens}")
    if objective == "throughput" and (method != "hpipe" or concurrency < 1):
        raise PlanMismatchError(f"objective 'throughput' plans method 'hpipe' for "
                                f"concurrency >= 1, not method {method!r} at {concurrency}")
    pb = Problem(model=model, cluster=cluster, batch=batch, seq_len=seq_len, dtype=dtype,
                 cost=cost if cost is not None else cost_model(model, cluster, dtype),
                 grain_tokens=grain_tokens or default_grain_tokens(seq_len),
                 decode_steps=max_new_tokens - 1 if objective == "latency" else 0,
                 lend=lend)
    if objective == "throughput" and not overrides:
        from hpipe.plan.throughput import plan_throughput

        return plan_throughput(pb, concurrency=concurrency, max_new_tokens=max_new_tokens,
                               allow_tp=allow_tp and pb.cost.times_tp_groups)
    if method == "manual" or overrides:
        plan = baselines.plan_manual(pb, layers=layers, slices=slices)
    elif method == "hpipe":
        # A profile times single devices and point-to-point links, never an all-reduce, so a
        # fitted model can only guess a TP group's time: HPipe does not pick one on a guess
        # (Megatron and TP-T, whose parallelism is fixed, are still timed with it).
        tp = allow_tp and pb.cost.times_tp_groups
        plan = plan_hpipe(pb, allow_tp=tp)  # its error already says what would fit
    else:
        try:
            plan = _PLANNERS[method](pb)
        except InfeasiblePlanError as e:
            if "fits:" in str(e):
                raise
            raise InfeasiblePlanError(f"{e}; fits: {_baseline_fix(pb, method)}") from None
    assert plan.predicted_latency_s is not None and math.isfinite(plan.predicted_latency_s)
    return plan


def _baseline_fix(pb: Problem, method: str) -> str:
    """The largest batch at which a baseline's fixed split fits, found by bisection."""
    import dataclasses

    def fits(b: int) -> bool:
        try:
            _PLANNERS[method](dataclasses.replace(pb, batch=b))
            return True
        except InfeasiblePlanError:
            return False

    fixes = []
    lo = largest_fitting(fits, pb.batch - 1)
    if lo:
        fixes.append(f"batch <= {lo}")
    # Suggest HPipe only where some split of it fits (its memory check, not a whole plan).
    if split_fits(pb.cost, model=pb.model, cluster=pb.cluster, batch=pb.batch,
                  seq_len=pb.seq_len, units=hpipe_units(pb.grain_tokens)):
        fixes.append("method 'hpipe' (its split and slicing adapt to memory)")
    if not fixes:
        return ("nothing at this batch and length, not even method 'hpipe' ('hpipe plan "
                "--method hpipe' says what would)")
    return ", or ".join(fixes)


def plan_all(
    *,
    model: ModelSpec,
    cluster: ClusterSpec,
    batch: int,
    seq_len: int,
    dtype: str = "float16",
    cost: CostModel | None = None,
    grain_tokens: int | None = None,
    methods: tuple[str, ...] = ("base", "gpipe", "gpb", "megatron", "terapipe", "tpt", "hpipe"),
    allow_tp: bool = True,
) -> dict[str, Plan | InfeasiblePlanError]:
    """Every method side by side; a method that does not fit maps to its error (the "OOM" cell).

    Argument errors (prompt too long, bad dtype) still raise: they concern all methods alike.
    """
    cost = cost if cost is not None else cost_model(model, cluster, dtype)
    out: dict[str, Plan | InfeasiblePlanError] = {}
    for m in methods:
        try:
            out[m] = plan_method(m, model=model, cluster=cluster, batch=batch, seq_len=seq_len,
                                 dtype=dtype, cost=cost, grain_tokens=grain_tokens,
                                 allow_tp=allow_tp)
        except InfeasiblePlanError as e:
            out[m] = e
    return out
