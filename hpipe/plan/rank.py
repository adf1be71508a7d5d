"""Ranking candidate splits cheaply, before the slicing DP and the simulator see them.

The search (``search.py``) gathers a few dozen splits; running the slicing DP and re-scoring
its slicings costs far more per split than the DPs that proposed it. ``estimate_split_s``
scores a split in a few hundred cost-model calls so that only the best few pay that price.

It evaluates simple unit streams (equal slices, equal slices on the slicing DP's grid, equal
micro-batches) with the flow-shop *machine bound* rather than the slicing DP's closed form
``sum_i tau_i + (N - 1) max_i tau_i``: the closed form charges a pipeline fill of N - 1
times the slowest stage, so it ranks a one-slice plan (whose latency is the sum of its
stages) and any short prompt badly, which is exactly where the choice between splits with
more or fewer stages is made.
"""

from __future__ import annotations

import math

import numpy as np

from hpipe.lending import lent_threads, lent_time_s
from hpipe.plan.evaluate import Problem, memory_overflows, stage_unit_times
from hpipe.plan.plan import Plan, StagePlan
from hpipe.schedule import prefill_units
from hpipe.spec import dtype_bytes


def uniform_slicings(seq_len: int, grain_tokens: int) -> list[tuple[int, ...]]:
    """1, 2, 4, ... equal slices (the paper's uniform ablation) down to the grain."""
    out, k = [], 1
    while k == 1 or seq_len // k >= grain_tokens:
        q, r = divmod(seq_len, k)
        out.append(tuple(q + (1 if i < r else 0) for i in range(k)))
        k *= 2
    return out


