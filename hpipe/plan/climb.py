"""A hill climb over neighbouring splits, after the search (``search.py``) has planned its
candidates: each neighbour is planned in full (slicing DP, micro-batch counts, simulator).

[Note: why the search climbs] The search picks splits by proxies: the workload DP's
bottleneck for each stage count, the least sum, the flow-shop bound's ranking. On short
prompts (a few slices, so the pipeline fill and the memory left for slices matter) the
fastest simulated split is often none of them but a small change away from one of them: a
boundary moved by a layer, a stage dropped, another host order, an idle device taking a
stage. An extra or a faster device changes the proxies, so the old winner could leave the
candidates while nothing as fast replaced it: a 4x faster device made the plan 15% slower.
Climbing on the simulator's latency, from the best plan and from the best ranked splits,
finds such plans again. On 862 random instances of up to 6 devices, 12 layers and 12 grid
steps with at most 400 splits, the search's plan was slower than the best of every split
planned in full on 78 and is now on 3 (before [Note: two changes at once]). Only a strictly
faster plan is ever taken, so what the search guarantees before the climb (search.py's
notes) holds after it.

[Note: two changes at once] A first-improvement climb stops where every single change is
slower, and an extra or a faster device can leave the search there while the old winner is
two changes away, each slower on its own (seed 2369 of tests/test_plan_properties.py's wide
instances, a 4x faster device with TP: a stage dropped and two hosts' TP pairs swapped; 16%
slower), or a neighbour of a ranked split that the new device's splits pushed out of the
climb's starts (seed 922, an extra device: two 7-stage splits outranked the 3-stage split
next to the old winner; 4.4%), or a split with one device fewer that no proxy proposes any
more (seed 1417, a 4x faster device: the old winner leaves it idle and was the workload
DP's best 3-stage split, which now uses it; 3.0%). So at a local optimum, while budget is
left, the climb (1) ranks the best plan's two-change neighbours (tens to a few hundred; too
many to plan in full) by ``rank.estimate_split_s`` and plans the best ``NUM_PAIR_TRIES``, and
failing that (2) plans and climbs from up to ``NUM_LATER_STARTS`` further starts (at most
``NUM_LATER_PLANS`` plans in all): the search's ranked splits not yet planned in full, then
the workload DP's best split for every stage count with one device left out, for each
device (what the DP proposed before the device was added or sped up). Both run only on
budget left over, so a long prompt, whose budget the first neighbours spend, gets the same
plan in the same time; short prompts pay for them (below). Of the 11 wide seeds where an
extra or a faster device made the plan slower, none is left, and each step is needed: (1)
alone mended 2369 and 1052 but not 922, (1) with the ranked splits of (2) not 1417
(tests/test_plan_properties.py asserts all 11). Over seeds 600-2599 (4,802 comparisons) 2
remain, both new and both an extra device without TP: seed 1054, 1.5%, and seed 1646,
0.01%; the steps made the plan on the smaller cluster faster and not the one on the larger.
They made 120 of the sweep's 4,802 plans faster, by up to 24%, and none slower (only a
faster plan is taken); the sweep took 2,301 s instead of 1,248 s (a shared 2-core machine).

Each neighbour costs about as much as a candidate, a slicing DP over grid points^2 x stages,
so the climb plans neighbours within ``CLIMB_WORK`` of that work. Short prompts, where the
proxies are poorest, get a full climb (12 grid steps on 6 stages: over 100 neighbours, more
than a climb from the first starts takes); the paper setting (129 grid points, 3 stages) a
neighbour or two; a 32k-token prompt on 8 stages none, which keeps the planner speed goals
(benchmarks/planner_speed.py), with the same plans and times after [Note: two changes at
once]. Short prompts on large models pay for it with the same plans: on the paper's cluster
a 128-token prompt plans in 0.9 s instead of 0.4 s, 256 tokens at batch 6 in 1.8 s instead
of 1.4 s (same machine, same load).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable

from hpipe.plan.evaluate import Problem, stage_slice_times
from hpipe.plan.groups import Group
from hpipe.plan.layers import even_counts
from hpipe.plan.plan import Plan, StagePlan
from hpipe.plan.rank import estimate_split_s
from hpipe.plan.slices import grid_positions

CLIMB_WORK = 2**17  # grid points^2 x stages, summed over the neighbours planned
# Two-change neighbours planned in full at each local optimum, best by estimate first
# ([Note: two changes at once]).
NUM_PAIR_TRIES = 3
# At most this many further starts are climbed from at the local optima of one climb, and
# at most NUM_LATER_PLANS splits planned in full once the first of them is taken, besides
# ``CLIMB_WORK``: a plan's cost has a floor (the simulator, the micro-batch counts) that
# grid points^2 x stages misses on short prompts: with no limit but the budget the further
# climbs made a 128-token prompt on the paper's cluster plan 5x as long, with 64 plans 2.4x.
# With 32 plans, 1 of the 11 former violations came back (seed 1290, 0.05%), with 16 two.
NUM_LATER_STARTS = 8
NUM_LATER_PLANS = 64


def neighbour_splits(stages: tuple[StagePlan, ...], pb: Problem,
                     groups: tuple[Group, ...]) -> list[tuple[StagePlan, ...]]:
    """Splits one change away from ``stages``, each valid in some host order:

    - a boundary between two stages moved by one layer either way (a stage left empty
      drops out), or a stage dropped, its layers going to the stage before or after it;
    - two hosts' runs of stages swapped, every stage keeping its group and its number of
      layers (another host order);
    - an idle group of ``groups`` (none of its devices in use) that some host order places
      between stages j - 1 and j: taking the last layer of stage j - 1 or the first of
      stage j (a new stage), or all of stage j - 1's or stage j's layers (the stage moves);
    - a stage on another group of ``groups`` that overlaps its own and is otherwise idle
      (a device joins or leaves its TP group, or the group shifts by one); two adjacent
      stages whose devices form a group of ``groups`` joined on it, and a TP stage split
      into one stage per device, its layers shared evenly.
    """
    out = [*_moved_boundaries(stages), *_dropped_stages(stages),
           *_tp_joins_and_splits(stages, set(groups)), *_swapped_hosts(stages, pb),
           *_onto_other_groups(stages, pb, groups)]
    return [s for s in dict.fromkeys(out) if s != stages]


Split = tuple[StagePlan, ...]


def _moved_boundaries(stages: Split) -> list[Split]:
    """A boundary moved by one layer either way (a stage left empty drops out)."""
    out = []
    for j in range(len(stages) - 1):
        a, b = stages[j], stages[j + 1]
        for cut in (a.layer_stop - 1, a.layer_stop + 1):
            if a.layer_start <= cut <= b.layer_stop:
                moved = (*stages[:j], dataclasses.replace(a, layer_stop=cut),
                         dataclasses.replace(b, layer_start=cut), *stages[j + 2:])
                out.append(tuple(st for st in moved if st.num_layers))
    return out


def _dropped_stages(stages: Split) -> list[Split]:
    """Stage j's layers all go to the stage before or after it."""
    out = []
    num = len(stages)
    for j in range(num):
        for k in (j - 1, j + 1):
            if 0 <= k < num:
                grown = _resized(stages[k], stages[k].num_layers + stages[j].num_layers)
                out.append(_restacked([grown if i == k else st
                                       for i, st in enumerate(stages) if i != j]))
    return out


