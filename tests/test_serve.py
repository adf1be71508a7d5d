"""``hpipe serve`` through the official ``openai`` client (and raw HTTP where the client hides
the wire): SmolLM2 on local:2, greedy answers equal to the single-process reference, streams,
stop strings, limits, errors, cancel on disconnect, a killed worker and the recovery, metrics.

Every server is a real ``hpipe serve`` subprocess on 127.0.0.1 and a free port, ended (SIGTERM,
exit 0, no worker left) by its fixture.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time

import httpx
import openai
import pytest
from runtime_harness import write_slow_cluster
from serve_harness import KEY, Server

from hpipe.model.generate import generate


@pytest.fixture(scope="module")
def server(smollm2_gguf):
    s = Server(["--model", "smollm2", "--cluster", "local:2", "--no-tp", "--seq-len", "512",
                "--liveness", "3"], api_key=KEY)
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


def _reference(smollm2, smollm2_model, messages, max_tokens: int) -> str:
    tok = smollm2.tokenizer
    ids = tok.encode(tok.chat_messages(messages))
    out = generate(smollm2_model, [ids], max_new_tokens=max_tokens,
                   eos_token_ids=tok.eos_token_ids)
    return tok.decode(out.output_ids[0])


QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Write a long story about a dragon who learns to bake."}]


def test_chat_equals_the_single_process_answer(server, smollm2, smollm2_model):
    resp = server.client().chat.completions.create(model="smollm2", messages=QUESTION,
                                                   max_tokens=24, temperature=0)
    want = _reference(smollm2, smollm2_model, QUESTION, 24)
    choice = resp.choices[0]
    assert choice.message.content == want and choice.message.role == "assistant"
    assert choice.finish_reason == ("stop" if len(smollm2.tokenizer.encode(want)) < 24
                                    else "length")
    assert resp.usage.prompt_tokens == len(smollm2.tokenizer.encode(
        smollm2.tokenizer.chat_messages(QUESTION)))
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert resp.id.startswith("chatcmpl-") and resp.model == "smollm2" and resp.created > 0


def test_a_stream_with_usage_carries_the_same_text(server, smollm2, smollm2_model):
    chunks = list(server.client().chat.completions.create(
        model="smollm2", messages=QUESTION, max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == _reference(smollm2, smollm2_model, QUESTION, 24)
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals in (["stop"], ["length"])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])


def test_prefill_progress_is_sent_as_sse_comments(server):
    body = {"model": "smollm2", "messages": QUESTION, "max_tokens": 2, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        lines = [line for line in r.iter_lines() if line]
    comments = [line for line in lines if line.startswith(": prefill ")]
    assert comments and comments[-1].split()[-2].split("/")[0] == comments[-1].split()[-2].split("/")[1]
    assert lines[-1] == "data: [DONE]"


def test_stop_strings_and_max_tokens(server, smollm2, smollm2_model):
    client = server.client()
    want = _reference(smollm2, smollm2_model, QUESTION, 24)
    word = want.split()[2]  # a word inside the answer
    resp = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=24,
                                          temperature=0, stop=[word, "zzz-never"])
    assert resp.choices[0].message.content == want[:want.index(word)]
    assert resp.choices[0].finish_reason == "stop"
    resp = client.completions.create(model="smollm2", prompt="The capital of France is",
                                     max_tokens=3, temperature=0)
    assert resp.choices[0].finish_reason == "length" and resp.usage.completion_tokens == 3
    assert resp.object == "text_completion" and resp.choices[0].text


def test_a_second_question_on_a_document_reuses_its_prefix(server, smollm2, smollm2_model):
    """Automatic prefix caching: the same document with a new question is answered from the
    kept KV of the document (usage says how many prompt tokens were cached, /metrics counts
    them) and equals the single-process answer to the whole prompt."""
    from hpipe.demo import DOCUMENT_PATH

    tok = smollm2.tokenizer
    document = tok.decode(tok.encode(DOCUMENT_PATH.read_text())[:400])
    client = server.client()
    hits_before = server.metric("hpipe:prefix_cache_hits_total")
    cached = []
    for q in ("Who is this about?", "Which year is mentioned first?"):
        messages = [{"role": "user", "content": f"{document}\n\nQuestion: {q}"}]
        resp = client.chat.completions.create(model="smollm2", messages=messages,
                                              max_tokens=8, temperature=0)
        assert resp.choices[0].message.content == _reference(smollm2, smollm2_model,
                                                             messages, 8)
        cached.append(resp.usage.prompt_tokens_details.cached_tokens)
    assert cached[0] < 64 and cached[1] > 380, cached
    assert server.metric("hpipe:prefix_cache_hits_total") - hits_before == sum(cached)
    assert server.metric("hpipe:prefix_cache_held_tokens") > 400


def test_eight_concurrent_clients_get_their_solo_answers(server):
    client = server.client()
    questions = [[{"role": "user", "content": f"Name a fruit that is {c}."}]
                 for c in ("red", "yellow", "green", "orange", "purple", "blue", "brown",
                           "pink")]

    def ask(messages):
        return client.chat.completions.create(model="smollm2", messages=messages,
                                              max_tokens=10, temperature=0
                                              ).choices[0].message.content

    solo = [ask(q) for q in questions]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, questions))
    assert together == solo


def test_errors_are_openai_error_objects(server):
    client = server.client()
    with pytest.raises(openai.AuthenticationError, match="missing or wrong API key"):
        server.client(api_key="wrong").models.list()
    with pytest.raises(openai.NotFoundError, match="'gpt-4' does not exist"):
        client.chat.completions.create(model="gpt-4", messages=QUESTION)
    with pytest.raises(openai.BadRequestError, match=r"max_tokens is 9000: \d+ tokens exceed "
                                                     r"this model's context of 8192") as info:
        client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=9000)
    assert info.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError, match="n=2 is not supported") as info:
        client.chat.completions.create(model="smollm2", messages=QUESTION, n=2)
    assert info.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError, match="unsupported field 'tools_x'"):
        client.chat.completions.create(model="smollm2", messages=QUESTION,
                                       extra_body={"tools_x": 1})
    assert [m.id for m in client.models.list().data] == ["smollm2"]


def test_a_client_that_disconnects_cancels_its_request(server):
    before = server.metric("hpipe:request_cancelled_total")
    body = {"model": "smollm2", "messages": STORY, "max_tokens": 400, "stream": True,
            "temperature": 0}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: {") and '"content"' in line
            if seen >= 3:
                break  # leave: the connection closes
    deadline = time.monotonic() + 20
    while server.metric("hpipe:request_cancelled_total") <= before:
        assert time.monotonic() < deadline, "the request was not cancelled"
        time.sleep(0.2)
    assert server.metric("hpipe:num_requests_running") == 0
    # The same pipeline serves on.
    resp = server.client().completions.create(model="smollm2", prompt="Hello", max_tokens=2,
                                                       extra_body={"ignore_eos": True})
    assert resp.usage.completion_tokens == 2


def test_a_killed_worker_fails_its_request_then_the_pipeline_is_reopened(server):
    workers = server.wait_ready()["workers"]
    stream = server.client().chat.completions.create(
        model="smollm2", messages=STORY, max_tokens=400, temperature=0, stream=True)
    with pytest.raises(openai.APIError, match=r"rank 1 .*was killed by signal SIGKILL"):
        for n, _chunk in enumerate(stream):
            if n == 3:
                os.kill(workers[1], signal.SIGKILL)
    after = server.wait_ready(timeout_s=120)["workers"]
    assert set(after).isdisjoint(workers)
    assert server.metric("hpipe:pipeline_restarts_total") >= 1
    assert server.metric("hpipe:request_failed_total") >= 1
    resp = server.client().completions.create(model="smollm2", prompt="Hello", max_tokens=2,
                                                       extra_body={"ignore_eos": True})
    assert resp.usage.completion_tokens == 2


def test_metrics_use_vllm_names(server):
    text = httpx.get(f"{server.url}/metrics", timeout=5).text
    for name in ("hpipe:num_requests_running", "hpipe:num_requests_waiting",
                 "hpipe:prompt_tokens_total", "hpipe:generation_tokens_total",
                 "hpipe:time_to_first_token_seconds_bucket",
                 "hpipe:inter_token_latency_seconds_bucket",
                 "hpipe:e2e_request_latency_seconds_bucket", "hpipe:stage_busy_fraction",
                 "hpipe:request_cancelled_total", "hpipe:request_failed_total"):
        assert name in text, name
    assert server.metric("hpipe:generation_tokens_total") > 0


# -- a full queue, on a small slow model ---------------------------------------------------------



def test_a_full_queue_answers_429_with_retry_after(tiny_checkpoints, tmp_path):
    write_slow_cluster(tmp_path / "slow.yaml", 60)
    s = Server(["--model", str(tiny_checkpoints["llama"]), "--cluster", str(tmp_path / "slow.yaml"),
                "--served-model-name", "tiny", "--max-running", "1", "--max-waiting", "1",
                "--seq-len", "8", "--keepalive", "0.2"])
    try:
        s.wait_ready()
        # Greedy, past any end of sequence: every request runs its max_tokens.
        body = {"model": "tiny", "prompt": [5, 6, 7, 8], "max_tokens": 8, "temperature": 0,
                "ignore_eos": True}

        def stream_lines() -> list[str]:
            with httpx.stream("POST", f"{s.url}/v1/completions", json={**body, "stream": True},
                              timeout=120) as r:
                return [line for line in r.iter_lines() if line]

        def until(name: str, value: float) -> None:
            deadline = time.monotonic() + 60
            while s.metric(name) != value:
                assert time.monotonic() < deadline, f"{name} never reached {value}"
                time.sleep(0.05)

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            # 0.1-0.5 s a token here: the first runs for seconds, past many keep-alives (0.2 s)
            first = pool.submit(httpx.post, f"{s.url}/v1/completions",
                                json={**body, "max_tokens": 12}, timeout=120)
            until("hpipe:num_requests_running", 1)
            second = pool.submit(stream_lines)
            until("hpipe:num_requests_waiting", 1)  # the queue (1) is full
            third = httpx.post(f"{s.url}/v1/completions", json=body, timeout=30)
            assert third.status_code == 429, third.text
            assert int(third.headers["Retry-After"]) >= 1
            assert third.json()["error"]["type"] == "rate_limit_error"
            first.result().raise_for_status()
            lines = second.result()
        # The second waited past a keep-alive comment and still streamed all of its tokens.
        assert ": waiting" in lines and lines[-1] == "data: [DONE]"
        assert '"finish_reason":"length"' in lines[-2]
    finally:
        s.stop()
