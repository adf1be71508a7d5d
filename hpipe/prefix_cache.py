"""Which prompts' KV caches the stages keep for later requests. Pure: keys and token tuples; the
workers hold the tensors under the same keys (hpipe/runtime/items.py).

[Note: prefix reuse] The K and V a stage computes at position i depend only on tokens [0, i].
So a new prompt that starts like a kept one can take the kept cache's first L positions, L the
length of their common prefix, and prefill only the rest: the same document with a new
question prefills the question alone. The answer is the one the whole prompt gives (the same
numbers, computed in different slices).

What is kept: a prompt's cache is kept as soon as its prefill ends, if at least
``MIN_NEW_TOKENS`` of it were new. A kept prompt that the new one extends (a conversation's
next turn) is dropped, since the new entry answers every lookup it answered. A prompt that
diverges inside a kept one (another question about the same document) is not kept: it would
duplicate the document for a few tokens of question.

Memory: kept entries share the scheduler's KV budget with running requests; the least recently
used go first when a request or a new entry needs room. A stage keeps an entry in the memory of
the request it came from (no copy), so an entry holds that request's room: its prompt and its
new tokens (``held``).
"""

from __future__ import annotations

import itertools
import os
from collections import OrderedDict

MIN_REUSE_TOKENS = 32  # a shorter common prefix is prefilled again (the copy is not worth it)
MIN_NEW_TOKENS = 64  # a prompt is kept only if this many of its tokens were new


class PrefixCache:
    def __init__(self) -> None:
        self.entries: OrderedDict[int, tuple[int, ...]] = OrderedDict()  # LRU first
        self.held: dict[int, int] = {}  # key -> KV positions its memory holds
        self._keys = itertools.count(1)
        self.queried_tokens = 0  # prompt tokens looked up, and found: for /metrics
        self.hit_tokens = 0

    @property
    def held_tokens(self) -> int:
        return sum(self.held.values())

    def lookup(self, prompt: tuple[int, ...]) -> tuple[int | None, int]:
        """The entry sharing the longest prefix with ``prompt`` and that length, at most
        len(prompt) - 1 (the last token is computed again: its logits give the first new
        token); (None, 0) under ``MIN_REUSE_TOKENS``. Marks the entry used."""
        best_key, best = None, 0
        for key, tokens in self.entries.items():
            n = len(os.path.commonprefix([tokens, prompt]))
            if n > best:
                best_key, best = key, n
        best = min(best, len(prompt) - 1)
        if best < MIN_REUSE_TOKENS:
            return None, 0
        self.entries.move_to_end(best_key)
        return best_key, best

    def record(self, prompt_tokens: int, cached: int) -> None:
        """A request was admitted with ``cached`` of its ``prompt_tokens`` reused."""
        self.queried_tokens += prompt_tokens
        self.hit_tokens += cached

    def should_keep(self, prompt: tuple[int, ...], cached: int) -> bool:
        return len(prompt) - cached >= MIN_NEW_TOKENS

    def superseded(self, prompt: tuple[int, ...]) -> list[int]:
        """Entries that are a prefix of ``prompt`` (keeping ``prompt`` makes them useless)."""
        return [k for k, t in self.entries.items()
                if len(t) <= len(prompt) and prompt[:len(t)] == t]

    def add(self, prompt: tuple[int, ...], *, held: int | None = None) -> int:
        """Keep ``prompt``; ``held``: the KV positions its memory holds (default its length)."""
        key = next(self._keys)
        self.entries[key] = tuple(prompt)
        self.held[key] = len(prompt) if held is None else held
        assert self.held[key] >= len(prompt), (self.held[key], len(prompt))
        return key

    def remove(self, key: int) -> None:
        del self.entries[key]
        del self.held[key]

    def least_recent(self, *, keep: int | None = None) -> int | None:
        """The entry to evict next (never ``keep``), or None."""
        return next((k for k in self.entries if k != keep), None)