def _tp_joins_and_splits(stages: Split, allowed: set) -> list[Split]:
    """Two adjacent stages joined on their devices' TP group, and a TP stage split back into
    one stage per device, its layers shared evenly."""
    out = []
    num = len(stages)
    for j in range(num):
        a = stages[j]
        if j + 1 < num and a.devices + stages[j + 1].devices in allowed:
            joined = StagePlan(a.devices + stages[j + 1].devices, a.layer_start,
                               stages[j + 1].layer_stop)
            out.append((*stages[:j], joined, *stages[j + 2:]))
        if len(a.devices) > 1 and a.num_layers > 1 and all((d,) in allowed for d in a.devices):
            parts = [StagePlan((d,), 0, c)
                     for d, c in zip(a.devices, even_counts(a.num_layers, len(a.devices)))]
            out.append(_restacked([*stages[:j], *(p for p in parts if p.num_layers),
                                   *stages[j + 1:]]))
    return out


def _swapped_hosts(stages: Split, pb: Problem) -> list[Split]:
    """Two hosts' runs of stages swapped, every stage keeping its group and its layer count."""
    num = len(stages)
    host = [pb.cluster.devices[st.device].host for st in stages]
    runs, i = [], 0  # [start, stop) of each host's run of stages
    for j in range(1, num + 1):
        if j == num or host[j] != host[i]:
            runs.append((i, j))
            i = j
    out = []
    for x, (a0, a1) in enumerate(runs):
        for b0, b1 in runs[x + 1:]:
            out.append(_restacked([*stages[:a0], *stages[b0:b1], *stages[a1:b0],
                                   *stages[a0:a1], *stages[b1:]]))
    return out


