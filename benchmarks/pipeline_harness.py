"""Shared by the benchmarks: profile a cluster, and run plans for real on it, locally or over
emulated hosts (network namespaces with shaped links, ``hpipe.netns``).

Local clusters run on the runtime's own launcher (``launch_local``); a cluster spread over
namespaces runs one ``torchrun`` per emulated host (``hpipe.netns.launch_netns``), which is
how a multi-host run is started.
Every plan is run ``repeats`` times after one untimed warm-up run (first calls pay for kernel
selection and for gloo connection set-up), and the median prefill latency is reported. The
repeats are interleaved (plan A, plan B, plan A, ...): this VM drifts by 10-20 % over a minute,
and interleaving spreads a slow spell over every plan instead of handing it to one.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Measured:
    prefill_latency_s: float  # median over the repeats
    all_s: tuple[float, ...]
    output_ids: tuple[tuple[int, ...], ...]


def _requests(model: str, plans, prompt_ids, repeats: int):
    from hpipe.runtime.request import RunRequest

    reqs = [RunRequest(model=model, plan=plans[0], prompt_ids=prompt_ids, max_new_tokens=1,
                       label="warmup")]
    for r in range(repeats):
        for i, plan in enumerate(plans):
            reqs.append(RunRequest(model=model, plan=plan, prompt_ids=prompt_ids,
                                   max_new_tokens=1, label=f"{i}:{r}"))
    return reqs


def _collect(results, num_plans: int) -> list[Measured]:
    out = []
    for i in range(num_plans):
        mine = [r for r in results if r.label.startswith(f"{i}:")]
        lat = tuple(r.timeline.prefill_latency_s for r in mine)
        out.append(Measured(statistics.median(lat), lat, mine[0].output_ids))
    return out


def run_plans(model: str, plans, prompt_ids, *, repeats: int = 3,
              rates_mbit: dict[str, float | None] | None = None) -> list[Measured]:
    """Run each plan (all for one cluster) ``repeats`` times; median prefill latencies.

    ``rates_mbit`` (cluster host name -> uplink rate, None unshaped): given, each cluster host
    becomes a network namespace holding its devices' ranks (``hpipe.netns.launch_netns``).
    """
    if rates_mbit is None:
        from hpipe.runtime.launch import launch_local

        world = max(p.num_stages for p in plans)
        return _collect(launch_local(_requests(model, plans, prompt_ids, repeats),
                                     world_size=world), len(plans))
    from hpipe.netns import launch_netns

    results = launch_netns(_requests(model, plans, prompt_ids, repeats), rates_mbit=rates_mbit)
    return _collect(results, len(plans))


def profile_cluster(model: str, cluster_arg: str, out: Path, *, max_tokens: int,
                    quick: bool = True, rates_mbit: dict[str, float | None] | None = None,
                    max_batch: int = 1) -> Path:
    """``hpipe profile`` on the cluster, locally, or with every cluster host in its own
    namespace (``rates_mbit`` given) like ``run_plans``."""
    argv = ["--model", model, "--cluster", cluster_arg, "--out", str(out),
            "--max-tokens", str(max_tokens), "--max-batch", str(max_batch), "--no-progress"]
    if quick:
        argv.append("--quick")
    if rates_mbit is None:
        subprocess.run([sys.executable, "-m", "hpipe.commands.profile", *argv], check=True,
                       stdout=subprocess.DEVNULL)
        return out
    from hpipe.cluster import load_cluster
    from hpipe.netns import run_torchrun_netns

    run_torchrun_netns(load_cluster(cluster_arg), ["-m", "hpipe.commands.profile", *argv],
                       rates_mbit=rates_mbit)
    return out
