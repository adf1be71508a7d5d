"""One rank's life: join the process group, hold its stage, run requests, report.

A rank is a device: in a local launch, rank r holds the r-th device of the plan in pipeline
order (each stage's devices in turn, the leader first), which is also the timeline's row r, so a
plan without tensor parallelism has rank r run stage r. Under torchrun, ``rank_of_device`` says
(see ``ranks_by_host``).

Two ways to drive a rank share every piece below:

- ``serve_rank``: the rank of a running Session (``hpipe.session``), a local worker's or a
  torchrun job's (hpipe/runtime/job_worker.py). It loads its stage once, makes the
  tensor-parallel groups once, then takes commands (run, cancel, close) as messages from its
  supervisor until it is closed, streaming tokens as they are sampled.
- ``run_requests``: a fixed list of requests, all ranks in the same order, results gathered to
  rank 0 (the profiler's calibration run, and ``hpipe.netns.launch_netns``). A stage is reloaded only when a
  request's layout differs from the previous one's.

[Note: a shared clock] Each request starts with a barrier on the control group; every rank takes
t = 0 when it leaves it. Ranks leave within about one loopback round trip of each other (well
under a millisecond here, one network round trip across hosts), which is the skew of the measured
timeline; intervals are then ``time.perf_counter()`` differences on each rank.
"""

from __future__ import annotations

import datetime
import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from hpipe.cluster import ClusterSpec, DeviceSpec
from hpipe.errors import ClusterError, WorkerFailedError
from hpipe.plan.plan import Plan, StagePlan
from hpipe.runtime.comm import GroupLink, StageLink, wire_device_for
from hpipe.runtime.request import RunRequest, RunResult, dtype_of
from hpipe.runtime.worker import (
    OnAction,
    OnToken,
    Progress,
    ShouldStop,
    StageOutcome,
    StageRunner,
)
from hpipe.timeline import Timeline

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rendezvous:
    """Where the ranks meet: ``tcp://addr:port``, a free local port for a local launch and
    MASTER_ADDR:MASTER_PORT under torchrun (torch serves that exactly as it serves ``env://``,
    torchrun's agent store included; the address is spelled out so errors can name it).

    ``connect_timeout_s`` bounds joining; ``collective_timeout_s`` (None: the same) bounds each
    collective and receive afterwards. A session sets it long: its liveness comes from the
    supervisor's heartbeat, and an idle pipeline has nothing pending that could time out.
    """

    addr: str
    port: int
    rank: int
    world_size: int
    backend: str  # "gloo" or "nccl"
    connect_timeout_s: float = 60.0
    collective_timeout_s: float | None = None

    @property
    def init_method(self) -> str:
        return f"tcp://{self.addr}:{self.port}"


def pick_backend(plans: list[Plan]) -> str:
    """NCCL when every device of every plan is on CUDA, otherwise gloo (see comm.py's note)."""
    devices = {plan.cluster.devices[d].torch_device for plan in plans for d in rank_devices(plan)}
    return "nccl" if all(d.startswith("cuda") for d in devices) else "gloo"


def rank_devices(plan: Plan) -> tuple[int, ...]:
    """Local launch: the cluster device each rank holds; rank r holds timeline row r's (see
    [Note: timeline rows] in hpipe/plan/plan.py)."""
    return plan.row_devices


def stage_ranks(plan: Plan, rank_of_device: dict[int, int] | None = None
                ) -> tuple[tuple[int, ...], ...]:
    """Each stage's ranks, its leader first; ``rank_of_device`` None means a local launch."""
    if rank_of_device is None:
        rank_of_device = {d: r for r, d in enumerate(rank_devices(plan))}
    return tuple(tuple(rank_of_device[d] for d in st.devices) for st in plan.stages)


def describe_rank(plan: Plan, rank: int) -> str:
    """"rank 2 (stage 1, device 'cpu2')" for errors, in a local launch."""
    for s, ranks in enumerate(stage_ranks(plan)):
        if rank in ranks:
            device = plan.cluster.devices[plan.stages[s].devices[ranks.index(rank)]]
            return f"rank {rank} (stage {s}, device {device.name!r})"
    return f"rank {rank}"


