"""The simulator against closed forms and the design notes' counter-example."""

import pytest

from hpipe.cluster import local_cluster
from hpipe.plan.plan import Plan, StagePlan
from hpipe.schedule import build_schedule
from hpipe.sim import simulate
from hpipe.spec import ModelSpec

TINY = ModelSpec(name="tiny", family="llama", num_layers=4, hidden=8, num_heads=2,
                 num_kv_heads=2, intermediate=16, vocab_size=32, max_seq_len=4096)


class TableCost:
    """Compute time looked up per (stage's first layer, slice index by prefix); fixed transfers."""

    times_tp_groups = True

    def __init__(self, times_by_stage_and_prefix, transfer_s=0.0):
        self.times = times_by_stage_and_prefix  # {(layer_start, prefix): seconds}
        self.transfer_s = transfer_s

    def stage_time_s(self, devices, layer_start, layer_stop, *, batch, tokens, prefix,
                     has_embedding, has_head):
        return self.times[(layer_start, prefix)]

    def decode_time_s(self, devices, layer_start, layer_stop, *, batch, context, has_embedding,
                      has_head):
        return self.times[(layer_start, context)]

    def transfer_time_s(self, src, dst, num_bytes):
        return self.transfer_s

    def stage_memory_bytes(self, devices, layer_start, layer_stop, **kw):
        return 0


def _plan(num_stages, slices):
    per = TINY.num_layers // num_stages
    stages = tuple(StagePlan((i,), i * per, (i + 1) * per) for i in range(num_stages))
    return Plan(method="manual", model=TINY, cluster=local_cluster(num_stages), batch=1,
                seq_len=sum(slices), dtype="float32", stages=stages, slices=tuple(slices))


@pytest.mark.parametrize("num_stages,num_slices", [(1, 1), (2, 4), (4, 3), (4, 8)])
def test_equal_stage_times_give_m_plus_n_minus_1(num_stages, num_slices):
    plan = _plan(num_stages, [16] * num_slices)
    per = TINY.num_layers // num_stages
    times = {(s * per, i * 16): 2.5 for s in range(num_stages) for i in range(num_slices)}
    tl = simulate(plan, TableCost(times))
    assert tl.prefill_latency_s == pytest.approx((num_slices + num_stages - 1) * 2.5)


def test_counter_example_closed_form_is_not_a_bound():
    # algorithms.md section 5: stage 0 takes [10,10,0,0], stage 1 [0,0,10,10] -> 40, not 30.
    plan = _plan(2, [8, 8, 8, 8])
    t0, t1 = [10, 10, 0, 0], [0, 0, 10, 10]
    times = {(0, 8 * i): t0[i] for i in range(4)} | {(2, 8 * i): t1[i] for i in range(4)}
    tl = simulate(plan, TableCost(times))
    closed = max(sum(t0), sum(t1)) + (2 - 1) * max(t0 + t1)
    assert closed == 30
    assert tl.prefill_latency_s == pytest.approx(40)


def test_overlap_hides_transfers_but_paper_accounting_does_not():
    plan = _plan(2, [8, 8, 8])
    times = {(s, 8 * i): 1.0 for s in (0, 2) for i in range(3)}
    overlapped = simulate(plan, TableCost(times, transfer_s=0.5))
    serial = simulate(plan, TableCost(times, transfer_s=0.5), overlap_comm=False)
    # Overlapped: stage 0 never waits on its sends; only the first transfer is exposed.
    assert overlapped.prefill_latency_s == pytest.approx(3 * 1.0 + 0.5 + 1.0)
    # Paper's accounting: F[i][0] = i * 1.5 + 1.5, then the last slice's stage-1 compute.
    assert serial.prefill_latency_s == pytest.approx(3 * 1.5 + 1.0)


def test_one_transfer_at_a_time_per_link():
    plan = _plan(2, [8, 8])
    times = {(0, 0): 1.0, (0, 8): 0.0, (2, 0): 0.0, (2, 8): 0.0}
    tl = simulate(plan, TableCost(times, transfer_s=5.0))
    sends = sorted((iv.start_s, iv.end_s) for iv in tl.intervals if iv.kind == "send")
    assert sends == [(1.0, 6.0), (6.0, 11.0)]  # the second waits for the link


