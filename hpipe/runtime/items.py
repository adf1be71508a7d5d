"""A rank's side of the serving scheduler (hpipe/interleave.py): a KV cache per admitted
request, and items run in the order they arrive.

An item is at most one prefill slice of one request plus one decode row per running request
(see [Note: interleaving slices with decode steps]). Each stage computes the slice on that
request's cache and the rows as one batch over their own caches (``Stage.forward_rows``),
then sends both on; the last stage samples, per request with its own sampler, the token after
a final slice and after every decode row, and reports them to the supervisor, which feeds them
back in the next items. Messages carry unit numbers 2 * index (the slice) and 2 * index + 1
(the rows), checked on arrival like every other transfer.

Kept prefixes (hpipe/prefix_cache.py) live here too, by key: an admission may start a
request's cache as a copy of one, and an item with ``keep_as`` snapshots its prefill
request's cache after computing it.
"""

from __future__ import annotations

import time
from collections import deque

import torch

from hpipe.emulation import emulated_sleep_s
from hpipe.model.kv_cache import RowCaches
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
        with torch.inference_mode():
            xp = xd = None
            if self.s == 0:
                if piece is not None:
                    xp = torch.tensor([piece.ids], dtype=torch.int64, device=self.device)
                if rows:
                    xd = torch.tensor([[r.token] for r in rows], dtype=torch.int64,
                                      device=self.device)
            else:
                if piece is not None:
                    xp = self._recv(2 * item.index, (1, len(piece.ids), self.hidden))
                if rows:
                    xd = self._recv(2 * item.index + 1, (len(rows), 1, self.hidden))
            start, cpu0 = time.perf_counter(), time.process_time()
            op = od = None
            if piece is not None:
                op = self.stage(xp, self.caches[piece.rid], last_only=self.samples)
            split = time.perf_counter()
            if rows:
                od = self.stage.forward_rows(xd, RowCaches([self.caches[r.rid] for r in rows]),
                                             last_only=self.samples)
            computed = time.perf_counter()
            self._emulate(start, cpu0)
            end = time.perf_counter()
            # The slice's and the rows' compute, for the scheduler's slice sizes; an emulated
            # slowdown stretches both alike.
            stretch = (end - start) / max(1e-9, computed - start)
            piece_s, rows_s = (split - start) * stretch, (computed - split) * stretch
            self.busy_s += end - start
            if item.keep_as is not None:
                cache = self.caches[piece.rid]
                self.prefixes[item.keep_as] = cache.snapshot(cache.length)
        if self.s < self.last and self.leader:
            for unit, out in ((2 * item.index, op), (2 * item.index + 1, od)):
                if out is not None:
                    self.sends.append(self.link.isend(out, dst=self.s + 1, unit=unit))
            while len(self.sends) > KEEP_SENDS:
                self.sends.popleft().join()
        if self.samples:
            tokens = {}
            if piece is not None and piece.last:
                tokens[piece.rid] = self._sample(piece.rid, op[:, -1])
            for i, r in enumerate(rows):
                tokens[r.rid] = self._sample(r.rid, od[i:i + 1, -1])
            self.emit(("sampled", item.index, tokens, piece_s, rows_s))
        if time.monotonic() - self.reported_at >= BUSY_REPORT_S:
            self.reported_at = time.monotonic()
            self.emit(("busy", self.rank, self.busy_s))

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
