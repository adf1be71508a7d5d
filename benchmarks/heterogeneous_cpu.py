"""HPipe on emulated heterogeneous CPU clusters, measured for real: HPipe vs the even split with
TeraPipe slicing, GP-B and Base.

    .venv/bin/python benchmarks/heterogeneous_cpu.py [--only slow2 hetero3] [--repeats 2]

Settings (cluster files in examples/):
  slow2          two CPU workers, cpu1 EMULATED 3x slower (slowdown: it sleeps 2x its compute);
  hetero3_1gbit  three emulated hosts (network namespaces), cpu1 and cpu2 EMULATED 2x and 3x
                 slower, cpu2 behind a tbf-shaped 1 Gbit/s link. Needs root + iproute2
                 (skipped otherwise).
Each cluster is profiled first (``hpipe profile --quick``) and every method is planned on the
fitted model, then all plans run for real in one launch: a warm-up run, then ``repeats`` runs
each, median prefill latency. Goal: HPipe fastest, clearly ahead of the even split.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline_harness import profile_cluster, run_plans  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("hpipe", "terapipe", "gpb", "base")
LABELS = {"hpipe": "HPipe", "terapipe": "even+TeraPipe", "gpb": "GP-B", "base": "Base"}
SETTINGS = {
    # name: (cluster file, uplink rate per host in Mbit/s or None for a local run)
    "slow2": (ROOT / "examples" / "slow2.yaml", None),
    "hetero3": (ROOT / "examples" / "hetero3_1gbit.yaml", {"h0": None, "h1": None, "h2": 1000}),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", choices=tuple(SETTINGS))
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)

    import torch

    from hpipe.cluster import load_cluster
    from hpipe.cost import read_profile
    from hpipe.cost.fitted import FittedCost
    from hpipe.model.source import open_model
    from hpipe.netns import netns_unavailable_reason
    from hpipe.plan.api import plan_method
    from hpipe.sim import simulate

    spec = open_model(args.model).spec
    ids = torch.randint(3, spec.vocab_size, (args.batch, args.seq_len),
                        generator=torch.Generator().manual_seed(0))
    prompt = tuple(tuple(int(t) for t in row) for row in ids)
    # Profiles and random checkpoints (~0.6 GB) live only as long as the run.
    tmp_dir = tempfile.TemporaryDirectory(prefix="hpipe-hetero-")
    tmp = Path(tmp_dir.name)
    ok = True
    print(f"{spec.name}, batch {args.batch} x {args.seq_len} tokens, float32; "
          f"load average at start {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    for name, (cluster_file, rates) in SETTINGS.items():
        if args.only and name not in args.only:
            continue
        if rates is not None and (reason := netns_unavailable_reason()):
            print(f"\n{name}: skipped: {reason}")
            continue
        t0 = time.time()
        cluster = load_cluster(str(cluster_file))
        prof = profile_cluster(args.model, str(cluster_file), tmp / f"{name}.json",
                               max_tokens=args.seq_len, max_batch=args.batch, rates_mbit=rates)
        cost = FittedCost(read_profile(prof), spec, cluster, "float32")
        plans = [plan_method(m, model=spec, cluster=cluster, batch=args.batch,
                             seq_len=args.seq_len, dtype="float32", cost=cost) for m in METHODS]
        measured = run_plans(args.model, plans, prompt, repeats=args.repeats, rates_mbit=rates)
        emu = ", ".join(f"{d.name} x{d.slowdown:g}" for d in cluster.devices if d.emulated)
        print(f"\n{name} ({cluster_file.name}; EMULATED slowdown: {emu or 'none'}"
              + (f"; shaped uplinks {rates}" if rates else "") + ")")
        print(f"  {'method':<14} {'measured s':>10} {'predicted s':>11} {'vs HPipe':>9}   plan")
        hp = measured[0].prefill_latency_s
        for m, plan, res in zip(METHODS, plans, measured):
            pred = simulate(plan, cost).prefill_latency_s
            devs = [cluster.devices[s.device].name for s in plan.stages]
            print(f"  {LABELS[m]:<14} {res.prefill_latency_s:10.2f} {pred:11.2f} "
                  f"{res.prefill_latency_s / hp:8.2f}x   layers {list(plan.layer_counts())} on "
                  f"{devs}, {len(plan.slices)} slices, {plan.num_microbatches} micro-batches")
        outputs = {res.output_ids for res in measured}
        print(f"  same first token from every method: {len(outputs) == 1}; "
              f"{time.time() - t0:.0f} s incl. profiling; load average now "
              f"{os.getloadavg()[0]:.1f}")
        ok &= hp == min(r.prefill_latency_s for r in measured)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
