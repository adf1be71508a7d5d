"""A Session across hosts: torchrun jobs whose "hosts" are separate torchruns on this machine
(tests/job_harness.py). Rank 0 drives, the others serve; the same greedy tokens as one
process, the same workers for every request, a killed or stopped rank named within the
liveness limit, and a new job serving after a failure."""

from __future__ import annotations

import json
import os
import random
import signal
import time

import pytest
import yaml
from job_harness import Host, driver_result, run_driver, stop_all, torchrun, wait_all, workers_of

from hpipe.cluster import parse_cluster
from hpipe.model.generate import generate
from hpipe.model.source import open_model

LIVENESS_S = 3.0
CONNECT_S = 3.0  # short: an idle session must outlive it


def _cluster(path, hosts: dict[str, list[str]], slowdown: float = 1.0):
    """A cluster file with these hosts and CPU devices (``slowdown`` on every host but the
    first, so a request lasts long enough to signal a worker mid-way)."""
    spec = {"name": "job", "links": [{"between": list(hosts), "kind": "custom",
                                      "bandwidth_gbps": 1}],
            "hosts": [{"name": h, "devices": [
                {"name": d, "type": "cpu", **({"slowdown": slowdown} if k else {})}
                for d in devs]} for k, (h, devs) in enumerate(hosts.items())]}
    parse_cluster(spec)  # a bad test cluster fails here, not inside torchrun
    path.write_text(yaml.safe_dump(spec))
    return path


def _prompts(vocab: int, lengths) -> list[list[int]]:
    rng = random.Random(7)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def _config(model, cluster, prompts, sessions, **kw) -> dict:
    return {"model": str(model), "cluster": str(cluster), "prompts": prompts,
            "max_new_tokens": kw.pop("max_new_tokens", 6), "sessions": sessions,
            "liveness_s": LIVENESS_S, "connect_timeout_s": CONNECT_S, **kw}


def test_a_job_across_hosts_serves_many_requests_like_one_process(tiny_checkpoints, tmp_path):
    """Two hosts, the driver on the second one (ranks are found by host, not by order): two
    sessions (a pipeline, then a pipeline into a tensor-parallel pair), three requests each
    submitted at once from threads, one session idle past the connect timeout."""
    model = tiny_checkpoints["llama"]
    spec = open_model(model).spec
    cluster = _cluster(tmp_path / "c.yaml", {"h0": ["cpu0"], "h1": ["cpu1", "cpu2"]})
    prompts = _prompts(spec.vocab_size, (5, 17, 40))
    sessions = [{"layers": [1, 3], "slices": [12, 8], "idle_s": CONNECT_S + 1.5},
                {"layers": [2, 2], "groups": [1, 2], "slices": [10, 10]}]
    # node rank 0 (so rank 0, the driver) runs on h1, which holds cpu1 and cpu2
    hosts = run_driver([Host("h1", 2), Host("h0", 1)],
                       _config(model, cluster, prompts, sessions), tmp_path)
    try:
        assert wait_all(hosts) == [0, 0], [h.text()[1][-2000:] for h in hosts]
    finally:
        stop_all(hosts)
    out = driver_result(hosts)
    assert "error" not in out, out
    ref_model = open_model(model).load_model()
    want = [list(generate(ref_model, [p], max_new_tokens=6, eos_token_ids=()).output_ids[0])
            for p in prompts]
    first, second = out["sessions"]
    assert first["device_ranks"]["cpu0"] == 2  # h0 joined as node 1: its device is rank 2
    for s in (first, second):
        assert s["outputs"] == want
        assert s["pids"] == s["pids_after"] and len(set(s["pids"])) == 3
        # every rank that holds a stage loaded it once, for all three requests
        assert all(set(loads) == {1} for loads in s["loads"]), s["loads"]
    assert first["pids"] == second["pids"]  # one job: the same processes host both sessions