def build_tp_groups(plans: list[Plan], *, backend: str,
                    rank_of_device: dict[int, int] | None, timeout_s: float,
                    ) -> dict[tuple[int, ...], dist.ProcessGroup]:
    """A process group for every tensor-parallel stage of every plan, keyed by its sorted ranks.

    ``dist.new_group`` is collective over the whole world: every rank must create every group,
    members or not, in the same order, so the groups are made up front, sorted. Their timeout
    is at least a receive's, because a member waits in the leader's broadcast as long as the
    leader waits for the previous stage.
    """
    wanted = sorted({tuple(sorted(ranks)) for plan in plans
                     for ranks in stage_ranks(plan, rank_of_device) if len(ranks) > 1})
    timeout = datetime.timedelta(seconds=timeout_s)
    return {ranks: dist.new_group(list(ranks), backend=backend, timeout=timeout)
            for ranks in wanted}


def join_group(rv: Rendezvous) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """init_process_group; returns (data group, gloo control group).

    Joining waits at most ``connect_timeout_s``; the groups' own timeout is
    ``collective_timeout_s``. The control group carries the barrier and the pickled results; it
    is gloo even when the data group is NCCL, because gather_object over NCCL would need the
    objects on the GPU.
    """
    connect = datetime.timedelta(seconds=rv.connect_timeout_s)
    collective = datetime.timedelta(seconds=rv.collective_timeout_s or rv.connect_timeout_s)
    try:
        if collective == connect:  # torchrun's agent store is reached through init_method
            dist.init_process_group(rv.backend, init_method=rv.init_method, rank=rv.rank,
                                    world_size=rv.world_size, timeout=connect)
        else:
            store = dist.TCPStore(rv.addr, rv.port, rv.world_size, rv.rank == 0, timeout=connect)
            dist.init_process_group(rv.backend, store=store, rank=rv.rank,
                                    world_size=rv.world_size, timeout=collective)
            dist.barrier()  # every rank has joined, within the connect timeout's reach
    except (RuntimeError, TimeoutError) as e:  # DistStoreError / DistNetworkError subclass RuntimeError
        raise WorkerFailedError(
            f"rank {rv.rank} could not join the process group at {rv.addr}:{rv.port} within "
            f"{rv.connect_timeout_s:g} s ({type(e).__name__}: {str(e).splitlines()[0]}); check "
            "that rank 0 runs on that address, the port is open, and MASTER_ADDR/MASTER_PORT "
            "agree on every host") from e
    world = dist.group.WORLD
    ctrl = world if rv.backend == "gloo" else dist.new_group(backend="gloo", timeout=collective)
    return world, ctrl


# -- what a rank holds across requests --------------------------------------------------------
@dataclass
class RankStage:
    """One rank's stage, loaded once and kept across requests: its weights (or its
    tensor-parallel share), its device and its link to the rest of its TP group."""

    model: str  # what open_model was given
    layout: tuple[StagePlan, ...]  # the plan's stages it was loaded for
    stage_index: int
    member: int  # index in the stage's TP group; 0 = the leader
    module: torch.nn.Module
    device: torch.device
    device_spec: DeviceSpec
    rank_of_stage: dict[int, int]  # the stage leaders' ranks
    group: GroupLink | None = None


