"""Emulated hosts: a tbf-shaped veth link measures at its rate, and everything is cleaned up."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hpipe.netns import _list_ours, netns_network, netns_unavailable_reason
from hpipe.runtime.launch import free_port


def require_netns() -> None:
    reason = netns_unavailable_reason()
    if reason:
        pytest.skip(reason)


pytestmark = pytest.mark.netns


def _pingpong(net, sizes=(4096, 1 << 20, 4 << 20)) -> dict:
    port = str(free_port())
    addr = net.hosts[0].address
    argv = [sys.executable, "-m", "hpipe.profile.links", "--master-addr", addr,
            "--master-port", port, "--world-size", "2", "--repeats", "3",
            "--sizes", *map(str, sizes)]
    p0 = net.popen(0, [*argv, "--rank", "0"], stdout=subprocess.PIPE, text=True)
    p1 = net.popen(1, [*argv, "--rank", "1"], stdout=subprocess.DEVNULL)
    out, _ = p0.communicate(timeout=60)
    assert p1.wait(timeout=30) == 0 and p0.returncode == 0, out
    return json.loads(out.strip().splitlines()[-1])


def test_shaped_link_measures_at_its_rate(netns2):
    fit = _pingpong(netns2)
    rate_bytes_s = 200e6 / 8
    # tbf shapes to the rate; TCP over it gets 85-100% of it. Far below an unshaped veth
    # (several GB/s), so this shows the shaping is in force.
    assert 0.75 * rate_bytes_s < fit["bandwidth_bytes_s"] < 1.1 * rate_bytes_s, fit
    assert 0 < fit["latency_s"] < 5e-3, fit


def test_namespaces_are_removed_even_on_error():
    require_netns()
    before = set(_list_ours())
    with pytest.raises(RuntimeError, match="boom"):
        with netns_network(2, rates_mbit=100) as net:
            assert len(set(_list_ours()) - before) == 3  # two hosts and the switch
            proc = net.popen(0, ["sleep", "60"])
            raise RuntimeError("boom")
    assert set(_list_ours()) == before
    assert proc.poll() is not None  # the process it started was stopped too


def test_addresses_stay_inside_the_namespaces(netns2):
    # The machine's own namespace gets no address of the emulated subnet.
    own = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
    assert netns2.hosts[0].address not in own
    inside = subprocess.run(netns2.exec_argv(0, ["ip", "-o", "addr"]), capture_output=True,
                            text=True).stdout
    assert netns2.hosts[0].address in inside


def test_two_host_pipeline_over_shaped_link_matches_one_process(tmp_path):
    """Two emulated hosts, 100 Mbit/s between them, torchrun in each: same tokens and logits
    as the single-process reference (the runtime's own equivalence contract)."""
    require_netns()
    from runtime_harness import Case, assert_equivalent, reference, request_for

    from hpipe.cluster import parse_cluster
    from hpipe.model.source import open_model
    from hpipe.netns import launch_netns
    from hpipe.profile.random_model import write_random_checkpoint
    from hpipe.spec import ModelSpec

    # A tiny random LLaMA written without transformers (fast); std 0.2 spreads the logits so
    # greedy argmax is decided by clear margins, as in conftest's checkpoints.
    spec = ModelSpec(name="tiny", family="llama", num_layers=4, hidden=64, num_heads=4,
                     num_kv_heads=2, intermediate=112, vocab_size=96, max_seq_len=128)
    path = write_random_checkpoint(spec, tmp_path / "tiny", std=0.2)
    source = open_model(path)
    cluster = parse_cluster({
        "name": "two-hosts", "links": [{"between": ["h0", "h1"], "kind": "custom",
                                        "bandwidth_gbps": 0.1}],
        "hosts": [{"name": "h0", "devices": [{"name": "cpu0", "type": "cpu"}]},
                  {"name": "h1", "devices": [{"name": "cpu1", "type": "cpu"}]}]})
    cases = [Case("netns-sliced", "llama", layers=(1, 3), slices=(24, 16, 8), max_new_tokens=5),
             Case("netns-batch", "llama", layers=(3, 1), slices=(30, 18), batch=2)]
    reqs = [request_for(c, path, source.spec, 2, cluster=cluster) for c in cases]
    results = launch_netns(reqs, rates_mbit=100)
    assert [r.label for r in results] == [c.name for c in cases]
    model = source.load_model()
    for case, result in zip(cases, results):
        assert_equivalent(result, reference(case, model, source.spec))


def test_hpipe_run_across_namespaced_hosts_uses_a_session_job(tmp_path, capfd):
    """`hpipe run` under torchrun in two namespaces (its job's store and groups over the shaped
    veths): one process's tokens, for HPipe's plan and Base's."""
    require_netns()
    from runtime_harness import Case, prompt_for, reference

    from hpipe.cluster import parse_cluster
    from hpipe.model.source import open_model
    from hpipe.netns import run_torchrun_netns
    from hpipe.profile.random_model import write_random_checkpoint
    from hpipe.spec import ModelSpec

    spec = ModelSpec(name="tiny", family="llama", num_layers=4, hidden=64, num_heads=4,
                     num_kv_heads=2, intermediate=112, vocab_size=96, max_seq_len=128)
    path = write_random_checkpoint(spec, tmp_path / "tiny", std=0.2)
    cluster_file = tmp_path / "two.json"
    cluster_file.write_text(json.dumps({
        "name": "two-hosts", "links": [{"between": ["h0", "h1"], "kind": "custom",
                                        "bandwidth_gbps": 0.1}],
        "hosts": [{"name": "h0", "devices": [{"name": "cpu0", "type": "cpu"}]},
                  {"name": "h1", "devices": [{"name": "cpu1", "type": "cpu"}]}]}))
    case = Case("netns-session", "llama", layers=(1, 3), slices=(24, 16), max_new_tokens=5)
    ids = prompt_for(case, spec)[0]
    run_torchrun_netns(parse_cluster(json.loads(cluster_file.read_text())),
                       ["-m", "hpipe.cli", "run", "--model", str(path), "--cluster",
                        str(cluster_file), "--prompt-ids", ",".join(map(str, ids)),
                        "--max-new-tokens", "5", "--layers", "1,3", "--slices", "24,16",
                        "--compare", "base", "--no-calibration", "--json"],
                       rates_mbit=100, quiet=False)
    report = json.loads(capfd.readouterr().out)
    want = reference(case, open_model(path).load_model(), spec)
    assert report["output"]["ids"] == [list(want.output_ids[0])]
    assert report["compare"]["same_output"]
