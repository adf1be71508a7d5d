"""The flags that describe a pipeline to open (``serve`` and ``analyze``): the cluster, a plan
or how to make one, and the liveness limits; and the plan they give."""

from __future__ import annotations

import argparse
from pathlib import Path

from hpipe.commands.settings import add_profile_argument, in_range, positive
from hpipe.runtime.liveness import DEFAULT_LIVENESS_S
from hpipe.spec import DTYPES, METHODS, OBJECTIVES


def add_pipeline_arguments(p: argparse.ArgumentParser) -> None:
    """Everything but --model (required by one command, optional in another)."""
    p.add_argument("--cluster", default=None,
                   help="'local:N' or a cluster YAML file (default: the --plan's, else local:2)")
    p.add_argument("--plan", type=Path, help="a plan JSON from 'hpipe plan --json'")
    add_profile_argument(p)
    p.add_argument("--method", default="hpipe", choices=METHODS)
    p.add_argument("--seq-len", type=in_range(int, 1), default=None,
                   help="prompt length to plan the slicing for (default: the context, at most "
                        "4096); other lengths rescale it")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--no-tp", dest="allow_tp", action="store_false",
                   help="keep HPipe to a pure pipeline (one device per stage)")
    p.add_argument("--objective", default="throughput", choices=OBJECTIVES,
                   help="what HPipe's plan minimises (default: output tokens/s of the "
                        "requests running at once; see 'hpipe plan --help')")


def add_liveness_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--liveness", type=positive(float), default=DEFAULT_LIVENESS_S,
                   help="seconds of silence after which a worker is declared stopped")
    p.add_argument("--connect-timeout", type=positive(float), default=60.0,
                   help="seconds a worker waits to join the process group")


def build_plan(args, *, concurrency: int, max_new_tokens: int, local: bool = True):
    """The plan to serve: --plan, or the method planned on --cluster for --seq-len tokens.
    ``local``: the devices are this machine's (not a torchrun job's, whose ranks each check
    their own)."""
    import dataclasses

    from hpipe.cluster import load_cluster
    from hpipe.cost import cost_model
    from hpipe.errors import PlanMismatchError
    from hpipe.model.source import open_model
    from hpipe.plan.api import plan_method
    from hpipe.plan.plan import read_plan
    from hpipe.runtime.launch import check_local_devices
    from hpipe.runtime.request import check_plan

    spec = open_model(args.model).spec
    if args.plan is not None:
        # See below: what a served plan says about lending must be what runs.
        plan = dataclasses.replace(read_plan(args.plan), lend_idle_threads=False)
        if args.cluster is not None:
            cluster = load_cluster(args.cluster)
            if dataclasses.replace(cluster, name=plan.cluster.name) != plan.cluster:
                raise PlanMismatchError(f"--cluster {args.cluster!r} is not the cluster the "
                                        f"plan {str(args.plan)!r} was made for; drop --cluster")
    else:
        cluster = load_cluster(args.cluster or "local:2")
        seq_len = args.seq_len or min(spec.max_seq_len, 4096)
        # A server's requests run together: by default the split with the most output
        # tokens/s for ``concurrency`` of them, HPipe's slicing for their prompts.
        objective = args.objective if args.method == "hpipe" else "prefill"
        plan = plan_method(args.method, model=spec, cluster=cluster, batch=1, seq_len=seq_len,
                           dtype=args.dtype,
                           cost=cost_model(spec, cluster, args.dtype, profile=args.profile),
                           allow_tp=args.allow_tp, objective=objective,
                           max_new_tokens=max_new_tokens, concurrency=concurrency,
                           # Served requests run as interleaved items, which never borrow a
                           # host's idle cores (an item may overlap any other, so no compute
                           # is provably alone): the plan is priced as it will run.
                           lend=False)
    check_plan(plan, spec, model=args.model)
    if local:
        check_local_devices([plan])
    return plan
