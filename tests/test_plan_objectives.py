"""The planner's objectives beyond the prefill: the throughput planner against every split on
small random instances, its decode round against the simulator's steps, and the objectives
through the public API."""

from __future__ import annotations

import math

import pytest
from plan_harness import plan_kw, random_instance

from hpipe.cluster import load_cluster
from hpipe.errors import InfeasiblePlanError, PlanMismatchError
from hpipe.plan.api import plan_method
from hpipe.plan.brute import brute_throughput_cycle_s
from hpipe.plan.throughput import decode_cycle_s, throughput_splits
from hpipe.spec import model_preset


@pytest.mark.parametrize("concurrency", [1, 2, 5])
def test_the_throughput_split_matches_every_split_on_small_instances(concurrency):
    gaps = []
    for seed in range(0, 240, 2):
        pb = random_instance(seed, max_devices=4, max_layers=7, max_grid=5)
        oracle = brute_throughput_cycle_s(pb, concurrency=concurrency, max_new_tokens=32)
        got = throughput_splits(pb, concurrency=concurrency, max_new_tokens=32,
                                allow_tp=False)
        if not got:
            assert math.isinf(oracle), f"seed {seed}: no split, oracle {oracle}"
            continue
        assert got[0][0] >= oracle * (1 - 1e-12), f"seed {seed}: beat every split?"
        gaps.append((got[0][0] / oracle - 1, seed))
    assert len(gaps) > 40, len(gaps)
    assert max(gaps)[0] < 1e-9, sorted(gaps)[-3:]


def test_one_request_decodes_at_the_simulated_step():
    """At concurrency 1 a round is one token's trip, the simulator's decode step (at the same
    context)."""
    from hpipe.cost.analytic import AnalyticCost
    from hpipe.plan.evaluate import Problem
    from hpipe.sim import simulate

    model, cluster = model_preset("llama-7b"), load_cluster("paper")
    plan = plan_method("hpipe", model=model, cluster=cluster, batch=1, seq_len=1024,
                       dtype="float16", allow_tp=False)
    cost = AnalyticCost(model, cluster, "float16")
    pb = Problem(model=model, cluster=cluster, batch=1, seq_len=1024, dtype="float16",
                 cost=cost, grain_tokens=16)
    tl = simulate(plan, cost, num_decode_steps=3)
    steps = sorted({iv.unit for iv in tl.intervals
                    if iv.phase == "decode" and iv.kind == "compute"})
    second = [iv for iv in tl.intervals if iv.unit == steps[1]]
    step_s = max(iv.end_s for iv in second) - max(iv.end_s for iv in tl.intervals
                                                   if iv.unit == steps[0])
    assert decode_cycle_s(pb, plan.stages, concurrency=1, context=1024 + 1) == pytest.approx(
        step_s, rel=1e-9)


def test_objectives_through_the_api():
    model, cluster = model_preset("llama-7b"), load_cluster("paper")
    kw = dict(model=model, cluster=cluster, batch=1, seq_len=2048, allow_tp=False)
    thr = plan_method("hpipe", objective="throughput", concurrency=16, max_new_tokens=256, **kw)
    assert any("objective throughput" in n and "tokens/s with 16 requests" in n
               for n in thr.notes)
    lat = plan_method("hpipe", objective="latency", max_new_tokens=256, **kw)
    pre = plan_method("hpipe", **kw)
    assert lat.predicted_latency_s > pre.predicted_latency_s  # it includes 255 decode steps
    with pytest.raises(PlanMismatchError, match="objective 'latency' needs max_new_tokens"):
        plan_method("hpipe", objective="latency", **kw)
    with pytest.raises(PlanMismatchError, match="objective 'fastest' is not one of"):
        plan_method("hpipe", objective="fastest", **kw)
    # The KV cache of every running request counts: 4096 requests of 2k tokens do not fit.
    with pytest.raises(InfeasiblePlanError, match="fits no split"):
        plan_method("hpipe", objective="throughput", concurrency=4096, max_new_tokens=256,
                    **kw)


