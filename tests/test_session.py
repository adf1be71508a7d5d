"""A Session keeps one pipeline running: the same workers and weights serve many requests, a
stopped or killed worker breaks it within the liveness limit naming the rank, and a new one
opens at once. Everything goes through the public API (``hpipe.session``)."""

from __future__ import annotations

import os
import re
import signal
import threading
import time

import pytest
from runtime_harness import Case, plan_for, prompt_for, reference, slow_cluster

from hpipe.demo import DOCUMENT_PATH
from hpipe.errors import PromptTooLongError, WorkerFailedError
from hpipe.model.generate import generate
from hpipe.model.source import open_model
from hpipe.session import Finished, Progress, Request, Session, SessionClosedError, Tokens

LIVENESS_S = 3.0  # short, so the failure tests are quick; the default is 15 s


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _wait_gone(pids, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(_gone(p) for p in pids):
            return True
        time.sleep(0.1)
    return False


# -- many requests, one set of workers ---------------------------------------------------------
def test_one_session_serves_five_requests_like_generate(smollm2, smollm2_model):
    """Five prompts of different lengths, submitted from several threads at once: each gives
    hpipe generate's greedy tokens; the workers and their loaded stages never change."""
    doc_ids = smollm2.tokenizer.encode(DOCUMENT_PATH.read_text())
    prompts = [doc_ids[:n] for n in (7, 60, 200, 450, 900)]
    eos = smollm2.tokenizer.eos_token_ids
    with Session.open(model="smollm2", cluster="local:2", seq_len=512, allow_tp=False) as session:
        pids = list(session.pids)
        assert len(pids) == 2 and session.state == "ready"
        streams: dict[int, object] = {}

        def submit(i: int) -> None:
            streams[i] = session.submit(Request.from_ids(prompts[i], max_new_tokens=6))

        threads = [threading.Thread(target=submit, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        submit(3)
        submit(4)
        finished = {i: s.result(timeout=300) for i, s in streams.items()}
        assert session.pids == pids and not any(_gone(p) for p in pids)
    for i, ids in enumerate(prompts):
        ref = generate(smollm2_model, [ids], max_new_tokens=6, eos_token_ids=eos)
        done = finished[i]
        assert done.output_ids == ref.output_ids, (len(ids), done.output_ids, ref.output_ids)
        # Each rank loaded its stage once, in the whole life of the session.
        assert done.result.num_stage_loads == (1, 1)
        assert done.result.timeline.seq_len == len(ids)
    assert _wait_gone(pids)


def test_a_stream_reports_progress_then_tokens_then_its_end(tiny_checkpoints):
    path = str(tiny_checkpoints["llama"])
    spec = open_model(path).spec
    case = Case("stream", "llama", layers=(1, 3), slices=(6, 3, 1), max_new_tokens=5,
                eos_token_ids=())
    ids = prompt_for(case, spec)[0]
    with Session.open(model=path, plan=plan_for(case, spec, slow_cluster(2))) as session:
        stream = session.submit(Request.from_ids(ids, max_new_tokens=5, stop_at_eos=False))
        events = list(stream)
    prefill = [e.done for e in events if isinstance(e, Progress) and e.kind == "prefill"]
    tokens = [e.ids for e in events if isinstance(e, Tokens)]
    assert prefill == [1, 2, 3]
    assert isinstance(events[-1], Finished) and events[-1].finish_reasons == ("length",)
    assert tuple(t[0] for t in tokens) == events[-1].output_ids[0]
    ref = reference(case, open_model(path).load_model(), spec)
    assert events[-1].output_ids == ref.output_ids


def test_bad_requests_are_refused_at_submit_and_the_session_goes_on(tiny_checkpoints):
    path = str(tiny_checkpoints["llama"])
    spec = open_model(path).spec
    case = Case("refuse", "llama", layers=(2, 2), slices=(8,))
    with Session.open(model=path, plan=plan_for(case, spec, slow_cluster(2))) as session:
        with pytest.raises(PromptTooLongError, match=r"120 tokens \+ 20 new tokens = 140"):
            session.submit(Request.from_ids([5] * 120, max_new_tokens=20))
        with pytest.raises(ValueError, match="temperature"):
            session.submit(Request.from_ids([5, 6], temperature=-1.0))
        done = session.generate(Request.from_ids([5, 6, 7], max_new_tokens=2), timeout=120)
        assert len(done.output_ids[0]) <= 2
    with pytest.raises(SessionClosedError, match="closed"):
        session.submit(Request.from_ids([5, 6, 7]))


def test_an_idle_session_outlives_its_connect_timeout(tiny_checkpoints):
    """The connect timeout bounds joining only: after idling past it, the session serves."""
    path = str(tiny_checkpoints["llama"])
    spec = open_model(path).spec
    case = Case("idle", "llama", layers=(2, 2), slices=(5, 3), eos_token_ids=())
    with Session.open(model=path, plan=plan_for(case, spec, slow_cluster(2)),
                      connect_timeout_s=4.0) as session:
        time.sleep(7.0)
        done = session.generate(Request.from_ids(prompt_for(case, spec)[0], max_new_tokens=4,
                                                 stop_at_eos=False), timeout=120)
    ref = reference(case, open_model(path).load_model(), spec)
    assert done.output_ids == ref.output_ids


# -- cancel ------------------------------------------------------------------------------------
def _slow_session(tiny_checkpoints, *, groups=(), layers=(2, 2), slowdown=300.0):
    """A tiny model on workers emulated `slowdown` x slower, so a request lasts seconds."""
    path = str(tiny_checkpoints["llama"])
    spec = open_model(path).spec
    case = Case("slow", "llama", layers=layers, groups=groups, slices=(4, 4, 4, 4))
    num = sum(groups) if groups else len(layers)
    plan = plan_for(case, spec, slow_cluster(num, slowdown))
    return Session.open(model=path, plan=plan, liveness_s=LIVENESS_S), prompt_for(case, spec)[0]


def test_cancel_mid_decode_and_mid_prefill_then_serve_again(tiny_checkpoints):
    session, ids = _slow_session(tiny_checkpoints)
    with session:
        pids = list(session.pids)
        long = Request.from_ids(ids, max_new_tokens=100, stop_at_eos=False)
        stream = session.submit(long)
        queued = session.submit(long)  # waits behind the first
        # A request still waiting ends at once, without reaching the workers.
        assert queued.cancel()
        assert queued.result(timeout=5).finish_reasons == ("cancelled",)
        assert queued.result().result is None
        for event in stream:
            if isinstance(event, Tokens):
                t0 = time.monotonic()
                assert stream.cancel()
                break
        done = stream.result(timeout=60)
        assert time.monotonic() - t0 < 10
        assert done.finish_reasons == ("cancelled",)
        assert 1 <= len(done.output_ids[0]) < 100
        # Cancelled after the first prefill slice: stage 0 stops feeding slices.
        stream = session.submit(long)
        for event in stream:
            if isinstance(event, Progress) and event.kind == "prefill":
                assert stream.cancel()
                break
        done = stream.result(timeout=60)
        assert done.finish_reasons == ("cancelled",) and done.output_ids == ((),)
        assert done.result.num_decode_steps == 0
        # The same workers serve the next request in full.
        done = session.generate(Request.from_ids(ids, max_new_tokens=3, stop_at_eos=False),
                                timeout=120)
        assert len(done.output_ids[0]) == 3 and done.finish_reasons == ("length",)
        assert session.pids == pids
        assert not session.cancel(done.request_id)  # already finished


# -- a worker that dies or stops ---------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["kill", "stop"])
@pytest.mark.parametrize("shape", ["pipeline", "tp-pair"])
def test_a_dead_or_stopped_worker_breaks_the_session_naming_it(tiny_checkpoints, sig, shape):
    """Rank 1 is signalled mid-decode: the request ends within the liveness limit with an
    error naming rank 1 (not rank 0, which was waiting for it), every worker is ended, the
    session refuses further work, and a new session serves."""
    kw = {"groups": (2,), "layers": (4,)} if shape == "tp-pair" else {}
    session, ids = _slow_session(tiny_checkpoints, **kw)
    pids = list(session.pids)
    stream = session.submit(Request.from_ids(ids, max_new_tokens=100, stop_at_eos=False))
    with pytest.raises(WorkerFailedError) as info:
        num_tokens = 0
        for event in stream:
            if isinstance(event, Tokens):
                num_tokens += 1
                if num_tokens == 2:
                    os.kill(pids[1], sig)
                    signalled_at = time.monotonic()
    waited_s = time.monotonic() - signalled_at
    message = str(info.value)
    assert "rank 1" in message and f"pid {pids[1]}" in message
    # The request's schedule, with the action each stage was on when it failed.
    assert "where each stage was" in message and re.search(r"stage 0: .*\[[RCS]\d+\]", message)
    if sig == signal.SIGKILL:
        assert "SIGKILL" in message and waited_s < 10
    else:
        assert "stopped answering" in message and "stopped (SIGSTOP" in message
        assert LIVENESS_S <= waited_s < LIVENESS_S + 10
    assert session.state == "broken"
    with pytest.raises(WorkerFailedError, match="broken.*rank 1.*open a new one"):
        session.submit(Request.from_ids(ids, max_new_tokens=2))
    session.close()
    assert _wait_gone(pids), "a worker outlived its session"
    again, _ = _slow_session(tiny_checkpoints, slowdown=1.0, **kw)
    with again:
        done = again.generate(Request.from_ids(ids, max_new_tokens=3, stop_at_eos=False),
                              timeout=120)
    assert len(done.output_ids[0]) == 3


def test_a_script_without_a_main_guard_is_told_to_add_one(tiny_checkpoints, tmp_path):
    """Spawned workers import the user's script again; the one that opens a pipeline at import
    time must hear what to change, and nothing may be left running."""
    import subprocess
    import sys

    script = tmp_path / "no_guard.py"
    script.write_text(
        "from hpipe.session import Session\n"
        f"Session.open(model={str(tiny_checkpoints['llama'])!r}, cluster='local:2', "
        "seq_len=16).close()\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path)
    assert r.returncode != 0
    assert "put the script's code under `if __name__ == \"__main__\":`" in r.stderr, r.stderr
    assert "AssertionError" not in r.stderr, r.stderr  # closing a half-started pool
