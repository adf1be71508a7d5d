"""The analytic roofline and memory model: formulas, limits and the paper's memory facts."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from hpipe.cluster import load_cluster, parse_cluster
from hpipe.cost.analytic import EFF_MAX, AnalyticCost
from hpipe.cost.memory import workspace_bytes
from hpipe.spec import model_preset

PAPER = load_cluster("paper")
LLAMA = model_preset("llama-7b")
P100, RTX = 0, 4


@pytest.fixture
def cost():
    return AnalyticCost(LLAMA, PAPER, "float16")


def test_flops_formula_and_slicing_keeps_total_flops(cost):
    b, s, p = 6, 512, 1024
    P, h = LLAMA.params_per_layer(), LLAMA.hidden
    assert cost.layer_flops(batch=b, tokens=s, prefix=p) == 2 * b * s * P + 4 * b * h * s * (p + s / 2)
    whole = cost.layer_flops(batch=b, tokens=2048, prefix=0)
    sliced = sum(cost.layer_flops(batch=b, tokens=s, prefix=q) for q in range(0, 2048, 512))
    assert sliced == pytest.approx(whole)  # sum s_i (p_i + s_i / 2) = L^2 / 2


def test_achievable_rate_rises_with_rows_and_stays_below_peak(cost):
    dev = PAPER.devices[RTX]
    rates = [cost.achievable_flops(dev, r) for r in (16, 128, 1024, 12288)]
    assert rates == sorted(rates)
    assert rates[1] == pytest.approx(dev.peak_flops_fp16 * EFF_MAX / 2)  # half at 128 rows
    assert rates[-1] < dev.peak_flops_fp16 * EFF_MAX


def test_small_slices_cost_more_per_token(cost):
    t16 = 128 * cost.stage_time_s((RTX,), 0, 1, batch=1, tokens=16, prefix=0,
                                  has_embedding=False, has_head=False)
    t2048 = cost.stage_time_s((RTX,), 0, 1, batch=1, tokens=2048, prefix=0,
                              has_embedding=False, has_head=False)
    assert t16 > 2 * t2048


def test_a_decode_step_costs_its_reads_over_the_bandwidth(cost):
    """The closed form: (weights + KV cache read) / (bandwidth x 0.8) where that exceeds the
    FLOPs over the rate, as it does at batch 1."""
    kv_per_token = 2 * LLAMA.kv_dim * 2  # K and V, fp16, one layer
    for batch, context in ((1, 100), (1, 2000), (8, 2000)):
        t = cost.decode_time_s((P100,), 0, 4, batch=batch, context=context,
                               has_embedding=False, has_head=False)
        read = 4 * (LLAMA.params_per_layer() * 2 + batch * (context + 1) * kv_per_token)
        assert t == pytest.approx(read / (732e9 * 0.8), rel=1e-9), (batch, context)
    # The head reads its vocabulary matrix once per step, whatever the batch.
    head = cost.decode_time_s((P100,), 0, 0, batch=1, context=0, has_embedding=False,
                              has_head=True)
    assert head == pytest.approx(LLAMA.head_params() * 2 / (732e9 * 0.8), rel=1e-6)


def test_a_big_decode_batch_turns_compute_bound(cost):
    """At a batch large enough, the FLOPs over the rate exceed the reads: the larger wins."""
    t = cost.decode_time_s((P100,), 0, 1, batch=4096, context=16, has_embedding=False,
                           has_head=False)
    flops = cost.layer_flops(batch=4096, tokens=1, prefix=16)
    assert t == pytest.approx(flops / (cost.cluster.devices[P100].peak_flops("float16") * 0.7))


def test_decode_on_the_paper_cluster_is_near_the_weights_over_the_bandwidth():
    """LLaMA-7B on the paper cluster, batch 1: a whole decode step through the six devices
    (split as HPipe plans it) costs close to the weights over each device's bandwidth."""
    from hpipe.plan.api import plan_method
    from hpipe.sim import simulate

    plan = plan_method("hpipe", model=LLAMA, cluster=PAPER, batch=1, seq_len=2048,
                       dtype="float16", allow_tp=False)
    c = AnalyticCost(LLAMA, PAPER)
    tl = simulate(plan, c, num_decode_steps=17)
    step_s = (tl.latency_s - tl.ttft_s) / 16
    assert 0.02 < step_s < 0.04, step_s


