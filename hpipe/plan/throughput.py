"""Planning for a server: the split with the most output tokens per second while ``concurrency``
requests decode at once (``hpipe plan --objective throughput``; what ``hpipe serve`` and
``hpipe analyze`` run by default).

[Note: a decoding pipeline's beat] The serving scheduler (hpipe/interleave.py) keeps one item
per stage in flight and spreads the running requests over them: M = min(C, S) micro-batches
of r = ceil(C / M) rows each, S the number of stages. In steady state every resource (a stage,
a link, the token's way back) handles each micro-batch once per round, and one micro-batch's
round trip passes all of them in turn, so a round takes

    cycle = max( sum of every resource's time for one micro-batch,
                 M x the slowest resource's time for one )

and yields C tokens: C / cycle tokens/s. Each stage's time is a decode step at the requests'
mean context (prompt + half the new tokens; the read-bound decode cost of hpipe/cost). Memory:
each stage holds the KV cache of all C requests at their full length, beside its weights.

The split: for every stage count S and host order, the workload DP (hpipe/plan/layers.py) on
decode-step times at r rows gives the least-bottleneck split of S stages and the least-sum
split. Neither is the least round, which is the larger of a sum and M x a maximum, so from the
best few a local search moves one layer at a time between any two devices of the order
(emptying or filling one) while the round gets shorter. ``tests/test_plan_objectives.py``
checks the result against every split on small random instances. HPipe's slicing then serves
the prompts' prefill.
"""

from __future__ import annotations

import math

import numpy as np

from hpipe.errors import InfeasiblePlanError
from hpipe.plan.evaluate import Problem
from hpipe.plan.groups import stage_groups
from hpipe.plan.layers import (
    SplitCosts,
    max_stops,
    solve_split_one_pass,
    splits_by_stages,
    stages_from_counts,
)
from hpipe.plan.plan import Plan, StagePlan
from hpipe.spec import dtype_bytes

TOKEN_BYTES = 8


