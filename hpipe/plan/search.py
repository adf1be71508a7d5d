"""HPipe's search: workload DP per host order -> slicing DP -> exact re-scoring (Alpa's
"search wrapper" layer between the DP kernels and the front door).

1. The workload DP (``layers.py``) gives each host order its least-bottleneck split, over
   single devices and, with ``allow_tp``, over tensor-parallel groups inside a host too
   (``groups.py``): Alpa's inter-operator (pipeline) search with intra-operator (tensor)
   parallelism inside a stage.
2. For the best few distinct splits, the slicing DP (``slices.py``) proposes its best few
   slicings by the closed-form estimate.
3. Each (split, slicing) candidate is simulated exactly (``hpipe.sim``) and the fastest kept:
   the closed form is only an estimate with heterogeneous stages (algorithms.md section 5
   shows it can be off by a third), so the simulator, not the estimate, has the last word.

[Note: HPipe contains every baseline] Each baseline's final configuration is one of HPipe's
candidates, scored by the same simulator, so HPipe's pick is never slower than any of them,
exactly, by construction:
- Base: the even split, one slice (the uniform slicing of 1), one micro-batch;
- GPipe: the even split, one slice, 1 .. batch micro-batches;
- GP-B: the single-device workload DP's best split (``plan_hpipe_split(pb)[0]``), same sweep;
- TeraPipe: the even split with TeraPipe's own slicing (``terapipe_slices``, added verbatim:
  HPipe's slicing DP minimises another estimate and can miss it);
- Megatron and TP-T (with ``allow_tp``): the same on the even split over Megatron's TP pairs.
A baseline that fits memory therefore means HPipe fits too. The one pruning rule (skip a split
whose DP bottleneck is no less than the best latency so far) keeps this exact: a split's
bottleneck is its every stage's time for the whole prefill in one pass, and no slicing or
micro-batching of that work is faster under the cost models here (smaller GEMMs, weights
re-read per unit, a link latency per transfer), so it bounds any plan on that split from below.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from hpipe.errors import InfeasiblePlanError
from hpipe.plan.evaluate import (
    Problem,
    check_memory,
    memory_overflows,
    scored,
    stage_slice_times,
)
from hpipe.plan.feasibility import explain_no_split
from hpipe.plan.groups import Group, single_groups, stage_groups, tp_pairs
from hpipe.plan.layers import (
    LayerSplit,
    SplitCosts,
    build_split_costs,
    even_counts,
    plan_layers,
    solve_split_one_pass,
    split_bottleneck_s,
    stages_from_counts,
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


def _split_costs(pb: Problem, groups: tuple[Group, ...],
                 units: tuple[tuple[int, int, int], ...]) -> SplitCosts:
    return build_split_costs(pb.cost, model=pb.model, cluster=pb.cluster, batch=pb.batch,
                             seq_len=pb.seq_len, dtype=pb.dtype, units=units,
                             overlap_comm=pb.overlap_comm, groups=groups)


def _no_split_error(pb: Problem) -> InfeasiblePlanError:
    return InfeasiblePlanError(explain_no_split(
        pb.cost, model=pb.model, cluster=pb.cluster, batch=pb.batch, seq_len=pb.seq_len,
        units=hpipe_units(pb.grain_tokens)))


def _dp_splits(sc: SplitCosts, pb: Problem, groups: tuple[Group, ...]) -> list[LayerSplit]:
    """The workload DP's feasible splits on ``groups``, one per host order, best first."""
    return [s for s in plan_layers(sc, pb.cluster.host_orders(), groups=groups)
            if math.isfinite(s.bottleneck_s)]


def plan_hpipe_split(pb: Problem) -> list[tuple[StagePlan, ...]]:
    """Distinct single-device workload-DP splits over host orders, best bottleneck first (the
    split of GP-B and of a manual plan without --layers); raises if none fits."""
    singles = single_groups(pb.cluster)
    sc = _split_costs(pb, singles, hpipe_units(pb.grain_tokens)(pb.batch, pb.seq_len))
    out: list[tuple[StagePlan, ...]] = []
    for split in _dp_splits(sc, pb, singles):
        if split.stages() not in out:
            out.append(split.stages())
    if not out:
        raise _no_split_error(pb)
    return out


@dataclass(frozen=True)
class Candidate:
    """A split worth slicing. ``bottleneck_s`` bounds its latency from below (0 when unknown);
    ``terapipe``: also score TeraPipe's slicing on it (the even splits the baselines use)."""

    bottleneck_s: float
    stages: tuple[StagePlan, ...]
    terapipe: bool = False


