"""Run the profiler on the workers ``hpipe run`` uses: one process per device, joined over gloo.

Rank r profiles cluster device r, in its own process with its own torch thread pool, as the
runtime's rank r runs stage r. Then every pair of devices ping-pongs (all pairs, not only
neighbours, so the planner's other host orders are measured too), and rank 0 gathers a Profile.

[Note: concurrent or one at a time] GPUs are measured one at a time: each is its own chip,
and a neighbour's work would only add noise through the shared host. CPU workers are measured
all at once: they share this machine's cores, caches and memory bandwidth, and a pipeline
keeps them busy together, so that is the speed the planner must see (measured alone, two
workers on two cores were ~1.5x faster per compute than inside the running pipeline).

Local launch spawns the ranks (``spawn``: clean interpreters, as the runtime) and supervises
them: a worker that raises or dies stops the others and its error is re-raised. Under torchrun
(``ip netns exec NS torchrun ...`` for emulated hosts) this process is one rank.

[design] The runtime's ``launch_local`` takes RunRequests and its worker entry runs them, so it
cannot run a profiling job; this module mirrors its supervision in a few lines instead. A
``target=`` hook on ``launch_local`` would let both share one supervisor.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import logging
import multiprocessing as mp
import os
import queue
import signal
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

from hpipe.cluster import ClusterSpec
from hpipe.errors import WorkerFailedError
from hpipe.profile.links import QUICK_SIZES_BYTES, SIZES_BYTES, fit_link, measure_link
from hpipe.profile.measure import Grid
from hpipe.profile.profile_file import LinkProfile, Profile, model_shape

log = logging.getLogger(__name__)

# on_progress(what, done, total) in the supervisor; ``what`` names the device or the link.
OnProgress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class ProfileJob:
    model: str  # what open_model accepts: a path or "smollm2"
    cluster: ClusterSpec
    dtype: str
    grid: Grid
    link_sizes_bytes: tuple[int, ...]
    link_repeats: int
    quick: bool


def concurrent_profiling(cluster: ClusterSpec) -> bool:
    """CPU-only clusters are profiled with every worker busy at once (see the note)."""
    return all(d.torch_device == "cpu" for d in cluster.devices)


def make_job(model: str, cluster: ClusterSpec, dtype: str, grid: Grid, *, quick: bool) -> ProfileJob:
    return ProfileJob(model=model, cluster=cluster, dtype=dtype, grid=grid,
                      link_sizes_bytes=QUICK_SIZES_BYTES if quick else SIZES_BYTES,
                      link_repeats=3 if quick else 5, quick=quick)


def profile_rank(job: ProfileJob, *, rank: int, world_size: int,
                 report: OnProgress | None = None,
                 rank_of_device: dict[int, int] | None = None) -> Profile | None:
    """This rank's share of the profile, in an initialised process group; rank 0 returns it.

    ``rank_of_device``: cluster device index -> rank (torchrun across hosts numbers nodes in
    join order); default rank r holds device r.
    """
    import torch
    import torch.distributed as dist

    from hpipe.model.source import open_model
    from hpipe.profile.measure import profile_device

    cluster = job.cluster
    assert world_size == cluster.num_devices, (world_size, cluster.num_devices)
    rank_of = rank_of_device or {d: d for d in range(world_size)}
    me = next(d for d, r in rank_of.items() if r == rank)
    source = open_model(job.model)
    mine = None
    dev = cluster.devices[me]
    progress = (lambda d, t: report(dev.name, d, t)) if report else None
    together = concurrent_profiling(cluster)
    for d in range(world_size):  # see [Note: concurrent or one at a time]
        if (d == me or together) and mine is None:
            mine = profile_device(source, dev, dtype=job.dtype, grid=job.grid, progress=progress)
        dist.barrier()
    pairs = [(a, b) for a in range(world_size) for b in range(a + 1, world_size)]
    links: list[LinkProfile] = []
    for k, (a, b) in enumerate(pairs):
        if me in (a, b):
            peer = rank_of[b if me == a else a]
            samples = measure_link(peer, initiator=me == a, sizes_bytes=job.link_sizes_bytes,
                                   repeats=job.link_repeats)
            if me == a:
                lat, bw = fit_link(samples)
                links.append(LinkProfile(cluster.devices[a].name, cluster.devices[b].name,
                                         samples, latency_s=lat, bandwidth_bytes_s=bw))
        dist.barrier()
        if report and rank == 0:
            report("links", k + 1, len(pairs))
    gathered: list | None = [None] * world_size if rank == 0 else None
    dist.gather_object((me, mine, links), gathered, dst=0)
    if rank != 0:
        return None
    assert gathered is not None
    gathered.sort(key=lambda g: g[0])
    return Profile(
        model_name=source.spec.name, model_shape=model_shape(source.spec), dtype=job.dtype,
        torch_version=torch.__version__,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        cluster_name=cluster.name, device_names=tuple(d.name for d in cluster.devices),
        devices=tuple(g[1] for g in gathered), links=tuple(lk for g in gathered for lk in g[2]),
        quick=job.quick,
    )


def _join(addr: str, port: int, rank: int, world_size: int, init_method: str | None = None):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init_method or f"tcp://{addr}:{port}",
                            rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=120))


def _worker_main(job, rank, world_size, addr, port, inbox, parent_pid) -> None:
    with contextlib.suppress(OSError, AttributeError):  # die with the supervisor: no orphans
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor handles Ctrl-C
    logging.basicConfig(level=os.environ.get("HPIPE_LOG", "WARNING").upper(),
                        format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    try:
        import torch.distributed as dist

        _join(addr, port, rank, world_size)
        prof = profile_rank(job, rank=rank, world_size=world_size,
                            report=lambda what, d, t: inbox.put(("progress", what, d, t)))
        if rank == 0:
            inbox.put(("result", prof.to_json()))
        dist.destroy_process_group()
    except Exception as e:  # report to the supervisor, then exit non-zero
        inbox.put(("error", rank, type(e).__name__, str(e), traceback.format_exc()))
        inbox.close()
        inbox.join_thread()
        os._exit(1)
    inbox.close()
    inbox.join_thread()


def profile_local(job: ProfileJob, *, on_progress: OnProgress | None = None) -> Profile:
    """Profile every device of ``job.cluster`` with one local worker process each."""
    from hpipe.runtime.launch import free_port

    addr, port = "127.0.0.1", free_port()
    n = job.cluster.num_devices
    ctx = mp.get_context("spawn")
    inbox = ctx.Queue()
    procs = [ctx.Process(target=_worker_main, name=f"hpipe-profile{r}",
                         args=(job, r, n, addr, port, inbox, os.getpid())) for r in range(n)]
    for p in procs:
        p.start()
    try:
        result, failed_at = None, None
        while True:
            try:
                msg = inbox.get(timeout=0.2)
            except queue.Empty:
                msg = None
            if msg is not None:
                if msg[0] == "progress" and on_progress:
                    on_progress(*msg[1:])
                elif msg[0] == "result":
                    result = Profile.from_json(msg[1])
                elif msg[0] == "error":
                    _, rank, tname, text, tb = msg
                    log.debug("profiler rank %d traceback:\n%s", rank, tb)
                    raise WorkerFailedError(
                        f"profiler rank {rank} (device {job.cluster.devices[rank].name!r}) "
                        f"failed: {tname}: {text}")
                continue
            codes = [p.exitcode for p in procs]
            if result is not None and all(c == 0 for c in codes):
                return result
            bad = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
            if bad:
                failed_at = failed_at or time.monotonic()
                if time.monotonic() - failed_at > 1.0:  # let a reported error arrive first
                    r, c = bad[0]
                    raise WorkerFailedError(
                        f"profiler rank {r} (device {job.cluster.devices[r].name!r}) exited "
                        f"with code {c}; the other workers were stopped")
    finally:
        for p in procs:
            if p.exitcode is None:
                p.terminate()
        for p in procs:
            p.join(timeout=3)
            if p.exitcode is None:
                p.kill()
                p.join()
        inbox.close()


def profile_torchrun(job: ProfileJob, env: dict[str, str],
                     on_progress: OnProgress | None = None) -> Profile | None:
    """This process is one rank of a torchrun job (env from ``torchrun_env``); rank 0 returns."""
    import torch.distributed as dist

    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    if world != job.cluster.num_devices:
        raise WorkerFailedError(
            f"torchrun started {world} processes but cluster {job.cluster.name!r} has "
            f"{job.cluster.num_devices} devices; start one process per device")
    _join(env["MASTER_ADDR"], int(env["MASTER_PORT"]), rank, world, init_method="env://")
    try:
        # Find this process's device as the runtime does: by (HPIPE_HOST or hostname,
        # LOCAL_RANK), since torchrun numbers nodes in the order they joined.
        import socket

        from hpipe.runtime.rank import ranks_by_host

        members: list = [None] * world
        dist.all_gather_object(members, (os.environ.get("HPIPE_HOST", socket.gethostname()),
                                         int(os.environ.get("LOCAL_RANK", "0"))))
        rank_of = ranks_by_host(job.cluster, [tuple(m) for m in members])
        return profile_rank(job, rank=rank, world_size=world, rank_of_device=rank_of,
                            report=on_progress if rank == 0 else None)
    finally:
        dist.destroy_process_group()
