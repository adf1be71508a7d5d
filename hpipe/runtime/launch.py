"""Start the ranks: N local worker processes under a supervisor, or this process under torchrun.

Local launch (``--cluster local:N`` or a cluster file whose devices are all on this machine):
the caller's process is a supervisor, not a rank. It spawns one process per rank (``spawn``, so
each worker starts a clean interpreter with its own torch thread pool), which meet over gloo on
127.0.0.1, and then watches them:

- a worker that dies (``kill -9``, an out-of-memory kill, a crash) is noticed within
  ``POLL_S`` from its exit code; the others are terminated and ``WorkerFailedError`` names the
  rank, its device and the signal or exit code, well within 30 s;
- a worker that raises reports the exception (type, message, traceback) over a queue; typed
  errors (``ShapeMismatchError``, any ``HPipeError``) are re-raised as the same type;
- Ctrl-C, or any exception in the supervisor, terminates the workers (SIGTERM, then SIGKILL
  after ``GRACE_S``); the workers also ask Linux to SIGKILL them if the supervisor dies
  (``PR_SET_PDEATHSIG``), so nothing is orphaned even when the supervisor is killed.

Under torchrun, ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` are set by torchrun's c10d
rendezvous; ``run_torchrun_rank`` joins ``tcp://MASTER_ADDR:MASTER_PORT`` through
``rank.join_group`` (torch serves that the same way as ``env://``, torchrun's agent store
included, and the wrapper names the address when it cannot be reached) and runs this rank.

Both paths run a per-rank *target*, ``target(payload, RankContext) -> result``, and return rank
0's result: ``launch_local`` / ``run_as_torchrun_rank`` run RunRequests with it, and the profiler
(``hpipe.profile.launch``) runs its measurements with it, so there is one supervisor.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing as mp
import os
import pickle
import queue
import signal
import socket
import time
import traceback
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from hpipe import errors
from hpipe.cluster import ClusterSpec
from hpipe.errors import WorkerFailedError
from hpipe.runtime.request import RunRequest, RunResult

log = logging.getLogger(__name__)

POLL_S = 0.2  # supervisor's poll period for exit codes and messages
# Busy cores beyond those a cluster leaves free before a run warns: a shell or an editor adds a
# few tenths without taking a core. The window is short because every launch pays it.
BUSY_SLACK_CORES = 0.5
BUSY_WINDOW_S = 0.2
GRACE_S = 3.0  # SIGTERM -> SIGKILL
SETTLE_S = 1.0  # after a first failure, wait this long for the root cause to show up
PR_SET_PDEATHSIG = 1

# on_progress(kind, done, total), called in the supervisor; see worker.Progress
OnProgress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class RankContext:
    """What a per-rank target is given: who it is, its joined process groups, where to report."""

    rank: int
    world_size: int
    backend: str  # the data group's; the control group is always gloo (see rank.join_group)
    data_group: Any
    ctrl_group: Any
    progress: OnProgress | None = None  # None where this rank's progress is not wanted
    rank_of_device: dict[int, int] | None = None  # cluster device -> rank; None: rank r holds r


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
) -> list[RunResult]:
    """Run ``requests`` in order on ``world_size`` local worker processes; rank 0's results."""
    from hpipe.runtime.rank import describe_rank, pick_backend, rank_devices

    # One rank per device the plan uses (a tensor-parallel stage has several; see rank.py).
    world_size = world_size or max(len(rank_devices(r.plan)) for r in requests)
    check_local_devices(requests)
    backend = pick_backend(requests)
    warn_if_oversubscribed(requests)

    def where(rank: int) -> str:
        return describe_rank(requests[0].plan, rank)

    cuda_devices = ([cuda_device_of(requests, r) for r in range(world_size)]
                    if backend == "nccl" else None)
    return launch_ranks(_run_requests, requests, world_size=world_size, backend=backend,
                        addr=addr, port=port, connect_timeout_s=connect_timeout_s,
                        on_progress=on_progress, progress_ranks=(_last_rank(requests),),
                        on_started=on_started, describe_rank=where, cuda_devices=cuda_devices)