def candidate_splits(pb: Problem, *, allow_tp: bool = True) -> tuple[list[Candidate], bool]:
    """(candidates best bottleneck first, whether the workload DP found any split that fits).

    - The workload DP's best few splits over single devices (GP-B's split first), and with
      ``allow_tp`` over TP groups too. Its bottleneck is the right objective when many slices
      keep every stage busy;
    - a prompt of a few slices runs almost sequentially, where the split with the least *sum*
      of stage times wins (``solve_split_one_pass``), again without and with TP groups;
    - the baselines' even splits (over devices; with ``allow_tp`` over Megatron's pairs), so
      that HPipe contains every baseline (the note above).
    The simulator decides between them.
    """
    units = hpipe_units(pb.grain_tokens)(pb.batch, pb.seq_len)
    singles = single_groups(pb.cluster)
    groups = stage_groups(pb.cluster, allow_tp=allow_tp)
    sc = _split_costs(pb, groups, units)
    kinds = [singles, groups] if allow_tp else [singles]
    found: dict[tuple[StagePlan, ...], Candidate] = {}

    def add(split_groups, counts, *, terapipe: bool = False) -> None:
        stages = stages_from_counts(split_groups, counts)
        b = split_bottleneck_s(sc, tuple(split_groups), tuple(counts))
        old = found.get(stages)
        # A split too full for the whole batch's grain slice may still take micro-batches of a
        # few rows; with no bound to prune by, it is always tried (key 0).
        found[stages] = Candidate(b if math.isfinite(b) else 0.0, stages,
                                  terapipe or (old is not None and old.terapipe))

    dp_feasible = False
    for gs in kinds:
        splits = _dp_splits(sc, pb, gs)
        dp_feasible |= bool(splits)
        for split in splits[:NUM_SPLITS]:
            add(split.groups, split.counts)
    if dp_feasible:
        # One pass means the whole prompt's workspace must fit, not just a grain's.
        sc1 = _split_costs(pb, groups, ((pb.batch, pb.seq_len, 0),))
        for gs in kinds:
            one_pass = [solve_split_one_pass(sc1, o, groups=gs) for o in pb.cluster.host_orders()]
            best = min(one_pass, key=lambda s: _sum_s(sc1, s))
            if math.isfinite(best.bottleneck_s):
                add(best.groups, best.counts)
    n = pb.model.num_layers
    even_groups = [singles] + ([tuple(tp_pairs(pb.cluster))] if allow_tp else [])
    for gs in even_groups:
        add(gs, even_counts(n, len(gs)), terapipe=True)
    return sorted(found.values(), key=lambda c: c.bottleneck_s), dp_feasible


def _sum_s(sc: SplitCosts, split: LayerSplit) -> float:
    """Sum of stage times and transfers of a split: its one-slice latency."""
    if not math.isfinite(split.bottleneck_s):
        return math.inf
    stages = split.stages()
    total = 0.0
    for i, st in enumerate(stages):
        total += sc.block_s(st.devices, st.layer_start, st.layer_stop)
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
                    notes: tuple[str, ...] = (),
                    extra_slicings: tuple[tuple[int, ...], ...] = ()) -> Plan | None:
    """HPipe's slicing of the prompt over fixed stages, re-scored; None if no slicing fits.

    Candidates: the DP's best few by estimate, plus the uniform slicings (1, 2, 4, ... equal
    slices) so that the pick is never worse than the paper's uniform ablation or a single
    pass, plus ``extra_slicings`` (a baseline's); all are simulated and the fastest wins.
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
    for sl in (*uniform_slicings(pb.seq_len, pb.grain_tokens), *extra_slicings):
        if sl not in cands and _fits(st, sl):
            cands.append(sl)
    plans = [scored(pb.plan(method, stages, sl, notes=notes), pb.cost) for sl in cands]
    # Fastest simulated; on a tie, fewer slices (less per-slice overhead in a real runtime).
    best = min(plans, key=lambda p: (p.predicted_latency_s, len(p.slices)))
    # The table's entry for this length is the re-scored winner, not the estimate's.
    table = tuple((n, best.slices if n == pb.seq_len else sl) for n, sl in res.table)
    return dataclasses.replace(best, slice_table=table)


def terapipe_slices(pb: Problem, stages: tuple[StagePlan, ...]) -> tuple[int, ...] | None:
    """TeraPipe's slicing of fixed stages; None if no slicing fits memory.

    TeraPipe's DP assumes every stage costs the same, so it plans against one stage: the
    slowest over the whole prefill. Its pick is its own estimate's best (no re-scoring).
    """
    full = stage_slice_times(stages, pb.cost, model=pb.model, dtype=pb.dtype, rows=pb.batch,
                             tokens=pb.seq_len, prefix=0, overlap_comm=pb.overlap_comm)
    slowest = max(range(len(stages)), key=lambda j: full[j])
    st = pb.slice_times(stages, only_stage=slowest)
    res = plan_slicing(st.tau, fits_fn=st.fits, tau_row_fn=st.tau_row, seq_len=pb.seq_len,
                       grain_tokens=pb.grain_tokens, num_stages=len(stages), num_candidates=1)
    return None if res is None else res.slices


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


def plan_hpipe(pb: Problem, *, allow_tp: bool = True) -> Plan:
    """[design] HPipe's pipeline unit is a token slice of the whole batch; for prompts too
    short to cut into useful slices, splitting the batch into micro-batches (GPipe's unit)
    can pipeline better, so the search scores those too and keeps whichever is fastest.

    ``allow_tp=False`` restricts it to pure pipelines (one device per stage)."""
    candidates, dp_feasible = candidate_splits(pb, allow_tp=allow_tp)
    best: Plan | None = None
    for cand in candidates:
        # A split's bottleneck bounds its latency from below (the note at the top), so a split
        # whose bottleneck is no better than the best plan so far cannot win.
        if best is not None and cand.bottleneck_s >= best.predicted_latency_s:
            continue
        extra = ()
        if cand.terapipe:
            sl = terapipe_slices(pb, cand.stages)
            extra = () if sl is None else (sl,)
        plans = [plan_slices_for(pb, cand.stages, method="hpipe", extra_slicings=extra)]
        if pb.batch > 1:
            plans.append(best_microbatches(pb, "hpipe", cand.stages,
                                           counts=range(2, pb.batch + 1)))
        for plan in plans:
            if plan is not None and (best is None
                                     or plan.predicted_latency_s < best.predicted_latency_s):
                best = plan
    if best is None:
        if not dp_feasible:
            raise _no_split_error(pb)
        raise InfeasiblePlanError(
            f"hpipe: layers fit but no slicing of {pb.seq_len} tokens at a {pb.grain_tokens}-"
            f"token grain fits memory at batch {pb.batch}; fits: a smaller batch or grain_tokens")
    return best
