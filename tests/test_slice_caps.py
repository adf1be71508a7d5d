"""How the Session's serving driver sizes prefill slices (hpipe/session_items.py,
hpipe/slice_rate.py): the learned cost of a slice by its prefix, slices that grow from what is
measured while others decode, and lone slices kept to about a second of work."""

from __future__ import annotations

import functools
import random

import pytest


def test_idle_slices_start_small_and_follow_what_a_lone_slice_measured():
    """The Session's idle cap: START_IDLE_TOKENS at first, at most twice the last measured
    lone slice, and what the measured rate fits in IDLE_ITEM_S, shorter late in a prompt."""
    from types import SimpleNamespace

    from hpipe.interleave import DecodeRow, Item, PrefillPiece
    from hpipe.session_items import IDLE_ITEM_S, START_IDLE_TOKENS, InterleavedRuns
    from hpipe.spec import model_preset

    plan = SimpleNamespace(model=model_preset("smollm2-135m"), slices_for=lambda n: (n,))
    runs = InterleavedRuns(SimpleNamespace(plan=plan), depth=1, kv_token_budget=100_000)
    runs.reqs = {1: None}
    cap = functools.partial(runs.sched.idle_cap, 1)
    assert cap(0) == START_IDLE_TOKENS == cap(6000)
    runs._measure(Item(0, PrefillPiece(1, 0, (7,) * 256, False), ()), 0.4)  # alone: 1.6 ms/token
    assert cap(0) == 512  # doubles; the rate alone would allow ~600 in IDLE_ITEM_S
    assert cap(6000) < cap(0) and runs.solo_rate.seconds(cap(6000), 6000) <= IDLE_ITEM_S * 1.01
    # A slice beside decode rows teaches the idle cap nothing.
    before = runs.solo_rate.s_per_flop
    runs._measure(Item(1, PrefillPiece(1, 256, (7,) * 32, False),
                       (DecodeRow(rid=9, token=5, position=40),)), 0.2)
    assert runs.solo_rate.s_per_flop == before
    runs._end(1, None)
    assert 1 not in runs.idle_grow_to


def test_slice_rate_caps_slices_shorter_as_the_prefix_grows():
    """The serving driver's slice rate (hpipe/slice_rate.py): a slice's work grows with its
    prefix (attention over the cached keys), so the slice that fits a decode step shrinks as a
    long prompt advances; the cap is the exact root of the learned cost."""
    from hpipe.slice_rate import SliceRate
    from hpipe.spec import model_preset

    rate = SliceRate(model_preset("smollm2-135m"))
    assert not rate.learned
    rate.learn(256, 0, 0.5)  # a 256-token first slice added 0.5 s: one rate for both kinds
    assert rate.s_per_flop[0] == pytest.approx(rate.s_per_flop[1])
    for prefix in (0, 1000, 6000):
        tokens = rate.tokens_within(0.1, prefix)
        assert rate.seconds(tokens, prefix) == pytest.approx(0.1, rel=1e-9)
    caps = [rate.tokens_within(0.1, p) for p in (0, 2000, 4000, 6000)]
    assert caps == sorted(caps, reverse=True) and caps[-1] < caps[0] / 2.5
    assert rate.tokens_within(0.1, 0) == pytest.approx(51.2, rel=0.05)  # 256 x 0.1 / 0.5