def test_decode_loops_tokens_back_to_stage_zero():
    plan = _plan(2, [8])
    sched = build_schedule(plan, num_decode_steps=2)
    assert [repr(a) for a in sched.actions[0]] == ["0C0", "0S0", "0R0", "0C1", "0S1", "0R1", "0C2", "0S2"]
    times = {(s, p): 1.0 for s in (0, 2) for p in (0, 8, 9)}
    tl = simulate(plan, TableCost(times, transfer_s=0.25), schedule=sched)
    # prefill 1 + .25 + 1, then each step: token back .25, stage 0 1, hop .25, stage 1 1
    assert tl.prefill_latency_s == pytest.approx(2.25)
    assert tl.latency_s == pytest.approx(2.25 + 2 * 2.5)


def test_decode_steps_are_timed_by_the_decode_cost():
    """The simulator times prefill units with stage_time_s and decode steps with decode_time_s
    (a different cost: read-bound), at the context each step attends to."""
    plan = _plan(2, [8])
    times = {(0, 0): 1.0, (2, 0): 1.0, (0, 8): 0.1, (2, 8): 0.1, (0, 9): 0.2, (2, 9): 0.2}

    class DecodeCost(TableCost):
        def stage_time_s(self, devices, layer_start, layer_stop, *, tokens, prefix, **kw):
            assert tokens == 8 and prefix == 0, "a decode step timed as a prefill"
            return self.times[(layer_start, prefix)]

    tl = simulate(plan, DecodeCost(times), num_decode_steps=2)
    assert tl.prefill_latency_s == pytest.approx(2.0)
    assert tl.latency_s == pytest.approx(2.0 + 2 * 0.1 + 2 * 0.2)


def test_actions_read_back_from_their_short_form():
    from hpipe.schedule import Action, ActionKind

    sched = build_schedule(_plan(2, [4, 4]), num_decode_steps=2)
    for acts in sched.actions:
        for a in acts:
            back = Action.from_str(repr(a))
            assert (back.kind, back.stage, back.unit) == (a.kind, a.stage, a.unit)
    assert ActionKind.from_str("compute") is ActionKind.from_str("C") is ActionKind.COMPUTE
    with pytest.raises(ValueError, match="unknown action kind 'X'"):
        Action.from_str("1X3")
    with pytest.raises(ValueError, match="is not STAGE KIND UNIT"):
        Action.from_str("C3")


def test_the_failure_grid_marks_where_each_stage_was():
    sched = build_schedule(_plan(2, [2, 2, 2, 2]), num_decode_steps=20)
    grid = sched.grid({0: 9, 1: 4}, around=2)
    stage0, stage1 = grid.splitlines()
    # stage 0: C0 S0 C1 S1 C2 S2 C3 S3 R3 [C4] ...; stage 1: R0 C0 R1 C1 [R2] ...
    assert stage0 == "stage 0: ... S3 R3 [C4] S4 R4 ..."
    assert stage1 == "stage 1: ... R1 C1 [R2] C2 R3 ..."
    assert "[" not in sched.grid()


def test_the_planners_latency_equals_the_timelines():
    """``simulate_latency`` (what the planner scores, without intervals) gives exactly the
    simulated timeline's prefill latency and time to first token: sliced and micro-batched
    prefills, decode steps after them, TP stages, and sends that do not overlap."""
    import random

    from hpipe.cluster import load_cluster
    from hpipe.cost.analytic import AnalyticCost
    from hpipe.plan.api import plan_method
    from hpipe.sim import simulate_latency
    from hpipe.spec import model_preset

    rng = random.Random(3)
    checked = 0
    for model_name in ("llama-7b", "gpt3-2.7b"):
        model = model_preset(model_name)
        cluster = load_cluster("paper")
        cost = AnalyticCost(model, cluster, "float16")
        for method in ("hpipe", "gpipe", "terapipe", "megatron", "base"):
            plan = plan_method(method, model=model, cluster=cluster, batch=rng.choice([1, 4]),
                               seq_len=rng.choice([512, 2048]), cost=cost)
            for overlap in (True, False):
                for steps in (0, 3):
                    tl = simulate(plan, cost, num_decode_steps=steps, overlap_comm=overlap)
                    lat = simulate_latency(plan, cost, overlap_comm=overlap,
                                           schedule=build_schedule(plan, num_decode_steps=steps))
                    assert (lat.prefill_s, lat.ttft_s) == (tl.prefill_latency_s, tl.ttft_s)
                    checked += 1
    assert checked == 40
