"""The serving scheduler: which work goes through the pipeline next. Pure: no workers, no
clocks; the Session feeds it requests and sampled tokens and sends what it decides.

[Note: interleaving slices with decode steps] The unit of work is an *item*: the decode step of
every running request whose last token has come back, plus at most one prefill slice of one
waiting prompt. Slices come from the plan's slicing for that prompt length (``Plan.slices_for``:
longer first, shorter later), so a long prompt delays the running streams by about one slice
per item, never by its whole prefill. Up to ``depth`` items are in flight at once (the number
of stages: each stage works on a different item, as in a pipeline of micro-batches), and the
decoding requests are split over them, at most 1 / ``depth`` of them per item. A request
appears in at most one in-flight item as a decode row (its next token needs the previous one),
while one prompt's slices may be in several: every stage takes items in order, so its KV cache
sees the slices in order.

[Note: slices that fit a decode step] A slice planned for latency alone (the slicing DP's)
is as long as the pipeline's fill allows, hundreds of tokens; inside an item that also carries
decode rows, its time is what every running stream waits between two tokens. So while any
request decodes, a slice is cut to ``slice_cap(rid, prefix)`` tokens (the Session measures it
as it runs: what adds about one decode step to the last stage's item, hpipe/session_items.py), and
the planned slices resume when nobody decodes.

[Note: a slice bounds the next arrival's wait] An item cannot be cut short once sent, so a
request that arrives while the pipeline is busy waits for the items in flight. The planned
slicing is for latency alone and may be one slice: on one worker the slicing DP gains nothing
from slices, and a 7000-token document on local:1 went in as one 57 s item, during which every
chat that arrived waited (the slowest chat's first token in the mixed serving load: 57 s). So
while nobody decodes, slices are cut to ``idle_cap(rid, prefix)`` instead (the Session keeps
them to about a second of work, hpipe/session_items.py).

[Note: short prompts first] Each item carries one slice, so the prompts being prefilled take
turns. In arrival order, a chat that comes while a long document prefills would wait for the
whole document (SmolLM2 on local:2, 2-3k-token documents among chats at 0.5/s: chats' first
token after 10 s at the median); the prompt with the fewest tokens left goes first instead, so
the chat's one or two slices go ahead and the document's first token comes that much later.
Shortest-remaining-first alone could starve a long prompt under a stream of short ones: one
passed over ``PASS_LIMIT`` items in a row gets the next slice.

Memory: a request is admitted (its KV cache allocated on every stage) only while the caches of
the admitted requests, prompt plus new tokens each, and the kept prefixes fit
``kv_token_budget``; the others wait in arrival order, and kept prefixes are evicted, least
recently used first, to make room. A request that could never fit is refused when it is
submitted.

Prefix reuse (hpipe/prefix_cache.py): when a request is admitted it takes the longest kept
prefix of its prompt (``Admitted.source``, ``cached`` tokens) and is sliced and prefilled from
there; an item whose last slice ends a prompt worth keeping says so (``Item.keep_as``), and the
stages keep that request's cache under the key after computing the item.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from hpipe.prefix_cache import PrefixCache

# A prompt passed over this many items in a row for shorter ones gets the next slice (see
# [Note: short prompts first]).
PASS_LIMIT = 8


@dataclass(frozen=True)
class PrefillPiece:
    """Prompt tokens [prefix, prefix + len(ids)) of request ``rid``; ``last``: its final slice
    (the last stage samples the first token after it)."""

    rid: int
    prefix: int
    ids: tuple[int, ...]
    last: bool


@dataclass(frozen=True)
class DecodeRow:
    """Request ``rid`` feeds back ``token`` (sampled after the previous item) at ``position``."""

    rid: int
    token: int
    position: int


@dataclass(frozen=True)
class Item:
    """One pass through the pipeline. ``keep_as``: after computing it, each stage keeps the
    prefill request's cache of its whole prompt as prefix ``keep_as``."""

    index: int
    prefill: PrefillPiece | None
    decode: tuple[DecodeRow, ...]
    keep_as: int | None = None

    @property
    def rids(self) -> tuple[int, ...]:
        return ((self.prefill.rid,) if self.prefill else ()) + tuple(r.rid for r in self.decode)

    @property
    def num_tokens(self) -> int:
        return (len(self.prefill.ids) if self.prefill else 0) + len(self.decode)


@dataclass
class _Live:
    """A request the scheduler knows: waiting for admission, prefilling, or decoding."""

    rid: int
    prompt: tuple[int, ...]
    max_new_tokens: int
    eos: frozenset[int]
    stop_at_eos: bool = True
    slices: tuple[int, ...] = ()  # of the tokens after the cached prefix, set when admitted
    cached: int = 0  # prompt tokens taken from a kept prefix
    next_slice: int = 0
    prefilled: int = 0  # prompt tokens handed out in items
    generated: list[int] = field(default_factory=list)
    passed: int = 0  # items in a row whose slice went to a shorter prompt
    in_flight: bool = False  # its decode row, or its last slice, is in the pipeline
    done: bool = False

    @property
    def room_tokens(self) -> int:
        """KV positions the request needs on every stage: the prompt and every token fed back."""
        return len(self.prompt) + max(0, self.max_new_tokens - 1)

    @property
    def decoding(self) -> bool:
        return self.prefilled == len(self.prompt) and not self.done

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.prompt) and not self.done


