"""HPipe's sequence-slicing DP [paper sec. 4 structure; details design, algorithms.md sec. 4].

Objective (an estimate; the exact value comes from the simulator):

    T(slicing) ~= sum_i tau_i + (N - 1) * max_i tau_i,   tau_i = max_j t_ij

with t_ij the time of slice i on stage j (compute (+) the transfer after it). Summing the
per-slice maximum (TeraPipe's form) bounds the paper's max_j sum_i t_ij from above and, unlike
it, decomposes over slices, so it can be minimised exactly by enumerating the cap t_m:

    Lat[q] = min_{k : tau(k, q) <= t_m} Lat[k] + tau(k, q)        (slice = grid points k..q)

and keeping min_{t_m} Lat[Q] + (N - 1) t_m. Grid points are multiples of g tokens (the first
slice absorbs seq_len mod g). Because Lat[q] is a prefix DP, one pass over the caps yields a
scheme for every length pos[q]: the run-time ``slice_table``.

Pruning, after TeraPipe: caps ascend, and once (N - 1) * t_m exceeds the best total of every
length no larger cap can win. Caps within a factor (1 + epsilon) of a cluster's smallest are
solved once with the cluster's largest: a solution whose true maximum m lies in the cluster is
then charged at most (N - 1) * epsilon * m too much, so the result is within (1 + epsilon) of
the optimum; epsilon = 0 is exact.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

INF = math.inf


@dataclass(frozen=True)
class SlicingResult:
    """The DP's output for one stage arrangement.

    - ``candidates``: the best few slicings of the full length by estimate, best first
      (the planner re-scores them with the simulator).
    - ``table``: (length, slices) for every grid length, the run-time lookup.
    """

    slices: tuple[int, ...]
    estimate_s: float
    candidates: tuple[tuple[tuple[int, ...], float], ...]
    table: tuple[tuple[int, tuple[int, ...]], ...]


def grid_positions(seq_len: int, grain_tokens: int) -> np.ndarray:
    """Slice boundaries: 0, r + g, r + 2g, ..., seq_len with r = seq_len mod g."""
    assert seq_len >= 1 and grain_tokens >= 1, (seq_len, grain_tokens)
    q, r = divmod(seq_len, grain_tokens)
    if q == 0:
        return np.array([0, seq_len])
    return np.array([0] + [r + k * grain_tokens for k in range(1, q + 1)])


def tau_matrix(positions: np.ndarray, tau_fn: Callable[[int, int], float],
               fits_fn: Callable[[int, int], bool] | None = None,
               tau_row_fn: Callable[[np.ndarray, int], np.ndarray] | None = None) -> np.ndarray:
    """tau[k, q] = tau_fn(tokens, prefix) of the slice from grid point k to q (inf if k >= q,
    or if ``fits_fn(tokens, prefix)`` says its workspace overflows a device).

    A slice's workspace grows with its length at a fixed start, so the longest slice that fits
    from each start is found by bisection: O(n log n) memory questions instead of O(n^2).
    ``tau_row_fn(tokens array, prefix)``, when given, fills a row at once (numpy).
    """
    n = len(positions)
    tau = np.full((n, n), INF)
    last = n - 1
    for k in range(n - 1):
        p = int(positions[k])
        if fits_fn is not None:
            lo, hi = k, n - 1  # invariant: every end <= lo fits (lo = k: none yet)
            # Try the previous start's longest end first: it usually still fits (a later
            # start at the same end is a shorter slice), which settles most rows in one or
            # two questions instead of log n. Only a hint: the bisection below stays exact.
            h = max(last, k + 1)
            if fits_fn(int(positions[h]) - p, p):
                lo = h
            else:
                hi = h - 1
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if fits_fn(int(positions[mid]) - p, p):
                    lo = mid
                else:
                    hi = mid - 1
            last = lo
        else:
            last = n - 1
        if last <= k:
            continue
        if tau_row_fn is not None:
            tau[k, k + 1:last + 1] = tau_row_fn(positions[k + 1:last + 1] - p, p)
        else:
            for q in range(k + 1, last + 1):
                tau[k, q] = tau_fn(int(positions[q]) - p, p)
    return tau


def estimate_s(slices: tuple[int, ...], tau_fn: Callable[[int, int], float],
               num_stages: int) -> float:
    """sum_i tau_i + (N - 1) max_i tau_i for one slicing: the DP's objective, evaluated directly."""
    taus, p = [], 0
    for s in slices:
        taus.append(tau_fn(s, p))
        p += s
    return sum(taus) + (num_stages - 1) * max(taus)


