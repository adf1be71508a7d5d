"""HPipe's search: workload DP per host order -> slicing DP -> exact re-scoring (Alpa's
"search wrapper" layer between the DP kernels and the front door).

1. The workload DP (``layers.py``) gives each host order its least-bottleneck split.
2. For the best few distinct splits, the slicing DP (``slices.py``) proposes its best few
   slicings by the closed-form estimate.
3. Each (split, slicing) candidate is simulated exactly (``hpipe.sim``) and the fastest kept:
   the closed form is only an estimate with heterogeneous stages (algorithms.md section 5
   shows it can be off by a third), so the simulator, not the estimate, has the last word.
"""

from __future__ import annotations

import dataclasses
import math

from hpipe.errors import InfeasiblePlanError
from hpipe.plan.evaluate import Problem, scored
from hpipe.plan.feasibility import explain_no_split
from hpipe.plan.layers import build_split_costs, plan_layers
from hpipe.plan.plan import Plan, StagePlan
from hpipe.plan.slices import plan_slicing

# Splits (host orders) and slicings re-scored with the simulator. More costs time linearly
# and, on the paper's setting, finds nothing better.
NUM_SPLITS = 3
NUM_SLICINGS = 8
EPSILON = 1e-2  # cap clustering of the slicing DP: within 1% of its optimum, ~10x fewer caps


def hpipe_units(grain_tokens: int):
    """The work unit whose workspace the split must leave room for: the smallest slice HPipe
    may use, at the end of the prompt. The slicing DP then keeps every slice within memory."""

    def units(batch: int, seq_len: int) -> tuple[tuple[int, int, int], ...]:
        g = min(grain_tokens, seq_len)
        return ((batch, g, seq_len - g),)

    return units


def plan_hpipe_split(pb: Problem) -> list[tuple[StagePlan, ...]]:
    """Distinct DP splits over host orders, best bottleneck first; raises if none fits."""
    units = hpipe_units(pb.grain_tokens)
    sc = build_split_costs(pb.cost, model=pb.model, cluster=pb.cluster, batch=pb.batch,
                           seq_len=pb.seq_len, dtype=pb.dtype,
                           units=units(pb.batch, pb.seq_len), overlap_comm=pb.overlap_comm)
    out: list[tuple[StagePlan, ...]] = []
    for split in plan_layers(sc, pb.cluster.host_orders()):
        if math.isfinite(split.bottleneck_s) and split.stages() not in out:
            out.append(split.stages())
    if not out:
        raise InfeasiblePlanError(explain_no_split(
            pb.cost, model=pb.model, cluster=pb.cluster, batch=pb.batch, seq_len=pb.seq_len,
            units=units))
    return out


def plan_slices_for(pb: Problem, stages: tuple[StagePlan, ...], *, method: str,
                    notes: tuple[str, ...] = ()) -> Plan | None:
    """HPipe's slicing of the prompt over fixed stages, re-scored; None if no slicing fits."""
    st = pb.slice_times(stages)
    res = plan_slicing(st.tau, fits_fn=st.fits, seq_len=pb.seq_len,
                       grain_tokens=pb.grain_tokens, num_stages=len(stages), epsilon=EPSILON,
                       num_candidates=NUM_SLICINGS)
    if res is None:
        return None
    cands = [sl for sl, _ in res.candidates]
    if res.slices not in cands:
        cands.insert(0, res.slices)
    plans = [scored(pb.plan(method, stages, sl, notes=notes), pb.cost) for sl in cands]
    # Fastest simulated; on a tie, fewer slices (less per-slice overhead in a real runtime).
    best = min(plans, key=lambda p: (p.predicted_latency_s, len(p.slices)))
    # The table's entry for this length is the re-scored winner, not the estimate's.
    table = tuple((n, best.slices if n == pb.seq_len else sl) for n, sl in res.table)
    return dataclasses.replace(best, slice_table=table)


def plan_hpipe(pb: Problem) -> Plan:
    best: Plan | None = None
    for stages in plan_hpipe_split(pb)[:NUM_SPLITS]:
        plan = plan_slices_for(pb, stages, method="hpipe")
        if plan is not None and (best is None
                                 or plan.predicted_latency_s < best.predicted_latency_s):
            best = plan
    if best is None:
        raise InfeasiblePlanError(
            f"hpipe: layers fit but no slicing of {pb.seq_len} tokens at a {pb.grain_tokens}-"
            f"token grain fits memory at batch {pb.batch}; fits: a smaller batch or grain_tokens")
    return best
