"""HPipe's workload-distribution DP: contiguous layer blocks sized to each device [paper sec. 3].

    T(a, b, m) = sum_{k=a..b} t_comp(l_k; d_m) (+) t_comm(l_b, m)     (inf if it overflows d_m)
    A[b][m]    = min_{k<b} max(A[k][m-1], T(k+1, b, m))

[design] Three extensions of the paper's recurrence:
- A device may take no layers (the paper's own GPT3-2B plan nearly empties the P100 in front of
  the 1 Gbps link). The activation then goes straight from the previous busy device to the next
  one, so the link a block pays for depends on who receives next. The table is therefore
  indexed by the *receiver*: D[b][r] = least bottleneck with layers [0, b) placed on devices
  before position r, the last of them sending its output to r (transfer included).
- (+) is ``max`` when communication overlaps compute (the runtime's non-blocking sends, and the
  simulator's default: a link is then a pipeline resource of its own), ``+`` with the paper's
  accounting (the sender is busy until its transfer ends).
- Devices keep one host together; we solve once per host order (``cluster.host_orders()``).

The reference workload is the whole prefill: ``batch`` rows of ``seq_len`` tokens in one pass.
Its FLOPs equal those of any slicing (sum_i s_i (p_i + s_i/2) = L^2 / 2), so the split is
independent of the slicing chosen afterwards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from hpipe.cluster import ClusterSpec
from hpipe.cost.base import CostModel
from hpipe.plan.plan import StagePlan, dtype_bytes
from hpipe.spec import ModelSpec

INF = math.inf


@dataclass(frozen=True)
class LayerSplit:
    """Layer counts per device along ``order`` (zeros allowed) and the DP's bottleneck."""

    order: tuple[int, ...]
    counts: tuple[int, ...]
    bottleneck_s: float

    def stages(self) -> tuple[StagePlan, ...]:
        out, start = [], 0
        for dev, c in zip(self.order, self.counts):
            if c:
                out.append(StagePlan((dev,), start, start + c))
                start += c
        return tuple(out)


@dataclass(frozen=True)
class SplitCosts:
    """Everything the DP and the brute-force oracle read, computed once per device.

    - ``prefix_s[d][k]``: compute time of layers [0, k) on device d (the paper's prefix sums).
    - ``emb_s[d]`` / ``head_s[d]``: extra time when the block holds the embedding / head.
    - ``max_stop[d][a]``: the largest b such that layers [a, b) fit d's memory (a if none).
    - ``comm_s[(d, e)]``: sending one boundary activation from d to e.
    """

    num_layers: int
    prefix_s: dict
    emb_s: dict
    head_s: dict
    max_stop: dict
    comm_s: dict
    overlap_comm: bool

    def block_s(self, dev: int, a: int, b: int) -> float:
        t = self.prefix_s[dev][b] - self.prefix_s[dev][a]
        t += self.emb_s[dev] if a == 0 else 0.0
        t += self.head_s[dev] if b == self.num_layers else 0.0
        return t

    def combine(self, compute_s: float, comm_s: float) -> float:
        return max(compute_s, comm_s) if self.overlap_comm else compute_s + comm_s


def build_split_costs(
    cost: CostModel, *, model: ModelSpec, cluster: ClusterSpec, batch: int, seq_len: int,
    dtype: str, units: tuple[tuple[int, int, int], ...], overlap_comm: bool = True,
) -> SplitCosts:
    """Per-device layer times for the whole prefill and per-device memory limits.

    ``units`` are the (rows, tokens, prefix) work units whose workspace must fit (the planner
    passes the smallest slice it may use for HPipe, whole sequences for GPipe-like methods).
    """
    n = model.num_layers
    kw = dict(batch=batch, tokens=seq_len, prefix=0)
    prefix_s, emb_s, head_s = {}, {}, {}
    for d in range(cluster.num_devices):
        one = [cost.stage_time_s((d,), k, k + 1, has_embedding=False, has_head=False, **kw)
               for k in range(n)]
        prefix_s[d] = np.concatenate([[0.0], np.cumsum(one)])
        emb_s[d] = (cost.stage_time_s((d,), 0, 1, has_embedding=True, has_head=False, **kw)
                    - one[0])
        head_s[d] = (cost.stage_time_s((d,), n - 1, n, has_embedding=False, has_head=True, **kw)
                     - one[n - 1])
    max_stop = max_stops(cost, model=model, cluster=cluster, batch=batch, seq_len=seq_len,
                         units=units)
    act_bytes = batch * seq_len * model.hidden * dtype_bytes(dtype)
    comm_s = {(d, e): cost.transfer_time_s(d, e, act_bytes)
              for d in range(cluster.num_devices) for e in range(cluster.num_devices) if d != e}
    return SplitCosts(n, prefix_s, emb_s, head_s, max_stop, comm_s, overlap_comm)


