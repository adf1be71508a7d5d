"""Lone computes against explicit reachability, and which computes borrow threads."""

from __future__ import annotations

import random

import pytest

from hpipe.cluster import local_cluster, parse_cluster
from hpipe.lending import lent_threads, lent_time_s, lone_computes
from hpipe.plan.plan import Plan, StagePlan
from hpipe.schedule import ActionKind, build_schedule
from hpipe.sim import simulate
from hpipe.spec import ModelSpec

TINY = ModelSpec(name="tiny", family="llama", num_layers=8, hidden=8, num_heads=2,
                 num_kv_heads=2, intermediate=16, vocab_size=32, max_seq_len=4096)


def _plan(num_stages, slices, *, cluster=None, batch=1, microbatches=1, lend=True,
          devices=None):
    cuts = [TINY.num_layers * i // num_stages for i in range(num_stages + 1)]
    devices = devices or [(i,) for i in range(num_stages)]
    stages = tuple(StagePlan(devices[i], cuts[i], cuts[i + 1]) for i in range(num_stages))
    return Plan(method="manual", model=TINY, cluster=cluster or local_cluster(num_stages),
                batch=batch, seq_len=sum(slices), dtype="float32", stages=stages,
                slices=tuple(slices), num_microbatches=microbatches, lend_idle_threads=lend)


def _reachable(sched):
    """(stage, index) -> every (stage, index) that must come after it: program order and each
    send before its receive, closed by search."""
    after = {}
    recv_at = {}
    for s, acts in enumerate(sched.actions):
        for i, a in enumerate(acts):
            after[(s, i)] = [(s, i + 1)] if i + 1 < len(acts) else []
            if a.kind is ActionKind.RECV:
                recv_at[(a.unit, s, a.payload)] = (s, i)
    for s, acts in enumerate(sched.actions):
        for i, a in enumerate(acts):
            if a.kind is ActionKind.SEND:
                after[(s, i)].append(recv_at[(a.unit, a.peer, a.payload)])
    reach = {}
    for node in after:
        seen, todo = set(), [node]
        while todo:
            for nxt in after[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        reach[node] = seen
    return reach


def _lone_by_search(sched, rivals):
    reach = _reachable(sched)
    computes = [(s, i) for s, acts in enumerate(sched.actions) for i, a in enumerate(acts)
                if a.kind is ActionKind.COMPUTE]
    return {(a, i) for a, i in computes if a in rivals
            and all(b not in rivals[a] or (b, j) in reach[(a, i)] or (a, i) in reach[(b, j)]
                    for b, j in computes if b != a)}


@pytest.mark.parametrize("seed", range(40))
def test_lone_computes_match_reachability(seed):
    rng = random.Random(seed)
    n = rng.choice([1, 2, 2, 3, 4])
    batch = rng.randint(1, 3)
    plan = _plan(n, [rng.randint(1, 6) for _ in range(rng.randint(1, 5))], batch=batch,
                 microbatches=rng.randint(1, batch))
    sched = build_schedule(plan, num_decode_steps=rng.randint(0, 3))
    # Rivals as hosts make them: a random subset of the other stages, per stage.
    rivals = {a: {b for b in range(n) if b != a and rng.random() < 0.7}
              for a in range(n) if rng.random() < 0.8}
    assert lone_computes(sched, rivals) == _lone_by_search(sched, rivals)


@pytest.mark.parametrize("seed", range(20))
def test_leaving_decode_out_of_the_walk_changes_nothing(seed):
    rng = random.Random(seed)
    n = rng.choice([1, 2, 3, 4])
    batch = rng.randint(1, 3)
    plan = _plan(n, [rng.randint(1, 6) for _ in range(rng.randint(1, 5))], batch=batch,
                 microbatches=rng.randint(1, batch), cluster=local_cluster(max(n, 2)))
    sched = build_schedule(plan, num_decode_steps=rng.randint(1, 4))
    units = sched.units
    with_decode = {(s, sched.actions[s][i].unit)
                   for s, i in lone_computes(sched, {a: set(range(n)) - {a} for a in range(n)})
                   if units[sched.actions[s][i].unit].phase == "prefill"}
    assert set(lent_threads(plan)) == with_decode


def test_fill_and_drain_borrow_the_hosts_threads():
    plan = _plan(3, [4, 4, 4])
    lent = lent_threads(plan)
    # Stage 0's first slice runs before anything else; the last stage's last slice after
    # everything else of the prefill, and decode is never lent.
    assert lent == {(0, 0): 3, (2, 2): 3}


def test_no_lending_without_the_flag_or_idle_cores():
    plan = _plan(2, [4, 4], lend=False)
    assert lent_threads(plan) == {}
    two_hosts = parse_cluster({
        "name": "two", "hosts": [
            {"name": "a", "intra_link": "loopback", "devices": [{"name": "c0", "type": "cpu"}]},
            {"name": "b", "intra_link": "loopback", "devices": [{"name": "c1", "type": "cpu"}]}],
        "links": [{"between": ["a", "b"], "kind": "1gbe"}]})
    plan = _plan(2, [4, 4], cluster=two_hosts)
    assert lent_threads(plan) == {}
    slowed = parse_cluster({"name": "slow", "hosts": [{"name": "a", "intra_link": "loopback",
        "devices": [{"name": "c0", "type": "cpu", "slowdown": 2.0},
                    {"name": "c1", "type": "cpu"}]}]})
    plan = _plan(2, [4, 4], cluster=slowed)
    assert lent_threads(plan) == {(1, 1): 2}  # not the emulated stage 0


def test_a_stage_alone_on_its_host_borrows_every_slice():
    # One stage on local:2: the other worker holds nothing, so all its cores are idle.
    plan = _plan(1, [4, 4, 4], cluster=local_cluster(2, num_threads=3))
    assert lent_threads(plan) == {
        (0, 0): 6, (0, 1): 6, (0, 2): 6}


def test_a_tensor_parallel_stage_neither_borrows_nor_lets_others_overlap():
    plan = _plan(2, [4, 4], cluster=local_cluster(3), devices=[(0,), (1, 2)])
    assert lent_threads(plan) == {(0, 0): 3}


def test_the_simulator_prices_lent_computes_with_the_borrowed_threads():
    class Flat:
        times_tp_groups = True

        def stage_time_s(self, *a, **k):
            return 1.0

        def decode_time_s(self, *a, **k):
            return 1.0

        def transfer_time_s(self, *a):
            return 0.0

        def stage_memory_bytes(self, *a, **k):
            return 0

    lent, plain = (simulate(_plan(2, [4, 4, 4], lend=flag), Flat(), num_decode_steps=1)
                   for flag in (True, False))
    fast = lent_time_s(Flat(), 0, 1.0, tokens=4, own_threads=1, threads=2)
    assert fast < 1.0
    first = {(iv.row, iv.unit): iv for iv in lent.intervals if iv.kind == "compute"}
    assert first[(0, 0)].duration_s == pytest.approx(fast) and first[(0, 0)].threads == 2
    assert first[(1, 2)].duration_s == pytest.approx(fast) and first[(1, 2)].threads == 2
    assert first[(0, 1)].threads == 0 and first[(0, 1)].duration_s == pytest.approx(1.0)
    # Fill and drain each shrink; the middle of the pipeline does not.
    assert lent.prefill_latency_s == pytest.approx(plain.prefill_latency_s - 2 * (1.0 - fast))


def test_hpipe_plan_names_the_lent_computes():
    import dataclasses

    from hpipe.commands.plan import describe, summarise
    from hpipe.cost.analytic import AnalyticCost

    plan = dataclasses.replace(_plan(2, [4, 4, 4]), predicted_latency_s=1.0)
    summary = summarise(plan, AnalyticCost(TINY, plan.cluster, "float32"))
    assert summary["lent_computes"] == [
        {"stage": 0, "device": "cpu0", "microbatch": 0, "slice": 0, "threads": 2},
        {"stage": 1, "device": "cpu1", "microbatch": 0, "slice": 2, "threads": 2}]
    assert ("run alone on their host, on 2 threads (its idle workers' too): slice 0 on cpu0, "
            "slice 2 on cpu1") in describe(plan, summary)


def test_a_served_plan_does_not_lend(tmp_path):
    """serve and analyze run interleaved items, which never borrow: their plan says so."""
    import argparse
    import dataclasses

    from hpipe.commands.pipeline import build_plan
    from hpipe.plan.api import plan_method

    kw = dict(model=TINY, cluster=local_cluster(2), batch=1, seq_len=256, dtype="float32")
    assert plan_method("hpipe", **kw).lend_idle_threads
    assert not plan_method("hpipe", lend=False, **kw).lend_idle_threads
    args = argparse.Namespace(model="smollm2", plan=None, cluster="local:2", seq_len=512,
                              method="hpipe", dtype="float32", profile=None, allow_tp=False,
                              objective="prefill")
    served = build_plan(args, concurrency=4, max_new_tokens=16)
    assert not served.lend_idle_threads and lent_threads(served) == {}
    path = tmp_path / "plan.json"
    path.write_text(dataclasses.replace(served, lend_idle_threads=True).to_json())
    args.plan = path
    assert not build_plan(args, concurrency=4, max_new_tokens=16).lend_idle_threads
