"""The device profiler on a real (tiny, random) stage in-process, and ``hpipe profile`` end to end."""

from __future__ import annotations

import statistics

import pytest
import yaml

from hpipe.cluster import parse_cluster
from hpipe.cost import read_profile
from hpipe.cost.fitted import FittedCost
from hpipe.model.source import open_model
from hpipe.profile.measure import Grid, default_grid, profile_device
from hpipe.profile.random_model import write_random_checkpoint
from hpipe.spec import ModelSpec

TINY = ModelSpec(name="tiny-llama", family="llama", num_layers=4, hidden=64, num_heads=4,
                 num_kv_heads=2, intermediate=112, vocab_size=96, max_seq_len=256)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_random_checkpoint(TINY, tmp_path_factory.mktemp("tiny") / "tiny-llama")


def _cluster(slowdowns):
    return parse_cluster({"name": "t", "hosts": [{"name": "local", "intra_link": "loopback",
                          "devices": [{"name": f"cpu{i}", "type": "cpu", "slowdown": s}
                                      for i, s in enumerate(slowdowns)]}]})


def test_profile_device_measures_every_grid_point_and_counts_real_tensors(tiny_path):
    grid = Grid(batches=(1, 2), tokens=(8, 32), prefixes=(0, 64), max_tokens=128, repeats=2,
                warmup=1)
    prof = profile_device(open_model(tiny_path), _cluster([1.0]).devices[0], dtype="float32",
                          grid=grid)
    assert [(s.rows, s.tokens, s.prefix) for s in prof.layer] == list(grid.points())
    assert all(s.time_s > 0 for s in prof.layer + prof.head + prof.embedding)
    # Counted from the real tensors: K and V of kv_dim floats per token per layer.
    assert prof.kv_bytes_per_token_per_layer == 2 * TINY.kv_dim * 4
    assert prof.layer_weight_bytes == TINY.params_per_layer() * 4
    assert prof.head_weight_bytes == TINY.head_params() * 4
    assert prof.peak_memory_bytes > prof.context_bytes > 0


def test_emulated_slowdown_is_in_the_measured_times(tiny_path):
    # The profiler stretches each call to k x its CPU time like the worker, so a k = 4 device
    # measures about 4x slower (sleep overshoot only adds to it). Without the emulation the
    # ratio is about 1, hence the lower bound. The upper one is wide: the two profiles run one
    # after the other on a CPU that other work shares; a full-suite run measured 9.4x once.
    grid = Grid(batches=(1,), tokens=(32, 64), prefixes=(0, 64), max_tokens=128, repeats=3,
                warmup=1)
    source = open_model(tiny_path)
    fast, slow = (profile_device(source, d, dtype="float32", grid=grid)
                  for d in _cluster([1.0, 4.0]).devices)
    ratios = [s.time_s / f.time_s for s, f in zip(slow.layer, fast.layer)]
    assert 2.0 < statistics.median(ratios) < 12.0, ratios
    assert slow.slowdown == 4.0 and fast.slowdown == 1.0


def test_hpipe_profile_command_end_to_end(tiny_path, tmp_path, capsys):
    from hpipe.cli import main

    cluster_file = tmp_path / "slow2.yaml"
    cluster_file.write_text(yaml.safe_dump(_cluster([1.0, 2.0]).to_dict()))
    out = tmp_path / "profile.json"
    code = main(["profile", "--model", str(tiny_path), "--cluster", str(cluster_file),
                 "--out", str(out), "--quick", "--max-tokens", "128", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "EMULATED" in printed and "wrote" in printed
    prof = read_profile(out)
    assert prof.device_names == ("cpu0", "cpu1") and prof.emulated
    assert len(prof.links) == 1 and prof.links[0].bandwidth_bytes_s > 0
    grid = default_grid(128, quick=True, max_batch=2)
    decode = [pt for pt in grid.points() if pt[1] == 1]
    assert len(prof.devices[0].layer) == len(grid.points()) - len(decode)
    # The decode grid: one-token steps at a short and the longest context, fitted apart.
    assert {(s.rows, s.prefix) for s in prof.devices[0].decode_layer} == {(1, 16), (8, 16),
                                                                          (1, 127), (8, 127)}
    # The file plugs into the planner's cost interface for the same model and cluster.
    cost = FittedCost(prof, open_model(tiny_path).spec, _cluster([1.0, 2.0]), "float32")
    t = cost.stage_time_s((1,), 0, 2, batch=1, tokens=64, prefix=32, has_embedding=False,
                          has_head=True)
    assert t > 0
    # cpu0 may borrow cpu1's thread, so it was timed alone on both; emulated cpu1 may not.
    assert prof.devices[0].lent_threads == 2 and prof.devices[0].lent_layer
    assert prof.devices[1].lent_threads == 0 and not prof.devices[1].lent_layer
    assert "alone on 2 threads" in printed and cost.lent_speedup(0, tokens=64, threads=2) > 0
    step = cost.decode_time_s((1,), 0, 2, batch=8, context=100, has_embedding=False,
                              has_head=True)
    assert cost.fits[1].decode_layer is not None and 0 < step < t
    # The calibration run: the even split, equal slices of the profile's longest prompt, run
    # for real on the same workers; each device measured, a sane ratio to the grid fit.
    cal = prof.calibration
    assert cal is not None and "calibration:" in printed and "in a pipeline x" in printed
    assert cal.layer_counts == (2, 2) and sum(cal.slices) == 128  # the tiny model: 4 layers
    assert all(m > 0 for m in cal.measured_compute_s) and cal.measured_latency_s > 0
    assert all(0.2 < k < 5 for k in cal.compute_scale), cal
    assert cost.compute_scale == cal.compute_scale
    # --json: the same run as data for scripts; --no-calibrate skips the run.
    import json

    assert main(["profile", "--model", str(tiny_path), "--cluster", str(cluster_file),
                 "--out", str(out), "--quick", "--seq-len", "128", "--json",
                 "--no-calibrate"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [d["name"] for d in summary["devices"]] == ["cpu0", "cpu1"] and summary["emulated"]
    assert summary["links"][0]["bandwidth_gbps"] > 0
    assert [d["lent_threads"] for d in summary["devices"]] == [2, 0]
    assert list(summary["devices"][0]["lent_speedup_by_tokens"]) == ["64"]
    assert summary["calibration"] is None and read_profile(out).calibration is None


def test_profiler_worker_error_arrives_typed(tmp_path):
    # The profiler's workers run under the runtime's supervisor, which re-raises a worker's
    # typed error as that type (not WorkerFailedError), naming the rank and its device.
    from hpipe.errors import WeightsNotFoundError
    from hpipe.profile.launch import make_job, profile_local

    grid = Grid(batches=(1,), tokens=(8,), prefixes=(0,), max_tokens=16, repeats=1, warmup=0)
    job = make_job(str(tmp_path / "missing"), _cluster([1.0]), "float32", grid, quick=True)
    with pytest.raises(WeightsNotFoundError,
                       match=r"profiler rank 0 \(device 'cpu0'\): no model at .*missing"):
        profile_local(job)