def test_hpipe_run_under_torchrun_matches_one_process(tiny_checkpoints, tmp_path):
    """The CLI: `hpipe run --compare base --json` on two hosts gives one process's tokens, for
    HPipe's plan and for Base's (two sessions on one job); every rank exits 0 and only rank 0
    prints."""
    model = tiny_checkpoints["llama"]
    cluster = _cluster(tmp_path / "c.yaml", {"h0": ["cpu0"], "h1": ["cpu1"]})
    args = ["run", "--model", str(model), "--cluster", str(cluster), "--prompt-ids",
            ",".join(map(str, range(3, 40))), "--max-new-tokens", "5", "--layers", "1,3",
            "--slices", "20,17", "--compare", "base", "--json", "--no-calibration"]
    hosts = torchrun([Host("h0", 1), Host("h1", 1)], ["-m", "hpipe.cli", *args], tmp_path)
    try:
        assert wait_all(hosts) == [0, 0], [h.text()[1][-2000:] for h in hosts]
    finally:
        stop_all(hosts)
    assert hosts[1].out.read_text() == ""
    report = json.loads(hosts[0].out.read_text())
    want = generate(open_model(model).load_model(), [list(range(3, 40))], max_new_tokens=5,
                    eos_token_ids=())
    assert report["output"]["ids"] == [list(want.output_ids[0])]
    assert report["method"] == "manual" and report["cluster"] == "job"
    assert [s["device"] for s in report["stages"]] == ["cpu0", "cpu1"]
    assert report["compare"]["method"] == "base" and report["compare"]["same_output"]


def test_a_host_missing_from_the_cluster_or_with_another_model_is_refused(tiny_checkpoints,
                                                                           tmp_path):
    """Setup errors end every rank with the reason: a process whose HPIPE_HOST the cluster
    does not name (exit 2 on rank 0, which says which host to set), and a host whose --model
    is another model (rank 0 names that host and both shapes)."""
    model, other = tiny_checkpoints["llama"], tiny_checkpoints["llama_untied"]
    cluster = _cluster(tmp_path / "c.yaml", {"h0": ["cpu0"], "h1": ["cpu1"]})

    for case, hosts, models in [("host", [Host("h0", 1), Host("h7", 1)], [model, model]),
                                ("model", [Host("h0", 1), Host("h1", 1)], [model, other])]:
        tmp = tmp_path / case
        tmp.mkdir()
        argvs = [["-m", "hpipe.cli", "run", "--model", str(m), "--cluster", str(cluster),
                  "--prompt-ids", "3,4,5,6,7,8,9,10", "--max-new-tokens", "2", "--layers",
                  "2,2", "--no-calibration"] for m in models]
        torchrun(hosts, argvs, tmp)
        try:
            codes = wait_all(hosts, timeout_s=90)
        finally:
            stop_all(hosts)
        rank0_err, other_err = hosts[0].text()[1], hosts[1].text()[1]
        # torchrun exits 1 whatever its worker's code; the worker said a user error (exit 2).
        assert codes == [1, 1], (codes, rank0_err[-2000:])
        assert "hpipe run: error: " in rank0_err and "exitcode  : 2" in rank0_err
        if case == "host":
            assert "cluster host 'h1' device 'cpu1'" in rank0_err
            assert "set HPIPE_HOST=h1" in rank0_err
            assert "rank 0 ended the job: ClusterError" in other_err
        else:
            assert f"--model {other} on host 'h1'" in rank0_err
            assert "rank 0 planned for" in rank0_err


def _signal_case(tmp_path, model, shape: str):
    """A slow job (pipeline, or pipeline into a TP pair on host h1) and the device to signal."""
    if shape == "pipeline":
        cluster = _cluster(tmp_path / "c.yaml", {"h0": ["cpu0"], "h1": ["cpu1"]}, slowdown=300)
        return cluster, [Host("h0", 1), Host("h1", 1)], {"layers": [2, 2], "slices": [4] * 4}, "cpu1"
    cluster = _cluster(tmp_path / "c.yaml", {"h0": ["cpu0"], "h1": ["cpu1", "cpu2"]},
                       slowdown=300)
    return (cluster, [Host("h0", 1), Host("h1", 2)],
            {"layers": [2, 2], "groups": [1, 2], "slices": [4] * 4}, "cpu2")


