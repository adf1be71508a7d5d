"""The quick calibration `hpipe run` and `hpipe demo` plan from on local CPU workers
(hpipe/profile/quick.py): measured once, cached, read back, turned off, and never fatal."""

import json
import os
import subprocess
import sys

import pytest

from hpipe.cluster import load_cluster, local_cluster
from hpipe.cost.profile_file import read_profile
from hpipe.profile import quick

IDS = "5,17,33,8,9,60,2,4,11,70"


def test_grid_tokens_round_up_to_a_power_of_two_within_the_context():
    assert quick.grid_tokens(37, 8192) == 1024
    assert quick.grid_tokens(3605, 8192) == 4096
    assert quick.grid_tokens(5000, 8192) == 8192
    assert quick.grid_tokens(9000, 8192) == 8192
    assert quick.grid_tokens(100, 128) == 128  # a tiny model's context caps the grid


@pytest.mark.parametrize("value,wanted", [("", True), ("on", True), ("off", False),
                                          ("0", False), ("No", False), ("false", False)])
def test_calibration_wanted_reads_the_environment(monkeypatch, value, wanted):
    monkeypatch.setenv("HPIPE_CALIBRATION", value)
    assert quick.calibration_wanted(False) is wanted
    assert quick.calibration_wanted(True) is False  # --no-calibration always wins


def test_only_local_cpu_clusters_are_calibrated(tmp_path):
    assert quick.can_calibrate(local_cluster(2))
    two_hosts = tmp_path / "c.yaml"
    two_hosts.write_text(
        "name: two\nhosts:\n"
        "  - {name: a, devices: [{name: d0, type: cpu}]}\n"
        "  - {name: b, devices: [{name: d1, type: cpu}]}\n"
        "links:\n  - {between: [a, b], kind: 1gbe}\n")
    assert not quick.can_calibrate(load_cluster(str(two_hosts)))


def test_cache_key_follows_what_the_speed_depends_on(tiny_checkpoints):
    model = str(tiny_checkpoints["llama"])
    key = quick.cache_key(model, local_cluster(2), "float32", 128)
    assert key == quick.cache_key(model, local_cluster(2), "float32", 128)
    others = {quick.cache_key(model, local_cluster(3), "float32", 128),
              quick.cache_key(model, local_cluster(2, num_threads=2), "float32", 128),
              quick.cache_key(model, local_cluster(2), "bfloat16", 128),
              quick.cache_key(model, local_cluster(2), "float32", 64),
              quick.cache_key(str(tiny_checkpoints["qwen2"]), local_cluster(2), "float32", 128)}
    assert key not in others and len(others) == 5


