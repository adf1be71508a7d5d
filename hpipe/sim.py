"""The exact simulator: per-stage action lists + a cost model -> a Timeline. Pure.

[design] algorithms.md section 5, generalised to any action list: each stage runs its actions
in order; a compute starts when the stage is free and its inputs have arrived; a send starts
when its data is ready and its link is free (one transfer at a time per directed link) and,
with ``overlap_comm`` (the runtime's non-blocking sends), does not hold up the next compute.
Without overlap the sender is busy until the transfer ends: the paper's accounting,
F[i][j] = max(F[i-1][j], F[i][j-1]) + t_c + t_t.

A prefill compute that borrows its host's idle CPU threads (a plan with ``lend_idle_threads``,
see [Note: a lone compute borrows its host's idle cores] in hpipe/lending.py) is priced with
those threads, as the runtime runs it.
"""

from __future__ import annotations

from dataclasses import dataclass

from hpipe.cost.base import CostModel
from hpipe.lending import lent_threads, lent_time_s
from hpipe.plan.plan import Plan
from hpipe.schedule import TOKEN, ActionKind, Schedule, build_schedule
from hpipe.spec import dtype_bytes
from hpipe.timeline import Interval, Timeline

TOKEN_BYTES = 8  # int64 token ids going back from the last stage to the first in decode


def simulate(
    plan: Plan,
    cost: CostModel,
    *,
    schedule: Schedule | None = None,
    num_decode_steps: int = 0,
    overlap_comm: bool = True,
) -> Timeline:
    sched = schedule or build_schedule(plan, num_decode_steps=num_decode_steps)
    intervals, _ = _time_actions(plan, cost, sched, overlap_comm=overlap_comm)
    devs = [plan.cluster.devices[d] for d in plan.row_devices]
    return Timeline(
        source="simulated",
        method=plan.method,
        row_names=plan.row_names,
        intervals=tuple(intervals),
        peak_memory_bytes=_peak_memory_bytes(plan, cost, sched.units),
        busy_power_w=tuple(d.busy_power_w for d in devs),
        idle_power_w=tuple(d.idle_power_w for d in devs),
        batch=plan.batch,
        seq_len=sum(u.tokens for u in sched.units if u.phase == "prefill" and u.microbatch == 0),
        emulated=any(d.emulated for d in devs),
    )


@dataclass(frozen=True)
class Latency:
    """What the planner scores: ``Timeline.prefill_latency_s`` and ``Timeline.ttft_s`` of the
    same simulation, without building the timeline."""

    prefill_s: float
    ttft_s: float


def simulate_latency(plan: Plan, cost: CostModel, *, schedule: Schedule | None = None,
                     overlap_comm: bool = True) -> Latency:
    """``simulate(plan, cost)``'s prefill latency and time to first token, exactly, without its
    intervals: the planner simulates every candidate it cannot prune, and on big clusters
    recording tens of thousands of intervals per candidate was a quarter of the time."""
    sched = schedule or build_schedule(plan)
    return _time_actions(plan, cost, sched, overlap_comm=overlap_comm, record=False)[1]


