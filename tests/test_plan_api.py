"""The front door on the paper's setting, manual plans, JSON, and every user error."""

import json

import pytest

from hpipe.cli import main
from hpipe.cluster import load_cluster, parse_cluster
from hpipe.cost.analytic import AnalyticCost
from hpipe.errors import (
    InfeasiblePlanError,
    PlanMismatchError,
    PromptTooLongError,
    SliceError,
)
from hpipe.plan.api import default_grain_tokens, plan_all, plan_method
from hpipe.plan.plan import Plan
from hpipe.spec import model_preset

PAPER = load_cluster("paper")
LLAMA = model_preset("llama-7b")


@pytest.fixture(scope="module")
def paper_plans():
    return plan_all(model=LLAMA, cluster=PAPER, batch=6, seq_len=2048)  # HPipe: TP allowed


@pytest.fixture(scope="module")
def paper_pipeline():
    """The paper's HPipe: one device per stage."""
    return plan_method("hpipe", model=LLAMA, cluster=PAPER, batch=6, seq_len=2048,
                       allow_tp=False)


def test_hpipe_beats_every_baseline_on_the_paper_setting(paper_plans, paper_pipeline):
    hp = paper_plans["hpipe"]
    assert isinstance(hp, Plan)
    for name, other in paper_plans.items():
        if name != "hpipe":
            assert isinstance(other, Plan), f"{name}: {other}"
            # With TP pairs allowed (the default) and as the paper's pure pipeline.
            assert hp.predicted_latency_s < other.predicted_latency_s, name
            assert paper_pipeline.predicted_latency_s < other.predicted_latency_s, name


def test_paper_plan_shape(paper_pipeline):
    hp = paper_pipeline
    assert all(len(s.devices) == 1 for s in hp.stages)
    # The 3090s (about 2x a P100) get about twice the layers of each P100.
    by_kind = {}
    for s in hp.stages:
        by_kind.setdefault(PAPER.devices[s.device].kind, []).append(s.num_layers)
    assert min(by_kind["rtx3090"]) >= 1.5 * max(by_kind["p100"])
    assert len(hp.slices) > 4
    # One scheme for every 16-token length up to 2048.
    assert [n for n, _ in hp.slice_table] == list(range(16, 2049, 16))
    assert all(sum(sl) == n for n, sl in hp.slice_table)
    assert hp.slices_for(2048) == hp.slices


def test_paper_setting_with_tensor_parallel_pairs(paper_plans, paper_pipeline):
    """Allowed TP pairs, HPipe puts pairs of devices on stages (fewer, faster stages: a
    shorter pipeline fill) and beats the paper's pure pipeline; the pairs stay inside a host,
    and the plan is valid data like any other."""
    hp = paper_plans["hpipe"]
    groups = [s.devices for s in hp.stages]
    assert any(len(g) == 2 for g in groups), groups
    assert all(len({PAPER.devices[d].host for d in g}) == 1 for g in groups)
    assert hp.predicted_latency_s < paper_pipeline.predicted_latency_s
    assert Plan.from_json(hp.to_json()) == hp


def test_plan_round_trips_through_json(paper_plans):
    for plan in paper_plans.values():
        assert Plan.from_json(plan.to_json()) == plan


def test_manual_plan_uses_given_layers_and_slices():
    p = plan_method("manual", model=LLAMA, cluster=PAPER, batch=6, seq_len=2048,
                    layers=(8, 8, 4, 4, 4, 4), slices=(1024, 512, 512))
    assert p.layer_counts() == (8, 8, 4, 4, 4, 4) and p.slices == (1024, 512, 512)
    p = plan_method("hpipe", model=LLAMA, cluster=PAPER, batch=6, seq_len=2048,
                    layers=(0, 6, 6, 6, 7, 7))
    assert p.method == "manual" and p.layer_counts() == (6, 6, 6, 7, 7)
    assert p.stages[0].device == 1  # device 0 unused


def test_manual_errors():
    with pytest.raises(PlanMismatchError, match=r"need 6 non-negative counts .* summing to 32"):
        plan_method("manual", model=LLAMA, cluster=PAPER, batch=6, seq_len=2048, layers=(16, 16))
    with pytest.raises(SliceError, match="sum to 2000 tokens but the prompt has 2048"):
        plan_method("manual", model=LLAMA, cluster=PAPER, batch=6, seq_len=2048,
                    slices=(1000, 1000))
    with pytest.raises(PlanMismatchError, match="make a manual plan"):
        plan_method("gpipe", model=LLAMA, cluster=PAPER, batch=6, seq_len=2048, slices=(2048,))
    with pytest.raises(PlanMismatchError, match="unknown method 'fast'"):
        plan_method("fast", model=LLAMA, cluster=PAPER, batch=6, seq_len=2048)