def check_local_devices(requests: list[RunRequest]) -> None:
    """Refuse, before any worker starts, a plan whose devices name a CUDA device this machine's
    torch cannot use (a CPU-only build, or cuda:K past its GPUs): the worker would fail
    anyway, with torch's own message about a missing attribute."""
    import torch

    from hpipe.runtime.rank import rank_devices

    num_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for req in requests:
        for d in rank_devices(req.plan):
            dev = req.plan.cluster.devices[d]
            if not dev.torch_device.startswith("cuda"):
                continue
            index = int(dev.torch_device.partition(":")[2] or 0)
            if index >= num_gpus:
                raise errors.DeviceError(
                    f"device {dev.name!r} of cluster {req.plan.cluster.name!r} computes on "
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


def warn_if_oversubscribed(requests: list[RunRequest], *, busy_cores: float | None = None) -> None:
    """A local cluster wanting more cores than this machine has still runs, but its workers
    then wait for cores: timings stop describing the devices the cluster file names. The same
    holds when other processes already keep cores busy (``busy_cores``; measured when None),
    which on a small machine is the commoner case."""
    cores = len(os.sched_getaffinity(0))
    clusters = {id(r.plan.cluster): r.plan.cluster for r in requests}.values()
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
    process_name: str = "hpipe-rank",
) -> Any:
    """Run ``target(payload, ctx)`` on ``world_size`` spawned local processes joined over
    ``backend``, supervised as the module docstring says; returns rank 0's result.

    ``progress_ranks``: the ranks whose progress reaches ``on_progress`` (None: all).
    ``describe_rank(r)`` names rank r in errors ("rank 1 (stage 1, device 'cpu1')").
    ``cuda_devices[r]``: the CUDA device rank r binds before joining (NCCL needs one each).
    """
    port = port or free_port(addr)
    describe = describe_rank or (lambda r: f"rank {r}")
    ctx = mp.get_context("spawn")
    inbox = ctx.Queue()
    procs = []
    for rank in range(world_size):
        report = on_progress is not None and (progress_ranks is None or rank in progress_ranks)
        p = ctx.Process(target=_worker_main, name=f"{process_name}{rank}",
                        args=(target, payload, rank, world_size, addr, port, backend,
                              connect_timeout_s, inbox, os.getpid(), report,
                              cuda_devices[rank] if cuda_devices else None))
        p.start()
        procs.append(p)
    log.info("spawned %d workers (%s) on %s:%d: pids %s", world_size, backend, addr, port,
             [p.pid for p in procs])
    if on_started is not None:
        on_started([p.pid for p in procs])
    try:
        return _supervise(procs, inbox, on_progress, describe)
    finally:
        _stop_all(procs)
        inbox.close()


def _last_rank(requests: list[RunRequest]) -> int:
    from hpipe.runtime.rank import stage_ranks

    return stage_ranks(requests[0].plan)[-1][0]  # the last stage's leader samples


def _supervise(procs, inbox, on_progress, describe) -> Any:
    have_result, result = False, None
    failures: list[tuple[int, str, str, str]] = []  # (rank, type name, message, traceback)
    first_failure_at = None
    checked_at = time.monotonic()
    while True:
        try:
            msg = inbox.get(timeout=POLL_S)
        except queue.Empty:
            msg = None
        if msg is not None:
            kind = msg[0]
            if kind == "progress" and on_progress is not None:
                on_progress(*msg[1:])
            elif kind == "result":
                have_result, result = True, pickle.loads(msg[1])
            elif kind == "error":
                failures.append(msg[1:])
                first_failure_at = first_failure_at or time.monotonic()
            # Drain the queue before looking at exit codes, but look at least every POLL_S:
            # live ranks that keep reporting progress must not hide a dead one.
            if time.monotonic() - checked_at < POLL_S:
                continue
        checked_at = time.monotonic()
        codes = [p.exitcode for p in procs]
        if have_result and all(c == 0 for c in codes):
            return result
        if any(c not in (None, 0) for c in codes):
            first_failure_at = first_failure_at or time.monotonic()
        if first_failure_at is not None and time.monotonic() - first_failure_at >= SETTLE_S:
            raise _root_cause(procs, failures, describe)