def _onto_other_groups(stages: Split, pb: Problem, groups: tuple[Group, ...]) -> list[Split]:
    """In each host order that holds the split: an idle group between stages j - 1 and j takes
    a layer or a whole stage from either side; a group that overlaps stage j's and is otherwise
    idle takes stage j over (a device joins or leaves its TP group, or the group shifts)."""
    out = []
    num = len(stages)
    used = {d for st in stages for d in st.devices}
    for order in pb.orders():
        pos = {d: i for i, d in enumerate(order)}
        first = [pos[st.devices[0]] for st in stages]
        last = [pos[st.devices[-1]] for st in stages]
        if any(first[j + 1] <= last[j] for j in range(num - 1)):
            continue  # this order does not hold the split
        for g in groups:
            lo, hi = pos[g[0]], pos[g[-1]]
            if hi - lo != len(g) - 1:
                continue  # not consecutive in this order
            j = sum(1 for x in last if x < lo)  # the first stage that ends at or after g
            if used.isdisjoint(g) and (j == num or first[j] > hi):
                out += _into_idle_group(stages, StagePlan(tuple(g), 0, 0), j)
            elif (j < num and g != stages[j].devices
                  and used.intersection(g) <= set(stages[j].devices)
                  and (j == 0 or last[j - 1] < lo) and (j == num - 1 or hi < first[j + 1])):
                out.append((*stages[:j], dataclasses.replace(stages[j], devices=tuple(g)),
                            *stages[j + 1:]))
    return out


def _into_idle_group(stages: Split, new: StagePlan, j: int) -> list[Split]:
    """``new`` (an idle group, no layers yet) sits between stages j - 1 and j: it takes the
    last layer of stage j - 1 or all of them, or the first layer of stage j or all of them."""
    out = []
    if j > 0:
        s = stages[j - 1]
        if s.num_layers > 1:
            out.append(_restacked([*stages[:j - 1], _resized(s, s.num_layers - 1),
                                   _resized(new, 1), *stages[j:]]))
        out.append(_restacked([*stages[:j - 1], _resized(new, s.num_layers), *stages[j:]]))
    if j < len(stages):
        s = stages[j]
        if s.num_layers > 1:
            out.append(_restacked([*stages[:j], _resized(new, 1),
                                   _resized(s, s.num_layers - 1), *stages[j + 1:]]))
        out.append(_restacked([*stages[:j], _resized(new, s.num_layers), *stages[j + 1:]]))
    return out


def _resized(st: StagePlan, num_layers: int) -> StagePlan:
    return StagePlan(st.devices, 0, num_layers)


def _restacked(stages: list[StagePlan]) -> tuple[StagePlan, ...]:
    """The same groups and layer counts, in this order, layers renumbered from 0."""
    out, start = [], 0
    for st in stages:
        out.append(StagePlan(st.devices, start, start + st.num_layers))
        start += st.num_layers
    return tuple(out)


def climb(pb: Problem, best: Plan, starts: list[tuple[StagePlan, ...]], *,
          groups: tuple[Group, ...], seen: set,
          plan_split: Callable[[tuple[StagePlan, ...], Plan], Plan | None],
          later_starts: Iterable[tuple[StagePlan, ...]] = ()) -> Plan:
    """The fastest plan found by first-improvement hill climbing from ``best``'s split, then
    from each of ``starts``: every neighbour (``neighbour_splits`` over ``groups``) not in
    ``seen`` is planned by ``plan_split(stages, best)`` (its plan, or None where nothing
    fits or beats ``best``); a faster plan becomes ``best`` and its split is climbed from
    next. ``seen`` (splits already planned) grows with every split planned.

    At a local optimum of every start, while budget is left ([Note: two changes at once]):
    the best ``NUM_PAIR_TRIES`` of ``best``'s two-change neighbours by ``estimate_split_s``
    are planned, and the climb goes on from one that is faster; failing that, the next of
    ``later_starts`` (best first; at most ``NUM_LATER_STARTS``, and ``NUM_LATER_PLANS``
    plans from then on) is planned and climbed from.

    A split whose slowest stage over the whole prefill is no faster than ``best`` is not
    planned: no slicing or micro-batching of its work is faster (search.py's note)."""
    c = _Climb(pb, best, groups=groups, seen=seen, plan_split=plan_split,
               later_starts=later_starts)
    c.todo = list(dict.fromkeys([best.stages, *starts]))
    try:
        while True:
            c.climb_from_todo()
            if c.try_two_changes():
                continue
            if not c.take_later_start():
                break
    except _BudgetSpent:
        pass
    return c.best


class _BudgetSpent(Exception):
    """The climb's work budget ran out: the best plan so far is the answer."""