class StageHost:
    """The stage a rank holds and how often it loaded one (the session's tests count loads)."""

    def __init__(self, *, rank: int, backend: str, rank_of_device: dict[int, int] | None,
                 tp_groups: dict[tuple[int, ...], dist.ProcessGroup]) -> None:
        self.rank = rank
        self.backend = backend
        self.rank_of_device = rank_of_device
        self.tp_groups = tp_groups
        self.current: RankStage | None = None
        self.num_loads = 0
        self._sources: dict[str, object] = {}

    def stage_for(self, model: str, plan: Plan) -> RankStage | None:
        """This rank's stage of ``plan`` (None if the plan does not use this rank), loading its
        weights only when the model or the layout differs from what is held."""
        held = self.current
        if held is not None and (held.model, held.layout) == (model, plan.stages):
            return held
        self.current = None  # drop the old weights before reading the new ones
        ranks = stage_ranks(plan, self.rank_of_device)
        mine = [(s, group.index(self.rank)) for s, group in enumerate(ranks) if self.rank in group]
        if not mine:
            return None
        (s, member), = mine
        self.current = self._load(model, plan, s, member, ranks)
        return self.current

    def _load(self, model: str, plan: Plan, s: int, member: int, ranks) -> RankStage:
        from hpipe.model.shard import plan_shard
        from hpipe.model.source import open_model

        st = plan.stages[s]
        dev_spec = plan.cluster.devices[st.devices[member]]
        device = torch.device(dev_spec.torch_device)
        torch.set_num_threads(dev_spec.num_threads)
        if model not in self._sources:
            self._sources[model] = open_model(model)
        source = self._sources[model]
        group, tp_args = None, {}
        if len(st.devices) > 1:
            group = GroupLink(self.tp_groups[tuple(sorted(ranks[s]))], rank=self.rank,
                              leader=ranks[s][0], compute_device=device,
                              wire_device=wire_device_for(self.backend))
            spec = source.spec  # the loader slices by the model's own heads
            tp_args = {"tp": plan_shard(spec, rank=member, size=len(st.devices)),
                       "all_reduce": group.all_reduce}
        module = source.load_stage(
            st.layer_start, st.layer_stop, has_embedding=s == 0,
            # Only the last stage's leader samples, so only it needs the head.
            has_head=s == plan.num_stages - 1 and member == 0, dtype=dtype_of(plan),
            device=device, **tp_args)
        self.num_loads += 1
        log.info("rank %d: stage %d%s layers [%d, %d) on %s (%s, %d threads)%s", self.rank, s,
                 f" (TP member {member} of {len(st.devices)})" if group else "",
                 st.layer_start, st.layer_stop, dev_spec.name, device, dev_spec.num_threads,
                 f", emulated slowdown x{dev_spec.slowdown:g}" if dev_spec.emulated else "")
        return RankStage(model=model, layout=plan.stages, stage_index=s, member=member, module=module,
                         device=device, device_spec=dev_spec,
                         rank_of_stage={k: g[0] for k, g in enumerate(ranks)}, group=group)

    def run(self, req: RunRequest, *, data_group: dist.ProcessGroup, clock: Callable[[], float],
            progress: Progress | None = None, on_token: OnToken | None = None,
            should_stop: ShouldStop | None = None,
            on_action: OnAction | None = None) -> StageOutcome | None:
        """This rank's part of ``req`` (None when the plan leaves it out)."""
        rs = self.stage_for(req.model, req.plan)
        if rs is None:
            return None
        link = StageLink(data_group, rank=self.rank, compute_device=rs.device,
                         wire_device=wire_device_for(self.backend),
                         recv_timeout_s=req.recv_timeout_s, rank_of_stage=rs.rank_of_stage,
                         clock=clock)
        runner = StageRunner(req, stage_index=rs.stage_index, stage_module=rs.module, link=link,
                             device=rs.device, slowdown=rs.device_spec.slowdown,
                             progress=progress, member=rs.member, group=rs.group,
                             on_token=on_token, should_stop=should_stop,
                             on_action=on_action)
        t0 = time.perf_counter()
        try:
            outcome = runner.run()
        finally:
            link.close()
        outcome.num_stage_loads = self.num_loads
        log.info("rank %d: %s done in %.3f s", self.rank, req.label or req.plan.method,
                 time.perf_counter() - t0)
        return outcome


def freeze_heap() -> None:
    """[Note: a frozen heap] Python's full garbage collection walks every object the process
    holds, and a worker holds torch's and the model's: 75-130 ms per full collection, measured
    in a local:2 session's workers (SmolLM2), about one per 50 decode steps. It ran inside
    whichever compute was under way, so a 25-60 ms decode step now and then took 100 ms more
    (and an emulated slowdown multiplied it: a tiny model's first decode step on a 300x
    "device" took 27 s). Once the stage is loaded, everything alive stays alive, so it is
    collected once and frozen (``gc.freeze``: later collections skip it); full collections then
    took 0.1-0.3 ms."""
    gc.collect()
    gc.freeze()


def start_clock(ctrl_group: dist.ProcessGroup) -> Callable[[], float]:
    """Barrier, then a clock from 0 (see [Note: a shared clock])."""
    dist.barrier(group=ctrl_group)
    t0 = time.perf_counter()
    return lambda: time.perf_counter() - t0


