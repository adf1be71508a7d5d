"""Which computes of a schedule may borrow the idle cores of their host. Pure.

[Note: a lone compute borrows its host's idle cores] On a host whose CPU cores are split among
several pipeline workers, a worker's cores sit idle whenever its stage has nothing to compute:
while stage 0 computes the first slice, stage 1 waits for it (the fill); while the last stage
computes the last slice, stage 0 is done (the drain). A compute that provably runs alone on its
host may then use every CPU worker's threads of that host, not only its own.

"Provably alone" comes from the schedule, not from timing: compute A is *lone* when every
compute of every other stage on A's host is ordered with it, either one must finish before the
other can start by the schedule's dependencies (program order within a stage, send before the
matching receive). A runtime that is late or early still never runs two such computes at
once, so a lent thread never competes with a stage for a core. Found with vector clocks over
one topological walk (``lone_computes``); tests/test_lending.py checks them against explicit
reachability on small random schedules.

Only prefill computes borrow. Decode reads every weight once per token, and a second thread
did not read faster here: one process decoded SmolLM2 at 17.7 tokens/s on 2 threads against
17.8 on 1, and lending decode steps in local:2 made them slower (64.4 against 59.4 ms per
token, stage 1's step 35.1 against 31.2 ms), the idle OpenMP thread spinning into the other
stage's turn. On the measured 4096-token prefill of local:2 (SmolLM2, 21 slices), lending the
first and last slices cut them from 0.41 to 0.29 s and from 0.52 to 0.31 s.

Only plans with ``lend_idle_threads`` borrow (HPipe's and manual layouts): the paper's
baselines run as the paper describes them. A borrower is a one-device stage on CPU cores
(``type: cpu``, as local:N's workers) without an emulated slowdown, which would scale the
borrowed cores too; its lenders are every such CPU device of its host, used by the plan or not.

The simulator and the planner price a lent compute with the speed-up its cost model measured:
a profile (and the quick calibration) times each worker that may borrow alone on the lent
threads, against its grid with every worker busy ([Note: lent threads measured alone] in
hpipe/profile/launch.py; ``FittedCost.lent_speedup``). On this 2-core VM that gave 1.58-1.86x
at 64 tokens and 1.91-2.05x at 2048, by calibration. A cost model that did not measure it (the
analytic one, an older profile) assumes Amdahl's law with LENT_PARALLEL_FRACTION, a figure from
this machine: a 15-layer SmolLM2 slice ran 1.46-1.91x faster on 2 threads than on 1 (64-token
slices 1.5x, 4096-token prompts 1.9x); 0.8 gives 1.67x.
"""

from __future__ import annotations

import bisect

from hpipe.plan.plan import Plan
from hpipe.schedule import ActionKind, Schedule, build_schedule

LENT_PARALLEL_FRACTION = 0.8  # of a prefill compute's time, the part more threads divide


def lent_threads(plan: Plan, slices: tuple[int, ...] | None = None
                 ) -> dict[tuple[int, int], int]:
    """(stage, unit) -> torch threads, for each prefill compute of ``plan`` (cut into
    ``slices``, default the plan's) that borrows its host's idle cores (see [Note: a lone
    compute borrows its host's idle cores]); others are absent. Cheap when nothing can borrow.

    The walk leaves decode out: decode step 0 waits for the token sampled after the last
    stage's last prefill unit, which follows every prefill compute, so no decode compute can
    overlap one (tests/test_lending.py checks the answer against the walk with decode)."""
    if not plan.lend_idle_threads:
        return {}
    devices = plan.cluster.devices
    borrowers = {}
    for s, st in enumerate(plan.stages):
        threads = plan.cluster.lendable_threads(st.device) if len(st.devices) == 1 else 0
        if threads:
            borrowers[s] = threads
    if not borrowers:
        return {}
    # The stages whose computes run on each host's CPU cores.
    on_host: dict[str, set[int]] = {}
    for s, st in enumerate(plan.stages):
        for d in st.devices:
            if devices[d].lends_cores:
                on_host.setdefault(devices[d].host, set()).add(s)
    sched = build_schedule(plan, slices=slices)  # the prefill only: see above
    lone = lone_computes(sched, {s: on_host[devices[plan.stages[s].device].host] - {s}
                                 for s in borrowers})
    return {(s, sched.actions[s][i].unit): borrowers[s] for s, i in lone}


def lone_computes(sched: Schedule, rivals: dict[int, set[int]]) -> set[tuple[int, int]]:
    """(stage, action index) of each compute of a stage in ``rivals`` that is ordered with every
    compute of the stages ``rivals[stage]`` (the schedule's happens-before, both ways)."""
    n = sched.num_stages
    clocks = _vector_clocks(sched)  # (stage, index) -> clock of each compute
    # Per stage: its computes' action indices, ascending, for the first one not known to precede.
    computes = {s: [i for i, a in enumerate(sched.actions[s]) if a.kind is ActionKind.COMPUTE]
                for s in range(n)}
    out = set()
    for a, others in rivals.items():
        for i in computes[a]:
            mine = clocks[(a, i)]
            ordered = True
            for b in others:
                # b's actions [0, mine[b]) precede this compute; the first compute of b at or
                # after mine[b] must follow it (then every later one does, in program order).
                k = bisect.bisect_left(computes[b], mine[b])
                if k < len(computes[b]) and clocks[(b, computes[b][k])][a] < i + 1:
                    ordered = False
                    break
            if ordered:
                out.add((a, i))
    return out


def _vector_clocks(sched: Schedule) -> dict[tuple[int, int], tuple[int, ...]]:
    """For each compute (stage, action index): per stage, how many of its actions happen before
    it (its own stage counted through itself). One walk in dependency order, as the simulator's."""
    n = sched.num_stages
    clock = [[0] * n for _ in range(n)]
    sent: dict[tuple[int, int, str], list[int]] = {}  # (unit, dst stage, payload) -> clock
    ptr = [0] * n
    out: dict[tuple[int, int], tuple[int, ...]] = {}
    remaining = sum(len(a) for a in sched.actions)
    while remaining:
        progressed = False
        for s in range(n):
            acts = sched.actions[s]
            while ptr[s] < len(acts):
                a = acts[ptr[s]]
                if a.kind is ActionKind.RECV:
                    key = (a.unit, s, a.payload)
                    if key not in sent:
                        break
                    clock[s] = [max(x, y) for x, y in zip(clock[s], sent[key])]
                ptr[s] += 1
                clock[s][s] = ptr[s]
                if a.kind is ActionKind.SEND:
                    sent[(a.unit, a.peer, a.payload)] = list(clock[s])
                elif a.kind is ActionKind.COMPUTE:
                    out[(s, ptr[s] - 1)] = tuple(clock[s])
                remaining -= 1
                progressed = True
        assert progressed, f"schedule deadlocks:\n{sched.grid()}"
    return out


def lent_time_s(cost, device: int, time_s: float, *, tokens: int, own_threads: int,
                threads: int) -> float:
    """A prefill compute's predicted time on ``threads`` lent threads, from its time
    ``time_s`` on device index ``device``'s own ``own_threads``: the speed-up the cost model
    measured (``lent_speedup``, from a profile that timed it), else Amdahl's law with
    LENT_PARALLEL_FRACTION."""
    measured = getattr(cost, "lent_speedup", None)
    speedup = measured(device, tokens=tokens, threads=threads) if measured else None
    if speedup:
        return time_s / speedup
    p = LENT_PARALLEL_FRACTION
    return time_s * ((1.0 - p) + p * own_threads / threads)
