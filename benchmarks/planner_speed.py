"""Planner speed: how long HPipe's full planning takes (workload DP over host orders, slicing
DP with a scheme for every length, exact re-scoring of the candidates).

    .venv/bin/python benchmarks/planner_speed.py

Goals (issue 3): the paper setting (LLaMA-7B, bs 6, 2048 tokens, 16-token grain, schemes for
every length) in under 2 s; an 80-layer model on 16 devices of 4 kinds at 32k tokens in under
30 s. Each case is timed cold (a fresh cost model, so no memoised layer times).
"""

from __future__ import annotations

import dataclasses
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


def main() -> None:
    timed("paper / llama-7b / bs 6 / 2048 tok / 16-tok grain", 2.0,
          model=model_preset("llama-7b"), cluster=load_cluster("paper"), batch=6,
          seq_len=2048, grain_tokens=16)
    # LLaMA-2-70B shapes (80 layers, GQA) with the context stretched to 32k, as long-context
    # fine-tunes do; the grain defaults to 128 tokens at this length (~256 grid points).
    model = dataclasses.replace(model_preset("llama-70b"), name="llama-70b-32k",
                                max_seq_len=32768)
    timed("four-kinds x16 / 80 layers / bs 1 / 32k tok", 30.0, model=model,
          cluster=four_kinds_cluster(), batch=1, seq_len=32768)


if __name__ == "__main__":
    main()
