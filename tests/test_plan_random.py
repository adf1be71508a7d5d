"""The DPs against exhaustive enumeration on seeded random small instances (plan_harness.py)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from plan_harness import (
    baselines,
    feasible_baselines,
    feasible_stages,
    plan_kw,
    random_instance,
    split_costs,
)

from hpipe.errors import InfeasiblePlanError
from hpipe.plan.api import plan_method
from hpipe.plan.brute import (
    brute_slicing_estimate,
    brute_slicing_simulated,
    brute_split,
    brute_split_objectives,
    grid_slicings,
)
from hpipe.plan.climb import neighbour_splits
from hpipe.plan.groups import stage_groups
from hpipe.plan.layers import (
    plan_layers,
    solve_split_one_pass,
    split_bottleneck_s,
    split_sum_s,
    splits_by_stages,
)
from hpipe.plan.rank import plan_bound_s
from hpipe.plan.search import plan_slices_for
from hpipe.plan.slices import estimate_s, plan_slicing


@pytest.mark.parametrize("allow_tp", [False, True], ids=["devices", "tp-groups"])
def test_workload_dp_equals_exhaustive_on_200_instances(allow_tp):
    """Over single devices, and over single devices plus the TP pairs inside each host (the
    oracle then also enumerates every way to cut each host order into groups)."""
    feasible = infeasible = uses_tp = 0
    for seed in range(200):
        pb = random_instance(seed)
        sc = split_costs(pb, allow_tp=allow_tp)
        orders = pb.cluster.host_orders()
        dp = plan_layers(sc, orders)[0]
        oracle, _, _ = brute_split(sc, orders)
        if math.isinf(oracle):
            assert math.isinf(dp.bottleneck_s), f"seed {seed}: DP found {dp} where nothing fits"
            infeasible += 1
            continue
        feasible += 1
        assert dp.bottleneck_s == pytest.approx(oracle, rel=1e-9), f"seed {seed}"
        # Re-score the DP's own split independently.
        assert split_bottleneck_s(sc, dp.groups, dp.counts) == pytest.approx(dp.bottleneck_s)
        assert [d for g in dp.groups for d in g] in [list(o) for o in orders]
        uses_tp += any(len(st.devices) > 1 for st in dp.stages())
    assert feasible > 100 and infeasible > 10, (feasible, infeasible)
    # The TP variant is exercised: some optima put a block on a pair.
    assert (uses_tp > 10) if allow_tp else uses_tp == 0, uses_tp


@pytest.mark.parametrize("allow_tp", [False, True], ids=["devices", "tp-groups"])
def test_dp_per_stage_count_and_one_pass_dp_equal_exhaustive(allow_tp):
    """The search's other DP candidates: the least bottleneck with exactly K stages, for every
    K, and the least one-pass sum (stage times plus transfers), against every split."""
    checked = 0
    for seed in range(0, 200, 2):
        pb = random_instance(seed)
        sc = split_costs(pb, allow_tp=allow_tp)
        orders = pb.cluster.host_orders()
        by_stages, least_sum = brute_split_objectives(sc, orders)
        per_order = [splits_by_stages(sc, o) for o in orders]
        for k, col in enumerate(zip(*per_order), start=1):
            split = min(col, key=lambda s: s.bottleneck_s)
            if k not in by_stages:
                assert math.isinf(split.bottleneck_s), f"seed {seed}, K={k}: {split}"
                continue
            assert split.bottleneck_s == pytest.approx(by_stages[k], rel=1e-9), f"seed {seed}"
            assert sum(1 for c in split.counts if c) == k
            assert split_bottleneck_s(sc, split.groups, split.counts) == pytest.approx(
                split.bottleneck_s)
            checked += 1
        one = [solve_split_one_pass(sc, o) for o in orders]
        got = min((split_sum_s(sc, s.groups, s.counts) for s in one
                   if math.isfinite(s.bottleneck_s)), default=math.inf)
        assert got == pytest.approx(least_sum, rel=1e-9) or got == least_sum == math.inf
    assert checked > 100, checked


@pytest.mark.parametrize("allow_tp", [False, True], ids=["devices", "tp-groups"])
def test_the_climbs_neighbours_are_valid_splits_one_change_away(allow_tp):
    """Every neighbour the climb plans (``climb.neighbour_splits``) is a split the search
    could return: non-empty stages covering the layers in order, each on an allowed group,
    no device twice, the devices in the order of some host order; and every boundary move
    by one layer is among them."""
    checked = 0
    for seed in range(0, 200, 5):
        pb = random_instance(seed, max_devices=6)
        groups = stage_groups(pb.cluster, allow_tp=allow_tp)
        sc = split_costs(pb, allow_tp=allow_tp)
        for order in pb.cluster.host_orders()[:2]:
            for split in splits_by_stages(sc, order, groups=groups):
                stages = split.stages()
                if not stages:
                    continue
                found = neighbour_splits(stages, pb, groups)
                assert stages not in found and len(set(found)) == len(found)
                for nb in found:
                    assert nb[0].layer_start == 0 and nb[-1].layer_stop == pb.model.num_layers
                    assert all(a.layer_stop == b.layer_start for a, b in zip(nb, nb[1:]))
                    assert all(st.num_layers > 0 and st.devices in groups for st in nb), nb
                    devs = [d for st in nb for d in st.devices]
                    assert len(set(devs)) == len(devs), nb
                    assert any(_in_order(devs, o) for o in pb.cluster.host_orders()), nb
                    checked += 1
                for j in range(len(stages) - 1):
                    for cut in (stages[j].layer_stop - 1, stages[j].layer_stop + 1):
                        if stages[j].layer_start < cut < stages[j + 1].layer_stop:
                            moved = list(stages)
                            moved[j] = dataclasses.replace(stages[j], layer_stop=cut)
                            moved[j + 1] = dataclasses.replace(stages[j + 1], layer_start=cut)
                            assert tuple(moved) in found
    assert checked > 1000, checked


def _in_order(devices: list[int], order: tuple[int, ...]) -> bool:
    pos = {d: i for i, d in enumerate(order)}
    return all(pos[a] < pos[b] for a, b in zip(devices, devices[1:]))


def test_flow_bound_is_below_the_simulator_and_exact_for_equal_micro_batches():
    """``rank.plan_bound_s`` (the flow-shop machine bound the search prunes and ranks with)
    never exceeds the simulated latency, and equals it when every unit takes the same time
    (equal micro-batches of whole sequences), with and without overlapped transfers."""
    below = exact = 0
    for seed in range(0, 200, 2):
        pb = random_instance(seed, max_grid=4)
        split = plan_layers(split_costs(pb, allow_tp=True), pb.cluster.host_orders())[0]
        if math.isinf(split.bottleneck_s):
            continue
        stages = split.stages()
        for sl in grid_slicings(pb.seq_len, pb.grain_tokens):
            plan = pb.plan("manual", stages, sl)
            assert plan_bound_s(pb, plan) <= pb.objective_s(plan) * (1 + 1e-12)
            below += 1
        for m in range(1, pb.batch + 1):
            if pb.batch % m == 0:
                plan = pb.plan("manual", stages, (pb.seq_len,), num_microbatches=m)
                assert plan_bound_s(pb, plan) == pytest.approx(
                    pb.objective_s(plan), rel=1e-9), f"seed {seed}, {m} mb"
                exact += 1
    assert below > 100 and exact > 60, (below, exact)


def test_flow_bound_numpy_path_equals_one_call_per_unit():
    """The flow bound's numpy path (the analytic model's ``stage_times_many_s`` with a prefix
    per unit) gives the same unit x resource times as one ``stage_time_s`` call per cell,
    tensor-parallel groups and overlapped transfers included."""
    from hpipe.cost.analytic import AnalyticCost
    from hpipe.plan.evaluate import Problem
    from hpipe.plan.rank import _unit_times, _unit_times_many

    checked = 0
    for seed in range(0, 120, 3):
        skewed = random_instance(seed, max_grid=5)  # its SkewedCost has no numpy path
        pb = Problem(model=skewed.model, cluster=skewed.cluster, batch=skewed.batch,
                     seq_len=skewed.seq_len, dtype="float16", grain_tokens=16,
                     cost=AnalyticCost(skewed.model, skewed.cluster, "float16"),
                     overlap_comm=skewed.overlap_comm)
        split = plan_layers(split_costs(pb, allow_tp=True), pb.cluster.host_orders())[0]
        if math.isinf(split.bottleneck_s):
            continue
        stages = split.stages()
        for sl in grid_slicings(pb.seq_len, pb.grain_tokens):
            prefixes = [sum(sl[:i]) for i in range(len(sl))]
            units = [(pb.batch, s, p) for s, p in zip(sl, prefixes)]
            many = _unit_times_many(pb, stages, units)
            np.testing.assert_allclose(many, _unit_times(pb, stages, units), rtol=1e-12)
            checked += 1
    assert checked > 50, checked


def test_fits_fast_path_answers_as_stage_memory_does():
    """``SliceTimes.fits`` through the analytic model's ``stage_memory_parts`` (the fixed
    bytes per stage, one workspace per kind of stage) says "fits" exactly when every stage's
    ``stage_memory_bytes`` is within its devices' memory, on tight random instances."""
    from hpipe.cost.analytic import AnalyticCost
    from hpipe.plan.evaluate import Problem

    yes = no = 0
    for seed in range(0, 160, 3):
        skewed = random_instance(seed, max_grid=5)
        pb = Problem(model=skewed.model, cluster=skewed.cluster, batch=skewed.batch,
                     seq_len=skewed.seq_len, dtype="float16", grain_tokens=16,
                     cost=AnalyticCost(skewed.model, skewed.cluster, "float16",
                                       attention="eager"),
                     overlap_comm=skewed.overlap_comm)
        split = plan_layers(split_costs(pb, allow_tp=True), pb.cluster.host_orders())[0]
        if math.isinf(split.bottleneck_s):
            continue
        st = pb.slice_times(split.stages())
        assert st._rooms is not None  # the fast path is taken
        for tokens in (1, 16, 33, pb.seq_len):
            for prefix in (0, 16, pb.seq_len - tokens):
                if prefix < 0:
                    continue
                slow = all(
                    pb.cost.stage_memory_bytes(
                        g.devices, g.layer_start, g.layer_stop, batch=pb.batch,
                        seq_len=pb.kv_tokens, units=((pb.batch, tokens, prefix),),
                        has_embedding=j == 0, has_head=j == len(st.stages) - 1)
                    <= min(pb.cluster.devices[d].memory_bytes for d in g.devices)
                    for j, g in enumerate(st.stages))
                assert st.fits(tokens, prefix) == slow, (seed, tokens, prefix)
                yes, no = yes + slow, no + (not slow)
        # The workload DP's memory limits (layers.max_stops) take the same fast path.
        from hpipe.plan.layers import max_stops

        class OnlyBytes:  # the cost model without its fast path
            stage_memory_bytes = pb.cost.stage_memory_bytes

        kw = dict(model=pb.model, cluster=pb.cluster, batch=pb.batch, seq_len=pb.kv_tokens,
                  units=((pb.batch, 16, 0), (pb.batch, 16, pb.seq_len - 16)))
        # Groups of one memory class share one search (AnalyticCost.memory_class).
        from hpipe.plan.groups import stage_groups

        for groups in (None, stage_groups(pb.cluster, allow_tp=True)):
            fast = max_stops(pb.cost, groups=groups, **kw)
            plain = max_stops(OnlyBytes(), groups=groups, **kw)
            assert fast.keys() == plain.keys()
            assert all((fast[g] == plain[g]).all() for g in fast), seed
    assert yes > 50 and no > 10, (yes, no)


