"""The fitted cost model: the fit recovers known coefficients, and plugs into the simulator."""

from __future__ import annotations

import numpy as np
import pytest
from profile_harness import MODEL, make_profile

from hpipe.cluster import local_cluster
from hpipe.cost.fitted import FittedCost, fit_device, fit_nonnegative, layer_features
from hpipe.cost.profile_file import DeviceProfile, TimeSample
from hpipe.plan.plan import Plan, StagePlan
from hpipe.sim import simulate

# Known per-layer coefficients, in LAYER_TERMS order: 1, b*s, b*p, b*s*p, b*s^2.
TRUE = np.array([8e-4, 2.5e-6, 3e-8, 1.5e-9, 0.8e-9])
GRID = [(b, s, p) for b in (1, 2, 4) for s in (8, 32, 128, 512) for p in (0, 128, 512, 1536)]


def _true_time(b, s, p):
    return float(layer_features(np.array(b, float), np.array(s, float), np.array(p, float)) @ TRUE)


def test_fit_recovers_known_coefficients_exactly():
    b, s, p = (np.array(c, float) for c in zip(*GRID))
    coef = fit_nonnegative(layer_features(b, s, p), layer_features(b, s, p) @ TRUE)
    np.testing.assert_allclose(coef, TRUE, rtol=1e-6)


def test_fit_recovers_coefficients_under_timing_noise():
    # 1% multiplicative noise, like repeated medians on a quiet CPU: every coefficient within
    # 20% (the worst of 50 seeds is 17%: b*p is a small term, weakly determined), and
    # predictions off the grid, which are what the planner uses, within 3%.
    rng = np.random.default_rng(0)
    b, s, p = (np.array(c, float) for c in zip(*GRID))
    y = (layer_features(b, s, p) @ TRUE) * (1 + 0.01 * rng.standard_normal(len(GRID)))
    coef = fit_nonnegative(layer_features(b, s, p), y)
    np.testing.assert_allclose(coef, TRUE, rtol=0.2)
    for bb, ss, pp in [(3, 100, 900), (1, 2048, 0), (2, 16, 2000)]:
        pred = float(layer_features(np.array(bb, float), np.array(ss, float),
                                    np.array(pp, float)) @ coef)
        assert abs(pred / _true_time(bb, ss, pp) - 1) < 0.03, (bb, ss, pp)


def test_fit_keeps_coefficients_nonnegative():
    # Data with no prefix dependence at all: the fit must not invent a negative slope.
    x = np.array([[1.0, s, p] for s in (8, 64, 512) for p in (0, 256, 1024)])
    y = 1e-3 + 2e-6 * x[:, 1]
    coef = fit_nonnegative(x, y)
    assert (coef >= 0).all() and coef[2] == pytest.approx(0, abs=1e-15)
    np.testing.assert_allclose(coef[:2], [1e-3, 2e-6], rtol=1e-6)


def test_fitted_cost_scales_with_slowdown_and_layers():
    prof = make_profile(slowdowns=(1.0, 1.0))
    cost = FittedCost(prof, MODEL, local_cluster(2), "float32")
    one = cost.stage_time_s((0,), 0, 1, batch=2, tokens=64, prefix=256, has_embedding=False,
                            has_head=False)
    # make_profile's layer: 1e-3 + 2e-6*b*s + 1e-9*b*s*p
    # make_profile's stage call costs 5e-5 once per compute, however many layers.
    layer = 1e-3 + 2e-6 * 128 + 1e-9 * 128 * 256
    assert one == pytest.approx(layer + 5e-5, rel=1e-6)
    ten = cost.stage_time_s((0,), 0, 10, batch=2, tokens=64, prefix=256, has_embedding=False,
                            has_head=False)
    assert ten == pytest.approx(10 * layer + 5e-5, rel=1e-6)
    with_ends = cost.stage_time_s((0,), 0, 10, batch=2, tokens=64, prefix=256,
                                  has_embedding=True, has_head=True)
    assert with_ends == pytest.approx(ten + (1e-5 + 1e-8 * 128) + (1e-4 + 2e-6), rel=1e-6)
    # Transfers use the measured link fit: latency + bytes / bandwidth.
    assert cost.transfer_time_s(0, 1, 1.1e6) == pytest.approx(4e-5 + 1e-3)


