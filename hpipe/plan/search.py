"""HPipe's search: workload DP -> split ranking -> slicing DP -> exact re-scoring (Alpa's
"search wrapper" layer between the DP kernels and the front door).

1. The workload DP (``layers.py``) proposes splits, over single devices and, with
   ``allow_tp``, over tensor-parallel groups inside a host too (``groups.py``): Alpa's
   inter-operator (pipeline) search with intra-operator (tensor) parallelism inside a stage.
   ``candidate_splits`` says which and why.
2. A cheap bound (``rank.py``) ranks them; the best ``NUM_FULL_SPLITS`` get the slicing DP
   (``slices.py``), whose best few slicings by its closed-form estimate, with the equal
   slicings and the micro-batch counts, are
3. simulated exactly (``hpipe.sim``), and the fastest plan wins: the closed form is only an
   estimate with heterogeneous stages (algorithms.md section 5 shows it can be off by a
   third), so the simulator, not the estimate, has the last word.
4. A hill climb (``climb.py``) plans the neighbours of the best plan's split and of the best
   ranked splits in full, while any is faster: the proxies of steps 1-2 miss the fastest
   split on short prompts ([Note: why the search climbs]). At a local optimum, with
   budget left, it plans the best two-change neighbours by the estimate, then climbs from
   the other ranked splits and the DP's splits with one device left out ([Note: two
   changes at once]).
With ``allow_tp`` this runs twice: over single devices (the whole ``allow_tp=False`` search),
then over TP groups too, starting from the first search's plan.

[Note: HPipe contains every baseline] Each baseline's final configuration is one of HPipe's
candidates, scored by the same simulator, so HPipe's pick is never slower than any of them,
exactly, by construction (whether or not the split is among the fully searched ones):
- Base: the even split, one slice, one micro-batch;
- GPipe: the even split, one slice, 1 .. batch micro-batches;
- GP-B: the single-device workload DP's best split (``plan_hpipe_split(pb)[0]``), same sweep;
- TeraPipe: the even split with TeraPipe's own slicing (``terapipe_slices``, added verbatim:
  HPipe's slicing DP minimises another estimate and can miss it);
- Megatron and TP-T (with ``allow_tp``): the same on the even split over Megatron's TP pairs.
A baseline that fits memory therefore means HPipe fits too. Pruning keeps this exact, as it
only skips what cannot win, by two lower bounds:
- a split whose DP bottleneck is no less than the best latency so far is skipped: the
  bottleneck is a stage's time for the whole prefill in one pass, and no slicing or
  micro-batching of that work is faster under the cost models here (smaller GEMMs, weights
  re-read per unit, a link latency per transfer);
- a plan whose flow-shop bound (``rank.plan_bound_s``) is no less is not simulated: every
  stage and link handles its units one at a time, after the first unit has passed the ones
  before it and before the last unit passes the ones after it.
The climb only ever replaces the best plan by a faster one, so this holds after it too.
``allow_tp`` is never slower than a pure pipeline, exactly, for the same reason: its search
starts from the pure pipeline's final plan (``plan_hpipe``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from hpipe.errors import InfeasiblePlanError
from hpipe.plan.climb import climb
from hpipe.plan.evaluate import (
    MemoCost,
    Problem,
    check_memory,
    memory_overflows,
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
    split_sum_s,
    splits_by_stages,
    stages_from_counts,
)
from hpipe.plan.plan import Plan, StagePlan
from hpipe.plan.rank import estimate_split_s, microbatch_counts, plan_bound_s, uniform_slicings
from hpipe.plan.slices import plan_slicing

# How many of the workload DP's splits (best host orders) become candidates, and how many
# slicings per split are re-scored with the simulator.
NUM_SPLITS = 3
NUM_SLICINGS = 8
# Candidate splits that get the slicing DP and the simulator, best ranked first (in each of the
# two searches with ``allow_tp``). Four keeps the paper setting well under a second; with
# three, an extra or a faster device made the plan worse on 3 of 1,300 random small
# instances, with four on none (tests/test_plan_properties.py).
NUM_FULL_SPLITS = 4
# Of those, how many the climb starts from besides the best plan's split. On the 862 random
# instances of [Note: why the search climbs], climbing from the best split alone left 23 short
# of planning every split in full, from the four best ranked too 3, for ~20% more time.
NUM_CLIMB_STARTS = 4
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
                             overlap_comm=pb.overlap_comm, groups=groups,
                             kv_tokens=pb.kv_tokens)


def no_split_error(pb: Problem) -> InfeasiblePlanError:
    return InfeasiblePlanError(explain_no_split(
        pb.cost, model=pb.model, cluster=pb.cluster, batch=pb.batch, seq_len=pb.seq_len,
        units=hpipe_units(pb.grain_tokens)))


def _dp_splits(sc: SplitCosts, pb: Problem, groups: tuple[Group, ...]) -> list[LayerSplit]:
    """The workload DP's feasible splits on ``groups``, one per host order, best first."""
    return [s for s in plan_layers(sc, pb.orders(), groups=groups)
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
        raise no_split_error(pb)
    return out


@dataclass(frozen=True)
class Candidate:
    """A split worth planning. ``bottleneck_s`` bounds its latency from below (0 when unknown).
    ``baseline``: a baseline runs it with one slice and 1 .. batch micro-batches; ``terapipe``:
    TeraPipe or TP-T runs it with TeraPipe's slicing. Those configurations are always scored."""

    bottleneck_s: float
    stages: tuple[StagePlan, ...]
    baseline: bool = False
    terapipe: bool = False


def candidate_splits(pb: Problem, *, tp: bool) -> tuple[list[Candidate], bool]:
    """(candidates best bottleneck first, whether the workload DP found any split that fits),
    over single devices, or with ``tp`` over single devices and TP groups mixed.

    - the workload DP's best split for each of the best ``NUM_SPLITS`` host orders: its
      bottleneck is the right objective when many slices keep every stage busy;
    - its best split for every number of stages K (over host orders): a pipeline of K stages
      fills in about K - 1 slice times, so with few slices a split with fewer, slower stages
      can win; and a new device that adds a stage to the best split cannot hide the best split
      with the old stage count (the DP allows it zero layers);
    - the split with the least *sum* of stage times (``solve_split_one_pass``), the optimum
      when a prompt runs as one slice, with room for the whole prompt's workspace and with
      room for a grain slice's;
    the DP's splits leave room for a grain slice of the whole batch or, when none can, for
    one row of whole sequences (the finest micro-batch);
    and the baselines' even split (over devices; with ``tp`` over Megatron's pairs), so that
    HPipe contains every baseline (the note above).
    """
    singles = single_groups(pb.cluster)
    groups = stage_groups(pb.cluster, allow_tp=tp)
    found: dict[tuple[StagePlan, ...], Candidate] = {}

    def add(split_groups, counts, *, baseline: bool = False, terapipe: bool = False) -> None:
        stages = stages_from_counts(split_groups, counts)
        b = split_bottleneck_s(sc, tuple(split_groups), tuple(counts))
        old = found.get(stages, Candidate(0.0, stages))
        # A split too full for the whole batch's grain slice may still take micro-batches of a
        # few rows; with no bound to prune by, it is always tried (key 0).
        found[stages] = Candidate(b if math.isfinite(b) else 0.0, stages,
                                  baseline or old.baseline, terapipe or old.terapipe)

    dp_feasible = False
    orders = pb.orders()
    # The DP leaves each block room for HPipe's finest unit, a grain slice of the whole batch;
    # when no split has that, room for GPipe's finest, one row of whole sequences, may remain.
    finest = [hpipe_units(pb.grain_tokens)(pb.batch, pb.seq_len)]
    if pb.batch > 1:
        finest.append(((1, pb.seq_len, 0),))
    for units in finest:
        sc = _split_costs(pb, groups, units)
        by_order = [splits_by_stages(sc, o, groups=groups) for o in orders]
        splits = sorted((min(b, key=lambda s: s.bottleneck_s) for b in by_order),
                        key=lambda s: s.bottleneck_s)
        splits = [s for s in splits if math.isfinite(s.bottleneck_s)]
        dp_feasible = bool(splits)
        for i, split in enumerate(splits[:NUM_SPLITS]):
            add(split.groups, split.counts,
                baseline=i == 0 and not tp and units is finest[0])  # GP-B's
        for K in range(1, pb.cluster.num_devices + 1):
            split = min((b[K - 1] for b in by_order), key=lambda s: s.bottleneck_s)
            if math.isfinite(split.bottleneck_s):
                add(split.groups, split.counts)
        if dp_feasible:
            break
    if dp_feasible:
        whole = _split_costs(pb, groups, ((pb.batch, pb.seq_len, 0),))
        for scx in (whole, sc):
            one_pass = [solve_split_one_pass(scx, o, groups=groups) for o in orders]
            best = min(one_pass, key=lambda s: split_sum_s(scx, s.groups, s.counts))
            if math.isfinite(best.bottleneck_s):
                add(best.groups, best.counts)
    n = pb.model.num_layers
    even = tuple(tp_pairs(pb.cluster)) if tp else singles
    add(even, even_counts(n, len(even)), baseline=True, terapipe=True)
    return sorted(found.values(), key=lambda c: c.bottleneck_s), dp_feasible


def plan_slices_for(pb: Problem, stages: tuple[StagePlan, ...], *, method: str,
                    notes: tuple[str, ...] = (),
                    extra_slicings: tuple[tuple[int, ...], ...] = (),
                    cutoff_s: float = math.inf) -> Plan | None:
    """HPipe's slicing of the prompt over fixed stages, re-scored; None if no slicing fits.

    Candidates: the DP's best few by estimate, plus the uniform slicings (1, 2, 4, ... equal
    slices) so that the pick is never worse than the paper's uniform ablation or a single
    pass, plus ``extra_slicings`` (a baseline's); the fastest simulated wins. A candidate whose
    lower bound (``rank.plan_bound_s``) cannot beat the best so far, or ``cutoff_s`` (the
    search's best plan elsewhere), is not simulated: it could not win. The result may then be
    None, or no faster than ``cutoff_s``.
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
    plans = [pb.plan(method, stages, sl, notes=notes) for sl in cands]
    bounds = [plan_bound_s(pb, p) for p in plans]
    best: Plan | None = None
    for i in sorted(range(len(plans)), key=lambda i: bounds[i]):
        if bounds[i] >= cutoff_s or (best is not None and bounds[i] > best.predicted_latency_s):
            continue  # its latency is at least its bound
        plan = pb.score(plans[i])
        # Fastest simulated; on a tie, fewer slices (less per-slice overhead in a runtime).
        if best is None or ((plan.predicted_latency_s, len(plan.slices))
                            < (best.predicted_latency_s, len(best.slices))):
            best = plan
    if best is None:
        return None
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
    """Whether every slice's workspace fits. A slice's workspace grows with its prefix (its
    attention reads more keys), so each distinct length is asked once, where it starts last:
    an equal slicing of k slices costs two questions, not k."""
    last_start, p = {}, 0
    for s in slices:
        last_start[s] = p
        p += s
    return all(st.fits(s, p) for s, p in last_start.items())


def best_microbatches(pb: Problem, method: str, stages: tuple[StagePlan, ...], *,
                      counts: Sequence[int] | None = None,
                      cutoff_s: float = math.inf) -> Plan | None:
    """GPipe's sweep: micro-batch counts 1..batch (``rank.microbatch_counts``) of whole
    sequences, the fastest that fits memory (simulated). Raises naming the device when none
    fits and ``counts`` is the full sweep (a baseline's OOM); returns None for a partial sweep
    that finds nothing, or nothing faster than ``cutoff_s`` (a count whose lower bound cannot
    beat it is not simulated)."""
    full_sweep = counts is None
    counts = microbatch_counts(pb.batch) if counts is None else counts
    if not counts:
        return None
    # More micro-batches never need more memory (the weights and the whole batch's KV cache
    # stay; only the workspace shrinks with the rows per unit), so when the finest count does
    # not fit, none does: say so at once instead of trying every count (batch 100000 took
    # over 10 minutes to find that out).
    finest = pb.plan(method, stages, (pb.seq_len,), num_microbatches=max(counts))
    if memory_overflows(finest, pb.cost, kv_tokens=pb.kv_tokens):
        if full_sweep:
            check_memory(finest, pb.cost, kv_tokens=pb.kv_tokens)  # raises, naming the device
        return None
    best = None
    for m in counts:
        plan = pb.plan(method, stages, (pb.seq_len,), num_microbatches=m)
        if memory_overflows(plan, pb.cost, kv_tokens=pb.kv_tokens):
            continue
        if cutoff_s < math.inf and plan_bound_s(pb, plan) >= cutoff_s:
            continue
        plan = pb.score(plan)
        if best is None or plan.predicted_latency_s < best.predicted_latency_s:
            best = plan
    return best


def _scored_below(pb: Problem, plan: Plan, cutoff_s: float) -> Plan | None:
    """The plan, simulated, unless its lower bound shows it cannot beat ``cutoff_s``."""
    return None if plan_bound_s(pb, plan) >= cutoff_s else pb.score(plan)


def _stages_key(stages: tuple[StagePlan, ...]) -> tuple:
    """A total order on splits, so that ranking ties break the same way in every search."""
    return tuple((st.devices, st.layer_start, st.layer_stop) for st in stages)


def plan_hpipe(pb: Problem, *, allow_tp: bool = True) -> Plan:
    """[design] HPipe's pipeline unit is a token slice of the whole batch; for prompts too
    short to cut into useful slices, splitting the batch into micro-batches (GPipe's unit)
    can pipeline better, so the search scores those too and keeps whichever is fastest.

    ``allow_tp=False`` restricts it to pure pipelines (one device per stage). With it, the
    pure-pipeline search runs first, unchanged, and the search over TP groups starts from its
    plan, so allowing tensor parallelism never makes the plan slower."""
    # Both searches and the climbs ask the cost model the same questions many times (MemoCost).
    pb = dataclasses.replace(pb, cost=MemoCost(pb.cost))
    seen: set[tuple[StagePlan, ...]] = set()  # splits planned in full
    best, dp_feasible = _search(pb, tp=False, best=None, seen=seen)
    if allow_tp:
        best, tp_feasible = _search(pb, tp=True, best=best, seen=seen)
        dp_feasible |= tp_feasible
    if best is None:
        if not dp_feasible:
            raise no_split_error(pb)
        raise InfeasiblePlanError(
            f"hpipe: layers fit but no slicing of {pb.seq_len} tokens at a {pb.grain_tokens}-"
            f"token grain fits memory at batch {pb.batch}; fits: a smaller batch or grain_tokens")
    return polish_uniform(pb, best)


MAX_UNIFORM_SLICES = 128


def max_equal_slices(seq_len: int, grain_tokens: int) -> int:
    """The most equal slices HPipe tries: up to MAX_UNIFORM_SLICES, none under the grain."""
    return max(1, min(MAX_UNIFORM_SLICES, seq_len // grain_tokens))


def uniform_count_slicing(seq_len: int, count: int) -> tuple[int, ...]:
    """``count`` near-equal slices of ``seq_len`` tokens, the longer ones first."""
    q, r = divmod(seq_len, count)
    return tuple(q + (1 if i < r else 0) for i in range(count))


def polish_uniform(pb: Problem, plan: Plan) -> Plan:
    """``plan``, or the same stages with k equal slices where that is faster, for every k in
    1 .. MAX_UNIFORM_SLICES whose slices are at least the grain (the finest the search plans
    for): the slicing DP's grid and estimate can miss a count (LLaMA-7B on the paper cluster:
    21 equal slices took 2.547 s, the DP's 22 slices 2.554 s). Only the final split pays for
    this; only slicings whose bound beats the plan are simulated."""
    if plan.num_microbatches > 1:
        return plan
    st = pb.slice_times(plan.stages)
    best = plan
    for k in range(1, max_equal_slices(pb.seq_len, pb.grain_tokens) + 1):
        sl = uniform_count_slicing(pb.seq_len, k)
        if sl == best.slices or not _fits(st, sl):
            continue
        cand = dataclasses.replace(best, slices=sl, predicted_latency_s=None)
        if plan_bound_s(pb, cand) >= best.predicted_latency_s:
            continue
        cand = pb.score(cand)
        if cand.predicted_latency_s < best.predicted_latency_s:
            best = cand
    if best is plan:
        return plan
    table = tuple((n, best.slices if n == pb.seq_len else sl) for n, sl in plan.slice_table)
    return dataclasses.replace(best, slice_table=table)


def _search(pb: Problem, *, tp: bool, best: Plan | None,
            seen: set[tuple[StagePlan, ...]]) -> tuple[Plan | None, bool]:
    """(the fastest of ``best`` and the plans found over ``candidate_splits(pb, tp=tp)`` and
    the climb from them, whether the workload DP found a split). ``seen``: splits already
    planned in full, which are not planned again (they could not beat ``best``); it grows."""
    candidates, dp_feasible = candidate_splits(pb, tp=tp)
    ranked = sorted((c for c in candidates if c.stages not in seen),
                    key=lambda c: (estimate_split_s(pb, c.stages), c.bottleneck_s,
                                   _stages_key(c.stages)))
    full = ranked[:NUM_FULL_SPLITS]
    seen.update(c.stages for c in full)

    def cutoff() -> float:
        return math.inf if best is None else best.predicted_latency_s

    # The fully searched splits first, best ranked first, so that the bounds prune the most.
    for cand in full + [c for c in candidates if c not in full]:
        # A split's bottleneck bounds its latency from below (the note at the top), so a split
        # whose bottleneck is no better than the best plan so far cannot win.
        if cand.bottleneck_s >= cutoff():
            continue
        extra = ()
        if cand.terapipe:
            sl = terapipe_slices(pb, cand.stages)
            extra = () if sl is None else (sl,)
        runs: list = []
        if cand in full:
            runs.append(lambda c=cand, e=extra: _plan_split(pb, c.stages, cutoff(), e))
        else:  # only what a baseline runs on it
            for sl in extra:
                runs.append(lambda c=cand, sl=sl: _scored_below(
                    pb, pb.plan("hpipe", c.stages, sl), cutoff()))
            if cand.baseline:
                runs.append(lambda c=cand: best_microbatches(
                    pb, "hpipe", c.stages, counts=microbatch_counts(pb.batch), cutoff_s=cutoff()))
        for run in runs:
            plan = run()
            if plan is not None and plan.predicted_latency_s < cutoff():
                best = plan
    if best is not None:
        best = climb(pb, best, [c.stages for c in full[:NUM_CLIMB_STARTS]],
                     later_starts=_later_starts(pb, ranked[NUM_FULL_SPLITS:], tp=tp),
                     groups=stage_groups(pb.cluster, allow_tp=tp), seen=seen,
                     plan_split=lambda stages, b: _plan_split(
                         pb, stages, b.predicted_latency_s,
                         (b.slices,) if b.num_microbatches == 1 else ()))
    return best, dp_feasible


def _later_starts(pb: Problem, rest: list[Candidate], *,
                  tp: bool) -> Iterator[tuple[StagePlan, ...]]:
    """The climb's further starts, asked for only while its budget lasts: the ranked splits
    not planned in full, then the workload DP's best split for every stage count with one
    device left out, for each device, best estimate first ([Note: two changes at once])."""
    yield from (c.stages for c in rest)
    groups = stage_groups(pb.cluster, allow_tp=tp)
    sc = _split_costs(pb, groups, hpipe_units(pb.grain_tokens)(pb.batch, pb.seq_len))
    orders = pb.orders()
    found: dict[tuple[StagePlan, ...], None] = {}
    for d in range(pb.cluster.num_devices):
        without = tuple(g for g in groups if d not in g)
        by_order = [splits_by_stages(sc, o, groups=without) for o in orders]
        for K in range(1, pb.cluster.num_devices):
            split = min((b[K - 1] for b in by_order), key=lambda s: s.bottleneck_s)
            if math.isfinite(split.bottleneck_s):
                found[split.stages()] = None
    estimates = {s: estimate_split_s(pb, s) for s in found}
    yield from sorted((s for s in found if math.isfinite(estimates[s])),
                      key=estimates.__getitem__)


def _plan_split(pb: Problem, stages: tuple[StagePlan, ...], cutoff_s: float,
                extra_slicings: tuple[tuple[int, ...], ...] = ()) -> Plan | None:
    """A split planned in full: HPipe's slicing (with ``extra_slicings``) and 2 .. batch
    micro-batches, the fastest simulated. None, or a plan no faster than ``cutoff_s``, when
    nothing fits or what was pruned could not beat it (``plan_slices_for``)."""
    best = plan_slices_for(pb, stages, method="hpipe", extra_slicings=extra_slicings,
                           cutoff_s=cutoff_s)
    if best is not None:
        cutoff_s = min(cutoff_s, best.predicted_latency_s)
    if pb.batch > 1:
        plan = best_microbatches(pb, "hpipe", stages, counts=microbatch_counts(pb.batch, first=2),
                                 cutoff_s=cutoff_s)
        if plan is not None and plan.predicted_latency_s < cutoff_s:
            best = plan
    return best