@pytest.mark.parametrize("allow_tp", [False, True], ids=["devices", "tp-groups"])
def test_infeasible_instances_raise_in_the_planner_too(allow_tp):
    """HPipe raises, saying what would fit, when nothing it may use fits: no split over its
    groups leaves room for a grain slice of the whole batch nor for one row of whole
    sequences (its finest units; the oracle says so for both) and no baseline fits either.
    When only the single-row micro-batches fit, it still returns a plan."""
    raised = rescued = 0
    for seed in range(200):
        pb = random_instance(seed)
        orders = pb.cluster.host_orders()
        if math.isfinite(brute_split(split_costs(pb, allow_tp=allow_tp), orders)[0]):
            continue
        row = split_costs(pb, allow_tp=allow_tp, units=((1, pb.seq_len, 0),))
        if (pb.batch > 1 and math.isfinite(brute_split(row, orders)[0])
                or feasible_baselines(pb, baselines(allow_tp))):
            plan = plan_method("hpipe", allow_tp=allow_tp, **plan_kw(pb))
            assert plan.num_microbatches > 1, f"seed {seed}: {plan}"
            rescued += 1
            continue
        with pytest.raises(InfeasiblePlanError, match="fits no split.*fits:"):
            plan_method("hpipe", allow_tp=allow_tp, **plan_kw(pb))
        raised += 1
    assert raised > 10 and rescued >= 2, (raised, rescued)


