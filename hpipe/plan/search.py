"""HPipe's search: workload DP per host order -> slicing DP -> exact re-scoring (Alpa's
"search wrapper" layer between the DP kernels and the front door).

1. The workload DP (``layers.py``) gives each host order its least-bottleneck split.
2. For the best few distinct splits, the slicing DP (``slices.py``) proposes its best few
   slicings by the closed-form estimate.
3. Each (split, slicing) candidate is simulated exactly (``hpipe.sim``) and the fastest kept:
   the closed form is only an estimate with heterogeneous stages (algorithms.md section 5
   shows it can be off by a third), so the simulator, not the estimate, has the last word.
"""

from __future__ import annotations

import dataclasses
import math

from hpipe.errors import InfeasiblePlanError
from hpipe.plan.evaluate import Problem, check_memory, memory_overflows, scored
from hpipe.plan.feasibility import explain_no_split
from hpipe.plan.layers import (
    LayerSplit,
    build_split_costs,
    plan_layers,
    solve_split_one_pass,
    split_bottleneck_s,
)
from hpipe.plan.plan import Plan, StagePlan
from hpipe.plan.slices import plan_slicing

# Splits (host orders) and slicings re-scored with the simulator. More costs time linearly
# and, on the paper's setting, finds nothing better.
NUM_SPLITS = 3
NUM_SLICINGS = 8
EPSILON = 1e-2  # cap clustering of the slicing DP: within 1% of its optimum, ~10x fewer caps


def hpipe_units(grain_tokens: int):
    """The work unit whose workspace the split must leave room for: the smallest slice HPipe
    may use, at the end of the prompt. The slicing DP then keeps every slice within memory."""

    def units(batch: int, seq_len: int) -> tuple[tuple[int, int, int], ...]:
        g = min(grain_tokens, seq_len)
        return ((batch, g, seq_len - g),)

    return units


def plan_hpipe_split(pb: Problem) -> list[tuple[StagePlan, ...]]:
    """Distinct workload-DP splits over host orders, best bottleneck first; raises if none fits."""
    return [stages for _, stages in candidate_splits(pb, dp_only=True)]