# A stopped rank is found the same way in a pipeline and in a pair (its heartbeat); a killed one
# differs (its peers report broken links, and in a pair torchrun's agent ends its partner).
@pytest.mark.parametrize("shape, sig", [("pipeline", signal.SIGKILL), ("tp-pair", signal.SIGKILL),
                                        ("tp-pair", signal.SIGSTOP)],
                         ids=["pipeline-kill", "tp-pair-kill", "tp-pair-stop"])
def test_a_dead_or_stopped_rank_on_another_host_is_named(tiny_checkpoints, tmp_path, shape, sig):
    """The rank holding `device` is signalled mid-decode: rank 0 ends the request within the
    liveness limit with an error naming that rank and its host (not the rank left waiting for
    it), and every other process of the job exits by itself, so nothing is left to stand in a
    new job's way."""
    model = tiny_checkpoints["llama"]
    cluster, hosts, session, device = _signal_case(tmp_path, model, shape)
    spec = open_model(model).spec
    signal_file = tmp_path / "signal.json"
    cfg = _config(model, cluster, _prompts(spec.vocab_size, (16,)), [session],
                  max_new_tokens=100, signal_file=str(signal_file))
    hosts = run_driver(hosts, cfg, tmp_path)
    try:
        deadline = time.monotonic() + 90
        while not signal_file.exists() and time.monotonic() < deadline:
            assert all(h.proc.poll() is None for h in hosts), [h.text() for h in hosts]
            time.sleep(0.1)
        info = json.loads(signal_file.read_text())
        rank = info["device_ranks"][device]
        pid = info["pids"][rank]
        os.kill(pid, sig)
        signalled_at = time.monotonic()
        driver = hosts[0]
        assert driver.proc.wait(timeout=LIVENESS_S + 30) == 1
        out = driver_result(hosts)
        waited_s = out["error"]["at"] - signalled_at
        message = out["error"]["message"]
        assert out["error"]["rank"] == rank, message
        assert f"rank {rank} " in message and f"device '{device}' on host 'h1'" in message
        assert f"pid {pid}" in message
        if sig == signal.SIGKILL:
            assert "its process has exited" in message and waited_s < 10, (waited_s, message)
        else:
            assert "stopped (SIGSTOP" in message, message
            assert LIVENESS_S <= waited_s < LIVENESS_S + 10, waited_s
        assert "where each stage was" in message
        # Every process of the job but the stopped one exits by itself.
        others = [p for h in hosts for p in workers_of(h) if p != pid]
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(_alive(p) for p in others):
            time.sleep(0.1)
        assert not any(_alive(p) for p in others), [h.text()[1][-1500:] for h in hosts]
    finally:
        stop_all(hosts)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_hpipe_serve_across_hosts_answers_like_one_process(smollm2, smollm2_model, tmp_path):
    """`hpipe serve` under torchrun on two hosts: rank 0 serves HTTP, the official client gets
    the single process's answer, /metrics has both devices' busy time, and a SIGTERM to the
    server ends every process of the job with exit 0."""
    import httpx
    import openai

    from hpipe.runtime.launch import free_port

    cluster = _cluster(tmp_path / "c.yaml", {"h0": ["cpu0"], "h1": ["cpu1"]})
    port = free_port()
    args = ["serve", "--model", "smollm2", "--cluster", str(cluster), "--no-tp", "--seq-len",
            "512", "--port", str(port), "--liveness", "5"]
    hosts = torchrun([Host("h0", 1), Host("h1", 1)], ["-m", "hpipe.cli", *args], tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert all(h.proc.poll() is None for h in hosts), [h.text()[1][-2000:] for h in hosts]
            assert time.monotonic() < deadline, "the server did not get ready"
            try:
                health = httpx.get(f"{url}/health", timeout=5)
                if health.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        assert len(health.json()["workers"]) == 2
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
        resp = client.chat.completions.create(model="smollm2", messages=messages,
                                              max_tokens=16, temperature=0)
        tok = smollm2.tokenizer
        ids = tok.encode(tok.chat_messages(messages))
        want = tok.decode(generate(smollm2_model, [ids], max_new_tokens=16,
                                   eos_token_ids=tok.eos_token_ids).output_ids[0])
        assert resp.choices[0].message.content == want
        client.completions.create(model="smollm2", prompt="Once upon a time", max_tokens=48,
                                  temperature=0)  # long enough for the ranks to report busy time
        # Each rank reports its compute seconds about once a second, rank 1 through the store.
        deadline = time.monotonic() + 10
        while True:
            metrics = httpx.get(f"{url}/metrics", timeout=5).text
            busy = {line.split('device="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
                    for line in metrics.splitlines()
                    if line.startswith("hpipe:stage_busy_seconds_total{")}
            if (set(busy) == {"cpu0", "cpu1"} and min(busy.values()) > 0
                    or time.monotonic() > deadline):
                break
            time.sleep(0.5)
        assert set(busy) == {"cpu0", "cpu1"} and min(busy.values()) > 0, metrics
        rank0 = workers_of(hosts[0])
        assert len(rank0) == 1
        os.kill(rank0[0], signal.SIGTERM)
        assert wait_all(hosts, timeout_s=60) == [0, 0], [h.text()[1][-2000:] for h in hosts]
    finally:
        stop_all(hosts)


def test_a_rank_that_cannot_reach_the_job_says_so_on_its_own_host(tiny_checkpoints, tmp_path):
    """A process of a job whose rank 0 never comes (nothing listens at MASTER_ADDR:PORT): it
    gives up after --connect-timeout with one line naming the address, and exit 1."""
    import subprocess
    import sys

    from hpipe.runtime.launch import free_port

    port = free_port()
    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "HPIPE_HOST": "h1"}
    env.pop("TORCHELASTIC_USE_AGENT_STORE", None)
    p = subprocess.run([sys.executable, "-m", "hpipe.cli", "run", "--model",
                        str(tiny_checkpoints["llama"]), "--cluster", "local:2", "--prompt-ids",
                        "3,4,5", "--connect-timeout", "2"], env=env, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 1, p.stderr
    # torch's own C++ log of the failed connect comes first; ours is the last line
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("hpipe run: failed: rank 1 could not meet the other 1 ranks through "
                           f"the store at 127.0.0.1:{port} within 2 s"), last


def test_hpipe_analyze_across_hosts_answers_like_one_process(smollm2, smollm2_model, tmp_path):
    """`hpipe analyze` under torchrun: rank 0 reads the folder and writes the answers file, the
    stages run on both hosts, and each answer is one process's greedy answer."""
    from hpipe.model.prompts import document_question

    docs = tmp_path / "docs"
    docs.mkdir()
    texts = {"a.txt": "Ada Lovelace wrote the first program for Babbage's engine in London.",
             "b.txt": "The Eiffel Tower was finished in 1889 for the world's fair in Paris."}
    for name, body in texts.items():
        (docs / name).write_text(body)
    question = "Which city is named?"
    out = tmp_path / "answers.jsonl"
    cluster = _cluster(tmp_path / "c.yaml", {"h0": ["cpu0"], "h1": ["cpu1"]})
    args = ["analyze", str(docs), "--question", question, "--out", str(out), "--model",
            "smollm2", "--cluster", str(cluster), "--no-tp", "--seq-len", "512",
            "--max-new-tokens", "8", "--json", "--no-progress"]
    hosts = torchrun([Host("h0", 1), Host("h1", 1)], ["-m", "hpipe.cli", *args], tmp_path)
    try:
        assert wait_all(hosts) == [0, 0], [h.text()[1][-2000:] for h in hosts]
    finally:
        stop_all(hosts)
    assert json.loads(hosts[0].out.read_text())["answered"] == 2
    rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    tok = smollm2.tokenizer
    for name, body in texts.items():
        ids = tok.encode(tok.chat_messages([{"role": "user",
                                             "content": document_question(body, question)}]))
        want = tok.decode(generate(smollm2_model, [ids], max_new_tokens=8,
                                   eos_token_ids=tok.eos_token_ids).output_ids[0]).strip()
        assert rows[name]["status"] == "ok" and rows[name]["answer"] == want, rows[name]
