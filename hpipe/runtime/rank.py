"""One rank's life: join the process group, run its stage of each request, report to rank 0.

Used both by the local launcher (one spawned process per rank) and under ``torchrun`` (the
launched program is this rank). A rank is a device: in a local launch, rank r holds the r-th
device of the plan in pipeline order (each stage's devices in turn, the leader first), which is
also the timeline's row r, so a plan without tensor parallelism has rank r run stage r. Under
torchrun, ``rank_of_device`` says (see ``ranks_by_host``). A rank that a plan does not use sits
that request out but still joins the barrier and the gather, which are collective. All ranks
take the same list of requests, in the same order.

[Note: a shared clock] Each request starts with a barrier on the control group; every rank takes
t = 0 when it leaves it. Ranks leave within about one loopback round trip of each other (well
under a millisecond here, one network round trip across hosts), which is the skew of the measured
timeline; intervals are then ``time.perf_counter()`` differences on each rank.
"""

from __future__ import annotations

import datetime
import logging
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from hpipe.cluster import ClusterSpec
from hpipe.errors import ClusterError, WorkerFailedError
from hpipe.plan.plan import Plan
from hpipe.runtime.comm import GroupLink, StageLink, wire_device_for
from hpipe.runtime.request import RunRequest, RunResult, dtype_of
from hpipe.runtime.worker import Progress, StageOutcome, StageRunner
from hpipe.timeline import Timeline

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rendezvous:
    """Where the ranks meet: ``tcp://addr:port``, a free local port for a local launch and
    MASTER_ADDR:MASTER_PORT under torchrun (torch serves that exactly as it serves ``env://``,
    torchrun's agent store included; the address is spelled out so errors can name it)."""

    addr: str
    port: int
    rank: int
    world_size: int
    backend: str  # "gloo" or "nccl"
    connect_timeout_s: float = 60.0

    @property
    def init_method(self) -> str:
        return f"tcp://{self.addr}:{self.port}"


def pick_backend(requests: list[RunRequest]) -> str:
    """NCCL when every device of every request is on CUDA, otherwise gloo (see comm.py's note)."""
    devices = {req.plan.cluster.devices[d].torch_device
               for req in requests for d in rank_devices(req.plan)}
    return "nccl" if all(d.startswith("cuda") for d in devices) else "gloo"


def rank_devices(plan: Plan) -> tuple[int, ...]:
    """Local launch: the cluster device each rank holds, i.e. the plan's devices in pipeline
    order (the simulator's timeline rows)."""
    return tuple(d for st in plan.stages for d in st.devices)


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


def build_tp_groups(requests: list[RunRequest], *, backend: str,
                    rank_of_device: dict[int, int] | None, timeout_s: float,
                    ) -> dict[tuple[int, ...], dist.ProcessGroup]:
    """A process group for every tensor-parallel stage of every request, keyed by its sorted ranks.

    ``dist.new_group`` is collective over the whole world: every rank must create every group,
    members or not, in the same order, so the groups are made up front, sorted. Their timeout is
    the requests' receive timeout, because a member waits in the leader's broadcast as long as
    the leader waits for the previous stage.
    """
    wanted = sorted({tuple(sorted(ranks)) for req in requests
                     for ranks in stage_ranks(req.plan, rank_of_device) if len(ranks) > 1})
    timeout = datetime.timedelta(seconds=timeout_s)
    return {ranks: dist.new_group(list(ranks), backend=backend, timeout=timeout)
            for ranks in wanted}


def join_group(rv: Rendezvous) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """init_process_group with an explicit timeout; returns (data group, gloo control group).

    The control group carries the barrier and the pickled results; it is gloo even when the
    data group is NCCL, because gather_object over NCCL would need the objects on the GPU.
    """
    timeout = datetime.timedelta(seconds=rv.connect_timeout_s)
    try:
        dist.init_process_group(rv.backend, init_method=rv.init_method, rank=rv.rank,
                                world_size=rv.world_size, timeout=timeout)
    except (RuntimeError, TimeoutError) as e:  # DistStoreError / DistNetworkError subclass RuntimeError
        raise WorkerFailedError(
            f"rank {rv.rank} could not join the process group at {rv.addr}:{rv.port} within "
            f"{rv.connect_timeout_s:g} s ({type(e).__name__}: {str(e).splitlines()[0]}); check "
            "that rank 0 runs on that address, the port is open, and MASTER_ADDR/MASTER_PORT "
            "agree on every host") from e
    world = dist.group.WORLD
    ctrl = world if rv.backend == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
    return world, ctrl