def _run(model: str, cache, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HPIPE_CALIBRATION"}
    env["HPIPE_CACHE_DIR"] = str(cache)
    return subprocess.run(
        [sys.executable, "-m", "hpipe.cli", "run", "--model", model, "--cluster", "local:2",
         "--prompt-ids", IDS, "--max-new-tokens", "2", "--json", *extra],
        capture_output=True, text=True, env=env, timeout=300)


def test_run_calibrates_once_then_reads_the_cache(tiny_checkpoints, tmp_path):
    model = str(tiny_checkpoints["llama"])
    first = _run(model, tmp_path)
    assert first.returncode == 0, first.stderr
    assert "calibrating this machine's 2 CPU worker(s)" in first.stderr
    assert "planned from a quick calibration of this machine (measured in" in first.stderr
    report = json.loads(first.stdout)
    assert report["cost_model"] == "quick calibration"
    files = list((tmp_path / "calibration").glob("*.json"))
    assert len(files) == 1
    profile = read_profile(files[0])
    assert profile.quick and profile.cluster_name == "local:2"
    assert [d.name for d in profile.devices] == ["cpu0", "cpu1"] and profile.links
    # Each worker was also timed alone on both workers' threads, as a lent compute runs.
    for d in profile.devices:
        assert d.lent_threads == 2 and d.lent_layer
        assert all(t.tokens >= 64 and t.prefix == 0 and t.time_s > 0 for t in d.lent_layer)
    # The prediction is priced by the calibration's fit: close to what ran, on a tiny model too.
    assert report["predicted_prefill_latency_s"] > 0

    second = _run(model, tmp_path)
    assert second.returncode == 0, second.stderr
    assert "calibrating" not in second.stderr
    assert f"cached from {profile.date}" in second.stderr
    assert json.loads(second.stdout)["cost_model"] == "quick calibration"

    off = _run(model, tmp_path, "--no-calibration")
    assert off.returncode == 0, off.stderr
    assert "calibration" not in off.stderr
    assert json.loads(off.stdout)["cost_model"] == "analytic"

    before = files[0].stat().st_mtime_ns
    again = _run(model, tmp_path, "--recalibrate")
    assert again.returncode == 0, again.stderr
    assert "calibrating this machine's 2 CPU worker(s)" in again.stderr
    assert list((tmp_path / "calibration").glob("*.json")) == files  # the same entry, replaced
    assert files[0].stat().st_mtime_ns != before


def test_recalibrate_and_no_calibration_together_are_refused(tmp_path):
    r = _run("smollm2", tmp_path, "--recalibrate", "--no-calibration")
    assert r.returncode == 2
    assert "--no-calibration: not allowed with argument --recalibrate" in r.stderr, r.stderr
    assert not (tmp_path / "calibration").exists()


@pytest.mark.parametrize("flag,env,wanted", [(False, "", False), (True, "", True),
                                             (False, "refresh", True), (False, "on", False)])
def test_refresh_is_asked_by_flag_or_environment(monkeypatch, flag, env, wanted):
    monkeypatch.setenv("HPIPE_CALIBRATION", env)
    assert quick.refresh_wanted(flag) is wanted
    assert quick.calibration_wanted(False)  # refresh still calibrates


def test_a_run_far_from_a_cached_prediction_names_recalibrate():
    """[Note: a stale calibration]: only a cached entry that missed by more than STALE_RATIO."""
    from types import SimpleNamespace

    profile = SimpleNamespace(date="2026-12-01T10:00:00")  # all the hint reads of a profile
    cached = quick.QuickCalibration(profile, None, measured_s=None)
    fresh = quick.QuickCalibration(profile, None, measured_s=8.0)
    hint = quick.stale_hint(cached, 7.6, 10.0 * 1.3)
    assert hint is not None
    assert "ran 1.71x faster than the quick calibration cached on 2026-12-01T10:00:00" in hint
    assert "--recalibrate" in hint
    assert "1.40x slower" in quick.stale_hint(cached, 14.0, 10.0)
    assert quick.stale_hint(cached, 11.0, 10.0) is None and quick.stale_hint(cached, 8.5, 10.0) is None
    assert quick.stale_hint(fresh, 5.0, 10.0) is None  # just measured: recalibrating won't help


def test_a_damaged_cache_entry_is_measured_again(tiny_checkpoints, tmp_path, monkeypatch):
    monkeypatch.setenv("HPIPE_CACHE_DIR", str(tmp_path))
    model = str(tiny_checkpoints["llama"])
    cluster = local_cluster(1)
    key = quick.cache_key(model, cluster, "float32", 128)
    path = tmp_path / "calibration" / f"{key}.json"
    path.parent.mkdir(parents=True)
    path.write_text('{"format": "hpipe-profile", "devices": [')  # cut by a crash
    notices = []
    got = quick.quick_calibration(model, cluster, "float32", prompt_tokens=10, max_seq_len=128,
                                  on_notice=notices.append)
    assert got.measured_s is not None and notices and got.path == path
    assert read_profile(path).devices[0].name == "cpu0"  # the entry was rewritten whole


def test_a_failed_calibration_falls_back_to_the_catalog(monkeypatch, capsys):
    from argparse import Namespace

    from hpipe.commands import run as run_cmd
    from hpipe.errors import WorkerFailedError
    from hpipe.model.source import open_model

    def fail(*args, **kwargs):
        raise WorkerFailedError("profiler rank 1 (device 'cpu1') exited with code -9")

    monkeypatch.setenv("HPIPE_CALIBRATION", "on")
    monkeypatch.setattr(quick, "quick_calibration", fail)
    spec = open_model("smollm2").spec
    args = Namespace(no_calibration=False, model="smollm2")
    assert run_cmd.calibrate(args, spec, local_cluster(2), "float32", prompt_tokens=40) is None
    err = capsys.readouterr().err
    assert "the quick calibration failed (profiler rank 1" in err
    assert "planning from catalog figures" in err


def test_alike_workers_plan_from_one_grid():
    """[Note: alike workers, one speed]: two identical workers whose grids differ by noise get
    the median grid, so the planner prices the same layers the same on either; a worker with
    another slowdown keeps its own grid."""
    import dataclasses

    from profile_harness import MODEL, make_profile

    from hpipe.cost.fitted import FittedCost

    raw = make_profile()
    noisy = dataclasses.replace(raw.devices[1], layer=tuple(
        dataclasses.replace(t, time_s=t.time_s * 0.85) for t in raw.devices[1].layer))
    raw = dataclasses.replace(raw, devices=(raw.devices[0], noisy))
    cluster = local_cluster(2)

    def stage_s(profile, device: int) -> float:
        cost = FittedCost(profile, MODEL, cluster, "float32")
        return cost.stage_time_s((device,), 0, 15, batch=1, tokens=256, prefix=512,
                                 has_embedding=False, has_head=False)

    assert stage_s(raw, 1) < 0.9 * stage_s(raw, 0)  # as measured, cpu1 looks faster
    pooled = quick.pool_alike(raw)
    assert stage_s(pooled, 1) == pytest.approx(stage_s(pooled, 0), rel=1e-9)
    for a, b, c in zip(pooled.devices[0].layer, pooled.devices[1].layer, raw.devices[0].layer):
        assert a == b and a.time_s == pytest.approx(c.time_s * (1 + 0.85) / 2)
    assert pooled.devices[0].memory == raw.devices[0].memory  # only times are pooled
    slower = make_profile(slowdowns=(1.0, 2.0))
    assert quick.pool_alike(slower) == slower
