"""Properties of the whole HPipe planner on seeded random instances: scaling every time scales
the optimum; an extra or a faster device never makes the plan slower; HPipe is never slower
than any baseline; allowing tensor parallelism never makes it slower; and it matches an
exhaustive search over splits x slicings on small instances. The instances and their cost
model come from plan_harness.py.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
from plan_harness import (
    SkewedCost,
    baselines,
    feasible_baselines,
    feasible_stages,
    plan_kw,
    random_instance,
    split_costs,
)

from hpipe.cluster import parse_cluster
from hpipe.cost.analytic import AnalyticCost
from hpipe.errors import InfeasiblePlanError
from hpipe.plan.api import plan_method
from hpipe.plan.brute import (
    brute_hpipe_s,
)
from hpipe.plan.evaluate import Problem
from hpipe.plan.groups import stage_groups
from hpipe.plan.layers import (
    plan_layers,
)
from hpipe.plan.search import plan_slices_for


def _scaled(pb: Problem, c: float) -> Problem:
    return dataclasses.replace(pb, cost=SkewedCost(pb.cost.base, pb.cost.factors, scale=c))


def test_scaling_all_times_scales_the_optimum():
    for seed in range(0, 200, 10):
        pb = random_instance(seed)
        stages = feasible_stages(pb)
        if stages is None:
            continue
        a = plan_slices_for(pb, stages, method="hpipe")
        b = plan_slices_for(_scaled(pb, 3.0), stages, method="hpipe")
        if a is None:
            continue
        assert b.predicted_latency_s == pytest.approx(3.0 * a.predicted_latency_s, rel=1e-9)
        sa = plan_layers(split_costs(pb), pb.cluster.host_orders())[0]
        sb = plan_layers(split_costs(_scaled(pb, 3.0)), pb.cluster.host_orders())[0]
        assert sb.bottleneck_s == pytest.approx(3.0 * sa.bottleneck_s, rel=1e-9)


def _with_device(pb: Problem, *, extra: bool = False, faster: bool = False) -> Problem:
    d = pb.cluster.to_dict()
    host = d["hosts"][-1]
    if extra:  # one more device at the end of the last host (it may stay empty)
        host["devices"].append({**host["devices"][-1], "name": "extra"})
    if faster:  # the first device gets 4x the FLOP/s and bandwidth
        dev = d["hosts"][0]["devices"][0]
        dev["peak_flops_fp16"] *= 4
        dev["mem_bandwidth_bytes_s"] *= 4
    cluster = parse_cluster(d)
    base = AnalyticCost(pb.model, cluster, pb.dtype, attention=pb.cost.base.attention)
    return dataclasses.replace(pb, cluster=cluster, cost=SkewedCost(base, pb.cost.factors))


# Larger random instances, where the search's proxies are more often wrong.
WIDE = dict(max_devices=6, max_layers=12, max_grid=12)


# The wide seeds where an extra or a faster device made the plan slower before the climb's
# two-change step and further starts ([Note: two changes at once] in hpipe.plan.climb).
FORMER_VIOLATIONS = {("extra", False): (922, 1290, 2566), ("extra", True): (2171,),
                     ("faster", False): (1400, 1417, 1970),
                     ("faster", True): (1052, 1213, 1820, 2369)}


@pytest.mark.parametrize("allow_tp", [False, True], ids=["devices", "tp-groups"])
@pytest.mark.parametrize("change", ["extra", "faster"])
def test_an_extra_or_faster_device_never_makes_hpipe_worse(change, allow_tp):
    """Exact for the workload DP, a theorem (an extra device may take no layers; a faster one
    only lowers block times). For the whole planner it is asserted exactly on these 75
    instances (50 of up to 4 devices; 25 of up to 6 devices, 12 layers and 12 grid steps)
    and on the former violations below, but it is a property of the search, not a theorem:

    - Why not exact. The planner minimises simulated latency over candidates chosen by
      proxies (the DP's bottleneck per stage count, the least sum, the flow bound's ranking,
      the slicing DP's estimate). A new or faster device changes the proxies, so the old
      winner can leave the candidates while nothing as fast replaces it. The exhaustive
      optimum over splits x slicings is monotone (more plans; the simulator is monotone in
      durations), so a violation never exceeds the search's gap to it (measured by
      test_hpipe_matches_exhaustive_search_on_small_instances); closing the gap means
      enumerating splits x slicings, exponential in devices and grid steps.
    - What keeps it rare. The best split for every number of stages is a candidate, so a new
      device that makes the best split one stage longer cannot hide the best split with the
      old stage count; splits are ranked by a flow-shop bound that charges a short prompt its
      pipeline fill; and the search climbs from its best splits to every split one change
      away (a boundary, a dropped stage, a host order, an idle device or TP partner), planned
      in full, while that is faster (hpipe.plan.climb, [Note: why the search climbs]), which
      finds the old winner again when it is a neighbour of the new candidates; at a local
      optimum it plans the best few splits two changes away by the estimate, then climbs
      from further starts, among them the workload DP's splits with one device left out
      ([Note: two changes at once]).
    - Measured, both changes, with and without TP, with up to 6 devices, 12 layers and 12
      grid steps (seeds 600-2599): 2 of 4,802 comparisons, 0.01% and 1.5% slower (seeds
      1646 and 1054, an extra device, no TP; there the new steps sped up the plan on the
      smaller cluster only); none of 1,330 on seeds 0-599 (<= 4 devices). Before the
      two-change step and further starts 11 of 4,802, 0.02% to 16% slower
      (``FORMER_VIOLATIONS``), and none on seeds 0-599; before the climb 24, up to 17%.
      In those, the old winner was two or more changes from the new search's plans, each
      change slower on its own (seed 2369, 16%: a stage dropped and two hosts' TP pairs
      swapped).
    """
    checked = 0
    samples = [(seed, {}) for seed in range(0, 200, 4)]
    samples += [(seed, WIDE) for seed in range(600, 1000, 16)]
    samples += [(seed, WIDE) for seed in FORMER_VIOLATIONS[change, allow_tp]]
    for seed, sizes in samples:
        pb = random_instance(seed, **sizes)
        other = _with_device(pb, **{change: True})
        sc0, sc1 = split_costs(pb, allow_tp=allow_tp), split_costs(other, allow_tp=allow_tp)
        before = plan_layers(sc0, pb.cluster.host_orders())[0].bottleneck_s
        after = plan_layers(sc1, other.cluster.host_orders())[0].bottleneck_s
        assert after <= before * (1 + 1e-9), f"seed {seed}: {before} -> {after}"
        try:
            lat0 = plan_method("hpipe", allow_tp=allow_tp, **plan_kw(pb)).predicted_latency_s
        except InfeasiblePlanError:
            continue
        lat1 = plan_method("hpipe", allow_tp=allow_tp, **plan_kw(other)).predicted_latency_s
        assert lat1 <= lat0, f"seed {seed}: {lat0} -> {lat1} ({lat1 / lat0 - 1:.1%} slower)"
        checked += 1
    assert checked > 35, checked


@pytest.mark.parametrize("allow_tp", [False, True], ids=["devices", "tp-groups"])
def test_hpipe_never_worse_than_any_baseline_on_random_clusters(allow_tp):
    """Every baseline's final configuration is one of HPipe's candidates, scored by the same
    simulator (hpipe.plan.search, [Note: HPipe contains every baseline]), so HPipe is never
    slower than any of them, exactly (no tolerance), and fits whenever one of them fits.
    Restricted to pure pipelines (allow_tp=False) it contains the pipeline baselines."""
    compared = tp_wins = 0
    for seed in range(0, 200, 4):
        pb = random_instance(seed)
        others = feasible_baselines(pb, baselines(allow_tp))
        try:
            hp = plan_method("hpipe", allow_tp=allow_tp, **plan_kw(pb))
        except InfeasiblePlanError as e:
            assert not others, f"seed {seed}: hpipe infeasible ({e}) but {others} fit"
            continue
        assert allow_tp or all(len(st.devices) == 1 for st in hp.stages)
        for m, lat in others.items():
            assert hp.predicted_latency_s <= lat, f"seed {seed}: hpipe {hp} > {m} {lat}"
            compared += 1
        tp_wins += any(len(st.devices) > 1 for st in hp.stages)
    assert compared > (80 if allow_tp else 50), compared
    # Not vacuous: with TP allowed, HPipe's pick is a TP plan on some instances (where a
    # pure pipeline loses to Megatron or TP-T).
    assert (tp_wins > 3) if allow_tp else tp_wins == 0, tp_wins


def test_allowing_tensor_parallelism_never_makes_hpipe_slower():
    """With ``allow_tp`` the search fully plans the splits the pure-pipeline search would, and
    more (hpipe.plan.search.plan_hpipe), so the TP-enabled plan is never slower, exactly; and
    on some instances it is strictly faster."""
    compared = faster = 0
    for seed in range(0, 200, 4):
        pb = random_instance(seed)
        try:
            pure = plan_method("hpipe", allow_tp=False, **plan_kw(pb)).predicted_latency_s
        except InfeasiblePlanError:
            continue
        tp = plan_method("hpipe", allow_tp=True, **plan_kw(pb)).predicted_latency_s
        assert tp <= pure, f"seed {seed}: {tp} > {pure}"
        compared += 1
        faster += tp < pure
    assert compared > 20 and faster > 3, (compared, faster)


@pytest.mark.parametrize("allow_tp", [False, True], ids=["devices", "tp-groups"])
def test_hpipe_matches_exhaustive_search_on_small_instances(allow_tp):
    """The whole search against every plan it could return (every split x every grid or equal
    slicing x micro-batch counts, simulated): on these small instances (<= 3 devices,
    <= 6 layers, <= 5 grid steps) it finds the optimum on all of about 50, and on 150 more
    (odd seeds to 600) too. Before the climb (hpipe.plan.climb) it fell short on one of each:
    seed 134 by 5.4% (the optimum runs the same devices with the same layers in another host
    order, the first host last, and with two slices), and seed 597 by 0.8%. This gap also bounds how much an extra or
    faster device can make HPipe worse, since the optimum itself is monotone."""
    gaps = []
    for seed in range(0, 200, 2):
        pb = random_instance(seed, max_devices=3, max_layers=6, max_grid=5)
        oracle = brute_hpipe_s(pb, stage_groups(pb.cluster, allow_tp=allow_tp))
        try:
            hp = plan_method("hpipe", allow_tp=allow_tp, **plan_kw(pb)).predicted_latency_s
        except InfeasiblePlanError:
            assert math.isinf(oracle), f"seed {seed}: hpipe infeasible, oracle {oracle}"
            continue
        assert hp >= oracle * (1 - 1e-12), f"seed {seed}: beat the exhaustive optimum?"
        gaps.append((hp / oracle - 1, seed))
    assert len(gaps) > 40, len(gaps)
    assert max(gaps)[0] < 1e-9, sorted(gaps)[-3:]


def test_the_latency_objective_matches_exhaustive_search_on_small_instances():
    """With decode steps in the objective (TTFT + the steps), the whole search against every
    plan it could return, each scored the same way; and the closed-form decode time equals
    the simulator's decode steps."""
    import dataclasses

    from hpipe.sim import simulate

    gaps, differs = [], 0
    for seed in range(0, 120, 2):
        pb = dataclasses.replace(random_instance(seed, max_devices=3, max_layers=6, max_grid=5),
                                 decode_steps=40)
        oracle = brute_hpipe_s(pb, stage_groups(pb.cluster, allow_tp=False))
        try:
            plan = plan_method("hpipe", allow_tp=False, objective="latency", max_new_tokens=41,
                               **plan_kw(pb))
        except InfeasiblePlanError:
            assert math.isinf(oracle), f"seed {seed}: hpipe infeasible, oracle {oracle}"
            continue
        tl = simulate(plan, pb.cost, num_decode_steps=40)
        assert plan.predicted_latency_s == pytest.approx(tl.latency_s, rel=1e-9), seed
        assert plan.predicted_latency_s >= oracle * (1 - 1e-12), f"seed {seed}"
        gaps.append((plan.predicted_latency_s / oracle - 1, seed))
        prefill = plan_method("hpipe", allow_tp=False, **plan_kw(pb))
        differs += prefill.stages != plan.stages or prefill.slices != plan.slices
    assert len(gaps) > 25, len(gaps)
    assert max(gaps)[0] < 1e-9, sorted(gaps)[-3:]
    assert differs > 0, "decode never changed a plan: the test shows nothing"
