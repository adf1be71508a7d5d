"""Do profiled predictions hold? Predicted prefill latency (fitted model) against measured.

    .venv/bin/python benchmarks/prediction_accuracy.py [--only NAME ...] [--repeats 3]

For each configuration: write the cluster file, ``hpipe profile --quick`` it (on the same
workers as the run; emulated hosts in network namespaces where the config has a shaped link),
plan HPipe and the even split (TeraPipe) with the *fitted* model, run both for real, and print
predicted vs measured. Beside it: the grid fit without the profile's calibration run (what the
calibration buys, hpipe.profile.calibrate) and the analytic (catalog roofline) model (what
profiling buys). Neither evaluated plan is the calibration plan (even split, 4 equal slices,
batch 1). Goal: median |error| <= 10 %, max <= 20 % for the fitted model.

Devices are CPU workers; ``slowdown`` is emulation (each compute stretched to k x its CPU time, hpipe.emulation),
labelled as such in the output. Needs root + iproute2 for the shaped-link configurations
(skipped with the reason otherwise).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline_harness import profile_cluster, run_plans  # noqa: E402

# A LLaMA about 4x SmolLM2's per-layer work: wider (1024 vs 576) and a 4:1 GQA like LLaMA-3.
RANDOM_LLAMA = dict(name="random-llama-1024x12", family="llama", num_layers=12, hidden=1024,
                    num_heads=16, num_kv_heads=4, intermediate=2816, vocab_size=16000,
                    max_seq_len=4096)


@dataclass(frozen=True)
class Config:
    name: str
    model: str  # "smollm2" or "random-llama"
    slowdowns: tuple[float, ...]  # per device, pipeline order
    seq_len: int
    batch: int = 1
    hosts: tuple[int, ...] | None = None  # host index per device; None = one local host
    rates_mbit: tuple[float | None, ...] | None = None  # per host uplink


CONFIGS = (
    Config("smol-2-even", "smollm2", (1, 1), 1024),
    Config("smol-2-slow3", "smollm2", (1, 3), 1024),
    Config("smol-3-uneven", "smollm2", (1, 2, 3), 1024),
    Config("smol-2-1gbit", "smollm2", (1, 2), 1024, hosts=(0, 1), rates_mbit=(None, 1000)),
    Config("llama-2-uneven", "random-llama", (2, 1), 512, batch=2),
    Config("llama-3-200mbit", "random-llama", (1, 1, 2), 512, hosts=(0, 1, 2),
           rates_mbit=(None, None, 200)),
)


def cluster_dict(cfg: Config) -> dict:
    """Cluster file content: CPU workers, slowdowns as emulation, links as shaped."""
    hosts = cfg.hosts or (0,) * len(cfg.slowdowns)
    num_hosts = max(hosts) + 1
    out = {"name": cfg.name, "hosts": [], "links": []}
    for h in range(num_hosts):
        devs = [{"name": f"cpu{i}", "type": "cpu", "slowdown": float(cfg.slowdowns[i])}
                for i in range(len(hosts)) if hosts[i] == h]
        out["hosts"].append({"name": f"h{h}", "intra_link": "loopback", "devices": devs})
    rates = cfg.rates_mbit or (None,) * num_hosts
    for a in range(num_hosts):
        for b in range(a + 1, num_hosts):
            shaped = [r for r in (rates[a], rates[b]) if r is not None]
            # An unshaped veth moves several GB/s; the catalog has no such kind, so say 20 Gbit.
            gbps = min(shaped) / 1000 if shaped else 20.0
            out["links"].append({"between": [f"h{a}", f"h{b}"], "kind": "custom",
                                 "bandwidth_gbps": gbps, "latency_s": 100e-6})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", help="configuration names to run")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    from hpipe.cluster import load_cluster
    from hpipe.cost import read_profile
    from hpipe.cost.analytic import AnalyticCost
    from hpipe.cost.fitted import FittedCost
    from hpipe.model.source import open_model
    from hpipe.netns import netns_unavailable_reason
    from hpipe.plan.api import plan_method
    from hpipe.profile.random_model import write_random_checkpoint
    from hpipe.sim import simulate
    from hpipe.spec import ModelSpec

    netns_reason = netns_unavailable_reason()
    # Profiles and random checkpoints (~0.6 GB) live only as long as the run.
    tmp_dir = tempfile.TemporaryDirectory(prefix="hpipe-accuracy-")
    tmp = Path(tmp_dir.name)
    llama_path = str(write_random_checkpoint(ModelSpec(**RANDOM_LLAMA), tmp / "random-llama"))
    rows = []
    print(f"{'config':<17} {'plan':<9} {'measured':>9} {'fitted':>9} {'err':>6} "
          f"{'grid-only':>9} {'err':>6} {'analytic':>9} {'err':>7}   "
          "(prefill latency, s; devices emulated by slowdown)")
    for cfg in CONFIGS:
        if args.only and cfg.name not in args.only:
            continue
        if cfg.hosts is not None and netns_reason:
            print(f"{cfg.name:<17} skipped: {netns_reason}")
            continue
        t0 = time.time()
        model_path = llama_path if cfg.model == "random-llama" else "smollm2"
        cluster_file = tmp / f"{cfg.name}.yaml"
        cluster_file.write_text(yaml.safe_dump(cluster_dict(cfg)))
        cluster = load_cluster(str(cluster_file))
        spec = open_model(model_path).spec
        rates = (None if cfg.hosts is None
                 else {f"h{h}": r for h, r in enumerate(cfg.rates_mbit)})
        prof_path = profile_cluster(model_path, str(cluster_file), tmp / f"{cfg.name}.json",
                                    max_tokens=cfg.seq_len, max_batch=cfg.batch,
                                    rates_mbit=rates)
        fitted = FittedCost(read_profile(prof_path), spec, cluster, "float32")
        grid_only = FittedCost(read_profile(prof_path), spec, cluster, "float32",
                               calibrated=False)
        analytic = AnalyticCost(spec, cluster, "float32")
        plans = [plan_method(m, model=spec, cluster=cluster, batch=cfg.batch,
                             seq_len=cfg.seq_len, dtype="float32", cost=fitted)
                 for m in ("hpipe", "terapipe")]
        gen = __import__("torch").Generator().manual_seed(0)
        ids = __import__("torch").randint(3, spec.vocab_size, (cfg.batch, cfg.seq_len),
                                          generator=gen)
        prompt = tuple(tuple(int(t) for t in row) for row in ids)
        measured = run_plans(model_path, plans, prompt, repeats=args.repeats, rates_mbit=rates)
        for plan, m in zip(plans, measured):
            pred = simulate(plan, fitted).prefill_latency_s
            raw = simulate(plan, grid_only).prefill_latency_s
            ana = simulate(plan, analytic).prefill_latency_s
            err, rerr, aerr = (x / m.prefill_latency_s - 1 for x in (pred, raw, ana))
            rows.append((cfg.name, plan.method, err, aerr, rerr))
            print(f"{cfg.name:<17} {plan.method:<9} {m.prefill_latency_s:9.3f} {pred:9.3f} "
                  f"{err:+6.1%} {raw:9.3f} {rerr:+6.1%} {ana:9.3f} {aerr:+7.1%}   "
                  f"layers {list(plan.layer_counts())} {len(plan.slices)} slices", flush=True)
        scale = fitted.compute_scale
        print(f"{'':<17} ({time.time() - t0:.0f} s incl. profiling; calibration scales "
              f"{', '.join(f'{k:.2f}' for k in scale)})", flush=True)
    if not rows:
        return 1
    abs_err = [abs(r[2]) for r in rows]
    abs_ana = [abs(r[3]) for r in rows]
    abs_raw = [abs(r[4]) for r in rows]
    print(f"\nfitted:   median |error| {statistics.median(abs_err):.1%}, max {max(abs_err):.1%} "
          f"over {len(rows)} runs (goal: <= 10 %, <= 20 %)")
    print(f"grid fit without calibration: median |error| {statistics.median(abs_raw):.1%}, "
          f"max {max(abs_raw):.1%}")
    print(f"analytic: median |error| {statistics.median(abs_ana):.1%}, max {max(abs_ana):.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