def test_fitted_cost_plugs_into_the_simulator():
    cost = FittedCost(make_profile(), MODEL, local_cluster(2), "float32")
    plan = Plan(method="manual", model=MODEL, cluster=local_cluster(2), batch=1, seq_len=512,
                dtype="float32", stages=(StagePlan((0,), 0, 15), StagePlan((1,), 15, 30)),
                slices=(256, 256))
    tl = simulate(plan, cost)
    assert tl.prefill_latency_s > 0
    first = cost.stage_time_s((0,), 0, 15, batch=1, tokens=256, prefix=0, has_embedding=True,
                              has_head=False)
    assert tl.prefill_latency_s > 2 * first  # two slices went through stage 0 at least
    assert all(m > 0 for m in tl.peak_memory_bytes)


def test_device_fit_reports_its_worst_residual():
    samples = tuple(TimeSample(b, s, p, _true_time(b, s, p)) for b, s, p in GRID)
    dev = DeviceProfile(name="d", kind="cpu", torch_device="cpu", num_threads=1, slowdown=1.0,
                        layer=samples, embedding=samples[:4], head=samples[:4], call=(), memory=(),
                        context_bytes=0, layer_weight_bytes=0, kv_bytes_per_token_per_layer=0,
                        embedding_weight_bytes=0, head_weight_bytes=0, peak_memory_bytes=0)
    fit = fit_device(dev)
    assert fit.layer_rel_error_max < 1e-6


def test_hpipe_picks_no_tp_group_from_a_profile_that_never_timed_one(monkeypatch):
    from hpipe.plan import evaluate
    from hpipe.plan.api import plan_method

    # One stage that borrows the idle worker's thread for every slice (hpipe/lending.py) beats
    # the pair on this profile (0.019 against 0.022 s); without lending the pair wins, which is
    # the pick the rule must stop.
    monkeypatch.setattr(evaluate, "LENDING_METHODS", ())
    cluster = local_cluster(2)
    # Short prompts: with its TP estimate trusted, this profile's best plan is the pair.
    kw = dict(model=MODEL, cluster=cluster, batch=1, seq_len=32, dtype="float32")
    fitted = FittedCost(make_profile(), MODEL, cluster, "float32")
    assert all(len(st.devices) == 1 for st in plan_method("hpipe", cost=fitted, **kw).stages)
    trusting = FittedCost(make_profile(), MODEL, cluster, "float32")
    object.__setattr__(trusting, "times_tp_groups", True)  # what the rule turns off
    assert len(plan_method("hpipe", cost=trusting, **kw).stages[0].devices) == 2
    # Megatron's fixed pair is still timed with the fitted model's estimate.
    assert len(plan_method("megatron", cost=fitted, **kw).stages[0].devices) == 2


