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
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
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

    def snapshot(self, num_tokens: int) -> KVCache:
        """A new cache holding exactly this one's first ``num_tokens`` positions."""
        k = self.keys[0]
        out = KVCache(num_layers=len(self.keys), batch=self.batch, num_kv_heads=k.shape[1],
                      head_dim=k.shape[3], max_tokens=num_tokens, dtype=k.dtype,
                      device=k.device)
        out.copy_prefix(self, num_tokens)
        return out

    def reset(self) -> None:
        """Forget every cached token (buffers are reused, not freed)."""
        self.length = 0

    @property
    def mem_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


class RowCaches:
    """Several sequences' caches (each a KVCache of batch 1) as one decode batch: row i of the
    input is caches[i]'s next token.

    [Note: decode across requests] A server decodes many requests at once, each with its own
    cache and its own length. The projections and the MLP run on all rows in one matmul (the
    weights are read once: what makes batched decode fast); attention, which reads each
    sequence's own cache, runs row by row over that cache without copying it. Rotary and
    learned positions come from each row's own length.
    """

    def __init__(self, caches: list[KVCache]) -> None:
        assert caches and all(c.batch == 1 for c in caches), "one sequence per cache"
        self.caches = caches
        self.batch = len(caches)

    @property
    def lengths(self) -> list[int]:
        return [c.length for c in self.caches]

    def check_room(self, num_new: int) -> None:
        for c in self.caches:
            c.check_room(num_new)

    def update(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor
               ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Row i of (N, kv_heads, 1, head_dim) into caches[i]; each row's K, V so far."""
        return [c.update(layer, k_new[i:i + 1], v_new[i:i + 1])
                for i, c in enumerate(self.caches)]

    def advance(self, num_new: int) -> None:
        for c in self.caches:
            c.advance(num_new)