def max_stops(cost: CostModel, *, model: ModelSpec, cluster: ClusterSpec, batch: int,
              seq_len: int, units: tuple[tuple[int, int, int], ...]) -> dict:
    """max_stop[d][a]: the largest b such that layers [a, b) fit device d (a if none does)."""
    n = model.num_layers
    out = {}
    for d, dev in enumerate(cluster.devices):

        def fits(a: int, b: int, d=d, cap=dev.memory_bytes) -> bool:
            return cost.stage_memory_bytes(
                (d,), a, b, batch=batch, seq_len=seq_len, units=units,
                has_embedding=a == 0, has_head=b == n) <= cap

        stops = []
        for a in range(n + 1):
            # Memory grows with the block, so binary-search the largest stop that fits.
            lo, hi = a, n  # invariant: [a, lo) fits (an empty block always does)
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if fits(a, mid):
                    lo = mid
                else:
                    hi = mid - 1
            stops.append(lo)
        out[d] = np.asarray(stops)
    return out


def split_bottleneck_s(sc: SplitCosts, order: tuple[int, ...], counts: tuple[int, ...]) -> float:
    """The DP's objective for one split, evaluated directly (the brute-force oracle uses this).

    Bottleneck over the non-empty blocks of compute (+) the transfer to the next non-empty
    block; inf if a block overflows its device.
    """
    blocks, start = [], 0
    for dev, c in zip(order, counts):
        if c:
            blocks.append((dev, start, start + c))
            start += c
    worst = 0.0
    for i, (dev, a, b) in enumerate(blocks):
        if sc.max_stop[dev][a] < b:
            return INF
        comm = sc.comm_s[(dev, blocks[i + 1][0])] if i + 1 < len(blocks) else 0.0
        worst = max(worst, sc.combine(sc.block_s(dev, a, b), comm))
    return worst


def solve_split(sc: SplitCosts, order: tuple[int, ...]) -> LayerSplit:
    """The workload DP along one device order. Bottleneck inf = nothing fits."""
    n, num = sc.num_layers, len(order)
    # D[b, r]: least bottleneck with layers [0, b) on positions < r, the last busy one sending
    # to position r (its transfer included). D[0, r] = 0: devices before r may all be empty.
    D = np.full((n + 1, num), INF)
    D[0, :] = 0.0
    arg = {}  # (b, r) -> (k, m): block [k, b) on position m, sending to r
    best, best_arg = INF, None
    for b in range(1, n + 1):
        for m in range(num):
            dev = order[m]
            ks = np.arange(b)
            # Feasible starts k: block [k, b) fits on dev.
            ok = sc.max_stop[dev][:b] >= b
            if not ok.any():
                continue
            comp = sc.prefix_s[dev][b] - sc.prefix_s[dev][:b]
            comp = comp + np.where(ks == 0, sc.emb_s[dev], 0.0)
            if b == n:
                comp = comp + sc.head_s[dev]
                # Last block: no transfer. The paper's A[n][N] with empty devices after m.
                v = np.where(ok, np.maximum(D[:b, m], comp), INF)
                k = int(np.argmin(v))
                if v[k] < best:
                    best, best_arg = float(v[k]), (k, m)
                continue
            if sc.overlap_comm:
                # max(D, compute, comm): the transfer does not depend on k, so one reduction
                # over k serves every receiver r.
                w = np.where(ok, np.maximum(D[:b, m], comp), INF)
                k = int(np.argmin(w))
                for r in range(m + 1, num):
                    # A[b][m] = min_k max(A[k][m-1], T(k+1, b, m)), T = max(compute, comm).
                    v = max(float(w[k]), sc.comm_s[(dev, order[r])])
                    if v < D[b, r]:
                        D[b, r] = v
                        arg[(b, r)] = (k, m)
                continue
            for r in range(m + 1, num):
                comm = sc.comm_s[(dev, order[r])]
                # A[b][m] = min_k max(A[k][m-1], T(k+1, b, m)), T = compute + comm.
                v = np.where(ok, np.maximum(D[:b, m], comp + comm), INF)
                k = int(np.argmin(v))
                if v[k] < D[b, r]:
                    D[b, r] = v[k]
                    arg[(b, r)] = (k, m)
    counts = _backtrack(arg, best_arg, num_layers=n, num_devices=num)
    return LayerSplit(order=tuple(order), counts=counts, bottleneck_s=best)


