"""The profile file: JSON round trip, and refusal of a profile made for another model/cluster."""

from __future__ import annotations

import dataclasses

import pytest

from hpipe.cluster import local_cluster, parse_cluster
from hpipe.cost import cost_model, read_profile
from hpipe.cost.fitted import FittedCost
from hpipe.cost.profile_file import (
    DeviceProfile,
    LinkProfile,
    LinkSample,
    MemorySample,
    Profile,
    TimeSample,
    check_profile,
    model_shape,
)
from hpipe.errors import ProfileMismatchError
from hpipe.spec import model_preset

MODEL = model_preset("smollm2-135m")


def _device(name: str, slowdown: float = 1.0) -> DeviceProfile:
    grid = [(b, s, p) for b in (1, 2) for s in (16, 64, 256) for p in (0, 256, 1024)]
    return DeviceProfile(
        name=name, kind="cpu", torch_device="cpu", num_threads=1, slowdown=slowdown,
        layer=tuple(TimeSample(b, s, p, slowdown * (1e-3 + 2e-6 * b * s + 1e-9 * b * s * p))
                    for b, s, p in grid),
        embedding=tuple(TimeSample(b, s, 0, 1e-5 + 1e-8 * b * s) for b, s, _ in grid[::3]),
        head=tuple(TimeSample(b, s, 0, 1e-4 + 1e-6 * b) for b, s, _ in grid[::3]),
        call=tuple(TimeSample(b, s, p, 5e-5) for b, s, p in grid),
        memory=tuple(MemorySample(b, s, p, 4 * 576 * b * s + 36 * b * s * (p + s))
                     for b, s, p in grid),
        context_bytes=300 << 20, layer_weight_bytes=14 << 20,
        kv_bytes_per_token_per_layer=768, embedding_weight_bytes=113 << 20,
        head_weight_bytes=113 << 20, peak_memory_bytes=900 << 20,
    )


def make_profile(names=("cpu0", "cpu1"), slowdowns=(1.0, 1.0), model=MODEL) -> Profile:
    return Profile(
        model_name=model.name, model_shape=model_shape(model), dtype="float32",
        torch_version="2.13.0", date="2026-01-01T00:00:00+00:00", cluster_name="local:2",
        device_names=tuple(names),
        devices=tuple(_device(n, s) for n, s in zip(names, slowdowns)),
        links=(LinkProfile(names[0], names[1], (LinkSample(1024, 5e-5), LinkSample(1 << 20, 1e-3)),
                           latency_s=4e-5, bandwidth_bytes_s=1.1e9),),
    )


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
    broken = {**d, "devices": [dataclasses.replace(_device("x")).name]}
    with pytest.raises(ProfileMismatchError, match="malformed"):
        Profile.from_dict(broken)