def _backtrack(parent: np.ndarray, positions: np.ndarray, q: int) -> tuple[int, ...]:
    out = []
    while q > 0:
        k = int(parent[q])
        out.append(int(positions[q] - positions[k]))
        q = k
    return tuple(reversed(out))


def _cap_clusters(tau: np.ndarray, epsilon: float) -> list[tuple[float, float]]:
    """(smallest, largest) of each run of distinct tau values within a factor 1 + epsilon."""
    caps = np.unique(tau[np.isfinite(tau)])
    out, i = [], 0
    while i < len(caps):
        j = i
        while j + 1 < len(caps) and caps[j + 1] <= caps[i] * (1 + epsilon):
            j += 1
        out.append((float(caps[i]), float(caps[j])))
        i = j + 1
    return out


def solve_slicing(tau: np.ndarray, positions: np.ndarray, *, num_stages: int,
                  epsilon: float = 1e-2, num_candidates: int = 8,
                  caps_per_chunk: int = 64) -> SlicingResult | None:
    """Minimise the estimate over all slicings on the grid; None if no slicing is feasible.

    Caps are solved ``caps_per_chunk`` at a time (one numpy row per cap); the TeraPipe stop
    test runs between chunks, so a chunk may solve a few caps past the stop, which changes
    nothing but time.
    """
    n = len(positions)
    Q = n - 1
    clusters = _cap_clusters(tau, epsilon)
    best = np.full(n, INF)  # best[q]: least charged estimate for length pos[q] so far
    best_from: dict[int, tuple[np.ndarray, int]] = {}  # q -> (parent matrix, row) of best[q]
    heap: list[tuple[float, tuple[int, ...]]] = []  # (-charged estimate, slices): worst on top
    seen: set[tuple[int, ...]] = set()
    for c0 in range(0, len(clusters), caps_per_chunk):
        chunk = clusters[c0:c0 + caps_per_chunk]
        if np.all(np.isfinite(best[1:])) and (num_stages - 1) * chunk[0][0] >= best[1:].max():
            break  # no larger cap can beat any length's best
        cap = np.array([hi for _, hi in chunk])[:, None]  # (C, 1)
        C = len(chunk)
        # lat[c, q]: least sum of tau over slicings of [0, pos[q]) whose slices all take
        # <= cap[c]; parent[c, q]: the grid point where the last of those slices starts.
        lat = np.full((C, n), INF)
        lat[:, 0] = 0.0
        parent = np.zeros((C, n), dtype=np.int64)
        rows = np.arange(C)
        for q in range(1, n):
            t = tau[:q, q][None, :]  # (1, q)
            v = lat[:, :q] + np.where(t <= cap, t, INF)  # (C, q)
            k = np.argmin(v, axis=1)
            lat[:, q] = v[rows, k]
            parent[:, q] = k
        total = lat + (num_stages - 1) * cap  # Lat[q] + (N - 1) t_m
        row = np.argmin(total, axis=0)
        top = total[row, np.arange(n)]
        for q in np.nonzero(top < best)[0]:
            if q > 0:
                best[q] = top[q]
                best_from[int(q)] = (parent, int(row[q]))
        for c in np.nonzero(np.isfinite(total[:, Q]))[0]:
            sl = _backtrack(parent[c], positions, Q)
            if sl not in seen:
                seen.add(sl)
                item = (-float(total[c, Q]), sl)
                if len(heap) < num_candidates:
                    heapq.heappush(heap, item)
                elif item > heap[0]:
                    heapq.heapreplace(heap, item)
    if not np.isfinite(best[Q]):
        return None
    table = tuple((int(positions[q]), _backtrack(best_from[q][0][best_from[q][1]], positions, q))
                  for q in range(1, n) if np.isfinite(best[q]))
    slices = dict(table)[int(positions[Q])]
    cands = tuple(sorted(((sl, -neg) for neg, sl in heap), key=lambda c: c[1]))
    return SlicingResult(slices=slices, estimate_s=float(best[Q]), candidates=cands, table=table)


def plan_slicing(tau_fn: Callable[[int, int], float], *, seq_len: int, grain_tokens: int,
                 num_stages: int, fits_fn: Callable[[int, int], bool] | None = None,
                 tau_row_fn: Callable[[np.ndarray, int], np.ndarray] | None = None,
                 epsilon: float = 1e-2, num_candidates: int = 8) -> SlicingResult | None:
    """Build the tau grid from ``tau_fn(tokens, prefix)`` (``fits_fn`` = memory) and solve it."""
    pos = grid_positions(seq_len, grain_tokens)
    return solve_slicing(tau_matrix(pos, tau_fn, fits_fn, tau_row_fn), pos, num_stages=num_stages,
                         epsilon=epsilon, num_candidates=num_candidates)
