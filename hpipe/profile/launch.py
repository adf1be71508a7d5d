"""Run the profiler on the workers ``hpipe run`` uses: one process per device, joined over gloo.

Rank r profiles cluster device r, in its own process with its own torch thread pool, as the
runtime's rank r runs stage r. Then every pair of devices ping-pongs (all pairs, not only
neighbours, so the planner's other host orders are measured too), and rank 0 gathers a Profile.

[Note: concurrent or one at a time] GPUs are measured one at a time: each is its own chip,
and a neighbour's work would only add noise through the shared host. CPU workers are measured
all at once: they share this machine's cores, caches and memory bandwidth, and a pipeline
keeps them busy together, so that is the speed the planner must see (measured alone, two
workers on two cores were ~1.5x faster per compute than inside the running pipeline).

Launching is the runtime's (``hpipe.runtime.launch``): locally ``launch_ranks`` spawns and
supervises one process per device, so a worker's typed error (a missing model) reaches the
caller as that type and a killed worker is named; under torchrun (``ip netns exec NS torchrun
...`` for emulated hosts) ``run_torchrun_rank`` joins this process as one rank. Both run
``profile_rank`` through ``_profile_target``.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Callable
from dataclasses import dataclass

from hpipe.cluster import ClusterSpec
from hpipe.cost.profile_file import LinkProfile, Profile, model_shape
from hpipe.profile.links import QUICK_SIZES_BYTES, SIZES_BYTES, fit_link, measure_link
from hpipe.profile.measure import Grid
from hpipe.runtime.launch import RankContext, launch_ranks, run_torchrun_rank

# on_progress(what, done, total) in the supervisor; ``what`` names the device or the link.
OnProgress = Callable[[str, int, int], None]

# The gloo timeout for joining and for every collective: while GPUs are profiled one at a time
# the others wait in a barrier, so one device's profile must finish within it.
JOIN_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class ProfileJob:
    model: str  # what open_model accepts: a path or "smollm2"
    cluster: ClusterSpec
    dtype: str
    grid: Grid
    link_sizes_bytes: tuple[int, ...]
    link_repeats: int
    quick: bool
    # After the grid, one real pipelined prefill on the same workers (hpipe.profile.calibrate);
    # needs every layer of the model, so not for a preset's two-layer random twin.
    calibrate: bool = False


def concurrent_profiling(cluster: ClusterSpec) -> bool:
    """CPU-only clusters are profiled with every worker busy at once (see the note)."""
    return all(d.torch_device == "cpu" for d in cluster.devices)


def make_job(model: str, cluster: ClusterSpec, dtype: str, grid: Grid, *, quick: bool,
             calibrate: bool = False) -> ProfileJob:
    return ProfileJob(model=model, cluster=cluster, dtype=dtype, grid=grid,
                      link_sizes_bytes=QUICK_SIZES_BYTES if quick else SIZES_BYTES,
                      link_repeats=3 if quick else 5, quick=quick, calibrate=calibrate)


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
    from hpipe.profile.measure import BenchStage, profile_device, profile_lent

    cluster = job.cluster
    assert world_size == cluster.num_devices, (world_size, cluster.num_devices)
    rank_of = rank_of_device or {d: d for d in range(world_size)}
    me = next(d for d, r in rank_of.items() if r == rank)
    source = open_model(job.model)
    mine = None
    dev = cluster.devices[me]
    progress = (lambda d, t: report(dev.name, d, t)) if report else None
    together = concurrent_profiling(cluster)
    bench = BenchStage(source, dev, dtype=job.dtype, num_blocks=job.grid.num_blocks)
    try:
        for d in range(world_size):  # see [Note: concurrent or one at a time]
            if (d == me or together) and mine is None:
                mine = profile_device(source, dev, dtype=job.dtype, grid=job.grid,
                                      progress=progress, bench=bench)
            dist.barrier()
        # [Note: lent threads measured alone] A worker that may borrow its host's idle cores
        # (hpipe/lending.py) is timed on all of them, one worker at a time while the others
        # wait in the barrier, as the runtime runs a lone compute. The planner compares these
        # with the grid's times on the worker's own threads with every worker busy; on this
        # 2-core VM a block ran 1.58-2.05x faster lent, by slice length and by calibration.
        for d in (d for d in range(world_size) if cluster.lendable_threads(d)):
            if d == me:
                threads = cluster.lendable_threads(me)
                lent = profile_lent(bench, grid=job.grid, threads=threads)
                mine = dataclasses.replace(mine, lent_threads=threads, lent_layer=lent)
            dist.barrier()
    finally:
        bench.close()
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


def _profile_target(job: ProfileJob, ctx: RankContext) -> Profile | None:
    """The per-rank target the runtime's launchers run (module level: spawn pickles it)."""
    profile = profile_rank(job, rank=ctx.rank, world_size=ctx.world_size, report=ctx.progress,
                           rank_of_device=ctx.rank_of_device)
    if job.calibrate:
        from hpipe.profile.calibrate import calibrate_rank

        profile = calibrate_rank(job, profile, ctx)
    return profile


def profile_local(job: ProfileJob, *, on_progress: OnProgress | None = None) -> Profile:
    """Profile every device of ``job.cluster`` with one local worker process each."""
    names = [d.name for d in job.cluster.devices]
    return launch_ranks(_profile_target, job, world_size=job.cluster.num_devices,
                        connect_timeout_s=JOIN_TIMEOUT_S, on_progress=on_progress,
                        describe_rank=lambda r: f"profiler rank {r} (device {names[r]!r})",
                        process_name="hpipe-profile")


def profile_torchrun(job: ProfileJob, env: dict[str, str],
                     on_progress: OnProgress | None = None) -> Profile | None:
    """This process is one rank of a torchrun job (env from ``torchrun_env``); rank 0 returns."""
    return run_torchrun_rank(_profile_target, job, env=env, cluster=job.cluster,
                             connect_timeout_s=JOIN_TIMEOUT_S,
                             on_progress=on_progress if int(env["RANK"]) == 0 else None)