def test_slicing_dp_estimate_equals_exhaustive_on_200_instances():
    checked = 0
    for seed in range(200):
        pb = random_instance(seed)
        stages = feasible_stages(pb)
        if stages is None:
            continue
        st = pb.slice_times(stages)
        res = plan_slicing(st.tau, fits_fn=st.fits, seq_len=pb.seq_len,
                           grain_tokens=pb.grain_tokens, num_stages=len(stages), epsilon=0.0)
        oracle, _ = brute_slicing_estimate(st.tau, fits_fn=st.fits, seq_len=pb.seq_len,
                                           grain_tokens=pb.grain_tokens, num_stages=len(stages))
        if math.isinf(oracle):
            assert res is None, f"seed {seed}"
            continue
        assert res.estimate_s == pytest.approx(oracle, rel=1e-9), f"seed {seed}"
        assert estimate_s(res.slices, st.tau, len(stages)) == pytest.approx(oracle, rel=1e-9)
        # With cap clustering the estimate stays within (1 + epsilon) of the optimum.
        loose = plan_slicing(st.tau, fits_fn=st.fits, seq_len=pb.seq_len,
                             grain_tokens=pb.grain_tokens, num_stages=len(stages), epsilon=0.05)
        assert estimate_s(loose.slices, st.tau, len(stages)) <= oracle * 1.05 + 1e-12
        checked += 1
    assert checked > 100