def test_hpipe_plan_shows_each_objectives_plan(capsys):
    """On the paper cluster (LLaMA-7B, 2048 tokens, 256 new) decode changes the best plan:
    the latency objective's plan has the shortest total, the throughput objective's the most
    tokens/s, the prefill objective's the shortest time to first token."""
    import json

    from hpipe.cli import main

    argv = ["plan", "--cluster", "paper", "--model", "llama-7b", "--seq-len", "2048",
            "--batch", "1", "--no-tp", "--max-new-tokens", "256", "--concurrency", "16"]
    assert main([*argv, "--objective", "throughput", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = {r["objective"]: r for r in out["objectives"]}
    assert set(rows) == {"prefill", "latency", "throughput"}
    assert rows["latency"]["latency_s"] == min(r["latency_s"] for r in rows.values())
    assert rows["throughput"]["decode_tok_s"] == max(r["decode_tok_s"] for r in rows.values())
    assert rows["prefill"]["ttft_s"] == min(r["ttft_s"] for r in rows.values())
    assert rows["latency"]["layers"] != rows["prefill"]["layers"]  # decode moved the split
    # The plan printed is the throughput objective's.
    assert [[s["devices"][0], s["layers"][1] - s["layers"][0]] for s in out["summary"]["stages"]] \
        == [[r[0], r[-1]] for r in rows["throughput"]["layers"]]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "HPipe's plan per objective" in text and "tpot_ms" in text and "throughput" in text


def test_hpipe_slicing_is_never_worse_than_any_equal_slicing():
    """On random instances and the paper's case, HPipe's plan is no slower than k equal slices
    on its own stages, for every k from 1 to 128 (none under the grain) that fits memory."""
    from hpipe.plan.search import max_equal_slices, uniform_count_slicing

    cases = [random_instance(seed, max_devices=4, max_layers=7, max_grid=8)
             for seed in range(0, 80, 4)]
    for pb in cases:
        try:
            plan = plan_method("hpipe", allow_tp=False, **plan_kw(pb))
        except InfeasiblePlanError:
            continue
        st = pb.slice_times(plan.stages)
        for k in range(1, max_equal_slices(pb.seq_len, pb.grain_tokens) + 1):
            sl = uniform_count_slicing(pb.seq_len, k)
            if not all(st.fits(s, sum(sl[:i])) for i, s in enumerate(sl)):
                continue
            other = pb.objective_s(pb.plan("manual", plan.stages, sl))
            assert plan.predicted_latency_s <= other * (1 + 1e-12), (pb.cluster.name, k)
    paper = plan_method("hpipe", model=model_preset("llama-7b"), cluster=load_cluster("paper"),
                        batch=6, seq_len=2048, allow_tp=False)
    assert paper.predicted_latency_s <= 2.547 + 5e-4  # 21 equal slices; the DP alone: 2.554



def test_the_latency_objective_counts_the_decodes_kv_cache():
    """Eight LLaMA-2-7B requests of 2048 tokens fit two T4s for their prefill; with 4096 new
    tokens each their KV caches (24 GiB) no longer do, and the latency plan says so."""
    from hpipe.cluster import parse_cluster

    t4s = parse_cluster({"name": "two-t4", "hosts": [{"name": "h", "devices": [
        {"name": "t4-0", "type": "t4"}, {"name": "t4-1", "type": "t4"}]}]})
    kw = dict(model=model_preset("llama-2-7b-32k"), cluster=t4s, batch=8, seq_len=2048,
              allow_tp=False)
    assert plan_method("hpipe", **kw).predicted_latency_s > 0
    assert plan_method("hpipe", objective="latency", max_new_tokens=16, **kw)
    with pytest.raises(InfeasiblePlanError):
        plan_method("hpipe", objective="latency", max_new_tokens=4096, **kw)