@dataclass(frozen=True)
class Admitted:
    """Request ``rid`` gets its caches, the first ``cached`` positions copied from kept prefix
    ``source`` (None: nothing reused)."""

    rid: int
    source: int | None
    cached: int


@dataclass(frozen=True)
class Evicted:
    """Kept prefix ``key`` is dropped."""

    key: int


@dataclass(frozen=True)
class Sampled:
    """What one finished item gave a request: its new token, and whether it is done (and why:
    "stop" at end of sequence, "length" at max_new_tokens)."""

    rid: int
    token: int
    finished: str | None


class Interleaver:
    def __init__(self, *, depth: int, kv_token_budget: int,
                 slicing: Callable[[int], tuple[int, ...]] = lambda n: (n,),
                 slice_cap: Callable[[int, int], int] | None = None,
                 idle_cap: Callable[[int, int], int] | None = None,
                 prefixes: PrefixCache | None = None) -> None:
        assert depth >= 1 and kv_token_budget >= 1, (depth, kv_token_budget)
        self.depth = depth
        self.kv_token_budget = kv_token_budget
        self.slicing = slicing  # prompt tokens to prefill -> the plan's slices for them
        self.prefixes = prefixes  # None: no prefix reuse
        self.evicted: list[int] = []  # Evicted keys decided in next_item, for the caller
        # slice_cap(rid, prefix): the most prompt tokens of request rid an item may carry at
        # that prefix while other requests decode (see [Note: slices that fit a decode step]);
        # None: no cap.
        self.slice_cap = slice_cap
        # idle_cap(rid, prefix): the same while nobody decodes (see [Note: a slice bounds the
        # next arrival's wait]); None: the planned slices.
        self.idle_cap = idle_cap
        self.waiting: deque[_Live] = deque()  # not admitted yet, in arrival order
        self.live: dict[int, _Live] = {}  # admitted, in admission order
        self.in_flight: dict[int, Item] = {}
        self._next_index = 0

    # -- requests ----------------------------------------------------------------------------
    def add(self, rid: int, prompt: tuple[int, ...], *, max_new_tokens: int,
            eos: tuple[int, ...] = (), stop_at_eos: bool = True,
            slices: tuple[int, ...] | None = None) -> None:
        """Queue a request. ``slices``: its own slicing when nothing is reused (default: the
        scheduler's ``slicing``)."""
        assert prompt, "an empty prompt"
        assert slices is None or sum(slices) == len(prompt), (slices, len(prompt))
        req = _Live(rid, tuple(prompt), max_new_tokens, frozenset(eos), stop_at_eos,
                    slices=tuple(slices or ()))
        if req.room_tokens > self.kv_token_budget:
            raise ValueError(f"request {rid} needs {req.room_tokens} KV positions, more than "
                             f"the budget of {self.kv_token_budget}")
        self.waiting.append(req)

    def cancel(self, rid: int) -> bool:
        """Forget a request: at once if it waits or nothing of it is in flight; otherwise its
        in-flight work finishes and is dropped. True if it was known."""
        for req in self.waiting:
            if req.rid == rid:
                self.waiting.remove(req)
                return True
        req = self.live.get(rid)
        if req is None:
            return False
        req.done = True
        return True

    def _free_tokens(self) -> int:
        held = self.prefixes.held_tokens if self.prefixes is not None else 0
        return self.kv_token_budget - held - sum(r.room_tokens for r in self.live.values())

    def _evict_until(self, need: int, *, keep: int | None = None) -> list[int]:
        """Evict kept prefixes, least recent first and never ``keep``, until ``need`` tokens
        are free or none is left to evict."""
        out = []
        while self.prefixes is not None and self._free_tokens() < need:
            key = self.prefixes.least_recent(keep=keep)
            if key is None:
                break
            self.prefixes.remove(key)
            out.append(key)
        return out

    def admit(self) -> list[Admitted | Evicted]:
        """Admit waiting requests, in order, while their caches fit the budget (evicting kept
        prefixes for them). Send the decisions in the order given: an admission copies from
        its source before any later eviction."""
        out: list[Admitted | Evicted] = []
        while self.waiting:
            req = self.waiting[0]
            source, cached = (self.prefixes.lookup(req.prompt) if self.prefixes is not None
                              else (None, 0))
            out += [Evicted(k) for k in self._evict_until(req.room_tokens, keep=source)]
            if self._free_tokens() < req.room_tokens and source is not None:
                out += [Evicted(k) for k in self._evict_until(req.room_tokens)]
                source, cached = None, 0  # its own source had to go too
            if self._free_tokens() < req.room_tokens:
                break
            self.waiting.popleft()
            if self.prefixes is not None:
                self.prefixes.record(len(req.prompt), cached)
            req.cached = req.prefilled = cached
            if cached or not req.slices:
                req.slices = tuple(self.slicing(len(req.prompt) - cached))
            assert sum(req.slices) == len(req.prompt) - cached and all(s > 0 for s in req.slices)
            self.live[req.rid] = req
            out.append(Admitted(req.rid, source, cached))
        return out

    def releasable(self) -> list[int]:
        """Finished requests with nothing in flight: their caches may be freed (and are
        forgotten here)."""
        out = [rid for rid, r in self.live.items() if r.done and not self._mentioned(rid)]
        for rid in out:
            del self.live[rid]
        return out

    def _mentioned(self, rid: int) -> bool:
        return any(rid in item.rids for item in self.in_flight.values())

    # -- items -------------------------------------------------------------------------------
    def next_item(self) -> Item | None:
        """The next item to send, or None (the pipeline is full, or there is nothing to do)."""
        if len(self.in_flight) >= self.depth:
            return None
        # The decoding requests split into `depth` groups, one per item in flight, so that
        # while one group is on the last stage the next is on the first (micro-batches).
        decoding = [r for r in self.live.values() if r.decoding and r.generated]
        per_item = -(-len(decoding) // self.depth)
        rows = tuple(DecodeRow(r.rid, r.generated[-1], len(r.prompt) + len(r.generated) - 1)
                     for r in decoding if not r.in_flight)[:per_item]
        piece = None
        others_decode = any(r.decoding for r in self.live.values())
        prefilling = [r for r in self.live.values() if r.prefilling]
        if prefilling:
            r = self._prefill_turn(prefilling)
            # The rest of the planned slice, cut to the cap: slice_cap while other streams
            # decode, idle_cap while none does.
            done_in_plan = r.cached + sum(r.slices[:r.next_slice])
            n = done_in_plan + r.slices[r.next_slice] - r.prefilled
            cap_of = self.slice_cap if others_decode else self.idle_cap
            if cap_of is not None:
                cap = max(1, cap_of(r.rid, r.prefilled))
                # A tail under half a cap rides along: a 35-token chat in one piece, not 32 + 3
                # (each extra item costs every stage a pass and the scheduler a round trip).
                if n > cap + cap // 2:
                    n = cap
            if r.prefilled + n == done_in_plan + r.slices[r.next_slice]:
                r.next_slice += 1
            last = r.prefilled + n == len(r.prompt)
            piece = PrefillPiece(r.rid, r.prefilled, r.prompt[r.prefilled:r.prefilled + n], last)
            r.prefilled += n
            r.in_flight = r.in_flight or last
        if piece is None and not rows:
            return None
        for row in rows:
            self.live[row.rid].in_flight = True
        keep_as = self._keep_key(self.live[piece.rid]) if piece is not None and piece.last else None
        item = Item(self._next_index, piece, rows, keep_as)
        self._next_index += 1
        self.in_flight[item.index] = item
        return item

    def _prefill_turn(self, prefilling: list[_Live]) -> _Live:
        """Whose prompt gets this item's slice (see [Note: short prompts first])."""
        oldest = prefilling[0]
        turn = (oldest if oldest.passed >= PASS_LIMIT
                else min(prefilling, key=lambda r: len(r.prompt) - r.prefilled))
        for r in prefilling:
            r.passed = 0 if r is turn else r.passed + 1
        return turn

    def _keep_key(self, r: _Live) -> int | None:
        """Whether the prompt ``r`` just finished prefilling is kept, and under which key (see
        [Note: prefix reuse]); the evictions it needs go to ``self.evicted``."""
        if self.prefixes is None or not self.prefixes.should_keep(r.prompt, r.cached):
            return None
        for key in self.prefixes.superseded(r.prompt):
            self.prefixes.remove(key)
            self.evicted.append(key)
        # The entry holds the request's memory (see [Note: prefix reuse]), counted beside the
        # request's own while it runs: an over-count until it ends, never an under-count.
        self.evicted += self._evict_until(r.room_tokens)
        if self._free_tokens() < r.room_tokens:
            return None
        return self.prefixes.add(r.prompt, held=r.room_tokens)

    def take_evicted(self) -> list[int]:
        out, self.evicted = self.evicted, []
        return out

    def on_sampled(self, index: int, tokens: dict[int, int]) -> list[Sampled]:
        """Item ``index`` came out of the last stage with ``tokens`` (rid -> sampled id, for
        its decode rows and a last prefill slice). Returns what each live request got."""
        item = self.in_flight.pop(index)
        out = []
        for rid in item.rids:
            if rid not in tokens:
                continue  # a prefill slice before the last
            req = self.live.get(rid)
            if req is None:
                continue
            req.in_flight = False
            if req.done:
                continue  # cancelled meanwhile: drop the token
            tok = tokens[rid]
            req.generated.append(tok)
            finished = None
            if req.stop_at_eos and tok in req.eos:
                finished = "stop"
            elif len(req.generated) >= req.max_new_tokens:
                finished = "length"
            req.done = finished is not None
            out.append(Sampled(rid, tok, finished))
        return out

    @property
    def idle(self) -> bool:
        return not self.in_flight and not self.waiting and not self.live