def test_a_profiles_decode_grid_times_decode_steps():
    """Decode samples that follow a known formula (weights read, per row, KV read per row)
    are fitted apart from the prefill grid and give the decode step; the same profile without
    them, or read back from a file written before them, extrapolates the prefill fit."""
    import dataclasses

    from hpipe.cost.profile_file import Profile

    def layer_s(b, p):
        return 2e-3 + 1e-5 * b + 3e-9 * b * p

    pts = [(b, p) for b in (1, 4, 16) for p in (16, 512, 1023)]
    base = make_profile()
    devices = tuple(dataclasses.replace(
        d, decode_layer=tuple(TimeSample(b, 1, p, layer_s(b, p)) for b, p in pts),
        decode_head=tuple(TimeSample(b, 1, p, 4e-4 + 2e-6 * b) for b, p in pts),
        decode_call=tuple(TimeSample(b, 1, p, 1e-4) for b, p in pts)) for d in base.devices)
    prof = Profile.from_dict(dataclasses.replace(base, devices=devices).to_dict())
    cost = FittedCost(prof, MODEL, local_cluster(2), "float32")
    got = cost.decode_time_s((0,), 0, 10, batch=8, context=700, has_embedding=False,
                             has_head=True)
    assert got == pytest.approx(10 * layer_s(8, 700) + 1e-4 + 4e-4 + 2e-6 * 8, rel=1e-6)
    old = FittedCost(make_profile(), MODEL, local_cluster(2), "float32")
    assert old.fits[0].decode_layer is None
    assert old.decode_time_s((0,), 0, 10, batch=8, context=700, has_embedding=False,
                             has_head=True) == old.stage_time_s(
        (0,), 0, 10, batch=8, tokens=1, prefix=700, has_embedding=False, has_head=True)


def test_a_measured_lent_speed_up_prices_lent_computes():
    import dataclasses

    from hpipe.lending import LENT_PARALLEL_FRACTION, lent_time_s

    cluster = local_cluster(2)
    plain = make_profile()
    cost = FittedCost(plain, MODEL, cluster, "float32")
    assert cost.lent_speedup(0, tokens=64, threads=2) is None  # not measured: assumed
    p = LENT_PARALLEL_FRACTION
    assert lent_time_s(cost, 0, 1.0, tokens=64, own_threads=1, threads=2) == pytest.approx(
        1 - p + p / 2)

    # Timed lent at 16 and 256 tokens: 1.5x and 1.9x faster than the busy grid's same slices.
    def lent(dv):
        busy = {t.tokens: t.time_s for t in dv.layer if t.rows == 1 and t.prefix == 0}
        return dataclasses.replace(dv, lent_threads=2, lent_layer=(
            TimeSample(1, 16, 0, busy[16] / 1.5), TimeSample(1, 256, 0, busy[256] / 1.9)))

    measured = FittedCost(dataclasses.replace(plain, devices=tuple(map(lent, plain.devices))),
                          MODEL, cluster, "float32")
    assert measured.lent_speedup(0, tokens=16, threads=2) == pytest.approx(1.5)
    assert measured.lent_speedup(1, tokens=64, threads=2) == pytest.approx(1.7)  # halfway in log
    assert measured.lent_speedup(0, tokens=4096, threads=2) == pytest.approx(1.9)  # flat beyond
    assert measured.lent_speedup(0, tokens=8, threads=2) == pytest.approx(1.5)
    assert measured.lent_speedup(0, tokens=64, threads=3) is None  # timed on 2, not 3
    # Never more than the thread ratio: a busy grid taken in a slow spell would say 2.4x.
    fast = dataclasses.replace(plain, devices=tuple(
        dataclasses.replace(dv, lent_threads=2, lent_layer=(TimeSample(1, 256, 0, 1e-9),))
        for dv in plain.devices))
    assert FittedCost(fast, MODEL, cluster, "float32").lent_speedup(
        0, tokens=256, threads=2) == pytest.approx(2.0)
    assert lent_time_s(measured, 0, 1.9, tokens=256, own_threads=1, threads=2) == pytest.approx(1)
    # The simulator prices a lent slice by it: stage 0's first slice of an even split.
    plan = Plan(method="manual", model=MODEL, cluster=cluster, batch=1, seq_len=512,
                dtype="float32", stages=(StagePlan((0,), 0, 15), StagePlan((1,), 15, 30)),
                slices=(256, 256), lend_idle_threads=True)
    first = {(iv.row, iv.unit): iv for iv in simulate(plan, measured).intervals
             if iv.kind == "compute"}[(0, 0)]
    busy = measured.stage_time_s((0,), 0, 15, batch=1, tokens=256, prefix=0,
                                 has_embedding=True, has_head=False)
    assert first.threads == 2 and first.duration_s == pytest.approx(busy / 1.9)