def grid_uniform_slicings(seq_len: int, grain_tokens: int) -> list[tuple[int, ...]]:
    """1, 2, 4, ... and Q near-equal slices on the slicing DP's Q-step grid
    (``slices.grid_positions``): whole grain steps each, the first slice also taking the
    ``seq_len % grain`` remainder, so that later slices (longer prefixes, larger workspaces)
    are never the longer ones; the finest fits memory whenever any grid slicing does."""
    q, r = divmod(seq_len, grain_tokens)
    if q == 0:
        return [(seq_len,)]
    out = []
    for k in sorted({2**e for e in range(q.bit_length())} | {q}):
        steps = [q // k + (1 if i < q % k else 0) for i in range(k)]
        out.append(tuple(s * grain_tokens + (r if i == 0 else 0) for i, s in enumerate(steps)))
    return out


def flow_bound_s(pb: Problem, stages: tuple[StagePlan, ...],
                 units: list[tuple[int, int, int]],
                 lent: dict[tuple[int, int], int] | None = None) -> float:
    """A lower bound on the simulated latency of ``units`` (rows, tokens, prefix), in order,
    through ``stages``. Every resource r (a stage and, with overlapped communication, the
    link after it; without, the stage is busy for both) waits for the first unit to pass the
    resources before it, processes every unit, and hands the last one to those after it:

        T >= max_r  sum_{r' < r} x[1, r'] + sum_i x[i, r] + sum_{r' > r} x[M, r']

    (the machine bound of flow-shop scheduling). Exact when every unit takes the same time on
    each resource (equal micro-batches; equal slices up to the prefix's growth).

    ``lent``: (stage, unit) -> threads of the computes that borrow idle cores; without
    overlapped communication their whole cell (compute and send) is scaled, which only lowers
    the bound."""
    if (getattr(pb.cost, "stage_times_many_s", None) is not None
            and len({rows for rows, _, _ in units}) == 1):
        a = _unit_times_many(pb, stages, units)
    else:
        a = _unit_times(pb, stages, units)
    if lent:
        per = 2 if pb.overlap_comm else 1  # columns per stage
        for (j, i), threads in lent.items():
            own = pb.cluster.devices[stages[j].device].num_threads
            a[i, per * j] = lent_time_s(pb.cost, stages[j].device, a[i, per * j],
                                        tokens=units[i][1], own_threads=own, threads=threads)
    head = np.concatenate([[0.0], np.cumsum(a[0])[:-1]])  # the first unit reaching r
    tail = np.concatenate([np.cumsum(a[-1][::-1])[::-1][1:], [0.0]])  # the last leaving r
    return float(np.max(head + a.sum(axis=0) + tail))


def _unit_times(pb: Problem, stages, units) -> np.ndarray:
    """(units, resources): each unit's time on each stage (and link), one call per cell."""
    last = len(stages) - 1
    x = []
    for rows, tokens, prefix in units:
        act = rows * tokens * pb.model.hidden * dtype_bytes(pb.dtype)
        row = []
        for j, st in enumerate(stages):
            comp = pb.cost.stage_time_s(st.devices, st.layer_start, st.layer_stop, batch=rows,
                                        tokens=tokens, prefix=prefix, has_embedding=j == 0,
                                        has_head=j == last)
            comm = 0.0 if j == last else pb.cost.transfer_time_s(
                st.device, stages[j + 1].device, act)
            row += [comp, comm] if pb.overlap_comm else [comp + comm]
        x.append(row)
    return np.asarray(x)


def _unit_times_many(pb: Problem, stages, units) -> np.ndarray:
    """``_unit_times`` through the cost model's numpy path (``evaluate.stage_unit_times``, a
    prefix per unit): one call per stage instead of one per unit and stage. The flow bound
    ranks every candidate split, and at 128k tokens its units run into the hundreds."""
    times = stage_unit_times(stages, pb.cost, model=pb.model, dtype=pb.dtype, rows=units[0][0],
                             tokens=np.array([t for _, t, _ in units], dtype=float),
                             prefix=np.array([p for _, _, p in units], dtype=float))
    cols = []
    for comp, comm in times:
        cols += [comp, comm] if pb.overlap_comm else [comp + comm]
    return np.stack(cols, axis=1)


def plan_bound_s(pb: Problem, plan: Plan) -> float:
    """``flow_bound_s`` of a plan's own prefill units: its simulated latency is never less,
    so a plan whose bound does not beat the best so far need not be simulated. Computes that
    borrow their host's idle threads (hpipe/lending.py) count at their lent time, as the
    simulator prices them, or the bound could exceed the latency and prune the winner."""
    return pb.decode_s(plan.stages, first_rows=1) + flow_bound_s(
        pb, plan.stages, [(u.rows, u.tokens, u.prefix) for u in prefill_units(plan)],
        lent=lent_threads(plan))


# Micro-batch counts are swept one by one up to this batch. Above it only the counts at which
# the rows per micro-batch change are (about 2 sqrt(batch) of them): count m costs O(m) units,
# so the full sweep is quadratic (batch 300 of SmolLM2 took 31 s to plan), and between two
# such counts the longest micro-batch, which sets the pipeline's beat, stays the same.
EXACT_MICROBATCH_SWEEP = 64


def microbatch_counts(batch: int, first: int = 1) -> range | list[int]:
    """The micro-batch counts from ``first`` to ``batch`` that the GPipe-style sweeps try."""
    if batch <= EXACT_MICROBATCH_SWEEP:
        return range(first, batch + 1)
    counts, rows = [], None
    for m in range(first, batch + 1):
        r = -(-batch // m)  # rows of the longest micro-batch
        if r != rows:
            counts.append(m)
            rows = r
    return counts


def estimate_split_s(pb: Problem, stages: tuple[StagePlan, ...]) -> float:
    """A cheap score of a split: ``flow_bound_s`` at the best of the equal slicings (plain and
    on the grid) and the micro-batch counts that fit memory; inf if none does."""
    st = pb.slice_times(stages)
    best = math.inf
    for sl in dict.fromkeys(uniform_slicings(pb.seq_len, pb.grain_tokens)
                            + grid_uniform_slicings(pb.seq_len, pb.grain_tokens)):
        # The largest workspace is the first slice's (the longest) or the last's (the
        # longest prefix).
        if not (st.fits(sl[0], 0) and st.fits(sl[-1], pb.seq_len - sl[-1])):
            continue
        prefixes = np.concatenate([[0], np.cumsum(sl)[:-1]])
        best = min(best, flow_bound_s(pb, stages, [(pb.batch, int(s), int(p))
                                                   for s, p in zip(sl, prefixes)]))
    # The finest count needs the least memory (search.best_microbatches says why): when it
    # does not fit, no count does, and trying them all costs batch^2 units.
    finest = pb.plan("hpipe", stages, (pb.seq_len,), num_microbatches=pb.batch)
    if memory_overflows(finest, pb.cost, kv_tokens=pb.kv_tokens):
        return best
    for m in microbatch_counts(pb.batch, first=2):
        plan = pb.plan("hpipe", stages, (pb.seq_len,), num_microbatches=m)
        if not memory_overflows(plan, pb.cost, kv_tokens=pb.kv_tokens):
            best = min(best, flow_bound_s(pb, stages, [(r, pb.seq_len, 0)
                                                       for r in plan.microbatch_rows()]))
    return best + pb.decode_s(stages, first_rows=1)
