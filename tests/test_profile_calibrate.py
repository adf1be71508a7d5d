"""Calibration: the per-device ratio from one real pipelined run, and what the fit does with it.

The run itself is exercised end to end in test_profile_measure (``hpipe profile`` on a tiny
model); here the arithmetic is checked on simulated "measurements" with known answers.
"""

from __future__ import annotations

import dataclasses

import pytest
from profile_harness import MODEL, make_profile

from hpipe.cluster import local_cluster
from hpipe.cost.fitted import FittedCost
from hpipe.cost.profile_file import Profile
from hpipe.plan.api import plan_method
from hpipe.profile.calibrate import (
    NUM_SLICES,
    calibration_plan,
    compute_by_device,
    make_calibration,
)
from hpipe.sim import simulate


class DeviceScaled:
    """A cost model whose device d computes ``factors[d]`` times slower than ``base`` says: a
    stand-in for a real run that is slower (or faster) than the profile on some devices."""

    times_tp_groups = False

    def __init__(self, base, factors):
        self.base, self.factors = base, factors

    def stage_time_s(self, devices, *args, **kw):
        return self.factors[devices[0]] * self.base.stage_time_s(devices, *args, **kw)

    def transfer_time_s(self, *args):
        return self.base.transfer_time_s(*args)

    def stage_memory_bytes(self, *args, **kw):
        return self.base.stage_memory_bytes(*args, **kw)


def _fit(profile: Profile, n: int = 2, **kw) -> FittedCost:
    return FittedCost(profile, MODEL, local_cluster(n), "float32", **kw)


def test_calibration_plan_is_the_even_split_with_equal_slices_on_every_device():
    plan = calibration_plan(MODEL, local_cluster(2), _fit(make_profile()), tokens=1000,
                            dtype="float32")
    assert [(st.devices, st.layer_stop - st.layer_start) for st in plan.stages] == [
        ((0,), 15), ((1,), 15)]
    assert plan.slices == (250,) * NUM_SLICES and plan.batch == 1
    uneven = calibration_plan(MODEL, local_cluster(2), _fit(make_profile()), tokens=1002,
                              dtype="float32")
    assert sum(uneven.slices) == 1002 and max(uneven.slices) - min(uneven.slices) <= 1


def test_ratio_per_device_is_recovered_and_the_calibrated_fit_predicts_other_plans():
    profile = make_profile()
    raw = _fit(profile, calibrated=False)
    truth = DeviceScaled(raw, (1.25, 0.8))  # device 0 runs slower than profiled, 1 faster
    plan = calibration_plan(MODEL, local_cluster(2), raw, tokens=1024, dtype="float32")
    measured = [simulate(plan, truth), simulate(plan, truth)]
    cal = make_calibration(plan, raw, measured)
    assert cal.compute_scale == pytest.approx((1.25, 0.8), rel=1e-9)
    assert cal.measured_latency_s == pytest.approx(measured[0].prefill_latency_s)
    assert cal.predicted_latency_s == pytest.approx(simulate(plan, raw).prefill_latency_s)
    assert cal.layer_counts == (15, 15) and cal.slices == plan.slices
    calibrated = _fit(dataclasses.replace(profile, calibration=cal))
    # Another split and slicing than the calibration plan: the calibrated fit predicts what
    # the scaled "truth" gives, the raw fit does not.
    other = plan_method("manual", model=MODEL, cluster=local_cluster(2), batch=2, seq_len=768,
                        dtype="float32", cost=raw, layers=(20, 10), slices=(400, 256, 112))
    want = simulate(other, truth).prefill_latency_s
    assert simulate(other, calibrated).prefill_latency_s == pytest.approx(want, rel=1e-9)
    assert abs(simulate(other, raw).prefill_latency_s / want - 1) > 0.05
    # calibrated=False ignores the record: what the calibration itself compares against.
    assert _fit(dataclasses.replace(profile, calibration=cal), calibrated=False
                ).compute_scale == (1.0, 1.0)


def test_median_over_runs_per_device():
    profile = make_profile()
    raw = _fit(profile, calibrated=False)
    plan = calibration_plan(MODEL, local_cluster(2), raw, tokens=512, dtype="float32")
    runs = [simulate(plan, DeviceScaled(raw, f)) for f in ((1.1, 1.0), (1.5, 0.9), (1.2, 3.0))]
    cal = make_calibration(plan, raw, runs)
    assert cal.compute_scale == pytest.approx((1.2, 1.0), rel=1e-9)


def test_a_device_without_layers_keeps_scale_one():
    from hpipe.spec import ModelSpec

    two = ModelSpec(**{**dataclasses.asdict(MODEL), "num_layers": 2})
    names = ("cpu0", "cpu1", "cpu2")
    profile = make_profile(names=names, slowdowns=(1.0,) * 3, model=two)
    raw = FittedCost(profile, two, local_cluster(3), "float32", calibrated=False)
    plan = calibration_plan(two, local_cluster(3), raw, tokens=256, dtype="float32")
    assert len(plan.stages) == 2  # even_counts(2, 3) = (1, 1, 0)
    busy = compute_by_device(simulate(plan, raw), plan)
    assert busy[2] == 0.0 and busy[0] > 0 and busy[1] > 0
    cal = make_calibration(plan, raw, [simulate(plan, DeviceScaled(raw, (2.0, 2.0, 2.0)))])
    assert cal.compute_scale == pytest.approx((2.0, 2.0, 1.0))
    assert cal.layer_counts == (1, 1, 0)


def test_calibration_round_trips_through_json():
    profile = make_profile()
    raw = _fit(profile, calibrated=False)
    plan = calibration_plan(MODEL, local_cluster(2), raw, tokens=512, dtype="float32")
    cal = make_calibration(plan, raw, [simulate(plan, DeviceScaled(raw, (1.3, 0.7)))])
    with_cal = dataclasses.replace(profile, calibration=cal)
    back = Profile.from_json(with_cal.to_json())
    assert back == with_cal and back.calibration.compute_scale == pytest.approx((1.3, 0.7))
    assert with_cal.to_dict()["calibration"]["compute_scale"] == pytest.approx([1.3, 0.7])
    assert Profile.from_json(profile.to_json()).calibration is None