def test_slice_rate_tells_matmuls_from_attention():
    """[Note: two rates, not one]: with attention over a long prefix slower per FLOP than the
    matmuls, slices at several sizes and prefixes give both rates, so a long document's late
    slices do not make a fresh prompt's slice short; noise or one kind of sample falls back to
    one common rate, never to a rate at or below zero."""
    from hpipe.slice_rate import SliceRate
    from hpipe.spec import model_preset

    model = model_preset("smollm2-135m")
    truth = SliceRate(model)
    truth.s_per_flop = (1e-10, 6e-10)  # attention 6x slower per FLOP
    rate = SliceRate(model)
    rng = random.Random(0)
    for tokens, prefix in [(32, 0), (64, 0), (128, 32), (256, 160), (64, 3000), (16, 5000),
                           (8, 6000), (8, 6500), (8, 7000)]:
        rate.learn(tokens, prefix, truth.seconds(tokens, prefix) * rng.uniform(0.97, 1.03))
    assert rate.s_per_flop[0] == pytest.approx(1e-10, rel=0.25)
    assert rate.s_per_flop[1] == pytest.approx(6e-10, rel=0.25)
    for prefix in (0, 6000):  # caps near the true ones, at both ends
        assert rate.tokens_within(0.05, prefix) == pytest.approx(
            truth.tokens_within(0.05, prefix), rel=0.25)
    # One common rate fitted to the same samples prices a fresh prompt's matmuls at the
    # attention's rate: its cap at no prefix would be far too short.
    assert rate.common_s_per_flop > 2 * rate.s_per_flop[0]
    # Samples that contradict the shape (a long slice cheaper than short ones) keep rates > 0.
    odd = SliceRate(model)
    for tokens, prefix, seconds in [(8, 6000, 0.5), (512, 0, 0.01), (8, 6000, 0.5)]:
        odd.learn(tokens, prefix, seconds)
        assert min(odd.s_per_flop) > 0


def test_slices_grow_from_what_is_measured_while_others_decode():
    """[Note: learning a fused slice's cost]: a short slice's extra time over a decode step is
    noise and teaches no rate, so slices grow at most twice per measurement from 32 tokens;
    one that costs a fair share of a step sets the rate, which then caps them by the prefix."""
    from types import SimpleNamespace

    from hpipe.interleave import DecodeRow, Item, PrefillPiece
    from hpipe.session_items import MIN_SLICE_TOKENS, START_SLICE_TOKENS, InterleavedRuns
    from hpipe.spec import model_preset

    plan = SimpleNamespace(model=model_preset("smollm2-135m"), slices_for=lambda n: (n,))
    runs = InterleavedRuns(SimpleNamespace(plan=plan), depth=2, kv_token_budget=100_000)
    runs.reqs = {1: None, 2: None}  # two live requests
    cap = functools.partial(runs.sched.slice_cap, 1)  # request 1's, by prefix
    row = (DecodeRow(rid=9, token=5, position=40),)

    def measure(tokens: int, prefix: int, seconds: float) -> None:
        piece = PrefillPiece(rid=1, prefix=prefix, ids=(7,) * tokens, last=False)
        runs._measure(Item(0, piece, row), seconds)

    assert cap(0) == START_SLICE_TOKENS  # nothing measured yet
    runs._measure(Item(0, None, row), 0.050)  # a decode step: 50 ms
    measure(32, 0, 0.052)  # 2 ms more: noise, no rate
    assert not runs.slice_rate.learned and cap(0) == 64 and cap(6000) == 64
    measure(64, 0, 0.053)
    assert not runs.slice_rate.learned and cap(0) == 128
    measure(128, 0, 0.080)  # 30 ms more: a rate
    assert runs.slice_rate.learned
    assert cap(0) <= 256 and cap(6000) < cap(0)
    assert MIN_SLICE_TOKENS <= cap(60_000) < 16
    assert cap(0) > 2 * START_SLICE_TOKENS  # request 1 grew ...
    assert runs.sched.slice_cap(2, 0) == START_SLICE_TOKENS  # ... another starts from 32
    runs._end(1, None)
    assert 1 not in runs.grow_to
    # Without a step measured, a slice teaches nothing and does not grow the next.
    fresh = InterleavedRuns(SimpleNamespace(plan=plan), depth=2, kv_token_budget=100_000)
    fresh._measure(Item(0, PrefillPiece(1, 0, (7,) * 200, False), ()), 0.3)
    assert fresh.sched.slice_cap(1, 0) == START_SLICE_TOKENS
