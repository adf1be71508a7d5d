"""The serving scheduler (hpipe/interleave.py) on its own, driven by a fake pipeline, and an
interleaved Session on real workers: concurrent requests get their solo greedy tokens, a long
prompt's slices take turns with the decode steps of running requests, cancel and memory
admission work."""

from __future__ import annotations

import random
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hpipe.errors import CapacityError
from hpipe.interleave import PASS_LIMIT, Admitted, Evicted, Interleaver
from hpipe.model.generate import generate
from hpipe.prefix_cache import MIN_NEW_TOKENS, MIN_REUSE_TOKENS, PrefixCache
from hpipe.session import Finished, Request, Session, Tokens


# -- the scheduler alone -------------------------------------------------------------------------
def _run(sched: Interleaver, *, rng: random.Random, eos=frozenset(), max_items=10_000):
    """Drive ``sched`` like a pipeline: items return in order after a random delay; the token
    of request r at its n-th output is 100 * r + n. Checks the rules on every item."""
    out: dict[int, list[int]] = {}
    pipe: list = []
    fed_prefix: dict[int, int] = {}
    kept: dict[int, tuple[int, ...]] = {}  # what the stages would hold, by key
    kept_room: dict[int, int] = {}  # the memory each holds: its request's room
    prompts = {r.rid: r.prompt for r in sched.waiting}

    def check_budget():
        held = sum(kept_room[k] for k in kept)
        assert held + sum(r.room_tokens for r in sched.live.values()) <= sched.kv_token_budget

    for _ in range(max_items):
        sched.releasable()
        for got in sched.admit():
            if isinstance(got, Evicted):
                del kept[got.key]
                continue
            fed_prefix[got.rid] = got.cached
            if got.source is not None:  # the copied positions are the same tokens
                assert kept[got.source][:got.cached] == prompts[got.rid][:got.cached]
                assert got.cached < len(prompts[got.rid])
        check_budget()
        while (item := sched.next_item()) is not None:
            for key in sched.take_evicted():
                del kept[key]
            if item.keep_as is not None:
                assert item.prefill.last
                kept[item.keep_as] = prompts[item.prefill.rid]
                kept_room[item.keep_as] = sched.live[item.prefill.rid].room_tokens
            check_budget()
            # at most one slice, and slices of one prompt in order, without gaps
            if item.prefill is not None:
                p = item.prefill
                assert fed_prefix.get(p.rid, 0) == p.prefix
                fed_prefix[p.rid] = p.prefix + len(p.ids)
                if item.decode and sched.slice_cap is not None:  # others wait on this item
                    cap = sched.slice_cap(p.rid, p.prefix)
                    assert len(p.ids) <= cap + cap // 2
            rows = [r.rid for r in item.decode]
            assert len(rows) == len(set(rows))  # a request once per item
            in_flight = [i for it in sched.in_flight.values() if it is not item
                         for i in (r.rid for r in it.decode)]
            assert not set(rows) & set(in_flight), "a decode row before its token came back"
            for r in item.decode:  # the token fed back is the last one sampled
                assert r.token == out[r.rid][-1]
            pipe.append(item)
        assert len(sched.in_flight) <= sched.depth
        if not pipe:
            if sched.idle or not (sched.waiting or sched.live):
                return out
            continue
        # The pipeline returns items in the order they entered; a random number of new
        # requests' worth of items may be issued before the next one returns.
        if rng.random() < 0.3 and len(sched.in_flight) < sched.depth:
            continue
        item = pipe.pop(0)
        tokens = {}
        if item.prefill is not None and item.prefill.last:
            rid = item.prefill.rid
            tokens[rid] = 100 * rid + len(out.get(rid, []))
        for r in item.decode:
            tokens[r.rid] = 100 * r.rid + len(out[r.rid])
        for got in sched.on_sampled(item.index, tokens):
            out.setdefault(got.rid, []).append(got.token)
    raise AssertionError("the scheduler did not finish")


