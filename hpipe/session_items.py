"""A Session's interleaved mode: many requests on the pipeline at once (``Session.open(...,
interleave=True)``, what ``hpipe serve`` uses).

The Interleaver (hpipe/interleave.py) decides each item; this driver sends the workers what it
decides (admit a request's caches, run an item, release them), turns each item's sampled tokens
into the requests' stream events, and feeds the tokens back into the next items. One driver
thread sends; the supervisor's thread reports; both hold the session's lock while they touch the
scheduler. Requests here are one row each; their Finished carries the output ids but no
measured timeline (an item serves several requests at once), and the workers' compute seconds
are reported per rank instead (``busy_s``).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from hpipe.errors import CapacityError, PromptShapeError
from hpipe.interleave import Admitted, Interleaver
from hpipe.prefix_cache import PrefixCache
from hpipe.session_events import Finished, Progress, Tokens
from hpipe.slice_rate import SliceRate

log = logging.getLogger(__name__)

# A slice may add SLICE_FACTOR x a decode step's time to the item it rides in: the streams then
# wait about (1 + SLICE_FACTOR) x their usual gap while a long prompt prefills. Late in a long
# prompt that is a short slice, since each of its tokens attends over the whole prefix
# (SmolLM2, 15 layers, a 5600-token prefix: 8 tokens add 0.9 of a step, 16 add 1.8), hence the
# floor of 8; the price is the long prompt's own first token (the README's serving figures).
# Slices start at START_SLICE_TOKENS (32 added 0.47 of a step at no prefix) and grow from what
# is measured (see [Note: learning a fused slice's cost]).
SLICE_FACTOR = 1.0
MIN_SLICE_TOKENS, START_SLICE_TOKENS, MAX_SLICE_TOKENS = 8, 32, 1024
# While nobody decodes, a slice is kept to about IDLE_ITEM_S of the last stage's work, so a
# request that arrives meanwhile waits about that long for the pipeline (see [Note: a slice
# bounds the next arrival's wait] in interleave.py). SmolLM2 on one CPU worker: 1 s is about
# 300 tokens of a new prompt, 140 late in a 7000-token one; each extra slice costs one more
# read of the weights (about 60 ms for 30 layers), so a document pays a few percent of its
# prefill. The first is START_IDLE_TOKENS; each grows at most twice per measured one.
IDLE_ITEM_S = 1.0
START_IDLE_TOKENS = 256
EWMA_WEIGHT = 0.2
INFORMATIVE_SHARE = 0.25  # see [Note: learning a fused slice's cost]


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else (1 - EWMA_WEIGHT) * old + EWMA_WEIGHT * new


@dataclass
class _Req:
    stream: object  # hpipe.session.Stream
    request: object  # hpipe.session.Request
    prompt: tuple[int, ...]
    eos: frozenset[int]
    slices_done: int = 0
    output: list[int] = field(default_factory=list)
    ended: bool = False


class InterleavedRuns:
    def __init__(self, session, *, depth: int, kv_token_budget: int,
                 whole_prefill: bool = False, prefix_reuse: bool = True) -> None:
        self.session = session
        # whole_prefill, for comparison: one slice per prompt, never cut.
        self.sched = Interleaver(depth=depth, kv_token_budget=kv_token_budget,
                                 slicing=((lambda n: (n,)) if whole_prefill
                                          else session.plan.slices_for),
                                 slice_cap=None if whole_prefill else self._slice_cap,
                                 idle_cap=None if whole_prefill else self._idle_cap,
                                 prefixes=PrefixCache() if prefix_reuse else None)
        self.reqs: dict[int, _Req] = {}
        self.step_s: float | None = None  # a decode-only item's compute, measured
        self.grow_to: dict[int, int] = {}  # rid -> its cap's bound (see _measure)
        self.slice_rate = SliceRate(session.plan.model)
        # A slice alone in its item: its whole time, for the idle cap (see IDLE_ITEM_S).
        self.solo_rate = SliceRate(session.plan.model)
        self.idle_grow_to: dict[int, int] = {}  # rid -> its idle cap's bound
        self.busy_s: dict[int, float] = {}  # rank -> compute seconds so far
        self._thread: threading.Thread | None = None

    # -- from the session's callers ------------------------------------------------------------
    def submit(self, rid: int, stream, request, *, eos: tuple[int, ...]) -> None:
        """Called with the session's lock held."""
        if len(request.prompt_ids) != 1:
            raise PromptShapeError(f"an interleaved session takes one prompt per request, got "
                                   f"{len(request.prompt_ids)} rows; submit them separately")
        prompt = tuple(request.prompt_ids[0])
        if request.max_new_tokens == 0:
            stream._end(Finished(rid, None, ("length",), ((),)))
            return
        try:
            self.sched.add(rid, prompt, max_new_tokens=request.max_new_tokens, eos=eos,
                           stop_at_eos=request.stop_at_eos)
        except ValueError:
            need = len(prompt) + request.max_new_tokens - 1
            raise CapacityError(
                f"the prompt ({len(prompt)} tokens) and max_new_tokens "
                f"({request.max_new_tokens}) need {need} KV-cache positions on every stage, "
                f"but the stages hold at most {self.sched.kv_token_budget} beside their weights "
                "(the tightest device of the plan); shorten the prompt or ask for fewer tokens"
            ) from None
        self.reqs[rid] = _Req(stream, request, prompt, frozenset(eos))

    def cancel(self, rid: int) -> bool:
        """Called with the session's lock held."""
        req = self.reqs.get(rid)
        if req is None or req.ended or not self.sched.cancel(rid):
            return False
        self._end(rid, Finished(rid, None, ("cancelled",), (tuple(req.output),),
                                cached_tokens=self._cached(rid)))
        return True

    # -- the driver thread ---------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._drive, name="hpipe-session-items",
                                        daemon=True)
        self._thread.start()

    def _drive(self) -> None:
        """Send what the scheduler decides, whenever a request arrives or an item returns."""
        s = self.session
        while True:
            with s._cond:
                while True:
                    if s.state not in ("loading", "ready"):
                        return
                    cmds = self._decide() if s.state == "ready" else []
                    if cmds:
                        break
                    s._cond.wait()
            for cmd in cmds:
                s._pool.send_all(cmd)

    def _decide(self) -> list[tuple]:
        cmds: list[tuple] = [("release", rid) for rid in self.sched.releasable()]
        for got in self.sched.admit():
            if not isinstance(got, Admitted):
                cmds.append(("evict", got.key))
                continue
            r = self.reqs[got.rid].request
            room = len(self.reqs[got.rid].prompt) + max(0, r.max_new_tokens - 1)
            cmds.append(("admit", got.rid, room, r.temperature, r.top_p, r.seed, got.source,
                         got.cached))
        while (item := self.sched.next_item()) is not None:
            cmds += [("evict", key) for key in self.sched.take_evicted()]
            cmds.append(("item", item))
        return cmds

    def _cached(self, rid: int) -> int:
        live = self.sched.live.get(rid)
        return live.cached if live is not None else 0

    # -- from the workers (the supervisor's thread) --------------------------------------------
    def on_message(self, msg: tuple) -> bool:
        """Handle an interleaved-mode message; False when it is not one."""
        s = self.session
        if msg[0] == "busy":
            self.busy_s[msg[1]] = msg[2]
            return True
        if msg[0] != "sampled":
            return False
        _, index, tokens, compute_s = msg
        with s._cond:
            item = self.sched.in_flight.get(index)
            if item is None:
                return True
            piece = item.prefill
            self._measure(item, compute_s)
            got = self.sched.on_sampled(index, tokens)
            if piece is not None and piece.rid in self.reqs:
                req = self.reqs[piece.rid]
                req.slices_done += 1
                live = self.sched.live.get(piece.rid)
                if not req.ended and live is not None:
                    total = max(req.slices_done, len(live.slices))  # cut slices make more
                    req.stream._push(Progress(piece.rid, "prefill", req.slices_done, total))
            for g in got:
                req = self.reqs.get(g.rid)
                if req is None or req.ended:
                    continue
                req.stream._push(Tokens(g.rid, (g.token,)))
                if not (g.finished == "stop" and g.token in req.eos):
                    req.output.append(g.token)
                if g.finished is not None:
                    self._end(g.rid, Finished(g.rid, None, (g.finished,), (tuple(req.output),),
                                              cached_tokens=self._cached(g.rid)))
            s._cond.notify_all()
        return True

    def _measure(self, item, compute_s: float) -> None:
        """Learn, from the last stage's compute, a decode step's time and the prefill rate;
        the slice cap follows them (see [Note: slices that fit a decode step]).

        [Note: learning a fused slice's cost] A slice and the decode rows run in one forward,
        which reads the weights once for both ([Note: a slice and decode rows in one forward]),
        so what a slice costs the running streams is the item's time beyond a decode-only
        item's. A short slice's extra is almost nothing: its tokens ride along in matmuls whose
        time is the weight read (SmolLM2, 15 layers: 8 tokens at no prefix added 5%, 32 added
        47%). A rate learned there would let the next slice be ten times too long, and a
        stream wait three decode steps (measured). So the rate is learned only from slices
        whose extra is a fair share of a step, and until then, and at most, each cap is twice
        the last slice measured: slices grow from the floor as TCP's window does, and the
        rate is always learned near the size it is used for. The doubling is per prompt, so
        each prompt's slices grow from 32 tokens at its own prefixes, and the rates are those
        of hpipe/slice_rate.py ([Note: two rates, not one]).
        """
        piece = item.prefill
        if piece is not None and not item.decode and compute_s > 0:
            self.solo_rate.learn(len(piece.ids), piece.prefix, compute_s)
            if piece.rid in self.reqs:
                self.idle_grow_to[piece.rid] = max(START_IDLE_TOKENS, 2 * len(piece.ids))
        if piece is None:
            if item.decode and compute_s > 0:
                self.step_s = _ewma(self.step_s, compute_s)
        elif self.step_s is not None:
            extra_s = compute_s - self.step_s
            if extra_s >= INFORMATIVE_SHARE * self.step_s:
                self.slice_rate.learn(len(piece.ids), piece.prefix, extra_s)
            if piece.rid in self.reqs:  # (one that ended is forgotten, in _end)
                self.grow_to[piece.rid] = max(START_SLICE_TOKENS, 2 * len(piece.ids))

    def _slice_cap(self, rid: int, prefix: int) -> int:
        """The scheduler's ``slice_cap``: the most prompt tokens of request ``rid`` an item may
        carry at ``prefix`` while others decode (see [Note: slice cost grows with the prefix])."""
        tokens = self.grow_to.get(rid, START_SLICE_TOKENS)
        if self.step_s is not None and self.slice_rate.learned:
            tokens = min(tokens, self.slice_rate.tokens_within(SLICE_FACTOR * self.step_s,
                                                               prefix))
        return int(min(MAX_SLICE_TOKENS, max(MIN_SLICE_TOKENS, tokens)))

    def _idle_cap(self, rid: int, prefix: int) -> int:
        """The scheduler's ``idle_cap``: the most prompt tokens of request ``rid`` an item may
        carry at ``prefix`` while nobody decodes (see IDLE_ITEM_S)."""
        tokens = self.idle_grow_to.get(rid, START_IDLE_TOKENS)
        if self.solo_rate.learned:
            tokens = min(tokens, self.solo_rate.tokens_within(IDLE_ITEM_S, prefix))
        return int(max(MIN_SLICE_TOKENS, tokens))

    def _end(self, rid: int, final) -> None:
        req = self.reqs.pop(rid, None)
        self.grow_to.pop(rid, None)
        self.idle_grow_to.pop(rid, None)
        if req is not None and not req.ended:
            req.ended = True
            req.stream._end(final)

    def fail_all(self, error: Exception) -> list:
        """The session broke: every request still known ends with ``error``."""
        streams = [r.stream for r in self.reqs.values() if not r.ended]
        self.reqs.clear()
        return streams
