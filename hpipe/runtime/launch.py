"""Start the ranks: N local worker processes under a supervisor, or this process under torchrun.

Local launch (``--cluster local:N`` or a cluster file whose devices are all on this machine):
``launch_ranks`` runs a per-rank target once on spawned workers watched by the supervisor of
``hpipe.runtime.pool`` (dead or silent workers, Ctrl-C, no orphans). A Session
(``hpipe.session``) keeps such a pool running instead; this module holds what both need before
any worker starts: refusing devices this machine lacks, and warning when cores are short.

Under torchrun, ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` are set by torchrun's c10d
rendezvous; ``run_torchrun_rank`` joins ``tcp://MASTER_ADDR:MASTER_PORT`` through
``rank.join_group`` (torch serves that the same way as ``env://``, torchrun's agent store
included, and the wrapper names the address when it cannot be reached) and runs this rank.

Both paths run a per-rank *target*, ``target(payload, RankContext) -> result``, and return rank
0's result: ``launch_local`` / ``run_as_torchrun_rank`` run RunRequests with it, and the profiler
(``hpipe.profile.launch``) runs its measurements with it, so there is one supervisor.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Collection
from typing import Any, NoReturn

from hpipe import errors
from hpipe.cluster import ClusterSpec
from hpipe.runtime.liveness import DEFAULT_LIVENESS_S
from hpipe.runtime.pool import OnProgress, RankContext, WorkerSettings, run_once
from hpipe.runtime.request import RunRequest, RunResult

log = logging.getLogger(__name__)

# Busy cores beyond those a cluster leaves free before a run warns: a shell or an editor adds a
# few tenths without taking a core. The window is short because every launch pays it.
BUSY_SLACK_CORES = 0.5
BUSY_WINDOW_S = 0.2
# target(payload, ctx) -> a picklable result; rank 0's is what the launch returns. Local launch
# pickles target and payload into each spawned worker, so target must be a module-level function.
RankTarget = Callable[[Any, RankContext], Any]


def free_port(addr: str = "127.0.0.1") -> int:
    """A port nobody listens on now. Another process could take it before rank 0 binds it;
    on a developer machine that race is rare enough to not warrant a retry loop."""
    with socket.socket() as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def launch_local(
    requests: list[RunRequest], *, world_size: int | None = None, addr: str = "127.0.0.1",
    port: int | None = None, connect_timeout_s: float = 60.0,
    on_progress: OnProgress | None = None, on_started: Callable[[list[int]], None] | None = None,
    liveness_s: float = DEFAULT_LIVENESS_S,
) -> list[RunResult]:
    """Run ``requests`` in order on ``world_size`` local worker processes; rank 0's results.

    A Session (``hpipe.session``) is the way to run many requests on one set of workers; this
    one-shot launch is for a fixed list (the tests' harness, benchmarks)."""
    from hpipe.runtime.rank import describe_rank, pick_backend, rank_devices

    # One rank per device the plan uses (a tensor-parallel stage has several; see rank.py).
    world_size = world_size or max(len(rank_devices(r.plan)) for r in requests)
    check_local_devices([r.plan for r in requests])
    backend = pick_backend([r.plan for r in requests])
    warn_if_oversubscribed([r.plan.cluster for r in requests])

    def where(rank: int) -> str:
        return describe_rank(requests[0].plan, rank)

    widest = max((r.plan for r in requests), key=lambda p: len(rank_devices(p)))
    cuda_devices = list(cuda_devices_of(widest)) if backend == "nccl" else None
    return launch_ranks(_run_requests, requests, world_size=world_size, backend=backend,
                        addr=addr, port=port, connect_timeout_s=connect_timeout_s,
                        on_progress=on_progress, progress_ranks=(_last_rank(requests),),
                        on_started=on_started, describe_rank=where, cuda_devices=cuda_devices,
                        liveness_s=liveness_s)


def check_local_devices(plans: list) -> None:
    """Refuse, before any worker starts, a plan whose devices name a CUDA device this machine's
    torch cannot use (a CPU-only build, or cuda:K past its GPUs): the worker would fail
    anyway, with torch's own message about a missing attribute."""
    import torch

    from hpipe.runtime.rank import rank_devices

    num_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for plan in plans:
        for d in rank_devices(plan):
            dev = plan.cluster.devices[d]
            if not dev.torch_device.startswith("cuda"):
                continue
            index = int(dev.torch_device.partition(":")[2] or 0)
            if index >= num_gpus:
                raise errors.DeviceError(
                    f"device {dev.name!r} of cluster {plan.cluster.name!r} computes on "
                    f"torch_device {dev.torch_device!r}, but torch here sees {num_gpus} CUDA "
                    "device(s); set its torch_device to cpu (or a GPU this machine has), or run "
                    "on the machine that has it (torchrun)")


def cpu_demand_cores(cluster) -> float:
    """Cores the cluster's CPU workers keep busy when all compute: threads each, divided by an
    emulated slowdown (such a worker sleeps (k - 1) / k of the time; see hpipe.emulation)."""
    return sum(d.num_threads / max(1.0, d.slowdown) for d in cluster.devices
               if d.torch_device == "cpu")


def busy_cores_now(window_s: float = BUSY_WINDOW_S) -> float:
    """Cores other processes keep busy right now: the non-idle share of /proc/stat's CPU time
    over ``window_s``, times the core count (0 where /proc/stat is missing). Not the load
    average: that one lags a minute, so it blamed a run for the test suite that had just ended."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
        return sum(ticks), ticks[3] + ticks[4]  # all, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(window_s)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return 0.0
    if total1 <= total0:
        return 0.0
    return (1 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1)


def warn_if_oversubscribed(clusters: list[ClusterSpec], *, busy_cores: float | None = None
                           ) -> None:
    """A local cluster wanting more cores than this machine has still runs, but its workers
    then wait for cores: timings stop describing the devices the cluster file names. The same
    holds when other processes already keep cores busy (``busy_cores``; measured when None),
    which on a small machine is the commoner case."""
    cores = len(os.sched_getaffinity(0))
    clusters = {id(c): c for c in clusters}.values()
    needs = {c.name: cpu_demand_cores(c) for c in clusters}
    for name, need in needs.items():
        if need > cores + 1e-9:
            log.warning(
                "cluster %r: its CPU workers need about %.1f cores (threads / emulated slowdown) "
                "but this machine has %d; computes will wait for a core, so measured times "
                "include that wait. Give the workers fewer threads or fewer devices for "
                "timings that describe the cluster.", name, need, cores)
            return
    need = max(needs.values(), default=0.0)
    if need <= 0:
        return
    busy = busy_cores_now() if busy_cores is None else busy_cores
    if need + busy > cores + BUSY_SLACK_CORES:
        log.warning(
            "other processes keep about %.1f of this machine's %d cores busy, and the CPU "
            "workers need about %.1f: they will share cores, so measured times and ratios "
            "will be off. For timings, run when the machine is idle (see `top`).",
            busy, cores, need)


def launch_ranks(
    target: RankTarget, payload: Any, *, world_size: int, backend: str = "gloo",
    addr: str = "127.0.0.1", port: int | None = None, connect_timeout_s: float = 60.0,
    on_progress: OnProgress | None = None, progress_ranks: Collection[int] | None = None,
    on_started: Callable[[list[int]], None] | None = None,
    describe_rank: Callable[[int], str] | None = None, cuda_devices: list[str] | None = None,
    process_name: str = "hpipe-rank", liveness_s: float = DEFAULT_LIVENESS_S,
) -> Any:
    """Run ``target(payload, ctx)`` on ``world_size`` spawned local processes joined over
    ``backend``, supervised by ``hpipe.runtime.pool``; returns rank 0's result.

    ``progress_ranks``: the ranks whose progress reaches ``on_progress`` (None: all).
    ``describe_rank(r)`` names rank r in errors ("rank 1 (stage 1, device 'cpu1')").
    ``cuda_devices[r]``: the CUDA device rank r binds before joining (NCCL needs one each).
    """
    settings = WorkerSettings(
        world_size=world_size, addr=addr, port=port or free_port(addr), backend=backend,
        connect_timeout_s=connect_timeout_s,
        cuda_devices=tuple(cuda_devices) if cuda_devices else None,
        progress_ranks=None if progress_ranks is None else tuple(progress_ranks))
    return run_once(target, payload, settings, on_progress=on_progress, on_started=on_started,
                    describe_rank=describe_rank, liveness_s=liveness_s,
                    process_name=process_name)


def _last_rank(requests: list[RunRequest]) -> int:
    from hpipe.runtime.rank import stage_ranks

    return stage_ranks(requests[0].plan)[-1][0]  # the last stage's leader samples


def _run_requests(requests: list[RunRequest], ctx: RankContext) -> list[RunResult] | None:
    """The runtime's per-rank target: this rank's stage of every request."""
    from hpipe.runtime.rank import run_requests

    return run_requests(requests, rank=ctx.rank, world_size=ctx.world_size,
                        data_group=ctx.data_group, ctrl_group=ctx.ctrl_group,
                        backend=ctx.backend, progress=ctx.progress,
                        rank_of_device=ctx.rank_of_device)


def cuda_devices_of(plan) -> tuple[str, ...]:
    """The CUDA device each rank computes on (NCCL binds one device per process)."""
    from hpipe.runtime.rank import rank_devices

    return tuple(plan.cluster.devices[d].torch_device for d in rank_devices(plan))


def leave_rank(code: int) -> NoReturn:
    """End this torchrun rank now, its output flushed, skipping the interpreter's finalisation:
    tearing down torch's distributed threads there has aborted a rank whose work was done
    (SIGABRT, "terminate called without an active exception"), about once in a full test suite
    under load, and torchrun then reports the whole job failed."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def torchrun_env() -> dict[str, str] | None:
    """RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT when this process was started by torchrun."""
    keys = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    if all(k in os.environ for k in keys):
        return {k: os.environ[k] for k in keys}
    return None


def run_as_torchrun_rank(requests: list[RunRequest], *, env: dict[str, str],
                         connect_timeout_s: float = 300.0) -> list[RunResult] | None:
    """This process is one rank of a torchrun job; rank 0 returns the results."""
    from hpipe.runtime.rank import pick_backend

    return run_torchrun_rank(_run_requests, requests, env=env,
                             cluster=requests[0].plan.cluster,
                             backend=pick_backend([r.plan for r in requests]),
                             connect_timeout_s=connect_timeout_s)


def run_torchrun_rank(target: RankTarget, payload: Any, *, env: dict[str, str],
                      cluster: ClusterSpec, backend: str = "gloo",
                      connect_timeout_s: float = 300.0,
                      on_progress: OnProgress | None = None) -> Any:
    """Run ``target(payload, ctx)`` as this process's rank of a torchrun job (``env`` from
    ``torchrun_env``); rank 0 returns its result, the others None.

    Ranks find their device by host (see rank.ranks_by_host), so the c10d rendezvous may number
    the nodes in any order. ``on_progress`` is called in this process.
    """
    import torch
    import torch.distributed as dist

    from hpipe.runtime.rank import Rendezvous, join_group, ranks_by_host

    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    if world != cluster.num_devices:
        raise errors.ClusterError(
            f"torchrun started {world} processes but cluster {cluster.name!r} has "
            f"{cluster.num_devices} devices; start one process per device "
            "(--nnodes x --nproc-per-node)")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    host = os.environ.get("HPIPE_HOST", socket.gethostname())
    rv = Rendezvous(addr=env["MASTER_ADDR"], port=int(env["MASTER_PORT"]), rank=rank,
                    world_size=world, backend=backend, connect_timeout_s=connect_timeout_s)
    if backend == "nccl":
        torch.cuda.set_device(local_rank)  # the k-th device of a host is its LOCAL_RANK k
    data, ctrl = join_group(rv)
    try:
        members: list = [None] * world
        dist.all_gather_object(members, (host, local_rank), group=ctrl)
        rank_of_device = ranks_by_host(cluster, [tuple(m) for m in members])
        result = target(payload, RankContext(rank=rank, world_size=world, backend=backend,
                                             data_group=data, ctrl_group=ctrl,
                                             progress=on_progress,
                                             rank_of_device=rank_of_device))
        return result if rank == 0 else None
    finally:
        dist.destroy_process_group()