def candidate_splits(pb: Problem, *, dp_only: bool = False
                     ) -> list[tuple[float, tuple[StagePlan, ...]]]:
    """(bottleneck, stages) of the splits worth slicing, best bottleneck first.

    The workload DP's bottleneck is the right objective when many slices keep every stage
    busy; a prompt of a few slices runs almost sequentially, where the split with the least
    *sum* of stage times wins. So the search also tries that split (``solve_split_one_pass``)
    and the even split, and lets the simulator decide.
    """
    units = hpipe_units(pb.grain_tokens)
    sc = build_split_costs(pb.cost, model=pb.model, cluster=pb.cluster, batch=pb.batch,
                           seq_len=pb.seq_len, dtype=pb.dtype,
                           units=units(pb.batch, pb.seq_len), overlap_comm=pb.overlap_comm)
    orders = pb.cluster.host_orders()
    splits = [s for s in plan_layers(sc, orders) if math.isfinite(s.bottleneck_s)]
    if not splits:
        raise InfeasiblePlanError(explain_no_split(
            pb.cost, model=pb.model, cluster=pb.cluster, batch=pb.batch, seq_len=pb.seq_len,
            units=units))
    out: list[tuple[float, tuple[StagePlan, ...]]] = []

    def add(split: LayerSplit) -> None:
        if math.isfinite(split.bottleneck_s) and all(split.stages() != o for _, o in out):
            out.append((split.bottleneck_s, split.stages()))

    for split in splits[:NUM_SPLITS]:
        add(split)
    if not dp_only:
        # One pass means the whole prompt's workspace must fit, not just a grain's.
        sc1 = build_split_costs(pb.cost, model=pb.model, cluster=pb.cluster, batch=pb.batch,
                                seq_len=pb.seq_len, dtype=pb.dtype,
                                units=((pb.batch, pb.seq_len, 0),), overlap_comm=pb.overlap_comm)
        one_pass = [solve_split_one_pass(sc1, o) for o in orders]
        add(min(one_pass, key=lambda s: _sum_s(sc1, s)))
        order = tuple(range(pb.cluster.num_devices))
        n, num = pb.model.num_layers, len(order)
        even = tuple(n // num + (j < n % num) for j in range(num))
        b = split_bottleneck_s(sc, order, even)
        # A split too full for the whole batch's grain slice may still take micro-batches of a
        # few rows; with no bound to prune by, it is always tried (key 0).
        add(LayerSplit(order, even, b if math.isfinite(b) else 0.0))
    return sorted(out, key=lambda c: c[0])


def _sum_s(sc, split: LayerSplit) -> float:
    """Sum of stage times and transfers of a split: its one-slice latency."""
    if not math.isfinite(split.bottleneck_s):
        return math.inf
    stages = split.stages()
    total = 0.0
    for i, st in enumerate(stages):
        total += sc.block_s(st.device, st.layer_start, st.layer_stop)
        if i + 1 < len(stages):
            total += sc.comm_s[(st.device, stages[i + 1].device)]
    return total


def uniform_slicings(seq_len: int, grain_tokens: int) -> list[tuple[int, ...]]:
    """1, 2, 4, ... equal slices (the paper's uniform ablation) down to the grain."""
    out, k = [], 1
    while k == 1 or seq_len // k >= grain_tokens:
        q, r = divmod(seq_len, k)
        out.append(tuple(q + (1 if i < r else 0) for i in range(k)))
        k *= 2
    return out


def plan_slices_for(pb: Problem, stages: tuple[StagePlan, ...], *, method: str,
                    notes: tuple[str, ...] = ()) -> Plan | None:
    """HPipe's slicing of the prompt over fixed stages, re-scored; None if no slicing fits.

    Candidates: the DP's best few by estimate, plus the uniform slicings (1, 2, 4, ... equal
    slices) so that the pick is never worse than the paper's uniform ablation or a single
    pass; all are simulated and the fastest wins.
    """
    st = pb.slice_times(stages)
    res = plan_slicing(st.tau, fits_fn=st.fits, tau_row_fn=st.tau_row, seq_len=pb.seq_len,
                       grain_tokens=pb.grain_tokens, num_stages=len(stages), epsilon=EPSILON,
                       num_candidates=NUM_SLICINGS)
    if res is None:
        return None
    cands = [sl for sl, _ in res.candidates]
    if res.slices not in cands:
        cands.insert(0, res.slices)
    for sl in uniform_slicings(pb.seq_len, pb.grain_tokens):
        if sl not in cands and _fits(st, sl):
            cands.append(sl)
    plans = [scored(pb.plan(method, stages, sl, notes=notes), pb.cost) for sl in cands]
    # Fastest simulated; on a tie, fewer slices (less per-slice overhead in a real runtime).
    best = min(plans, key=lambda p: (p.predicted_latency_s, len(p.slices)))
    # The table's entry for this length is the re-scored winner, not the estimate's.
    table = tuple((n, best.slices if n == pb.seq_len else sl) for n, sl in res.table)
    return dataclasses.replace(best, slice_table=table)


def _fits(st, slices: tuple[int, ...]) -> bool:
    p = 0
    for s in slices:
        if not st.fits(s, p):
            return False
        p += s
    return True


def best_microbatches(pb: Problem, method: str, stages: tuple[StagePlan, ...], *,
                      counts: range | None = None) -> Plan | None:
    """GPipe's sweep: micro-batch counts 1..batch of whole sequences, the fastest that fits
    memory (simulated). Raises naming the device when none fits and ``counts`` is the full
    sweep (a baseline's OOM); returns None for a partial sweep that finds nothing."""
    best, last_err = None, None
    for m in counts or range(1, pb.batch + 1):
        plan = pb.plan(method, stages, (pb.seq_len,), num_microbatches=m)
        if memory_overflows(plan, pb.cost):
            last_err = plan
            continue
        plan = scored(plan, pb.cost)
        if best is None or plan.predicted_latency_s < best.predicted_latency_s:
            best = plan
    if best is None and counts is None:
        check_memory(last_err, pb.cost)  # raises, naming the device of the finest count
    return best


def plan_hpipe(pb: Problem) -> Plan:
    """[design] HPipe's pipeline unit is a token slice of the whole batch; for prompts too
    short to cut into useful slices, splitting the batch into micro-batches (GPipe's unit)
    can pipeline better, so the search scores those too and keeps whichever is fastest."""
    best: Plan | None = None
    for bottleneck_s, stages in candidate_splits(pb):
        # Every stage must process the whole prefill, and the prefill in one pass is the most
        # efficient way to do so, so a split's bottleneck bounds its latency from below.
        if best is not None and bottleneck_s >= best.predicted_latency_s:
            continue
        plans = [plan_slices_for(pb, stages, method="hpipe")]
        if pb.batch > 1:
            plans.append(best_microbatches(pb, "hpipe", stages, counts=range(2, pb.batch + 1)))
        for plan in plans:
            if plan is not None and (best is None
                                     or plan.predicted_latency_s < best.predicted_latency_s):
                best = plan
    if best is None:
        raise InfeasiblePlanError(
            f"hpipe: layers fit but no slicing of {pb.seq_len} tokens at a {pb.grain_tokens}-"
            f"token grain fits memory at batch {pb.batch}; fits: a smaller batch or grain_tokens")
    return best