def plan_layers(sc: SplitCosts, orders: list[tuple[int, ...]]) -> list[LayerSplit]:
    """The DP's split for each device order, best bottleneck first (infeasible ones last)."""
    return sorted((solve_split(sc, o) for o in orders), key=lambda s: s.bottleneck_s)


def stops_fit(max_stop: dict, num_layers: int, orders: list[tuple[int, ...]]) -> bool:
    """Whether any order admits a split that fits memory. Packing each device full, in order,
    is optimal for this question, since a block that fits still fits when it starts later."""
    for order in orders:
        a = 0
        for dev in order:
            a = max(a, int(max_stop[dev][a]))
        if a >= num_layers:
            return True
    return False


def solve_split_one_pass(sc: SplitCosts, order: tuple[int, ...]) -> LayerSplit:
    """The split with the least *sum* of stage times and transfers: the optimum when the prompt
    is too short to pipeline (one slice runs through the stages one after another).

    Same receiver-indexed table as ``solve_split`` with + in place of max (a shortest path):
    S[b, r] = min_{k, m} S[k, m] + compute(k, b; m) + comm(m -> r).
    A candidate for the search, which re-scores it; ``bottleneck_s`` is its DP bottleneck.
    """
    n, num = sc.num_layers, len(order)
    S = np.full((n + 1, num), INF)
    S[0, :] = 0.0
    arg = {}
    best, best_arg = INF, None
    for b in range(1, n + 1):
        for m in range(num):
            dev = order[m]
            ok = sc.max_stop[dev][:b] >= b
            if not ok.any():
                continue
            comp = sc.prefix_s[dev][b] - sc.prefix_s[dev][:b]
            comp[0] += sc.emb_s[dev]
            w = np.where(ok, S[:b, m] + comp, INF)
            if b == n:
                w = w + sc.head_s[dev]
                k = int(np.argmin(w))
                if w[k] < best:
                    best, best_arg = float(w[k]), (k, m)
                continue
            k = int(np.argmin(w))
            for r in range(m + 1, num):
                v = float(w[k]) + sc.comm_s[(dev, order[r])]
                if v < S[b, r]:
                    S[b, r] = v
                    arg[(b, r)] = (k, m)
    counts = _backtrack(arg, best_arg, num_layers=n, num_devices=num)
    return LayerSplit(order=tuple(order), counts=counts,
                      bottleneck_s=split_bottleneck_s(sc, tuple(order), counts)
                      if best_arg is not None else INF)


def _backtrack(arg: dict, best_arg: tuple[int, int] | None, *, num_layers: int,
               num_devices: int) -> tuple[int, ...]:
    """Layer counts per device (in ``order``) from the DP's back-pointers.

    ``arg[(b, r)] = (k, m)``: the best way to reach "layers [0, b) placed, next device r" put
    layers [k, b) on device m. ``best_arg`` is the (k, m) of the last block. Devices skipped
    between two blocks keep 0 layers.
    """
    counts = [0] * num_devices
    if best_arg is not None:
        k, m = best_arg
        b = num_layers
        while True:
            counts[m] = b - k
            if k == 0:
                break
            b, r = k, m
            k, m = arg[(b, r)]
    return tuple(counts)