def test_rescored_slicing_against_exhaustive_simulation():
    gaps = []
    for seed in range(100):
        pb = random_instance(seed, max_grid=5)
        stages = feasible_stages(pb)
        if stages is None:
            continue
        plan = plan_slices_for(pb, stages, method="hpipe")
        oracle, oracle_slices = brute_slicing_simulated(pb, stages)
        if plan is None:
            assert math.isinf(oracle), f"seed {seed}"
            continue
        # Independent re-score of the planner's own slicing.
        assert pb.objective_s(plan) == pytest.approx(plan.predicted_latency_s)
        # The exhaustive grid optimum bounds every grid slicing; the uniform candidates may
        # fall between grid points and then beat it.
        if plan.slices in set(grid_slicings(pb.seq_len, pb.grain_tokens)):
            assert plan.predicted_latency_s >= oracle * (1 - 1e-9)
        # Never worse than the estimate's own favourite, which is among the re-scored.
        st = pb.slice_times(stages)
        est_best, est_slices = brute_slicing_estimate(
            st.tau, fits_fn=st.fits, seq_len=pb.seq_len, grain_tokens=pb.grain_tokens,
            num_stages=len(stages))
        fav = pb.objective_s(pb.plan("manual", stages, est_slices))
        assert plan.predicted_latency_s <= fav * (1 + 1e-2), f"seed {seed}"
        gaps.append(plan.predicted_latency_s / oracle - 1)
    assert len(gaps) > 30
    # The closed form is an estimate, but re-scoring keeps the true optimum close.
    assert max(gaps) < 0.10, sorted(gaps)[-5:]
