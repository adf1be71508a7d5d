"""Planner speed: how long HPipe's full planning takes (workload DP over host orders, slicing
DP with a scheme for every length, exact re-scoring of the candidates).

    .venv/bin/python benchmarks/planner_speed.py

Goals (issue 3): the paper setting (LLaMA-7B, bs 6, 2048 tokens, 16-token grain, schemes for
every length) in under 2 s; an 80-layer model on 16 devices of 4 kinds at 32k tokens in under
30 s. Each case is timed cold (a fresh cost model, so no memoised layer times).

Scale (issue 15): Llama-3.1-405B (126 layers, GQA) at 128k tokens on 64 devices in 2, 4, 8
and 16 hosts, and on 100 devices in 25 hosts; goals under 10 s at 8 hosts, 60 s at 16, and
2 minutes and 4 GB at 25. Each case runs in its own process, which reports its peak memory.
Hosts hold eight kinds of GPU in turn, linked by 10 GbE. ``--no-scale`` skips these.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import subprocess
import sys
import time

from hpipe.cluster import load_cluster, parse_cluster
from hpipe.cost.analytic import AnalyticCost
from hpipe.plan.api import plan_method
from hpipe.spec import model_preset


def four_kinds_cluster():
    """16 devices of 4 kinds on 4 hosts: A100s on NVLink, 4090s and A10s on PCIe 4, T4s on
    PCIe 3, hosts joined by 10 GbE (the largest host order search: 4! = 24 orders)."""
    kinds = [("a100", "nvlink"), ("rtx4090", "pcie4"), ("a10", "pcie4"), ("t4", "pcie3")]
    hosts = [{"name": f"h-{k}", "intra_link": link,
              "devices": [{"name": f"{k}-{i}", "type": k} for i in range(4)]}
             for k, link in kinds]
    links = [{"between": [a["name"], b["name"]], "kind": "10gbe"}
             for i, a in enumerate(hosts) for b in hosts[i + 1:]]
    return parse_cluster({"name": "four-kinds", "hosts": hosts, "links": links})


def timed(label: str, goal_s: float, **kw) -> None:
    cost = AnalyticCost(kw["model"], kw["cluster"], "float16")
    t0 = time.perf_counter()
    plan = plan_method("hpipe", cost=cost, **kw)
    dt = time.perf_counter() - t0
    print(f"{label}: {dt:.2f} s (goal < {goal_s:.0f} s) {'OK' if dt < goal_s else 'SLOW'}; "
          f"predicted {plan.predicted_latency_s:.3f} s, layers {plan.layer_counts()}, "
          f"{len(plan.slices)} slices, schemes for {len(plan.slice_table)} lengths")


SCALE_KINDS = ("a100", "v100", "t4", "p100", "rtx3090", "a10", "rtx4090", "h100")
SCALE_CASES = ((2, 32, None), (4, 16, None), (8, 8, 10.0), (16, 4, 60.0), (25, 4, 120.0))


def scale_cluster(num_hosts: int, per_host: int):
    hosts = [{"name": f"h{i}", "intra_link": "pcie4",
              "devices": [{"name": f"h{i}-{j}", "type": SCALE_KINDS[i % len(SCALE_KINDS)]}
                          for j in range(per_host)]} for i in range(num_hosts)]
    links = [{"between": [a["name"], b["name"]], "kind": "10gbe"}
             for i, a in enumerate(hosts) for b in hosts[i + 1:]]
    return parse_cluster({"name": f"{num_hosts}x{per_host}", "hosts": hosts, "links": links})


def scale_case(num_hosts: int, per_host: int) -> dict:
    """One scale case in this process (a child of ``main``)."""
    from hpipe.errors import InfeasiblePlanError

    model = model_preset("llama-3.1-405b")
    t0 = time.perf_counter()
    try:
        plan = plan_method("hpipe", model=model, cluster=scale_cluster(num_hosts, per_host),
                           batch=1, seq_len=131072, allow_tp=False)
        result = f"{plan.predicted_latency_s:.1f} s prefill, {plan.num_stages} stages"
    except InfeasiblePlanError as e:
        result = f"does not fit: {str(e)[:80]}"
    return {"s": time.perf_counter() - t0,
            "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "result": result}


def scale_table() -> None:
    print("\nLlama-3.1-405B at 128k tokens, batch 1 (each case in its own process):")
    print(f"{'hosts':>5} {'devices':>7} {'time s':>7} {'peak GB':>8}  goal      result")
    for hosts, per, goal in SCALE_CASES:
        out = subprocess.run([sys.executable, __file__, "--case", str(hosts), str(per)],
                             capture_output=True, text=True, timeout=1800)
        if out.returncode != 0:
            print(f"{hosts:>5} {hosts * per:>7}  failed: {out.stderr.strip()[-200:]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        verdict = "" if goal is None else (f"< {goal:.0f} s " + ("OK" if r["s"] < goal
                                                                 else "SLOW"))
        print(f"{hosts:>5} {hosts * per:>7} {r['s']:>7.1f} {r['peak_gb']:>8.2f}  "
              f"{verdict:<9} {r['result']}")


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--case":
        print(json.dumps(scale_case(int(sys.argv[2]), int(sys.argv[3]))))
        return
    timed("paper / llama-7b / bs 6 / 2048 tok / 16-tok grain", 2.0,
          model=model_preset("llama-7b"), cluster=load_cluster("paper"), batch=6,
          seq_len=2048, grain_tokens=16)
    # LLaMA-2-70B shapes (80 layers, GQA) with the context stretched to 32k, as long-context
    # fine-tunes do; the grain defaults to 128 tokens at this length (~256 grid points).
    model = dataclasses.replace(model_preset("llama-70b"), name="llama-70b-32k",
                                max_seq_len=32768)
    timed("four-kinds x16 / 80 layers / bs 1 / 32k tok", 30.0, model=model,
          cluster=four_kinds_cluster(), batch=1, seq_len=32768)
    if "--no-scale" not in sys.argv:
        scale_table()


if __name__ == "__main__":
    main()