@settings(max_examples=60, deadline=None, derandomize=True)
@given(data=st.data())
def test_every_request_gets_all_its_tokens_in_order(data):
    depth = data.draw(st.integers(1, 4))
    cap = data.draw(st.none() | st.integers(1, 6))
    sched = Interleaver(depth=depth, kv_token_budget=data.draw(st.integers(40, 400)),
                        slice_cap=None if cap is None else (lambda rid, prefix: cap))
    wants = {}
    for rid in range(data.draw(st.integers(1, 6))):
        n = data.draw(st.integers(1, 30))
        slices = data.draw(st.lists(st.integers(1, 10), min_size=1, max_size=4))
        prompt = tuple(range(sum(slices)))
        if len(prompt) + n - 1 > sched.kv_token_budget:
            continue
        sched.add(rid, prompt, slices=tuple(slices), max_new_tokens=n)
        wants[rid] = [100 * rid + k for k in range(n)]
    out = _run(sched, rng=random.Random(data.draw(st.integers(0, 99))))
    assert out == wants
    assert sched.idle or not sched.live


@settings(max_examples=60, deadline=None, derandomize=True)
@given(data=st.data())
def test_prefix_reuse_keeps_every_token_and_the_budget(data):
    """Prompts that share documents, under a tight budget: each request still gets all its
    tokens, its pieces start where its reused prefix ends, a reused prefix is made of the same
    tokens, and kept prefixes plus running caches never exceed the budget."""
    depth = data.draw(st.integers(1, 3))
    budget = data.draw(st.integers(200, 1200))
    sched = Interleaver(depth=depth, kv_token_budget=budget, prefixes=PrefixCache(),
                        slicing=lambda n: (n,) if n < 40 else (n - n // 3, n // 3))
    docs = [tuple(range(1000 * d, 1000 * d + data.draw(st.integers(20, 150))))
            for d in range(data.draw(st.integers(1, 3)))]
    wants = {}
    for rid in range(data.draw(st.integers(1, 8))):
        doc = docs[data.draw(st.integers(0, len(docs) - 1))]
        question = tuple(range(500 + rid * 10, 500 + rid * 10 + data.draw(st.integers(1, 80))))
        n = data.draw(st.integers(1, 6))
        prompt = doc + question
        if len(prompt) + n - 1 > budget:
            continue
        sched.add(rid, prompt, max_new_tokens=n)
        wants[rid] = [100 * rid + k for k in range(n)]
    out = _run(sched, rng=random.Random(data.draw(st.integers(0, 99))))
    assert out == wants


def _finish(sched: Interleaver) -> list:
    """Run everything to the end one item at a time; the items, in order."""
    items = []
    while True:
        sched.releasable()
        sched.admit()
        item = sched.next_item()
        if item is None:
            return items
        items.append(item)
        tokens = {r.rid: 5 for r in item.decode}
        if item.prefill is not None and item.prefill.last:
            tokens[item.prefill.rid] = 5
        sched.on_sampled(item.index, tokens)


def test_a_second_question_prefills_only_itself():
    doc = tuple(range(1000, 1300))
    sched = Interleaver(depth=2, kv_token_budget=10_000, prefixes=PrefixCache())
    sched.add(1, doc + (1, 2, 3), max_new_tokens=2)
    first = _finish(sched)
    assert first[0].keep_as is not None and first[0].prefill.prefix == 0
    sched.add(2, doc + (7, 8), max_new_tokens=2)
    [admitted] = sched.admit()
    assert admitted == Admitted(2, first[0].keep_as, len(doc))
    second = _finish(sched)
    assert second[0].prefill.prefix == len(doc) and second[0].prefill.ids == (7, 8)
    assert second[0].keep_as is None  # two new tokens: not worth keeping the document twice
    assert sched.prefixes.hit_tokens == len(doc) and sched.prefixes.queried_tokens == 605


def test_a_conversation_turn_replaces_the_prefix_it_extends():
    turn1 = tuple(range(200))
    sched = Interleaver(depth=1, kv_token_budget=10_000, prefixes=PrefixCache())
    sched.add(1, turn1, max_new_tokens=1)
    key1 = _finish(sched)[0].keep_as
    turn2 = turn1 + tuple(range(300, 300 + MIN_NEW_TOKENS))
    sched.add(2, turn2, max_new_tokens=1)
    items = _finish(sched)
    assert items[0].prefill.prefix == len(turn1) - 0 and items[0].keep_as not in (None, key1)
    assert sched.take_evicted() == [key1] and list(sched.prefixes.entries.values()) == [turn2]


def test_kept_prefixes_make_room_least_recent_first():
    sched = Interleaver(depth=1, kv_token_budget=500, prefixes=PrefixCache())
    a, b = tuple(range(100)), tuple(range(1000, 1100))
    for rid, prompt in ((1, a), (2, b)):
        sched.add(rid, prompt, max_new_tokens=1)
        _finish(sched)
    assert sched.prefixes.held_tokens == 200
    sched.add(3, a + (9,) * 10, max_new_tokens=1)  # uses a: b is now the least recent
    _finish(sched)
    sched.add(4, tuple(range(2000, 2350)), max_new_tokens=1)  # needs 350 of the 300 free
    decisions = sched.admit()
    assert decisions[0] == Evicted(2) and isinstance(decisions[-1], Admitted)
    assert decisions[-1].source is None


def test_short_common_prefixes_are_not_reused():
    sched = Interleaver(depth=1, kv_token_budget=10_000, prefixes=PrefixCache())
    sched.add(1, tuple(range(100)), max_new_tokens=1)
    _finish(sched)
    sched.add(2, tuple(range(MIN_REUSE_TOKENS - 1)) + (7,) * 80, max_new_tokens=1)
    assert sched.admit() == [Admitted(2, None, 0)]


def test_decode_rows_ride_along_with_a_long_prompts_slices():
    """A running request gets a decode row in every item while another prompt prefills: its
    gap is one item, not the whole prefill."""
    sched = Interleaver(depth=1, kv_token_budget=10_000)
    sched.add(0, (1, 2, 3), slices=(3,), max_new_tokens=50)
    sched.admit()
    first = sched.next_item()
    sched.on_sampled(first.index, {0: 7})
    sched.add(1, tuple(range(80)), slices=(32, 24, 16, 8), max_new_tokens=2)
    sched.admit()
    seen = []
    for _ in range(4):
        item = sched.next_item()
        seen.append((item.prefill and len(item.prefill.ids), [r.rid for r in item.decode]))
        tokens = {r.rid: 7 for r in item.decode}
        if item.prefill is not None and item.prefill.last:
            tokens[item.prefill.rid] = 9
        sched.on_sampled(item.index, tokens)
    assert seen == [(32, [0]), (24, [0]), (16, [0]), (8, [0])]


def test_slices_are_cut_to_the_cap_only_while_others_decode():
    sched = Interleaver(depth=1, kv_token_budget=10_000, slice_cap=lambda rid, prefix: 10)
    sched.add(0, tuple(range(50)), slices=(30, 20), max_new_tokens=3)
    sched.admit()
    alone = []
    for _ in range(2):  # nobody decodes yet: the planned slices
        item = sched.next_item()
        alone.append(len(item.prefill.ids))
        sched.on_sampled(item.index, {0: 1} if item.prefill.last else {})
    assert alone == [30, 20]
    sched.add(1, tuple(range(25)), slices=(25,), max_new_tokens=1)
    sched.admit()
    cut = []
    for _ in range(2):
        item = sched.next_item()
        cut.append((len(item.prefill.ids), [r.rid for r in item.decode]))
        tokens = {r.rid: 1 for r in item.decode}
        if item.prefill.last:
            tokens[1] = 2
        sched.on_sampled(item.index, tokens)
    # 25 tokens at a cap of 10: 10, then the last 15 in one piece (a tail under half a cap
    # rides along instead of making an item of its own).
    assert cut[:2] == [(10, [0]), (15, [0])]


def test_while_nobody_decodes_slices_are_cut_to_the_idle_cap():
    """[Note: a slice bounds the next arrival's wait]: a prompt planned as one slice goes in
    pieces of the idle cap, so a chat arriving meanwhile waits one piece, not the prompt."""
    sched = Interleaver(depth=1, kv_token_budget=10_000, slice_cap=lambda rid, prefix: 4,
                        idle_cap=lambda rid, prefix: 30 if prefix < 60 else 20)
    sched.add(0, tuple(range(100)), slices=(100,), max_new_tokens=2)
    sched.admit()
    pieces = []
    for _ in range(2):
        item = sched.next_item()
        pieces.append(len(item.prefill.ids))
        sched.on_sampled(item.index, {})
    sched.add(1, tuple(range(12)), slices=(12,), max_new_tokens=1)  # a chat arrives
    sched.admit()
    item = sched.next_item()  # the chat's whole prompt goes next (shortest first) ...
    assert (item.prefill.rid, len(item.prefill.ids)) == (1, 12)
    sched.on_sampled(item.index, {1: 7})  # ... and ends at once (one new token)
    while (item := sched.next_item()) is not None:
        pieces.append(len(item.prefill.ids))
        sched.on_sampled(item.index, {0: 1} if item.prefill.last else {})
        if item.prefill.last:
            break
    # 30 + 30 at prefixes 0 and 30; from prefix 60 the cap is 20: 20, then the last 20.
    assert pieces == [30, 30, 20, 20]
    # Without an idle cap, the planned slice goes whole.
    plain = Interleaver(depth=1, kv_token_budget=10_000)
    plain.add(0, tuple(range(100)), slices=(100,), max_new_tokens=1)
    plain.admit()
    assert len(plain.next_item().prefill.ids) == 100


def test_a_short_prompt_goes_ahead_of_a_long_ones_slices_but_cannot_starve_it():
    """A chat that comes while a document prefills gets the next slice (its first token after
    one item, not after the document); chats arriving without end leave the document one item
    in PASS_LIMIT + 1."""
    sched = Interleaver(depth=1, kv_token_budget=100_000, slice_cap=lambda rid, prefix: 10)
    sched.add(0, (1, 2, 3), slices=(3,), max_new_tokens=10_000)  # a running stream
    sched.admit()
    item = sched.next_item()
    sched.on_sampled(item.index, {0: 7})
    sched.add(1, tuple(range(500)), slices=(500,), max_new_tokens=1)  # the document
    sched.admit()
    owners, next_rid = [], 2
    for step in range(40):
        if step >= 2:  # from the third item on, a 4-token chat arrives before every item
            sched.add(next_rid, (5, 6, 7, 8), slices=(4,), max_new_tokens=1)
            next_rid += 1
            sched.admit()
        item = sched.next_item()
        owners.append(item.prefill.rid if item.prefill else None)
        tokens = {r.rid: 7 for r in item.decode}
        if item.prefill is not None and item.prefill.last:
            tokens[item.prefill.rid] = 9
        sched.on_sampled(item.index, tokens)
        sched.releasable()
    assert owners[:3] == [1, 1, 2]  # the first chat went ahead of the document's third slice
    runs, run = [], 0
    for o in owners[2:]:
        run = run + 1 if o != 1 else 0
        runs.append(run)
    assert max(runs) == PASS_LIMIT, owners  # the document waits at most PASS_LIMIT items
    assert owners.count(1) >= 2 + (len(owners) - 2) // (PASS_LIMIT + 1)


def test_admission_waits_for_memory_and_refuses_what_never_fits():
    sched = Interleaver(depth=2, kv_token_budget=100)
    sched.add(0, tuple(range(60)), slices=(60,), max_new_tokens=11)  # 70 positions
    sched.add(1, tuple(range(40)), slices=(40,), max_new_tokens=1)  # 40: does not fit beside it
    assert [a.rid for a in sched.admit()] == [0]
    with pytest.raises(ValueError, match="needs 120 KV positions, more than the budget of 100"):
        sched.add(2, tuple(range(100)), slices=(100,), max_new_tokens=21)
    assert sched.cancel(0)
    assert sched.releasable() == [0] and [a.rid for a in sched.admit()] == [1]


# -- an interleaved session on real workers --------------------------------------------------------
@pytest.fixture(scope="module")
def session(smollm2_gguf):
    with Session.open(model="smollm2", cluster="local:2", seq_len=512, allow_tp=False,
                      interleave=True) as s:
        yield s


def test_concurrent_requests_get_their_solo_greedy_tokens(session, smollm2, smollm2_model):
    from hpipe.demo import DOCUMENT_PATH

    tok = smollm2.tokenizer
    prompts = [tok.encode(tok.chat_prompt(q)) for q in (
        "What is the capital of France?", "Name three colors.", "Count from one to five.")]
    prompts.append(tok.encode(DOCUMENT_PATH.read_text())[:1500])
    streams = [session.submit(Request.from_ids(p, max_new_tokens=12)) for p in prompts]
    done = [s.result(timeout=300) for s in streams]
    for p, d in zip(prompts, done):
        ref = generate(smollm2_model, [p], max_new_tokens=12, eos_token_ids=tok.eos_token_ids)
        assert d.output_ids == ref.output_ids, (len(p), d.output_ids, ref.output_ids)


def test_a_long_prompt_does_not_freeze_a_running_stream(session, smollm2):
    """While a 1.5k-token prompt prefills, a running stream keeps getting tokens: its longest
    gap stays near its usual one (one slice), far below the whole prefill."""
    from hpipe.demo import DOCUMENT_PATH

    tok = smollm2.tokenizer
    chat = session.submit(Request.from_ids(tok.encode(tok.chat_prompt("Tell a long story.")),
                                           max_new_tokens=120, stop_at_eos=False))
    arrivals: list[float] = []
    long_started = threading.Event()

    def read():
        for event in chat:
            if isinstance(event, Tokens):
                arrivals.append(time.monotonic())
                if len(arrivals) == 10:
                    long_started.set()

    reader = threading.Thread(target=read)
    reader.start()
    long_started.wait(120)
    t0 = time.monotonic()
    # Not the start of the document: another test's prompt, kept, would skip the prefill.
    long = session.submit(Request.from_ids(tok.encode(DOCUMENT_PATH.read_text())[1800:3300],
                                           max_new_tokens=1))
    long.result(timeout=300)
    prefill_s = time.monotonic() - t0
    reader.join(300)
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    during = [b - a for a, b in zip(arrivals, arrivals[1:]) if t0 <= b <= t0 + prefill_s]
    assert during, "no token arrived while the long prompt prefilled"
    assert max(during) < prefill_s / 2, (max(during), prefill_s)
    assert len(arrivals) == 120 and sorted(gaps)[len(gaps) // 2] < 1.0


def test_cancel_and_capacity_in_an_interleaved_session(session, smollm2):
    tok = smollm2.tokenizer
    ids = tok.encode(tok.chat_prompt("Tell a long story."))
    stream = session.submit(Request.from_ids(ids, max_new_tokens=300, stop_at_eos=False))
    for event in stream:
        if isinstance(event, Tokens):
            assert stream.cancel()
            break
    done = stream.result(timeout=60)
    assert isinstance(done, Finished) and done.finish_reasons == ("cancelled",)
    assert 1 <= len(done.output_ids[0]) < 300
    budget = session.kv_token_budget
    assert budget is not None and budget > 8192  # SmolLM2 on two CPU workers: all of it fits
    again = session.generate(Request.from_ids(ids, max_new_tokens=3, stop_at_eos=False),
                             timeout=120)
    assert len(again.output_ids[0]) == 3
    # A request whose cache could never fit is refused at submit, with the numbers.
    sched = session._items.sched
    saved, sched.kv_token_budget = sched.kv_token_budget, 100
    try:
        with pytest.raises(CapacityError, match=r"need 139 KV-cache positions.*at most 100"):
            session.submit(Request.from_ids(list(range(3, 103)), max_new_tokens=40))
    finally:
        sched.kv_token_budget = saved


def test_questions_on_a_kept_document_answer_as_the_whole_prompt(session, smollm2,
                                                                  smollm2_model):
    """A second and third question about the same document reuse its KV cache (cached_tokens
    counts it) and give the greedy tokens of the whole prompt computed from scratch."""
    from hpipe.demo import DOCUMENT_PATH
    from hpipe.model.prompts import document_question

    tok = smollm2.tokenizer
    document = tok.decode(tok.encode(DOCUMENT_PATH.read_text())[:700])
    before = session.prefix_stats()
    outs = []
    for q in ("Who wrote this?", "What is it about?", "Name one company it mentions."):
        ids = tok.encode(tok.chat_prompt(document_question(document, q)))
        done = session.generate(Request.from_ids(ids, max_new_tokens=10), timeout=300)
        ref = generate(smollm2_model, [ids], max_new_tokens=10, eos_token_ids=tok.eos_token_ids)
        assert done.output_ids == ref.output_ids, (q, done.output_ids, ref.output_ids)
        outs.append((len(ids), done.cached_tokens))
    assert outs[0][1] < 100  # the first question prefills the document
    for n, cached in outs[1:]:
        assert n - 40 < cached < n, outs  # the rest prefill about their question alone
    after = session.prefix_stats()
    assert after["hit_tokens"] - before["hit_tokens"] == sum(c for _, c in outs)
    assert after["held_tokens"] >= outs[0][0]
