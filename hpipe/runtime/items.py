"""A rank's side of the serving scheduler (hpipe/interleave.py): a KV cache per admitted
request, and items run in the order they arrive.

An item is at most one prefill slice of one request plus one decode row per running request
(see [Note: interleaving slices with decode steps]). Each stage runs the slice's tokens and the
rows' tokens as one token axis through one forward, each part attending over its own request's
cache (``Stage.forward_packed``, [Note: a slice and decode rows in one forward]), then sends the
hidden states on as one message, unit number = the item's index. The last stage samples, per
request with its own sampler, the token after a final slice and after every decode row, and
reports them to the supervisor, which feeds them back in the next items.

Kept prefixes (hpipe/prefix_cache.py) live here too, by key: an admission may start a
request's cache as a copy of one, and an item with ``keep_as`` keeps its prefill request's
cache, shared, not copied (``KVCache.share_prefix``), after computing it.
"""

from __future__ import annotations

import time
from collections import deque

import torch

from hpipe.emulation import emulated_sleep_s
from hpipe.model.kv_cache import PackedCaches
from hpipe.runtime.comm import Expected, StageLink, wire_device_for
from hpipe.runtime.request import dtype_of

BUSY_REPORT_S = 1.0  # how often a rank reports its compute seconds
KEEP_SENDS = 8  # posted sends kept before the oldest is joined (their buffers freed)


class ItemRunner:
    def __init__(self, rs, *, plan, rank: int, backend: str, data_group, emit,
                 recv_timeout_s: float) -> None:
        self.rs = rs
        self.stage = rs.module
        self.s = rs.stage_index
        self.last = plan.num_stages - 1
        self.leader = rs.member == 0
        self.samples = self.s == self.last and self.leader
        self.hidden = plan.model.hidden
        self.dtype = dtype_of(plan)
        self.device = rs.device
        self.emit = emit
        self.rank = rank
        self.link = StageLink(data_group, rank=rank, compute_device=rs.device,
                              wire_device=wire_device_for(backend),
                              recv_timeout_s=recv_timeout_s, rank_of_stage=rs.rank_of_stage)
        self.caches: dict[int, object] = {}
        self.prefixes: dict[int, object] = {}  # key -> KVCache of a kept prompt
        self.samplers: dict[int, object] = {}
        self.sends: deque = deque()
        self.busy_s = 0.0
        self.reported_at = time.monotonic()

    def admit(self, rid: int, *, room_tokens: int, temperature: float, top_p: float,
              seed: int, source: int | None = None, cached: int = 0) -> None:
        cache = self.stage.new_cache(batch=1, max_tokens=room_tokens)
        if source is not None:
            cache.copy_prefix(self.prefixes[source], cached)
        self.caches[rid] = cache
        if self.samples:
            from hpipe.model.generate import Sampler

            self.samplers[rid] = Sampler(temperature=temperature, top_p=top_p, seed=seed)

    def release(self, rid: int) -> None:
        self.caches.pop(rid, None)
        self.samplers.pop(rid, None)

    def evict(self, key: int) -> None:
        self.prefixes.pop(key, None)

    def run(self, item) -> None:
        piece, rows = item.prefill, item.decode
        caches = PackedCaches([self.caches[r.rid] for r in rows],
                              piece=None if piece is None else self.caches[piece.rid],
                              piece_tokens=0 if piece is None else len(piece.ids))
        with torch.inference_mode():
            if self.s == 0:
                ids = (piece.ids if piece is not None else ()) + tuple(r.token for r in rows)
                x = torch.tensor([ids], dtype=torch.int64, device=self.device)
            else:
                x = self._recv(item.index, (1, caches.num_tokens, self.hidden))
            start, cpu0 = time.perf_counter(), time.process_time()
            out = self.stage.forward_packed(
                x, caches, piece_logits=self.samples and piece is not None and piece.last)
            self._emulate(start, cpu0)
            compute_s = time.perf_counter() - start
            self.busy_s += compute_s
        if self.s < self.last and self.leader:
            self.sends.append(self.link.isend(out, dst=self.s + 1, unit=item.index))
            while len(self.sends) > KEEP_SENDS:
                self.sends.popleft().join()
        if self.samples:
            tokens, at = {}, 0
            if piece is not None and piece.last:
                tokens[piece.rid] = self._sample(piece.rid, out[:, 0])
                at = 1
            for i, r in enumerate(rows):
                tokens[r.rid] = self._sample(r.rid, out[:, at + i])
            self.emit(("sampled", item.index, tokens, compute_s))
        if time.monotonic() - self.reported_at >= BUSY_REPORT_S:
            self.reported_at = time.monotonic()
            self.emit(("busy", self.rank, self.busy_s))
        if item.keep_as is not None:
            cache = self.caches[piece.rid]
            self.prefixes[item.keep_as] = cache.share_prefix(cache.length)

    def _recv(self, unit: int, shape: tuple[int, ...]) -> torch.Tensor:
        exp = Expected(self.s - 1, unit, shape, self.dtype)
        got = self.link.recv(exp) if self.leader else None
        if self.rs.group is not None:
            got = self.rs.group.share(got, exp)
        return got.tensor

    def _sample(self, rid: int, logits: torch.Tensor) -> int:
        return int(self.samplers[rid].next_token(logits.float().cpu())[0])

    def _emulate(self, start: float, cpu0: float) -> None:
        slowdown = self.rs.device_spec.slowdown
        if slowdown > 1.0:  # as StageRunner._compute: stretch to slowdown x this compute
            on_cuda = self.device.type == "cuda"
            time.sleep(emulated_sleep_s(
                slowdown, wall_s=time.perf_counter() - start,
                cpu_s=None if on_cuda else time.process_time() - cpu0,
                num_threads=torch.get_num_threads()))

    def drain(self) -> None:
        while self.sends:
            self.sends.popleft().join()
        self.link.close()