def _time_actions(plan: Plan, cost: CostModel, sched: Schedule, *, overlap_comm: bool,
                  record: bool = True) -> tuple[list[Interval], Latency]:
    """Walk every stage's action list in dependency order, timing each action: each action's
    interval (none without ``record``), and the prefill's Latency."""
    n = sched.num_stages
    units = sched.units
    last = n - 1
    rows_of = [plan.stage_rows(s) for s in range(n)]  # see [Note: timeline rows]
    hidden_bytes = plan.model.hidden * dtype_bytes(plan.dtype)
    # Per stage, what its computes and sends pass to the cost model (hoisted: the planner walks
    # tens of thousands of actions per candidate on big clusters).
    where = [(st.devices, st.layer_start, st.layer_stop, s == 0, s == last)
             for s, st in enumerate(plan.stages)]
    device = [st.device for st in plan.stages]
    recv, compute = ActionKind.RECV, ActionKind.COMPUTE
    # (stage, unit) -> threads (hpipe/lending.py); prefill units are numbered alike in both
    lent = lent_threads(plan, tuple(u.tokens for u in units
                                    if u.phase == "prefill" and u.microbatch == 0))
    own_threads = [plan.cluster.devices[d].num_threads for d in device]

    stage_free = [0.0] * n  # when the stage can start its next compute
    inbox = [0.0] * n  # latest arrival among the recvs done since the last compute
    last_compute_end = [0.0] * n
    arrival: dict[tuple[int, int, str], float] = {}  # (unit, dst stage, payload) -> time
    link_free: dict[tuple[int, int], float] = {}
    ptr = [0] * n
    intervals: list[Interval] = []
    prefill_end = ttft = 0.0  # as Timeline.prefill_latency_s and ttft_s would say
    remaining = sum(len(a) for a in sched.actions)
    while remaining:
        progressed = False
        for s in range(n):
            acts = sched.actions[s]
            i, num_acts = ptr[s], len(acts)
            while i < num_acts:
                a = acts[i]
                u = units[a.unit]
                kind = a.kind
                if kind is recv:
                    key = (a.unit, s, a.payload)
                    if key not in arrival:
                        break  # its sender has not got there yet
                    inbox[s] = max(inbox[s], arrival[key])
                elif kind is compute:
                    devices, layer_start, layer_stop, has_embedding, has_head = where[s]
                    start = max(stage_free[s], inbox[s])
                    threads = lent.get((s, a.unit), 0) if lent else 0  # prefill only
                    if u.phase == "decode":  # read-bound: see cost.analytic
                        dur = cost.decode_time_s(
                            devices, layer_start, layer_stop, batch=u.rows, context=u.prefix,
                            has_embedding=has_embedding, has_head=has_head)
                    else:
                        dur = cost.stage_time_s(
                            devices, layer_start, layer_stop, batch=u.rows, tokens=u.tokens,
                            prefix=u.prefix, has_embedding=has_embedding, has_head=has_head)
                        if threads:
                            dur = lent_time_s(cost, device[s], dur, tokens=u.tokens,
                                              threads=threads, own_threads=own_threads[s])
                    end = start + dur
                    if record:
                        for r in rows_of[s]:
                            intervals.append(Interval(r, "compute", u.index, u.phase,
                                                      u.microbatch, u.slice_index, u.tokens,
                                                      start, end, threads))
                    if u.phase == "prefill":
                        prefill_end = max(prefill_end, end)
                        if s == last:
                            ttft = max(ttft, end)
                    stage_free[s] = last_compute_end[s] = end
                    inbox[s] = 0.0
                else:  # send
                    assert kind == ActionKind.SEND, a
                    num_bytes = (u.rows * TOKEN_BYTES if a.payload == TOKEN
                                 else u.rows * u.tokens * hidden_bytes)
                    link = (s, a.peer)
                    start = max(last_compute_end[s], link_free.get(link, 0.0))
                    if not overlap_comm:
                        start = max(start, stage_free[s])
                    end = start + cost.transfer_time_s(device[s], device[a.peer], num_bytes)
                    link_free[link] = end
                    arrival[(a.unit, a.peer, a.payload)] = end
                    if not overlap_comm:
                        stage_free[s] = end
                    # A token going back to stage 0 belongs to decode, even the one sampled
                    # from the prefill's last logits.
                    phase = "decode" if a.payload == TOKEN else u.phase
                    if record:
                        intervals.append(Interval(rows_of[s][0], "send", u.index, phase,
                                                  u.microbatch, u.slice_index, u.tokens, start,
                                                  end))
                    if phase == "prefill":
                        prefill_end = max(prefill_end, end)
                i += 1
                remaining -= 1
                progressed = True
            ptr[s] = i
        assert progressed, f"schedule deadlocks:\n{sched.grid()}"
    return intervals, Latency(prefill_end, ttft)


def _peak_memory_bytes(plan: Plan, cost: CostModel, units) -> tuple[float, ...]:
    """Each row's predicted peak: its stage's weights, KV cache and largest unit's workspace."""
    unit_shapes = tuple(sorted({(u.rows, u.tokens, u.prefix) for u in units}))
    seq_total = max(u.prefix + u.tokens for u in units)
    last = plan.num_stages - 1
    peak = []
    for s, st in enumerate(plan.stages):
        mem = cost.stage_memory_bytes(
            st.devices, st.layer_start, st.layer_stop, batch=plan.batch, seq_len=seq_total,
            units=unit_shapes, has_embedding=s == 0, has_head=s == last,
        )
        peak.extend([mem] * len(st.devices))
    return tuple(peak)
