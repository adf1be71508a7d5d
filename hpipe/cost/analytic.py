"""The analytic roofline cost model: spec-sheet figures, no measurements.

Per transformer layer, for ``b`` rows of ``s`` new tokens attending to ``p`` cached ones:

    FLOPs = 2*b*s*P_layer + 4*b*h*s*(p + s/2)

The first term is the matmuls (2 FLOPs per weight per token: Kaplan et al. 2020, "Scaling
Laws", Table 1; nanoGPT's ``estimate_mfu`` uses the same count). The second is Q K^T and A V:
2*h FLOPs each per (query, key) pair, and query i of the slice sees p + i keys, p + s/2 on
average under the causal mask. Time is the roofline max of

    FLOPs / (peak * eff(b*s))     and     (weights + KV read + KV written) / (bandwidth * MEM_EFF)

[Note: decode is read-bound] A decode step feeds one token per row: each weight is read once
for only ``batch`` multiply-adds, so the step takes about

    max((weights + KV cache read) / (bandwidth * MEM_EFF),  FLOPs / (peak * EFF_MAX))

(gpt-fast's "memory bandwidth achieved" argument). The under-fill curve below is not applied:
a one-row GEMV is slow because it streams the weights, which the first term already counts;
charging it as a one-row tile as well made LLaMA-7B's decode step on the paper cluster 111 ms
instead of about 25 ms.

[Note: achievable FLOP/s] ``eff(rows) = EFF_MAX * rows / (rows + HALF_ROWS)``: a GEMM with few
rows (rows = b*s, the M of every projection) fills few tiles of the tensor/SIMT cores and spends
its time loading weights, so small slices under-use a GPU. This is what stops the slicing DP
from cutting the prompt into one-token slices, and why the paper's ablation finds too-fine
slicing slow.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from hpipe.cluster import ClusterSpec, DeviceSpec
from hpipe.cost.memory import context_bytes, kv_bytes, weight_bytes, workspace_bytes
from hpipe.spec import ModelSpec, dtype_bytes

# Large fp16 GEMMs in cuBLAS reach 70-85% of the spec-sheet peak (P100 HGEMM, Ampere tensor
# cores with fp32 accumulate); a whole layer with its norms, rotary and softmax kernels does a
# little worse, so 0.7 is a deliberately middle-of-the-road figure, not a fit to the paper.
EFF_MAX = 0.7
# Rows at which a GEMM reaches half of EFF_MAX: 128 is the M of one cuBLAS/CUTLASS tile, below
# which tiles go partly empty. A CPU core saturates its FMA units with a few rows.
HALF_ROWS_GPU = 128
HALF_ROWS_CPU = 8
# Streaming kernels reach ~80% of the spec-sheet memory bandwidth (STREAM-like copies).
MEM_EFF = 0.8


@dataclass(frozen=True)
class AnalyticCost:
    """CostModel from spec-sheet figures for one (model, cluster, dtype)."""

    model: ModelSpec
    cluster: ClusterSpec
    dtype: str = "float16"
    # The attention kernel whose workspace memory counts (hpipe/cost/memory.py): "sdpa", what
    # hpipe's runtime runs, or "eager", what the paper's systems ran.
    attention: str = "sdpa"
    # Per-instance memo of the per-layer time: planners ask for the same shapes many times.
    # Excluded from eq/hash/repr; it holds only values derived from the frozen fields.
    _memo: dict = field(default_factory=dict, init=False, repr=False, compare=False, hash=False)
    times_tp_groups = True  # all-reduces timed on the link figures, like any transfer

    @property
    def elem_bytes(self) -> int:
        return dtype_bytes(self.dtype)

    # -- rates -----------------------------------------------------------------------------
    def achievable_flops(self, device: DeviceSpec, rows: int) -> float:
        """FLOP/s a layer reaches on ``rows`` = batch x tokens rows (see the note above)."""
        half = HALF_ROWS_CPU if device.kind == "cpu" else HALF_ROWS_GPU
        return device.peak_flops(self.dtype) * EFF_MAX * rows / (rows + half)

    @cached_property
    def _shape(self) -> tuple[float, float, float, float]:
        """(P_layer, hidden, KV bytes per token per layer, elem bytes), read on every call."""
        m, e = self.model, self.elem_bytes
        return (float(m.params_per_layer()), float(m.hidden),
                float(m.kv_bytes_per_token_per_layer(e)), float(e))

    def layer_flops(self, *, batch: int, tokens: int, prefix: int) -> float:
        return self.model.layer_flops(batch=batch, tokens=tokens, prefix=prefix)

    def _layer_time_s(self, dev_index: int, tp: int, batch: int, tokens: int,
                      prefix: int) -> float:
        """One layer on one device holding a 1/tp share of it (no all-reduce, no slowdown)."""
        key = (dev_index, tp, batch, tokens, prefix)
        hit = self._memo.get(key)
        if hit is not None:
            return hit
        dev = self.cluster.devices[dev_index]
        params, hidden, kv_tok, e = self._shape
        compute = self.layer_flops(batch=batch, tokens=tokens, prefix=prefix) / tp
        compute /= self.achievable_flops(dev, batch * tokens)
        moved = (params * e + batch * (prefix + tokens) * kv_tok) / tp
        moved += 2 * batch * tokens * hidden * e  # read the input, write the output
        memory = moved / (dev.mem_bandwidth_bytes_s * MEM_EFF)
        t = max(compute, memory)
        self._memo[key] = t
        return t

    def _ends_time_s(self, dev: DeviceSpec, tp: int, *, batch: int, tokens: int,
                     has_embedding: bool, has_head: bool) -> float:
        """Embedding gather and (final norm + LM head on each row's last token)."""
        m, e = self.model, self.elem_bytes
        bw = dev.mem_bandwidth_bytes_s * MEM_EFF
        t = 0.0
        if has_embedding:
            t += 2 * batch * tokens * m.hidden * e / bw  # gather rows, write them
        if has_head:
            flops = 2.0 * batch * m.hidden * m.vocab_size / tp
            t += max(flops / self.achievable_flops(dev, batch),
                     m.head_params() * e / tp / bw)
        return t

    def _allreduce_time_s(self, devices: tuple[int, ...], num_bytes: float) -> float:
        """Ring all-reduce: 2(k-1)/k of the data crosses each link, in 2(k-1) steps."""
        k = len(devices)
        link = self.cluster.link(devices[0], devices[1])
        return 2 * (k - 1) * link.latency_s + 2 * (k - 1) / k * num_bytes / link.bandwidth_bytes_s

    # -- CostModel ---------------------------------------------------------------------------
    def stage_time_s(self, devices: tuple[int, ...], layer_start: int, layer_stop: int, *,
                     batch: int, tokens: int, prefix: int, has_embedding: bool,
                     has_head: bool) -> float:
        tp = len(devices)
        n = layer_stop - layer_start
        ends = has_embedding or has_head
        # A tensor-parallel group runs in lock step: the slowest member sets the pace.
        compute = 0.0
        for d in devices:
            dev = self.cluster.devices[d]
            t = n * self._layer_time_s(d, tp, batch, tokens, prefix)
            if ends:
                t += self._ends_time_s(dev, tp, batch=batch, tokens=tokens,
                                       has_embedding=has_embedding, has_head=has_head)
            compute = max(compute, t * dev.slowdown)  # slowdown: an emulated slower device
        if tp > 1:
            # Megatron-LM: one all-reduce after attention, one after the MLP, per layer.
            compute += 2 * n * self._allreduce_time_s(
                devices, batch * tokens * self.model.hidden * self.elem_bytes)
        return compute

    def stage_times_many_s(self, devices: tuple[int, ...], layer_start: int, layer_stop: int,
                           *, batch: int, tokens: np.ndarray, prefix: int | np.ndarray,
                           has_embedding: bool, has_head: bool) -> np.ndarray:
        """``stage_time_s`` for many slice lengths at once (same formulas, numpy), at one prefix
        or one prefix per length.

        An optional fast path the slicing DP uses when a cost model offers it: the tau grid
        is O(Q^2) cells, too many for one Python call each on long prompts.
        """
        tokens = np.asarray(tokens, dtype=float)
        tp = len(devices)
        n = layer_stop - layer_start
        params, hidden, kv_tok, e = self._shape
        flops = (2.0 * batch * tokens * params
                 + 4.0 * batch * hidden * tokens * (prefix + tokens / 2.0)) / tp
        moved = (params * e + batch * (prefix + tokens) * kv_tok) / tp
        moved = moved + 2 * batch * tokens * hidden * e
        out = np.zeros_like(tokens)
        for d in devices:
            dev = self.cluster.devices[d]
            rate = self.achievable_flops(dev, batch * tokens)
            t = n * np.maximum(flops / rate, moved / (dev.mem_bandwidth_bytes_s * MEM_EFF))
            if has_embedding:
                t = t + 2 * batch * tokens * hidden * e / (dev.mem_bandwidth_bytes_s * MEM_EFF)
            if has_head:
                t = t + self._ends_time_s(dev, tp, batch=batch, tokens=1, has_embedding=False,
                                          has_head=True)
            out = np.maximum(out, t * dev.slowdown)
        if tp > 1:
            out = out + 2 * n * self._allreduce_time_s(devices, batch * tokens * hidden * e)
        return out

    def decode_time_s(self, devices: tuple[int, ...], layer_start: int, layer_stop: int, *,
                      batch: int, context: int, has_embedding: bool, has_head: bool) -> float:
        """One decode step (see [Note: decode is read-bound])."""
        tp = len(devices)
        n = layer_stop - layer_start
        m = self.model
        params, hidden, kv_tok, e = self._shape
        read = n * (params * e + batch * (context + 1) * kv_tok) / tp
        flops = n * self.layer_flops(batch=batch, tokens=1, prefix=context) / tp
        if has_embedding:
            read += 2 * batch * hidden * e
        if has_head:
            read += m.head_params() * e / tp
            flops += 2.0 * batch * hidden * m.vocab_size / tp
        step = 0.0
        for d in devices:  # a TP group runs in lock step: the slowest member sets the pace
            dev = self.cluster.devices[d]
            t = max(read / (dev.mem_bandwidth_bytes_s * MEM_EFF),
                    flops / (dev.peak_flops(self.dtype) * EFF_MAX))
            step = max(step, t * dev.slowdown)
        if tp > 1:
            step += 2 * n * self._allreduce_time_s(devices, batch * hidden * e)
        return step

    def transfer_time_s(self, src: int, dst: int, num_bytes: float) -> float:
        link = self._memo.get(("link", src, dst))
        if link is None:
            link = self._memo[("link", src, dst)] = self.cluster.link(src, dst)
        return link.latency_s + num_bytes / link.bandwidth_bytes_s

    def stage_memory_parts(self, devices: tuple[int, ...], layer_start: int, layer_stop: int,
                           *, batch: int, seq_len: int, has_embedding: bool, has_head: bool
                           ) -> tuple[int, tuple | None]:
        """``stage_memory_bytes`` in two parts: the bytes that do not depend on the unit
        (context, weights, KV cache) and a key for the unit's workspace (None: the stage holds
        nothing to work on), which ``unit_workspace_bytes`` prices. An optional fast path: the
        slicing DP asks "does this slice fit" thousands of times, and the workspace is the same
        on every stage with the same key."""
        tp = len(devices)
        n = layer_stop - layer_start
        e = self.elem_bytes
        static = (weight_bytes(self.model, num_layers=n, has_embedding=has_embedding,
                               has_head=has_head, elem_bytes=e)
                  + kv_bytes(self.model, num_layers=n, batch=batch, seq_len=seq_len,
                             elem_bytes=e)) // tp
        # Worst member of the group: the context differs between CPU and GPU members.
        ctx = max(context_bytes(self.cluster.devices[d]) for d in devices)
        key = (tp, has_head) if n > 0 or has_head or has_embedding else None
        return ctx + static, key

    def memory_class(self, devices: tuple[int, ...]) -> tuple:
        """Groups with the same class have the same ``stage_memory_parts`` for every block:
        it reads the group only through its size and its largest context. The workload DP's
        memory limits are then worked out once per class, not once per device."""
        return len(devices), max(context_bytes(self.cluster.devices[d]) for d in devices)

    def unit_workspace_bytes(self, key: tuple, rows: int, tokens: int, prefix: int) -> int:
        tp, has_head = key
        return workspace_bytes(self.model, rows=rows, tokens=tokens, prefix=prefix,
                               elem_bytes=self.elem_bytes, tp=tp, has_head=has_head,
                               attention=self.attention)

    def stage_memory_bytes(self, devices: tuple[int, ...], layer_start: int, layer_stop: int,
                           *, batch: int, seq_len: int, units: tuple[tuple[int, int, int], ...],
                           has_embedding: bool, has_head: bool) -> int:
        fixed, key = self.stage_memory_parts(devices, layer_start, layer_stop, batch=batch,
                                             seq_len=seq_len, has_embedding=has_embedding,
                                             has_head=has_head)
        if key is None:
            return fixed
        return fixed + max((self.unit_workspace_bytes(key, r, t, p) for r, t, p in units),
                           default=0)


__all__ = ["AnalyticCost", "EFF_MAX", "HALF_ROWS_CPU", "HALF_ROWS_GPU", "MEM_EFF"]