def round_shape(concurrency: int, num_stages: int) -> tuple[int, int]:
    """(micro-batches, rows in the largest) the scheduler runs ``concurrency`` requests as."""
    m = max(1, min(concurrency, num_stages))
    return m, -(-concurrency // m)


def decode_cycle_s(pb: Problem, stages: tuple[StagePlan, ...], *, concurrency: int,
                   context: int) -> float:
    """One round of every running request's next token (see [Note: a decoding pipeline's
    beat])."""
    m, rows = round_shape(concurrency, len(stages))
    cost, last = pb.cost, len(stages) - 1
    act = rows * pb.model.hidden * dtype_bytes(pb.dtype)
    times = []
    for j, st in enumerate(stages):
        comp = cost.decode_time_s(st.devices, st.layer_start, st.layer_stop, batch=rows,
                                  context=context, has_embedding=j == 0, has_head=j == last)
        if j < last:
            hop = cost.transfer_time_s(st.device, stages[j + 1].device, act)
        else:
            hop = (cost.transfer_time_s(st.device, stages[0].device, rows * TOKEN_BYTES)
                   if last else 0.0)
        times += [comp, hop] if pb.overlap_comm else [comp + hop]
    return max(sum(times), m * max(times))


def decode_tok_s(pb: Problem, stages: tuple[StagePlan, ...], *, concurrency: int,
                 context: int) -> float:
    return concurrency / decode_cycle_s(pb, stages, concurrency=concurrency, context=context)


def _decode_split_costs(pb: Problem, groups, *, rows: int, context: int, kv_tokens: int,
                        concurrency: int) -> SplitCosts:
    """The workload DP's inputs with decode-step times at ``rows`` rows, and memory for the KV
    cache of ``concurrency`` requests of ``kv_tokens`` (and a prefill grain slice)."""
    cost, n = pb.cost, pb.model.num_layers
    kw = dict(batch=rows, context=context)
    prefix_s, emb_s, head_s = {}, {}, {}
    for g in groups:
        one = [cost.decode_time_s(g, k, k + 1, has_embedding=False, has_head=False, **kw)
               for k in range(n)]
        prefix_s[g] = np.concatenate([[0.0], np.cumsum(one)])
        emb_s[g] = cost.decode_time_s(g, 0, 0, has_embedding=True, has_head=False, **kw)
        head_s[g] = cost.decode_time_s(g, 0, 0, has_embedding=False, has_head=True, **kw)
    grain = min(pb.grain_tokens, pb.seq_len)
    units = ((1, grain, pb.seq_len - grain), (rows, 1, kv_tokens - 1))
    max_stop = max_stops(cost, model=pb.model, cluster=pb.cluster, batch=concurrency,
                         seq_len=kv_tokens, units=units, groups=groups)
    act = rows * pb.model.hidden * dtype_bytes(pb.dtype)
    num = pb.cluster.num_devices
    comm_s = {(d, e): cost.transfer_time_s(d, e, act)
              for d in range(num) for e in range(num) if d != e}
    return SplitCosts(n, groups, prefix_s, emb_s, head_s, max_stop, comm_s, pb.overlap_comm)


NUM_CLIMB_STARTS = 4  # the best DP splits the local search starts from


def throughput_splits(pb: Problem, *, concurrency: int, max_new_tokens: int,
                      allow_tp: bool) -> list[tuple[float, tuple[StagePlan, ...]]]:
    """(cycle, stages) of the candidate splits, best first; empty if none fits memory."""
    groups = stage_groups(pb.cluster, allow_tp=allow_tp)
    context = pb.seq_len + max_new_tokens // 2
    kv_tokens = pb.seq_len + max_new_tokens
    found: dict[tuple[StagePlan, ...], float] = {}
    starts: list[tuple[float, tuple, tuple]] = []  # (cycle, groups, counts) of the DP's
    by_rows: dict[int, SplitCosts] = {}
    for num_stages in range(1, pb.cluster.num_devices + 1):
        _, rows = round_shape(concurrency, num_stages)
        sc = by_rows.get(rows)
        if sc is None:
            sc = by_rows[rows] = _decode_split_costs(pb, groups, rows=rows, context=context,
                                                     kv_tokens=kv_tokens,
                                                     concurrency=concurrency)
        for order in pb.orders():
            picks = [splits_by_stages(sc, order, groups=groups)[num_stages - 1]]
            if num_stages == 1:
                picks.append(solve_split_one_pass(sc, order, groups=groups))
            for split in picks:
                if not math.isfinite(split.bottleneck_s):
                    continue
                stages = stages_from_counts(split.groups, split.counts)
                if stages not in found:
                    found[stages] = decode_cycle_s(pb, stages, concurrency=concurrency,
                                                   context=context)
                    starts.append((found[stages], split.groups, split.counts))
    fits = _fits_fn(pb, concurrency=concurrency, kv_tokens=kv_tokens)
    for _, split_groups, counts in sorted(starts, key=lambda s: s[0])[:NUM_CLIMB_STARTS]:
        _climb(pb, split_groups, counts, found, fits=fits, concurrency=concurrency,
               context=context)
    return sorted(((c, s) for s, c in found.items()), key=lambda cs: cs[0])


def _fits_fn(pb: Problem, *, concurrency: int, kv_tokens: int):
    """fits(stages): every stage holds its weights, the KV cache of every request and the
    larger of a prefill grain slice's and a decode micro-batch's workspace."""
    grain = min(pb.grain_tokens, pb.seq_len)
    n = pb.model.num_layers
    memo: dict = {}

    def fits(stages: tuple[StagePlan, ...]) -> bool:
        _, rows = round_shape(concurrency, len(stages))
        units = ((1, grain, pb.seq_len - grain), (rows, 1, kv_tokens - 1))
        for st in stages:
            key = (st, units)
            if key not in memo:
                need = pb.cost.stage_memory_bytes(
                    st.devices, st.layer_start, st.layer_stop, batch=concurrency,
                    seq_len=kv_tokens, units=units, has_embedding=st.layer_start == 0,
                    has_head=st.layer_stop == n)
                memo[key] = need <= min(pb.cluster.devices[d].memory_bytes for d in st.devices)
            if not memo[key]:
                return False
        return True

    return fits


def _climb(pb: Problem, split_groups: tuple, counts: tuple[int, ...], found: dict, *,
           fits, concurrency: int, context: int) -> None:
    """First-improvement local search from one split: move one layer from any group of the
    order to any other while the decode round gets shorter; every split it scores goes into
    ``found``."""

    def cycle(c: tuple[int, ...]) -> float:
        stages = stages_from_counts(split_groups, c)
        if stages in found:
            return found[stages]
        value = (decode_cycle_s(pb, stages, concurrency=concurrency, context=context)
                 if fits(stages) else math.inf)
        found[stages] = value
        return value

    best, current = cycle(counts), tuple(counts)
    improved = True
    while improved:
        improved = False
        for i in range(len(current)):
            if current[i] == 0:
                continue
            for j in range(len(current)):
                if i == j:
                    continue
                c = list(current)
                c[i] -= 1
                c[j] += 1
                value = cycle(tuple(c))
                if value < best:
                    best, current, improved = value, tuple(c), True
                    break
            if improved:
                break


def plan_throughput(pb: Problem, *, concurrency: int, max_new_tokens: int,
                    allow_tp: bool = True) -> Plan:
    """HPipe's plan for the throughput objective: the split with the shortest decode round,
    sliced by HPipe's slicing DP for the prompt. ``predicted_latency_s`` is its prefill
    latency; the notes carry the throughput."""
    from hpipe.plan.search import no_split_error, plan_slices_for, polish_uniform

    splits = throughput_splits(pb, concurrency=concurrency, max_new_tokens=max_new_tokens,
                               allow_tp=allow_tp)
    context = pb.seq_len + max_new_tokens // 2
    for cycle, stages in splits:
        if not math.isfinite(cycle):
            break
        note = (f"objective throughput: {concurrency / cycle:.1f} output tokens/s with "
                f"{concurrency} requests of {pb.seq_len} + {max_new_tokens} tokens decoding "
                f"(a round every {cycle * 1e3:.2f} ms at context {context})")
        plan = plan_slices_for(pb, stages, method="hpipe", notes=(note,))
        if plan is not None:
            return polish_uniform(pb, plan)
    if splits:
        raise InfeasiblePlanError(f"hpipe: no slicing of the {pb.seq_len}-token prompt fits "
                                  "beside the KV cache of the running requests; lower "
                                  "--concurrency or the lengths")
    raise no_split_error(pb)