# -- a fixed list of requests (calibration, launch_netns) -----------------------------------------
def run_requests(
    requests: list[RunRequest], *, rank: int, world_size: int, data_group: dist.ProcessGroup,
    ctrl_group: dist.ProcessGroup, backend: str, progress: Progress | None = None,
    rank_of_device: dict[int, int] | None = None,
) -> list[RunResult] | None:
    """Run every request; rank 0 returns the results, the others None.

    A rank that a plan does not use sits that request out but still joins the barrier and the
    gather, which are collective. ``rank_of_device`` (cluster device index -> rank) says which
    process holds which device; None means a local launch (see ``rank_devices``).
    """
    tp_groups = build_tp_groups([r.plan for r in requests], backend=backend,
                                rank_of_device=rank_of_device,
                                timeout_s=max(req.recv_timeout_s for req in requests))
    host = StageHost(rank=rank, backend=backend, rank_of_device=rank_of_device,
                     tp_groups=tp_groups)
    results: list[RunResult] = []
    for req in requests:
        host.stage_for(req.model, req.plan)  # load before the clock starts
        freeze_heap()
        clock = start_clock(ctrl_group)
        outcome = host.run(req, data_group=data_group, clock=clock, progress=progress)
        gathered: list | None = [None] * world_size if rank == 0 else None
        dist.gather_object(outcome, gathered, dst=0, group=ctrl_group)
        if rank == 0:
            results.append(assemble_result(req, [g for g in gathered if g is not None]))
    return results if rank == 0 else None


# -- a session's rank -------------------------------------------------------------------------
def serve_rank(plan: Plan, model: str, ctx, commands, emit: Callable[[tuple], None]) -> None:
    """The rank of a running Session: load once, then obey ``commands`` until "close".

    ``commands`` is this rank's queue of messages from the supervisor, every rank getting the
    same ones in the same order: ``("run", id, RunRequest)``, ``("cancel", id)``, ``("close",)``,
    and the serving scheduler's ``("admit", id, room, temperature, top_p, seed, source,
    cached)``, ``("item", Item)``, ``("release", id)``, ``("evict", key)`` (see
    hpipe/runtime/items.py).
    ``emit`` sends to the supervisor: ``("ready", rank, num_loads)`` once loaded,
    ``("token", id, ids per row)`` and ``("progress", id, kind, done, total)`` from the rank
    that samples, and ``("outcome", id, rank, StageOutcome)`` from every rank after each run.

    [Note: cancel] Only two places act on a cancel, both at a unit boundary, so that every rank
    still ends its action list cleanly: stage 0 (a one-device stage) stops feeding prefill
    slices and sends STOP down the chain, and the sampling rank sends STOP instead of the next
    token (the early-EOS path, see worker.py's [Note: early stop]). A request cancelled
    mid-prefill therefore ends within one slice, and in decode within one step.
    """
    tp_groups = build_tp_groups([plan], backend=ctx.backend, rank_of_device=ctx.rank_of_device,
                                timeout_s=COLLECTIVE_TIMEOUT_S)
    host = StageHost(rank=ctx.rank, backend=ctx.backend, rank_of_device=ctx.rank_of_device,
                     tp_groups=tp_groups)
    rs = host.stage_for(model, plan)
    freeze_heap()
    emit(("ready", ctx.rank, host.num_loads))
    inbox = _Commands(commands)
    items = None  # the serving scheduler's side (hpipe/runtime/items.py), made on first use
    while True:
        cmd = inbox.next()
        if cmd[0] == "close":
            if items is not None:
                items.drain()
            return
        if cmd[0] in ("admit", "item", "release", "evict"):
            if items is None:
                from hpipe.runtime.items import ItemRunner

                items = ItemRunner(rs, plan=plan, rank=ctx.rank, backend=ctx.backend,
                                   data_group=ctx.data_group, emit=emit,
                                   recv_timeout_s=COLLECTIVE_TIMEOUT_S)
            if cmd[0] == "admit":
                _, rid, room, temperature, top_p, seed, source, cached = cmd
                items.admit(rid, room_tokens=room, temperature=temperature, top_p=top_p,
                            seed=seed, source=source, cached=cached)
            elif cmd[0] == "item":
                items.run(cmd[1])
            elif cmd[0] == "evict":
                items.evict(cmd[1])
            else:
                items.release(cmd[1])
            continue
        if cmd[0] != "run":
            continue  # a cancel for a request that already ended
        _, rid, req = cmd

        def stop(rid=rid) -> bool:
            return inbox.cancelled(rid)

        clock = start_clock(ctx.ctrl_group)
        outcome = host.run(
            req, data_group=ctx.data_group, clock=clock,
            progress=lambda kind, done, total, rid=rid: emit(("progress", rid, kind, done, total)),
            on_token=lambda ids, rid=rid: emit(("token", rid, ids)), should_stop=stop,
            on_action=ctx.mark_action)
        ctx.mark_action(-1)
        emit(("outcome", rid, ctx.rank, outcome))
        inbox.forget(rid)