def test_later_slices_cost_more(cost):
    kw = dict(batch=6, tokens=256, has_embedding=False, has_head=False)
    assert (cost.stage_time_s((P100,), 0, 4, prefix=1792, **kw)
            > cost.stage_time_s((P100,), 0, 4, prefix=0, **kw))


def test_slowdown_multiplies_compute():
    d = PAPER.to_dict()
    d["hosts"][0]["devices"][0]["slowdown"] = 3.0
    slow = parse_cluster(d)
    kw = dict(batch=2, tokens=512, prefix=0, has_embedding=True, has_head=False)
    a = AnalyticCost(LLAMA, PAPER).stage_time_s((0,), 0, 4, **kw)
    b = AnalyticCost(LLAMA, slow).stage_time_s((0,), 0, 4, **kw)
    assert b == pytest.approx(3 * a)


def test_tensor_parallel_halves_compute_and_pays_two_allreduces_per_layer(cost):
    kw = dict(batch=6, tokens=2048, prefix=0, has_embedding=False, has_head=False)
    one = cost.stage_time_s((P100,), 0, 4, **kw)
    pair = cost.stage_time_s((0, 1), 0, 4, **kw)
    link = PAPER.link(0, 1)
    nbytes = 6 * 2048 * LLAMA.hidden * 2
    allreduce = 2 * link.latency_s + nbytes / link.bandwidth_bytes_s  # ring, k = 2
    assert pair == pytest.approx(one / 2 + 2 * 4 * allreduce, rel=1e-6)


def test_transfer_uses_the_link_between_devices(cost):
    assert cost.transfer_time_s(3, 4, 1e8) == pytest.approx(100e-6 + 1e8 / (0.94e9 / 8))
    assert cost.transfer_time_s(0, 1, 1e8) == pytest.approx(10e-6 + 1e8 / 12e9)


def test_vectorised_stage_times_match_the_scalar_ones(cost):
    toks = np.array([16, 96, 2048])
    for devs in ((P100,), (RTX,), (0, 1)):
        for emb, head in ((False, False), (True, False), (False, True)):
            many = cost.stage_times_many_s(devs, 0, 5, batch=6, tokens=toks, prefix=320,
                                           has_embedding=emb, has_head=head)
            one = [cost.stage_time_s(devs, 0, 5, batch=6, tokens=int(t), prefix=320,
                                     has_embedding=emb, has_head=head) for t in toks]
            assert np.allclose(many, one, rtol=1e-12)


def test_memory_parts_and_slicing_shrinks_workspace():
    cost = AnalyticCost(LLAMA, PAPER, attention="eager")  # the paper's kernel: score tensors
    kw = dict(batch=6, seq_len=2048, has_embedding=False, has_head=False)
    whole = cost.stage_memory_bytes((P100,), 0, 6, units=((6, 2048, 0),), **kw)
    sliced = cost.stage_memory_bytes((P100,), 0, 6, units=((6, 128, 1920), (6, 256, 0)), **kw)
    assert whole - sliced > 5e9  # the L^2 score tensor is gone
    kv = 6 * 6 * 2048 * LLAMA.kv_bytes_per_token_per_layer(2)
    weights = 6 * LLAMA.params_per_layer() * 2
    assert sliced > kv + weights
    emb = cost.stage_memory_bytes((P100,), 0, 6, units=((6, 128, 0),), batch=6, seq_len=2048,
                                  has_embedding=True, has_head=False)
    no = cost.stage_memory_bytes((P100,), 0, 6, units=((6, 128, 0),), batch=6, seq_len=2048,
                                 has_embedding=False, has_head=False)
    assert emb - no == LLAMA.embedding_params() * 2
    # A TP pair holds half of the weights, KV and attention workspace each.
    pair = cost.stage_memory_bytes((0, 1), 0, 6, units=((6, 2048, 0),), **kw)
    assert pair < 0.6 * whole