def _root_cause(procs, failures, where: Callable[[int], str]) -> Exception:
    """The error to report: a typed error first, then a worker that died without a word, then
    the first reported error. A killed worker's peers also fail ("connection closed by
    peer"), so the silent death is the cause and their errors are the symptom."""
    for rank, tname, message, tb in failures:
        cls = getattr(errors, tname, None)
        if isinstance(cls, type) and issubclass(cls, Exception) and cls is not WorkerFailedError:
            log.debug("worker traceback:\n%s", tb)
            return cls(f"{where(rank)}: {message}")
    reported = {f[0] for f in failures}
    for rank, p in enumerate(procs):
        code = p.exitcode
        if code not in (None, 0) and rank not in reported:
            if code < 0:
                cause = f"was killed by signal {signal.Signals(-code).name}"
            else:
                cause = f"exited with code {code} without reporting an error"
            return WorkerFailedError(f"worker {where(rank)}, pid {p.pid}, {cause}; the run was "
                                     "stopped and the other workers terminated")
    rank, tname, message, tb = failures[0]
    log.debug("worker traceback:\n%s", tb)
    return WorkerFailedError(f"worker {where(rank)} failed: {tname}: {message}")


def _stop_all(procs) -> None:
    for p in procs:
        if p.exitcode is None:
            p.terminate()
    deadline = time.monotonic() + GRACE_S
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.exitcode is None:
            p.kill()
            p.join(timeout=GRACE_S)


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGKILL this worker when its supervisor dies (no orphans)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the supervisor died before prctl took effect
        os._exit(1)


def _worker_main(target, payload, rank, world_size, addr, port, backend, connect_timeout_s,
                 inbox, parent_pid, report_progress, cuda_device) -> None:
    """Entry point of a spawned worker process."""
    _die_with_parent(parent_pid)
    # SIGTERM from the supervisor: leave at once (the default handler); Ctrl-C reaches the
    # whole foreground process group, so the supervisor handles it and terminates us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=os.environ.get("HPIPE_LOG", "WARNING").upper(),
                        format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    try:
        from hpipe.runtime.rank import Rendezvous, join_group

        rv = Rendezvous(addr=addr, port=port, rank=rank, world_size=world_size, backend=backend,
                        connect_timeout_s=connect_timeout_s)
        if cuda_device is not None:
            import torch

            torch.cuda.set_device(cuda_device)
        data, ctrl = join_group(rv)
        progress = ((lambda kind, done, total: inbox.put(("progress", kind, done, total)))
                    if report_progress else None)
        result = target(payload, RankContext(rank=rank, world_size=world_size, backend=backend,
                                             data_group=data, ctrl_group=ctrl, progress=progress))
        if rank == 0:
            # Plain pickle to bytes: the queue's pickler would share tensor storage through
            # file descriptors, which vanish when this process exits before the read.
            inbox.put(("result", pickle.dumps(result)))
        import torch.distributed as dist

        dist.destroy_process_group()
    except Exception as e:  # report any failure, typed, to the supervisor; then exit non-zero
        inbox.put(("error", rank, type(e).__name__, str(e), traceback.format_exc()))
        inbox.close()
        inbox.join_thread()
        os._exit(1)
    inbox.close()
    inbox.join_thread()


def _run_requests(requests: list[RunRequest], ctx: RankContext) -> list[RunResult] | None:
    """The runtime's per-rank target: this rank's stage of every request."""
    from hpipe.runtime.rank import run_requests

    return run_requests(requests, rank=ctx.rank, world_size=ctx.world_size,
                        data_group=ctx.data_group, ctrl_group=ctx.ctrl_group,
                        backend=ctx.backend, progress=ctx.progress,
                        rank_of_device=ctx.rank_of_device)


def cuda_device_of(requests: list[RunRequest], rank: int) -> str:
    """The CUDA device rank ``rank`` computes on (NCCL binds one device per process)."""
    from hpipe.runtime.rank import rank_devices

    plan = next(r.plan for r in requests if rank < len(rank_devices(r.plan)))
    return plan.cluster.devices[rank_devices(plan)[rank]].torch_device


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
                             cluster=requests[0].plan.cluster, backend=pick_backend(requests),
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
