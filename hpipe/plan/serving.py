"""Slices for a server: how long a prompt slice may be while other requests decode.

See [Note: slices that fit a decode step] in hpipe/interleave.py. A slice shares its item with
the running requests' decode rows, so its stage time is what those streams wait for their next
token. The cap keeps it within ``factor`` x the stage time of a decode step of
``decode_rows`` requests, by the same cost model the planner uses; the slice may be longer at a
short prefix than at a long one (attention over the prefix grows). Pure.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

from hpipe.cost.base import CostModel
from hpipe.plan.plan import Plan

GRAIN_TOKENS = 16
MAX_CAP_TOKENS = 2048
PREFIX_BUCKET = 256  # the cap is computed once per this many tokens of prefix


def serving_slice_cap(plan: Plan, cost: CostModel, *, decode_rows: int = 4,
                      factor: float = 2.0) -> Callable[[int], int]:
    """``cap(prefix)``: the most prompt tokens (a multiple of 16, at least 16) an item may
    carry at ``prefix`` so that no stage computes them for longer than ``factor`` x a decode
    step of ``decode_rows`` rows."""
    last = plan.num_stages - 1

    def stage_s(s: int, *, rows: int, tokens: int, prefix: int) -> float:
        st = plan.stages[s]
        return cost.stage_time_s(st.devices, st.layer_start, st.layer_stop, batch=rows,
                                 tokens=tokens, prefix=prefix, has_embedding=s == 0,
                                 has_head=s == last)

    def slowest(tokens: int, prefix: int) -> float:
        return max(stage_s(s, rows=1, tokens=tokens, prefix=prefix)
                   for s in range(plan.num_stages))

    decode_s = max(stage_s(s, rows=decode_rows, tokens=1, prefix=PREFIX_BUCKET)
                   for s in range(plan.num_stages))
    target_s = factor * decode_s

    @cache
    def cap_at(bucket: int) -> int:
        prefix = bucket * PREFIX_BUCKET
        lo, hi = 1, MAX_CAP_TOKENS // GRAIN_TOKENS  # in grains; lo always allowed
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if slowest(mid * GRAIN_TOKENS, prefix) <= target_s:
                lo = mid
            else:
                hi = mid - 1
        return lo * GRAIN_TOKENS

    return lambda prefix: cap_at(prefix // PREFIX_BUCKET)