def test_scores_dominate_workspace_at_full_length():
    ws = workspace_bytes(LLAMA, rows=6, tokens=2048, prefix=0, elem_bytes=2, attention="eager")
    scores = 6 * 32 * 2048 * 2048 * (2 * 2 + 4)  # fp16 scores + fp32 softmax + fp16 probs
    assert scores < ws < scores * 1.2


def test_sdpa_holds_no_score_tensor_only_a_mask_after_a_prefix():
    """The runtime's fused kernel: a slice at prefix 0 (is_causal) and a decode step hold no
    (s, p + s) tensor at all; a slice after a prefix holds its mask, 5 bytes per pair for
    every row and head together, where eager attention holds heads x rows x 8 bytes."""
    kw = dict(elem_bytes=2, attention="sdpa")
    at0 = workspace_bytes(LLAMA, rows=6, tokens=2048, prefix=0, **kw)
    assert at0 < workspace_bytes(LLAMA, rows=6, tokens=2048, prefix=0, elem_bytes=2,
                                 attention="eager") / 5
    # Past a long prefix the mask sets the workspace: 5 bytes per (query, key) pair.
    far = workspace_bytes(LLAMA, rows=1, tokens=256, prefix=40000, **kw)
    near = workspace_bytes(LLAMA, rows=1, tokens=256, prefix=30000, **kw)
    assert far - near == 256 * 10000 * 5
    assert workspace_bytes(LLAMA, rows=6, tokens=1, prefix=2047, **kw) == workspace_bytes(
        LLAMA, rows=6, tokens=1, prefix=0, **kw)


def test_a_405b_model_at_128k_fits_32_gpus_with_the_runtimes_kernel():
    """Llama-3.1-405B at 128k tokens on 32 GPUs of four generations (1152 GiB): its weights
    and KV cache need about 817 GiB. With eager scores an 80 GB A100 holds 2 layers and
    nothing fits; with SDPA's workspace a split fits."""
    from hpipe.plan.feasibility import split_fits
    from hpipe.plan.search import hpipe_units

    model = model_preset("llama-3.1-405b")
    cluster = load_cluster(str(Path(__file__).resolve().parents[1] / "examples/mixed32.yaml"))
    kw = dict(model=model, cluster=cluster, batch=1, seq_len=131072, units=hpipe_units(512))
    assert split_fits(AnalyticCost(model, cluster, attention="sdpa"), **kw)
    assert not split_fits(AnalyticCost(model, cluster, attention="eager"), **kw)


def test_paper_base_memory_fits_a_p100_for_llama_7b():
    # The paper measured 11479 MB per P100 for Base (6 layers, whole sequence in one pass),
    # running eager attention.
    cost = AnalyticCost(LLAMA, PAPER, attention="eager")
    need = cost.stage_memory_bytes((P100,), 0, 6, batch=6, seq_len=2048,
                                   units=((6, 2048, 0),), has_embedding=True, has_head=False)
    assert 9e9 < need < 12.5e9


def test_memory_model_is_dtype_aware():
    c32 = AnalyticCost(LLAMA, PAPER, "float32")
    c16 = AnalyticCost(LLAMA, PAPER, "float16")
    kw = dict(batch=1, seq_len=128, units=((1, 128, 0),), has_embedding=False, has_head=False)
    assert c32.stage_memory_bytes((0,), 0, 4, **kw) > 1.9 * (
        c16.stage_memory_bytes((0,), 0, 4, **kw) - 512 * 1024**2)


def test_cost_is_frozen_and_hashable():
    c = AnalyticCost(LLAMA, PAPER)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.dtype = "float32"
    assert c == AnalyticCost(LLAMA, PAPER)
