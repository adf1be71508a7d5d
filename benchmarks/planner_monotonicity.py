"""An extra or a faster device never makes HPipe's plan slower: checked on paper-like clusters.

    .venv/bin/python benchmarks/planner_monotonicity.py [--quick]

The unit tests check the property on random synthetic instances (tests/test_plan_properties.py);
this checks it where users meet it: P100 hosts and RTX 3090 hosts over 1 GbE, real model
presets, with and without tensor parallelism. For each base cluster it plans HPipe, then plans
again on every variant (one more catalog GPU at the end of either host; one device made 1.5x
or 3x faster in FLOP/s and memory bandwidth) and counts the variants whose predicted latency
is higher. Each variant contains every plan of the base cluster (an extra device may take no
layers; a faster device only shortens computes), so the exact optimum could not get worse;
HPipe's search is not exhaustive, so this measures how often its proxies let it down.
"""

from __future__ import annotations

import argparse
import time

from hpipe.catalog import DEVICE_CATALOG
from hpipe.cluster import parse_cluster
from hpipe.errors import InfeasiblePlanError
from hpipe.plan.api import plan_method
from hpipe.spec import model_preset

EXTRA_KINDS = ("p100", "v100", "t4", "rtx3090", "rtx4090", "a10", "a100")
SPEEDUPS = (1.5, 3.0)
# (model, batch, prompt tokens): the paper's two settings, a bigger model, short prompts.
WORKLOADS = (("llama-7b", 6, 2048), ("gpt3-2.7b", 12, 2048), ("llama-13b", 2, 2048),
             ("llama-7b", 1, 512), ("gpt3-2.7b", 1, 1024))
SHAPES = ((4, 2), (3, 2), (2, 1), (1, 1))  # P100s on host1, RTX 3090s on host2


def two_hosts(host1: list[dict], host2: list[dict]):
    return parse_cluster({
        "name": "variant",
        "hosts": [
            {"name": "host1", "intra_link": "pcie3",
             "devices": [dict(name=f"h1-{i}", **d) for i, d in enumerate(host1)]},
            {"name": "host2", "intra_link": "pcie4",
             "devices": [dict(name=f"h2-{i}", **d) for i, d in enumerate(host2)]},
        ],
        "links": [{"between": ["host1", "host2"], "kind": "1gbe"}],
    })


def faster(device: dict, factor: float) -> dict:
    kind = DEVICE_CATALOG[device["type"]]
    return dict(type=device["type"], fp16_tflops=kind.fp16_tflops * factor,
                fp32_tflops=kind.fp32_tflops * factor,
                mem_bandwidth_gbs=kind.mem_bandwidth_gbs * factor)


def variants(host1: list[dict], host2: list[dict]):
    """(label, cluster) for every one-device change that cannot slow the exact optimum."""
    for kind in EXTRA_KINDS:
        yield f"+{kind} on host1", two_hosts(host1 + [{"type": kind}], host2)
        yield f"+{kind} on host2", two_hosts(host1, host2 + [{"type": kind}])
    for i in range(len(host1) + len(host2)):
        for factor in SPEEDUPS:
            h1, h2 = list(host1), list(host2)
            if i < len(h1):
                h1[i] = faster(h1[i], factor)
            else:
                h2[i - len(h1)] = faster(h2[i - len(h1)], factor)
            yield f"device {i} x{factor}", two_hosts(h1, h2)


def latency_s(cluster, model: str, batch: int, seq_len: int, allow_tp: bool) -> float:
    try:
        return plan_method("hpipe", model=model_preset(model), cluster=cluster, batch=batch,
                           seq_len=seq_len, dtype="float16", allow_tp=allow_tp).predicted_latency_s
    except InfeasiblePlanError:
        return float("inf")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="the paper's LLaMA-7B setting only (about a minute)")
    args = ap.parse_args()
    workloads = WORKLOADS[:1] if args.quick else WORKLOADS
    checked = worse = 0
    worst = 0.0
    t0 = time.perf_counter()
    for model, batch, seq_len in workloads:
        for allow_tp in (False, True):
            n0, w0 = checked, worse
            for n1, n2 in SHAPES:
                host1, host2 = [{"type": "p100"}] * n1, [{"type": "rtx3090"}] * n2
                before = latency_s(two_hosts(host1, host2), model, batch, seq_len, allow_tp)
                for label, cluster in variants(host1, host2):
                    after = latency_s(cluster, model, batch, seq_len, allow_tp)
                    checked += 1
                    if after > before:
                        worse += 1
                        worst = max(worst, after / before - 1)
                        print(f"  SLOWER {model} bs{batch} {seq_len} tok tp={allow_tp} "
                              f"{n1}xP100+{n2}x3090, {label}: {before:.4f} -> {after:.4f} s")
            print(f"{model} bs {batch}, {seq_len} tokens, {'TP allowed' if allow_tp else 'no TP'}: "
                  f"{worse - w0} of {checked - n0} variants slower "
                  f"({time.perf_counter() - t0:.0f} s so far)", flush=True)
    print(f"\n{worse} of {checked} variants planned slower than their base cluster"
          + (f" (worst +{worst:.1%})" if worse else ""))


if __name__ == "__main__":
    main()