class _Climb:
    """The state of one ``climb``: the best plan, the splits to climb from, the budget."""

    def __init__(self, pb: Problem, best: Plan, *, groups: tuple[Group, ...], seen: set,
                 plan_split: Callable[[tuple[StagePlan, ...], Plan], Plan | None],
                 later_starts: Iterable[tuple[StagePlan, ...]]) -> None:
        self.pb, self.best, self.groups, self.seen = pb, best, groups, seen
        self.plan_split = plan_split
        self.work_left = CLIMB_WORK
        self.grid = len(grid_positions(pb.seq_len, pb.grain_tokens))
        self.todo: list[tuple[StagePlan, ...]] = []
        self.later = iter(later_starts)  # lazy: the caller may compute them only when asked
        self.num_later = 0
        self.later_plans_left: int | None = None  # counted once the first further start is taken
        self.paired: set[tuple[StagePlan, ...]] = set()  # splits whose pairs were tried

    def plan_cost(self) -> int:
        """Budget units of planning one split of ``best``'s size in full."""
        return self.grid**2 * len(self.best.stages)

    def try_split(self, stages: tuple[StagePlan, ...]) -> bool:
        """Plan ``stages`` unless seen or hopeless; whether it beat ``best`` (now ``best``).
        Raises _BudgetSpent once the budget is spent."""
        if stages in self.seen:
            return False
        self.seen.add(stages)
        if _whole_bottleneck_s(self.pb, stages) >= self.best.predicted_latency_s:
            return False
        self.work_left -= self.grid**2 * len(stages)
        if self.later_plans_left is not None:
            self.later_plans_left -= 1
        if self.work_left < 0 or (self.later_plans_left is not None
                                  and self.later_plans_left < 0):
            raise _BudgetSpent
        plan = self.plan_split(stages, self.best)
        if plan is not None and plan.predicted_latency_s < self.best.predicted_latency_s:
            self.best = plan
            return True
        return False

    def climb_from_todo(self) -> None:
        """First improvement: the first faster neighbour is climbed from next."""
        while self.todo:
            split = self.todo.pop(0)
            for stages in neighbour_splits(split, self.pb, self.groups):
                if self.try_split(stages):
                    self.todo.insert(0, stages)
                    break

    def try_two_changes(self) -> bool:
        """At a local optimum: plan the best-estimated two-change neighbours of ``best``;
        True when one was faster (it is then climbed from)."""
        best = self.best
        if best.stages in self.paired or NUM_PAIR_TRIES * self.plan_cost() > self.work_left:
            return False
        self.paired.add(best.stages)
        pairs = [s for s in _two_change_splits(best.stages, self.pb, self.groups)
                 if s not in self.seen
                 and _whole_bottleneck_s(self.pb, s) < best.predicted_latency_s]
        # Ranking asks the cost model about the units of a few equal slicings (about twice
        # the grid points in all) on every stage; only where the budget also covers
        # planning the best ranked, so long prompts (little budget) never pay for it.
        rank_work = 2 * self.grid * sum(len(s) for s in pairs)
        if not pairs or rank_work + NUM_PAIR_TRIES * self.plan_cost() > self.work_left:
            return False
        self.work_left -= rank_work
        for stages in _ranked(self.pb, pairs)[:NUM_PAIR_TRIES]:
            if self.try_split(stages):
                self.todo = [stages]
                return True
        return False

    def take_later_start(self) -> bool:
        """Plan the next further start and climb from it, faster or not; False when none is
        left (or the budget would not cover it)."""
        if self.plan_cost() > self.work_left:
            return False
        stages = next(self.later, None)
        if stages is None or self.num_later == NUM_LATER_STARTS:
            return False
        self.num_later += 1
        if self.later_plans_left is None:
            self.later_plans_left = NUM_LATER_PLANS
        self.try_split(stages)
        self.todo = [stages]
        return True


def _ranked(pb: Problem, splits: list[tuple[StagePlan, ...]]) -> list[tuple[StagePlan, ...]]:
    """``splits`` that fit, best ``estimate_split_s`` first; ties keep their order."""
    estimates = {s: estimate_split_s(pb, s) for s in splits}
    return sorted((s for s in splits if math.isfinite(estimates[s])), key=estimates.__getitem__)


def _two_change_splits(stages: tuple[StagePlan, ...], pb: Problem,
                       groups: tuple[Group, ...]) -> list[tuple[StagePlan, ...]]:
    """Splits two changes away from ``stages`` (neighbours of its neighbours), none of them one
    change away, in a fixed order."""
    near = neighbour_splits(stages, pb, groups)
    out = dict.fromkeys(s2 for s in near for s2 in neighbour_splits(s, pb, groups))
    for s in (stages, *near):
        out.pop(s, None)
    return list(out)


def _whole_bottleneck_s(pb: Problem, stages: tuple[StagePlan, ...]) -> float:
    times = stage_slice_times(stages, pb.cost, model=pb.model, dtype=pb.dtype, rows=pb.batch,
                              tokens=pb.seq_len, prefix=0, overlap_comm=pb.overlap_comm)
    return max(times) + pb.decode_s(stages, first_rows=1) if times else math.inf
