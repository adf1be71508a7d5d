"""The profile file: JSON round trip, and refusal of a profile made for another model/cluster."""

from __future__ import annotations

import dataclasses

import pytest
from profile_harness import MODEL, device_profile, make_profile

from hpipe.cluster import local_cluster, parse_cluster
from hpipe.cost import cost_model, read_profile
from hpipe.cost.fitted import FittedCost
from hpipe.cost.profile_file import (
    Profile,
    TimeSample,
    check_profile,
)
from hpipe.errors import ProfileMismatchError
from hpipe.spec import model_preset


def test_profile_round_trips_through_json(tmp_path):
    prof = make_profile()
    path = tmp_path / "profile.json"
    path.write_text(prof.to_json())
    back = read_profile(path)
    assert back == prof
    # The file says what it was measured for.
    d = prof.to_dict()
    assert (d["torch_version"], d["dtype"], d["model_name"]) == ("2.13.0", "float32", MODEL.name)
    assert d["device_names"] == ["cpu0", "cpu1"] and d["date"].startswith("2026")
    # With the lent threads' samples too; a file written before them reads as none measured.
    lent = dataclasses.replace(prof, devices=tuple(
        dataclasses.replace(dv, lent_threads=2, lent_layer=(TimeSample(1, 64, 0, 0.01),))
        for dv in prof.devices))
    assert Profile.from_json(lent.to_json()) == lent
    old = prof.to_dict()
    for dv in old["devices"]:
        del dv["lent_threads"], dv["lent_layer"]
    assert Profile.from_dict(old) == prof


def test_emulated_slowdown_is_labelled_in_the_file():
    d = make_profile(slowdowns=(1.0, 3.0)).to_dict()
    assert d["emulated"] is True
    assert [dv["emulated"] for dv in d["devices"]] == [False, True]


def test_profile_with_other_device_count_is_refused():
    prof = make_profile()
    with pytest.raises(ProfileMismatchError, match=r"profile has 2 devices .* has 3"):
        check_profile(prof, MODEL, local_cluster(3), "float32")
    with pytest.raises(ProfileMismatchError, match="2 devices"):
        FittedCost(prof, MODEL, local_cluster(3), "float32")


def test_profile_for_another_model_is_refused():
    other = model_preset("llama-7b")
    with pytest.raises(ProfileMismatchError, match=r"another model: 'smollm2-135m', not 'llama-7b'"):
        FittedCost(make_profile(), other, local_cluster(2), "float32")


def test_profile_with_other_dtype_or_slowdown_is_refused():
    prof = make_profile()
    with pytest.raises(ProfileMismatchError, match="measured in float32 but the plan uses float16"):
        check_profile(prof, MODEL, local_cluster(2), "float16")
    slow = parse_cluster({"name": "slow2", "hosts": [{"name": "local", "intra_link": "loopback",
                          "devices": [{"name": "cpu0", "type": "cpu"},
                                      {"name": "cpu1", "type": "cpu", "slowdown": 3}]}]})
    with pytest.raises(ProfileMismatchError, match="'cpu1' was profiled with emulated slowdown 1"):
        check_profile(prof, MODEL, slow, "float32")


def test_cost_model_is_fitted_from_a_profile_else_analytic(tmp_path):
    from hpipe.cost.analytic import AnalyticCost

    path = tmp_path / "p.json"
    path.write_text(make_profile().to_json())
    assert isinstance(cost_model(MODEL, local_cluster(2), "float32", profile=path), FittedCost)
    assert isinstance(cost_model(MODEL, local_cluster(2), "float32", profile=make_profile()),
                      FittedCost)
    assert isinstance(cost_model(MODEL, local_cluster(2), "float32"), AnalyticCost)
    with pytest.raises(ProfileMismatchError, match="no such file"):
        cost_model(MODEL, local_cluster(2), "float32", profile=tmp_path / "nope.json")


def test_malformed_or_old_profile_is_refused():
    d = make_profile().to_dict()
    with pytest.raises(ProfileMismatchError, match="version 0"):
        Profile.from_dict({**d, "version": 0})
    broken = {**d, "devices": [dataclasses.replace(device_profile("x")).name]}
    with pytest.raises(ProfileMismatchError, match="malformed"):
        Profile.from_dict(broken)
