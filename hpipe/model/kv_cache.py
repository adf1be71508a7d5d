"""The KV cache of one pipeline stage: keys and values of its layers, filled slice by slice.

[Note: KV cache across slices]
HPipe (and TeraPipe before it) pipelines a prompt along the token axis. A stage sees the slices
of a sequence in order; each slice must attend to every earlier token of the same sequence plus
itself, causally. So a stage keeps K and V of everything it has processed, and a new slice of T
tokens (1) writes its K, V at positions [length, length + T), (2) attends to [0, length + T) with
the causal rule "query i sees key j iff j <= length + i", and (3) gets rotary/learned positions
offset by ``length``. Decode steps are the special case T = 1. Only hidden states cross stage
boundaries; the cache never leaves its stage.
"""

from __future__ import annotations

import torch

from hpipe.errors import PromptTooLongError


class KVCache:
    """Preallocated K, V buffers for ``num_layers`` layers, each (batch, kv_heads, max_tokens, head_dim).

    ``length`` is how many positions are filled; the stage advances it once per forward, after
    all its layers wrote that slice (so every layer of a stage agrees on the offset).
    """

    def __init__(
        self,
        *,
        num_layers: int,
        batch: int,
        num_kv_heads: int,
        head_dim: int,
        max_tokens: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (batch, num_kv_heads, max_tokens, head_dim)
        # Not zeroed: only positions [0, length) are ever read, and zeroing a long prompt's
        # buffers at admission stalled every running stream (SmolLM2, 7000 tokens: 62 ms per
        # 15 layers, against nothing for torch.empty; pages are then touched as slices fill).
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.batch = batch
        self.max_tokens = max_tokens
        self.length = 0

    def check_room(self, num_new: int) -> None:
        if self.length + num_new > self.max_tokens:
            raise PromptTooLongError(
                f"KV cache holds {self.length} of {self.max_tokens} tokens and cannot take "
                f"{num_new} more; create the cache with max_tokens >= {self.length + num_new}"
            )

    def update(
        self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (B, kv_heads, T, head_dim) at [length, length + T); return K, V of [0, length + T)."""
        stop = self.length + k_new.shape[2]
        self.keys[layer][:, :, self.length : stop] = k_new
        self.values[layer][:, :, self.length : stop] = v_new
        return self.keys[layer][:, :, :stop], self.values[layer][:, :, :stop]

    def advance(self, num_new: int) -> None:
        self.length += num_new

    def copy_prefix(self, source: KVCache, num_tokens: int) -> None:
        """Take ``source``'s first ``num_tokens`` positions as this cache's own (the same
        prefix, computed once; see hpipe/prefix_cache.py). Copied, not shared: this cache then
        grows past them while the source stays as it is."""
        assert self.length == 0 and num_tokens <= min(source.length, self.max_tokens), (
            self.length, num_tokens, source.length, self.max_tokens)
        for mine, theirs in zip(self.keys + self.values, source.keys + source.values):
            mine[:, :, :num_tokens] = theirs[:, :, :num_tokens]
        self.length = num_tokens

    def share_prefix(self, num_tokens: int) -> KVCache:
        """A cache of this one's first ``num_tokens`` positions that shares its memory: no
        copy (a 7000-token SmolLM2 prompt's is 160 MB per 15 layers, about 0.1 s). It stays
        right while this cache only writes past ``num_tokens``, as a request does when it
        decodes on after the prompt kept from it; nothing rewinds a request's cache. It holds
        this cache's whole buffers, room for new tokens included, until both are dropped."""
        assert num_tokens <= self.length, (num_tokens, self.length)
        out = KVCache.__new__(KVCache)
        out.keys = [k[:, :, :num_tokens] for k in self.keys]
        out.values = [v[:, :, :num_tokens] for v in self.values]
        out.batch, out.max_tokens, out.length = self.batch, num_tokens, num_tokens
        return out

    def reset(self) -> None:
        """Forget every cached token (buffers are reused, not freed)."""
        self.length = 0

    @property
    def mem_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


class PackedCaches:
    """One forward's token axis over several sequences' caches: an optional slice of
    ``piece_tokens`` tokens of ``piece``, then one decode token of each cache in ``rows``.

    [Note: a slice and decode rows in one forward] A server runs, in one pipeline item, a
    prefill slice of one request and the next token of every running one (hpipe/interleave.py).
    Run as separate forwards, each reads every weight of the stage once: on SmolLM2 (one
    thread) an 8-token slice cost as much as two decode rows, and a late 32-token slice plus
    the rows came to about 5x a decode-only item. So they share one forward, as chunked
    prefill does in vLLM: every token goes through the projections and the MLP in one matmul
    (the weights are read once), and only attention splits the axis, each span over its own
    sequence's cache, without copying it: the slice causally after its cached prefix, each
    decode token over all of its sequence. Positions (rotary or learned) come from each
    sequence's own length.
    """

    def __init__(self, rows: list[KVCache], *, piece: KVCache | None = None,
                 piece_tokens: int = 0) -> None:
        assert all(c.batch == 1 for c in rows) and (piece is None or piece.batch == 1), (
            "one sequence per cache")
        assert (piece is None) == (piece_tokens == 0) and (rows or piece is not None)
        self.piece, self.piece_tokens, self.rows = piece, piece_tokens, rows
        self.batch = 1
        # (first, stop, cache): token span [first, stop) of the axis belongs to cache
        self.spans = ([(0, piece_tokens, piece)] if piece is not None else []) + [
            (piece_tokens + i, piece_tokens + i + 1, c) for i, c in enumerate(rows)]

    @property
    def num_tokens(self) -> int:
        return self.piece_tokens + len(self.rows)

    @property
    def positions(self) -> list[int]:
        """Each token's position in its own sequence."""
        return [c.length + j for first, stop, c in self.spans for j in range(stop - first)]

    @property
    def last_tokens(self) -> list[int]:
        """Where on the axis each sequence's last token is: the slice's, then each row."""
        return [stop - 1 for _, stop, _ in self.spans]

    def check_room(self) -> None:
        for first, stop, c in self.spans:
            c.check_room(stop - first)

    def advance(self) -> None:
        for first, stop, c in self.spans:
            c.advance(stop - first)