def run_requests(
    requests: list[RunRequest], *, rank: int, world_size: int, data_group: dist.ProcessGroup,
    ctrl_group: dist.ProcessGroup, backend: str, progress: Progress | None = None,
    rank_of_device: dict[int, int] | None = None,
) -> list[RunResult] | None:
    """Run every request; rank 0 returns the results, the others None.

    ``rank_of_device`` (cluster device index -> rank) says which process holds which device;
    None means a local launch (see ``rank_devices``).
    """
    from hpipe.model.shard import plan_shard
    from hpipe.model.source import open_model

    sources: dict[str, object] = {}
    results: list[RunResult] = []
    tp_groups = build_tp_groups(requests, backend=backend, rank_of_device=rank_of_device,
                                timeout_s=max(req.recv_timeout_s for req in requests))
    for req in requests:
        plan = req.plan
        outcome: StageOutcome | None = None
        runner = None
        ranks = stage_ranks(plan, rank_of_device)
        rank_of_stage = {s: group[0] for s, group in enumerate(ranks)}  # the leaders
        mine = [(s, group.index(rank)) for s, group in enumerate(ranks) if rank in group]
        if mine:
            (me, member), = mine
            st = plan.stages[me]
            dev_spec = plan.cluster.devices[st.devices[member]]
            device = torch.device(dev_spec.torch_device)
            torch.set_num_threads(dev_spec.num_threads)
            if req.model not in sources:
                sources[req.model] = open_model(req.model)
            group = None
            tp_args = {}
            if len(st.devices) > 1:
                group = GroupLink(tp_groups[tuple(sorted(ranks[me]))], rank=rank,
                                  leader=ranks[me][0], compute_device=device,
                                  wire_device=wire_device_for(backend))
                spec = sources[req.model].spec  # the loader slices by the model's own heads
                tp_args = {"tp": plan_shard(spec, rank=member, size=len(st.devices)),
                           "all_reduce": group.all_reduce}
            stage = sources[req.model].load_stage(
                st.layer_start, st.layer_stop, has_embedding=me == 0,
                # Only the last stage's leader samples, so only it needs the head.
                has_head=me == plan.num_stages - 1 and member == 0, dtype=dtype_of(plan),
                device=device, **tp_args)
            link = StageLink(data_group, rank=rank, compute_device=device,
                             wire_device=wire_device_for(backend),
                             recv_timeout_s=req.recv_timeout_s, rank_of_stage=rank_of_stage)
            runner = StageRunner(req, stage_index=me, stage_module=stage, link=link,
                                 device=device, slowdown=dev_spec.slowdown, progress=progress,
                                 member=member, group=group)
            log.info("rank %d: stage %d%s layers [%d, %d) on %s (%s, %d threads)%s", rank, me,
                     f" (TP member {member} of {len(st.devices)})" if group else "",
                     st.layer_start, st.layer_stop, dev_spec.name, device, dev_spec.num_threads,
                     f", emulated slowdown x{dev_spec.slowdown:g}" if dev_spec.emulated else "")
        dist.barrier(group=ctrl_group)
        t0 = time.perf_counter()  # see [Note: a shared clock]
        if runner is not None:
            runner.link.clock = lambda t0=t0: time.perf_counter() - t0
            outcome = runner.run()
            log.info("rank %d: %s done in %.3f s", rank, req.label or plan.method,
                     time.perf_counter() - t0)
        gathered: list | None = [None] * world_size if rank == 0 else None
        dist.gather_object(outcome, gathered, dst=0, group=ctrl_group)
        if rank == 0:
            results.append(assemble_result(req, [g for g in gathered if g is not None]))
    return results if rank == 0 else None


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
    """Rank 0: the ranks' reports -> one RunResult with a measured Timeline, one row per device."""
    plan = req.plan
    devs = [plan.cluster.devices[d] for d in rank_devices(plan)]  # in row order
    outcomes = sorted(outcomes, key=lambda o: o.row)
    assert [o.row for o in outcomes] == list(range(len(devs))), [o.row for o in outcomes]
    last = next(o for o in outcomes if o.stage == plan.num_stages - 1 and o.member == 0)
    intervals = sorted((iv for o in outcomes for iv in o.intervals),
                       key=lambda iv: (iv.start_s, iv.row))
    timeline = Timeline(
        source="measured", method=plan.method, row_names=tuple(d.name for d in devs),
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
                     prefill_allreduce_s=tuple(o.prefill_allreduce_s for o in outcomes))