def test_seq_len_beyond_context():
    with pytest.raises(PromptTooLongError, match=r"seq_len 4096 exceeds the context of 'llama-7b', 2048 tokens"):
        plan_method("hpipe", model=LLAMA, cluster=PAPER, batch=6, seq_len=4096)


def test_model_that_fits_nowhere_says_why_and_what_fits():
    small = parse_cluster({"name": "two-t4", "hosts": [{"name": "h", "devices": [
        {"name": "t4-0", "type": "t4"}, {"name": "t4-1", "type": "t4"}]}]})
    with pytest.raises(InfeasiblePlanError,
                       match=r"'llama-70b' \(80 layers\) fits no split.*GiB on 't4-.*fits: about \d+ more device"):
        plan_method("hpipe", model=model_preset("llama-70b"), cluster=small, batch=1,
                    seq_len=1024)
    # No split can help when the weights alone exceed the cluster: it says by how much.
    with pytest.raises(InfeasiblePlanError,
                       match=r"its weights \(128.5 GiB\) and KV cache \([\d.]+ GiB\) alone exceed "
                             r"the [\d.]+ GiB the cluster's devices hold beside their runtimes"):
        plan_method("hpipe", model=model_preset("llama-70b"), cluster=PAPER, batch=6,
                    seq_len=2048)
    with pytest.raises(InfeasiblePlanError, match=r"fits: batch <= \d+"):
        plan_method("hpipe", model=model_preset("llama-13b"), cluster=PAPER, batch=200,
                    seq_len=2048)


def test_baseline_oom_names_device_and_smaller_batch():
    """The paper's case: Base's whole-sequence attention scores (eager) overflow a P100."""
    gpt = model_preset("gpt3-2.7b")
    eager = AnalyticCost(gpt, PAPER, attention="eager")
    with pytest.raises(InfeasiblePlanError,
                       match=r"base: layers \[0, 6\) need [\d.]+ GiB on 'p100-0' \(16.0 GiB, over by"
                             r".*fits: batch <= \d+, or method 'hpipe'"):
        plan_method("base", model=gpt, cluster=PAPER, batch=16, seq_len=2048, cost=eager)
    # A baseline never suggests HPipe where HPipe does not fit either.
    with pytest.raises(InfeasiblePlanError, match=r"terapipe: .*fits: nothing at this batch and "
                                                  r"length, not even method 'hpipe'"):
        plan_method("terapipe", model=model_preset("llama-70b"), cluster=PAPER, batch=6,
                    seq_len=2048)
    table = plan_all(model=gpt, cluster=PAPER, batch=16, seq_len=2048, cost=eager)
    assert isinstance(table["base"], InfeasiblePlanError) and isinstance(table["hpipe"], Plan)


def test_default_grain():
    assert default_grain_tokens(2048) == 16 and default_grain_tokens(32768) == 128


