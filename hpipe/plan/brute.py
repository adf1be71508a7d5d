"""Exhaustive oracles for the DPs, scored by the very evaluators the DPs use.

Small instances only: splits are all compositions of n layers into N parts (zeros allowed,
C(n + N - 1, N - 1) of them) for every host order and every way to cut it into stage groups
(single devices, tensor-parallel groups); slicings are all compositions of the
prompt on the g-token grid (2^(Q-1) for Q grid steps). Tests compare the DPs against these.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator

from hpipe.plan.evaluate import Problem
from hpipe.plan.layers import SplitCosts, split_bottleneck_s, split_sum_s
from hpipe.plan.plan import StagePlan
from hpipe.plan.slices import estimate_s, grid_positions


def compositions(total: int, parts: int) -> Iterator[tuple[int, ...]]:
    """Every way to write ``total`` as ``parts`` ordered non-negative integers."""
    for cuts in itertools.combinations(range(total + parts - 1), parts - 1):
        prev, out = -1, []
        for c in cuts:
            out.append(c - prev - 1)
            prev = c
        out.append(total + parts - 1 - prev - 1)
        yield tuple(out)


def groupings(order: tuple[int, ...], allowed) -> Iterator[tuple[tuple[int, ...], ...]]:
    """Every way to cut ``order`` into consecutive groups, each one of ``allowed``."""
    if not order:
        yield ()
        return
    for size in range(1, len(order) + 1):
        g = tuple(order[:size])
        if g in allowed:
            for rest in groupings(order[size:], allowed):
                yield (g, *rest)


def brute_split(sc: SplitCosts, orders: list[tuple[int, ...]], *,
                groups: tuple[tuple[int, ...], ...] | None = None
                ) -> tuple[float, tuple[tuple[int, ...], ...] | None, tuple[int, ...] | None]:
    """(least bottleneck, its groups, its counts) over every split of every order into every
    grouping from ``groups`` (default: all of ``sc.groups``); inf if none fits."""
    allowed = set(sc.groups if groups is None else groups)
    best = (math.inf, None, None)
    for order in orders:
        for gs in groupings(tuple(order), allowed):
            for counts in compositions(sc.num_layers, len(gs)):
                v = split_bottleneck_s(sc, gs, counts)
                if v < best[0]:
                    best = (v, gs, counts)
    return best


def brute_split_objectives(sc: SplitCosts, orders: list[tuple[int, ...]], *,
                           groups: tuple[tuple[int, ...], ...] | None = None
                           ) -> tuple[dict[int, float], float]:
    """({K: least bottleneck with exactly K non-empty stages}, least one-pass sum) over every
    split, as for ``brute_split``; K missing where nothing fits."""
    allowed = set(sc.groups if groups is None else groups)
    by_stages: dict[int, float] = {}
    least_sum = math.inf
    for order in orders:
        for gs in groupings(tuple(order), allowed):
            for counts in compositions(sc.num_layers, len(gs)):
                v = split_bottleneck_s(sc, gs, counts)
                k = sum(1 for c in counts if c)
                if v < by_stages.get(k, math.inf):
                    by_stages[k] = v
                least_sum = min(least_sum, split_sum_s(sc, gs, counts))
    return by_stages, least_sum


def grid_slicings(seq_len: int, grain_tokens: int) -> Iterator[tuple[int, ...]]:
    """Every slicing whose boundaries lie on the DP's grid (see ``slices.grid_positions``)."""
    pos = [int(x) for x in grid_positions(seq_len, grain_tokens)]
    inner = pos[1:-1]
    for r in range(len(inner) + 1):
        for chosen in itertools.combinations(inner, r):
            cuts = [0, *chosen, seq_len]
            yield tuple(b - a for a, b in zip(cuts, cuts[1:]))


def _fits_all(slices: tuple[int, ...], fits_fn: Callable[[int, int], bool] | None) -> bool:
    p = 0
    for s in slices:
        if fits_fn is not None and not fits_fn(s, p):
            return False
        p += s
    return True


