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
rendezvous; ``run_as_torchrun_rank`` joins with ``env://`` and runs this process's stage.
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
from collections.abc import Callable

from hpipe import errors
from hpipe.errors import WorkerFailedError
from hpipe.runtime.request import RunRequest, RunResult

log = logging.getLogger(__name__)

POLL_S = 0.2  # supervisor's poll period for exit codes and messages
GRACE_S = 3.0  # SIGTERM -> SIGKILL
SETTLE_S = 1.0  # after a first failure, wait this long for the root cause to show up
PR_SET_PDEATHSIG = 1

# on_progress(kind, done, total), called in the supervisor; see worker.Progress
OnProgress = Callable[[str, int, int], None]


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
    from hpipe.runtime.rank import pick_backend

    world_size = world_size or max(r.plan.num_stages for r in requests)
    port = port or free_port(addr)
    backend = pick_backend(requests)
    ctx = mp.get_context("spawn")
    inbox = ctx.Queue()
    procs = []
    for rank in range(world_size):
        p = ctx.Process(target=_worker_main, name=f"hpipe-rank{rank}",
                        args=(requests, rank, world_size, addr, port, backend,
                              connect_timeout_s, inbox, os.getpid(),
                              on_progress is not None and rank == _last_rank(requests)))
        p.start()
        procs.append(p)
    log.info("spawned %d workers (%s) on %s:%d: pids %s", world_size, backend, addr, port,
             [p.pid for p in procs])
    if on_started is not None:
        on_started([p.pid for p in procs])
    try:
        return _supervise(procs, inbox, requests, on_progress)
    finally:
        _stop_all(procs)
        inbox.close()


def _last_rank(requests: list[RunRequest]) -> int:
    return requests[0].plan.num_stages - 1


def _supervise(procs, inbox, requests, on_progress) -> list[RunResult]:
    results = None
    failures: list[tuple[int, str, str, str]] = []  # (rank, type name, message, traceback)
    first_failure_at = None
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
                results = pickle.loads(msg[1])
            elif kind == "error":
                failures.append(msg[1:])
                first_failure_at = first_failure_at or time.monotonic()
            continue  # drain the queue before looking at exit codes
        codes = [p.exitcode for p in procs]
        if results is not None and all(c == 0 for c in codes):
            return results
        if any(c not in (None, 0) for c in codes):
            first_failure_at = first_failure_at or time.monotonic()
        if first_failure_at is not None and time.monotonic() - first_failure_at >= SETTLE_S:
            raise _root_cause(procs, failures, requests)


def _root_cause(procs, failures, requests) -> Exception:
    """The error to report: a typed error first, then a worker that died without a word, then
    the first reported error. A killed worker's peers also fail ("connection closed by
    peer"), so the silent death is the cause and their errors are the symptom."""
    devs = requests[0].plan.cluster.devices
    stages = requests[0].plan.stages

    def where(rank: int) -> str:
        if rank < len(stages):
            return f"rank {rank} (stage {rank}, device {devs[stages[rank].device].name!r})"
        return f"rank {rank}"

    for rank, tname, message, _tb in failures:
        cls = getattr(errors, tname, None)
        if isinstance(cls, type) and issubclass(cls, Exception) and cls is not WorkerFailedError:
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


def _worker_main(requests, rank, world_size, addr, port, backend, connect_timeout_s, inbox,
                 parent_pid, report_progress) -> None:
    """Entry point of a spawned worker process."""
    _die_with_parent(parent_pid)
    # SIGTERM from the supervisor: leave at once (the default handler); Ctrl-C reaches the
    # whole foreground process group, so the supervisor handles it and terminates us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=os.environ.get("HPIPE_LOG", "WARNING").upper(),
                        format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    try:
        from hpipe.runtime.rank import Rendezvous, join_group, run_requests

        rv = Rendezvous(addr=addr, port=port, rank=rank, world_size=world_size, backend=backend,
                        connect_timeout_s=connect_timeout_s)
        if backend == "nccl":
            import torch

            torch.cuda.set_device(cuda_device_of(requests, rank))
        data, ctrl = join_group(rv)
        progress = ((lambda kind, done, total: inbox.put(("progress", kind, done, total)))
                    if report_progress else None)
        results = run_requests(requests, rank=rank, world_size=world_size, data_group=data,
                               ctrl_group=ctrl, backend=backend, progress=progress)
        if rank == 0:
            # Plain pickle to bytes: the queue's pickler would share tensor storage through
            # file descriptors, which vanish when this process exits before the read.
            inbox.put(("result", pickle.dumps(results)))
        import torch.distributed as dist

        dist.destroy_process_group()
    except Exception as e:  # report any failure, typed, to the supervisor; then exit non-zero
        inbox.put(("error", rank, type(e).__name__, str(e), traceback.format_exc()))
        inbox.close()
        inbox.join_thread()
        os._exit(1)
    inbox.close()
    inbox.join_thread()


def cuda_device_of(requests: list[RunRequest], rank: int) -> str:
    """The CUDA device rank ``rank`` computes on (NCCL binds one device per process)."""
    plan = next(r.plan for r in requests if rank < r.plan.num_stages)
    return plan.cluster.devices[plan.stages[rank].device].torch_device


def torchrun_env() -> dict[str, str] | None:
    """RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT when this process was started by torchrun."""
    keys = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    if all(k in os.environ for k in keys):
        return {k: os.environ[k] for k in keys}
    return None


def run_as_torchrun_rank(requests: list[RunRequest], *, env: dict[str, str],
                         connect_timeout_s: float = 300.0) -> list[RunResult] | None:
    """This process is one rank of a torchrun job; rank 0 returns the results.

    Ranks find their device by host (see rank.ranks_by_host), so the c10d rendezvous may number
    the nodes in any order.
    """
    import socket

    import torch
    import torch.distributed as dist

    from hpipe.runtime.rank import (
        Rendezvous,
        join_group,
        pick_backend,
        ranks_by_host,
        run_requests,
    )

    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    cluster = requests[0].plan.cluster
    if world != cluster.num_devices:
        raise errors.ClusterError(
            f"torchrun started {world} processes but cluster {cluster.name!r} has "
            f"{cluster.num_devices} devices; start one process per device "
            "(--nnodes x --nproc-per-node)")
    backend = pick_backend(requests)
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
        return run_requests(requests, rank=rank, world_size=world, data_group=data,
                            ctrl_group=ctrl, backend=backend, rank_of_device=rank_of_device)
    finally:
        dist.destroy_process_group()