def test_cli_plan_text_and_json(capsys):
    assert main(["plan", "--cluster", "paper", "--model", "gpt3-2.7b", "--batch", "12"]) == 0
    out = capsys.readouterr().out
    assert "3090-0" in out and "predicted latency" in out and "GiB" in out
    assert main(["plan", "--model", "gpt3-2.7b", "--batch", "12", "--method", "gpipe",
                 "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert Plan.from_dict(d).method == "gpipe" and d["summary"]["num_microbatches"] >= 1
    assert main(["plan", "--seq-len", "4096"]) == 2
    assert "exceeds" in capsys.readouterr().err


def test_cli_no_tp_keeps_hpipe_to_one_device_per_stage(capsys):
    # SmolLM2 over two CPU workers at 4096 tokens: a TP pair beats a two-stage pipeline
    # (`hpipe simulate --method all` shows Megatron ahead of a pure pipeline there).
    argv = ["plan", "--cluster", "local:2", "--model", "smollm2", "--seq-len", "4096",
            "--batch", "1", "--dtype", "float32", "--json"]
    assert main(argv) == 0
    tp = json.loads(capsys.readouterr().out)
    assert main([*argv, "--no-tp"]) == 0
    pure = json.loads(capsys.readouterr().out)
    assert [len(s["devices"]) for s in tp["stages"]] == [2]
    assert all(len(s["devices"]) == 1 for s in pure["stages"])
    assert tp["predicted_latency_s"] < pure["predicted_latency_s"]


def test_slicing_dp_cuts_longer_slices_first_when_attention_matters():
    # At 16k tokens the attention term is ~2/3 of a layer's FLOPs at the end of the prompt, so
    # later slices cost more and the DP's estimate-optimal slicing shrinks them (the paper's
    # figure). The simulator may still prefer another candidate: see hpipe.plan.search.
    from hpipe.cost.analytic import AnalyticCost
    from hpipe.plan.evaluate import Problem
    from hpipe.plan.slices import plan_slicing

    model = model_preset("llama-2-7b-32k")
    plan = plan_method("hpipe", model=model, cluster=PAPER, batch=1, seq_len=16384)
    pb = Problem(model=model, cluster=PAPER, batch=1, seq_len=16384, dtype="float16",
                 cost=AnalyticCost(model, PAPER), grain_tokens=default_grain_tokens(16384))
    st = pb.slice_times(plan.stages)
    res = plan_slicing(st.tau, fits_fn=st.fits, tau_row_fn=st.tau_row, seq_len=16384,
                       grain_tokens=pb.grain_tokens, num_stages=plan.num_stages)
    first, last = res.slices[:3], res.slices[-3:]
    assert min(first) > max(last), res.slices


@pytest.mark.parametrize("method", ["hpipe", "gpipe", "gpb"])
def test_a_huge_batch_is_refused_without_trying_every_micro_batch_count(method, monkeypatch):
    """More micro-batches never need more memory, so when the finest count does not fit the
    planner says so at once; it used to try all of 1..batch (batch 100000: over 10 minutes)."""
    import hpipe.plan.evaluate as evaluate
    import hpipe.plan.rank as rank
    import hpipe.plan.search as search

    calls = 0
    real = evaluate.memory_overflows

    def counted(plan, cost, **kw):
        nonlocal calls
        calls += 1
        if calls > 5000:
            raise AssertionError("the planner is sweeping micro-batch counts one by one")
        return real(plan, cost, **kw)

    for module in (rank, search):
        monkeypatch.setattr(module, "memory_overflows", counted)
    with pytest.raises(InfeasiblePlanError, match=r"fits: batch <= \d+"):
        plan_method(method, model=LLAMA, cluster=PAPER, batch=100_000, seq_len=2048)


def test_large_batches_sweep_only_the_counts_where_micro_batch_rows_change(monkeypatch):
    import hpipe.plan.rank as rank
    from hpipe.plan.rank import microbatch_counts

    assert list(microbatch_counts(64)) == list(range(1, 65))  # small batches: every count
    counts = microbatch_counts(300)
    rows = [-(-300 // m) for m in counts]
    assert len(set(rows)) == len(rows) == len(counts) <= 2 * 300**0.5 + 1
    assert set(rows) == {-(-300 // m) for m in range(1, 301)}  # every row count, once
    assert all(-(-300 // (m - 1)) != r for m, r in zip(counts[1:], rows[1:]))  # its smallest m
    # The reduced sweep finds the full sweep's GPipe plan on a realistic case.
    smol = model_preset("smollm2-135m")
    reduced = plan_method("gpipe", model=smol, cluster=PAPER, batch=100, seq_len=512)
    monkeypatch.setattr(rank, "EXACT_MICROBATCH_SWEEP", 10**9)
    full = plan_method("gpipe", model=smol, cluster=PAPER, batch=100, seq_len=512)
    assert reduced.predicted_latency_s == full.predicted_latency_s
    assert reduced.num_microbatches == full.num_microbatches


def test_the_slicing_dp_grows_slices_where_growing_wins():
    """The slicing DP searches every grid slicing, not only shrinking or equal ones: with a
    per-token cost that falls along the prompt and a fixed cost per slice, its best slicing
    grows, with lengths that are not powers of two; and it beats every equal slicing."""
    from hpipe.plan.slices import estimate_s, plan_slicing

    def tau(tokens: int, prefix: int) -> float:
        return tokens * (2.0 - 1.9 * prefix / 512) + 20.0

    res = plan_slicing(tau, seq_len=512, grain_tokens=16, num_stages=4, epsilon=0)
    sl = res.slices
    assert sum(sl) == 512
    assert list(sl) == sorted(sl) and sl[-1] > sl[0]  # growing
    assert any(s & (s - 1) for s in sl)  # a length that is not a power of two
    equal = [tuple([512 // k] * k) for k in (1, 2, 4, 8, 16, 32)]
    assert all(estimate_s(sl, tau, 4) < estimate_s(e, tau, 4) for e in equal)