def brute_slicing_estimate(tau_fn: Callable[[int, int], float], *, seq_len: int,
                           grain_tokens: int, num_stages: int,
                           fits_fn: Callable[[int, int], bool] | None = None
                           ) -> tuple[float, tuple[int, ...] | None]:
    """Least closed-form estimate over every grid slicing that fits memory."""
    best: tuple[float, tuple[int, ...] | None] = (math.inf, None)
    for sl in grid_slicings(seq_len, grain_tokens):
        if _fits_all(sl, fits_fn):
            v = estimate_s(sl, tau_fn, num_stages)
            if v < best[0]:
                best = (v, sl)
    return best


def brute_slicing_simulated(pb: Problem, stages: tuple[StagePlan, ...]
                            ) -> tuple[float, tuple[int, ...] | None]:
    """Least *simulated* latency over every grid slicing that fits memory."""
    st = pb.slice_times(stages)
    best: tuple[float, tuple[int, ...] | None] = (math.inf, None)
    for sl in grid_slicings(pb.seq_len, pb.grain_tokens):
        if _fits_all(sl, st.fits):
            v = pb.objective_s(pb.plan("manual", stages, sl))
            if v < best[0]:
                best = (v, sl)
    return best


def brute_hpipe_s(pb: Problem, groups: tuple[tuple[int, ...], ...]) -> float:
    """The least simulated latency over everything HPipe's search may return: every split
    (every host order, every grouping into ``groups``, every composition), each with every
    grid slicing and every equal slicing HPipe tries (up to 128 slices, none under the
    grain) that fits memory, and with 2 .. batch micro-batches
    of whole sequences; inf if nothing fits."""
    from hpipe.plan.evaluate import memory_overflows
    from hpipe.plan.layers import stages_from_counts
    from hpipe.plan.rank import uniform_slicings

    allowed = set(groups)
    from hpipe.plan.search import max_equal_slices, uniform_count_slicing

    equal = [uniform_count_slicing(pb.seq_len, k)
             for k in range(1, max_equal_slices(pb.seq_len, pb.grain_tokens) + 1)]
    slicings = list(dict.fromkeys([*grid_slicings(pb.seq_len, pb.grain_tokens),
                                   *uniform_slicings(pb.seq_len, pb.grain_tokens), *equal]))
    best, seen = math.inf, set()
    for order in pb.cluster.host_orders():
        for gs in groupings(tuple(order), allowed):
            for counts in compositions(pb.model.num_layers, len(gs)):
                stages = stages_from_counts(gs, counts)
                if stages in seen:
                    continue
                seen.add(stages)
                st = pb.slice_times(stages)
                plans = [pb.plan("manual", stages, sl) for sl in slicings
                         if _fits_all(sl, st.fits)]
                for m in range(2, pb.batch + 1):
                    plan = pb.plan("manual", stages, (pb.seq_len,), num_microbatches=m)
                    if not memory_overflows(plan, pb.cost, kv_tokens=pb.kv_tokens):
                        plans.append(plan)
                for plan in plans:
                    best = min(best, pb.objective_s(plan))
    return best


def brute_throughput_cycle_s(pb: Problem, *, concurrency: int, max_new_tokens: int) -> float:
    """The shortest decode round (hpipe/plan/throughput.py) over every split of single devices
    (every host order, every composition) whose stages hold the KV cache of every request;
    inf if none does."""
    from hpipe.plan.layers import stages_from_counts
    from hpipe.plan.throughput import decode_cycle_s, round_shape

    context, kv_tokens = pb.seq_len + max_new_tokens // 2, pb.seq_len + max_new_tokens
    grain = min(pb.grain_tokens, pb.seq_len)
    best, n = math.inf, pb.model.num_layers
    for order in pb.cluster.host_orders():
        gs = tuple((d,) for d in order)
        for counts in compositions(n, len(gs)):
            stages = stages_from_counts(gs, counts)
            _, rows = round_shape(concurrency, len(stages))
            units = ((1, grain, pb.seq_len - grain), (rows, 1, kv_tokens - 1))
            if any(pb.cost.stage_memory_bytes(
                    st.devices, st.layer_start, st.layer_stop, batch=concurrency,
                    seq_len=kv_tokens, units=units, has_embedding=st.layer_start == 0,
                    has_head=st.layer_stop == n) > pb.cluster.devices[st.device].memory_bytes
                   for st in stages):
                continue
            best = min(best, decode_cycle_s(pb, stages, concurrency=concurrency,
                                            context=context))
    return best
