"""A latency lower bound for a prefill, and where a plan's time goes relative to it.

Bound: total FLOPs over the sum of the devices' achievable rates,

    T* = F / R,   F = L_layers * flops(bs, L, 0),   R = sum_j r_j,

with r_j = flops(bs, L, 0) / t_j(one layer, bs rows of L tokens, no prefix): the rate device j
reaches on the whole prefill in one piece, the best case of a rate that rises with slice size.
Only transformer layers count in F (embedding and head are left out), so T* stays a lower bound.
FLOPs per layer follow algorithms.md section 2: 2*b*s*P_layer + 4*b*h*s*(p + s/2).

Gap decomposition: in a run of latency T the cluster could do R*T FLOPs and does F, so

    1 = T*/T  +  sum_j r_j (T - busy_j) / (R T)  +  sum_j (r_j busy_j - F_j) / (R T)
        useful     idle (bubbles, link waits,          busy below the best rate (small slices,
                   devices with no layers)              memory-bound shapes, embedding/head)

where F_j is the layer FLOPs device j executes. The three shares add up to 1 exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

from hpipe.cluster import ClusterSpec
from hpipe.cost.base import CostModel
from hpipe.plan.plan import Plan
from hpipe.schedule import prefill_units
from hpipe.spec import ModelSpec
from hpipe.timeline import Timeline


@dataclass(frozen=True)
class LatencyBound:
    total_flops: float
    device_names: tuple[str, ...]
    rates_flops_s: tuple[float, ...]  # per cluster device, best achievable

    @property
    def bound_s(self) -> float:
        return self.total_flops / sum(self.rates_flops_s)


def latency_lower_bound(model: ModelSpec, cluster: ClusterSpec, cost: CostModel, *,
                        batch: int, seq_len: int) -> LatencyBound:
    per_layer = model.layer_flops(batch=batch, tokens=seq_len, prefix=0)
    rates = []
    for j in range(cluster.num_devices):
        t = cost.stage_time_s((j,), 0, 1, batch=batch, tokens=seq_len, prefix=0,
                              has_embedding=False, has_head=False)
        rates.append(per_layer / t)
    return LatencyBound(total_flops=model.num_layers * per_layer,
                        device_names=tuple(d.name for d in cluster.devices),
                        rates_flops_s=tuple(rates))


@dataclass(frozen=True)
class GapBreakdown:
    """Shares of the cluster's FLOP capacity over the run (they sum to 1)."""

    latency_s: float
    bound_s: float
    useful: float
    idle: float
    below_rate: float
    idle_by_device: tuple[tuple[str, float], ...]  # share of capacity each device wastes idling
    utilisation_by_device: tuple[tuple[str, float], ...]


def gap_breakdown(plan: Plan, timeline: Timeline, bound: LatencyBound) -> GapBreakdown:
    """Where ``plan``'s latency goes relative to ``bound`` (single-device stages only)."""
    model = plan.model
    assert all(len(s.devices) == 1 for s in plan.stages), "gap breakdown assumes no TP groups"
    flops_by_dev = dict.fromkeys(bound.device_names, 0.0)
    units = prefill_units(plan)
    for st in plan.stages:
        name = plan.cluster.devices[st.device].name
        flops_by_dev[name] = st.num_layers * sum(
            model.layer_flops(batch=u.rows, tokens=u.tokens, prefix=u.prefix) for u in units)
    busy = dict.fromkeys(bound.device_names, 0.0)
    busy.update(zip(timeline.row_names, timeline.busy_s()))
    T = timeline.prefill_latency_s
    R = sum(bound.rates_flops_s)
    cap = R * T
    rate = dict(zip(bound.device_names, bound.rates_flops_s))
    idle_by = tuple((n, rate[n] * (T - busy[n]) / cap) for n in bound.device_names)
    below = sum(rate[n] * busy[n] - flops_by_dev[n] for n in bound.device_names) / cap
    return GapBreakdown(
        latency_s=T, bound_s=bound.bound_s, useful=sum(flops_by_dev.values()) / cap,
        idle=sum(v for _, v in idle_by), below_rate=below, idle_by_device=idle_by,
        utilisation_by_device=tuple((n, busy[n] / T) for n in bound.device_names),
    )