# A session's collectives and receives may wait this long: a long prompt upstream is the longest
# legitimate wait. A rank that stopped is found by the supervisor's heartbeat long before.
COLLECTIVE_TIMEOUT_S = 24 * 3600.0


class _Commands:
    """A rank's command queue, read between requests and polled for cancels during one."""

    def __init__(self, queue) -> None:
        self.queue = queue
        self.later: list[tuple] = []
        self.cancels: set = set()

    def next(self) -> tuple:
        if self.later:
            return self.later.pop(0)
        while True:
            cmd = self.queue.get()
            if cmd[0] != "cancel":
                return cmd
            self.cancels.add(cmd[1])

    def cancelled(self, rid) -> bool:
        import queue as queue_mod

        while True:
            try:
                cmd = self.queue.get_nowait()
            except queue_mod.Empty:
                break
            if cmd[0] == "cancel":
                self.cancels.add(cmd[1])
            else:
                self.later.append(cmd)
        return rid in self.cancels

    def forget(self, rid) -> None:
        self.cancels.discard(rid)


def ranks_by_host(cluster: ClusterSpec, members: list[tuple[str, int]]) -> dict[int, int]:
    """Cluster device index -> rank, from each rank's (host name, LOCAL_RANK).

    torchrun's c10d rendezvous numbers nodes in the order they join, not in the cluster file's
    order, so a rank finds its device by host: the k-th device of host H is LOCAL_RANK k on
    the machine whose ``HPIPE_HOST`` (default: its hostname) is H. A one-host cluster needs no
    names: rank r holds device r.
    """
    if len(cluster.hosts) == 1:
        return {d: d for d in range(cluster.num_devices)}
    where = {member: rank for rank, member in enumerate(members)}
    out = {}
    for host in cluster.hosts:
        for k, name in enumerate(host.device_names):
            if (host.name, k) not in where:
                seen = sorted({h for h, _ in members})
                raise ClusterError(
                    f"cluster host {host.name!r} device {name!r} (local rank {k}) has no torchrun "
                    f"process; processes came from hosts {seen}: set HPIPE_HOST={host.name} on "
                    f"that machine and start {len(host.device_names)} processes per node there")
            out[cluster.device_index(name)] = where[(host.name, k)]
    return out


def assemble_result(req: RunRequest, outcomes: list[StageOutcome]) -> RunResult:
    """The ranks' reports -> one RunResult with a measured Timeline, one row per device."""
    plan = req.plan
    devs = [plan.cluster.devices[d] for d in plan.row_devices]
    outcomes = sorted(outcomes, key=lambda o: o.row)
    assert [o.row for o in outcomes] == list(range(len(devs))), [o.row for o in outcomes]
    last = next(o for o in outcomes if o.stage == plan.num_stages - 1 and o.member == 0)
    intervals = sorted((iv for o in outcomes for iv in o.intervals),
                       key=lambda iv: (iv.start_s, iv.row))
    timeline = Timeline(
        source="measured", method=plan.method, row_names=plan.row_names,
        intervals=tuple(intervals),
        peak_memory_bytes=tuple(o.peak_memory_bytes for o in outcomes),
        busy_power_w=tuple(d.busy_power_w for d in devs),
        idle_power_w=tuple(d.idle_power_w for d in devs),
        batch=req.batch, seq_len=req.prompt_len, emulated=any(d.emulated for d in devs))
    logits = last.prefill_logits
    if logits is None:
        logits = torch.empty(req.batch, 0)
    return RunResult(label=req.label or plan.method,
                     output_ids=tuple(tuple(r) for r in (last.output_ids or [[]] * req.batch)),
                     prefill_logits=logits, timeline=timeline,
                     num_decode_steps=last.num_decode_steps,
                     prefill_cpu_s=tuple(o.prefill_cpu_s for o in outcomes),
                     prefill_allreduce_s=tuple(o.prefill_allreduce_s for o in outcomes),
                     cancelled=any(o.cancelled for o in outcomes),
                     num_stage_loads=tuple(o.num_stage_loads for o in outcomes))
