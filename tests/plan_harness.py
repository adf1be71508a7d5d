"""Seeded random small planning instances, shared by the planner's brute-force tests
(test_plan_random.py) and its property tests (test_plan_properties.py).

Instances vary device speeds (50x range), memory tightness (from "nothing fits" to "all on
one device"), link bandwidths (slow Ethernet to fast PCIe) and per-layer cost (a skew factor
per layer, so the workload DP's prefix sums are exercised on non-uniform layers).
"""

from __future__ import annotations

import math
import random

from hpipe.cluster import parse_cluster
from hpipe.cost.analytic import AnalyticCost
from hpipe.cost.memory import CONTEXT_BYTES_GPU, kv_bytes, weight_bytes
from hpipe.errors import InfeasiblePlanError
from hpipe.plan.api import plan_method
from hpipe.plan.evaluate import Problem
from hpipe.plan.groups import stage_groups
from hpipe.plan.layers import build_split_costs, plan_layers
from hpipe.plan.search import hpipe_units
from hpipe.spec import ModelSpec

GIB = 1024**3


class SkewedCost:
    """An AnalyticCost whose layer l costs ``factors[l]`` times a plain layer, times ``scale``."""

    times_tp_groups = True

    def __init__(self, base: AnalyticCost, factors: list[float], scale: float = 1.0):
        self.base, self.factors, self.scale = base, factors, scale

    def stage_time_s(self, devices, layer_start, layer_stop, *, batch, tokens, prefix,
                     has_embedding, has_head):
        kw = dict(batch=batch, tokens=tokens, prefix=prefix)
        one = self.base.stage_time_s(devices, 0, 1, has_embedding=False, has_head=False, **kw)
        ends = self.base.stage_time_s(devices, 0, 0, has_embedding=has_embedding,
                                      has_head=has_head, **kw)
        return self.scale * (one * sum(self.factors[layer_start:layer_stop]) + ends)

    def decode_time_s(self, devices, layer_start, layer_stop, *, batch, context,
                      has_embedding, has_head):
        kw = dict(batch=batch, context=context)
        one = self.base.decode_time_s(devices, 0, 1, has_embedding=False, has_head=False, **kw)
        ends = self.base.decode_time_s(devices, 0, 0, has_embedding=has_embedding,
                                       has_head=has_head, **kw)
        return self.scale * (one * sum(self.factors[layer_start:layer_stop]) + ends)

    def transfer_time_s(self, src, dst, num_bytes):
        return self.scale * self.base.transfer_time_s(src, dst, num_bytes)

    def stage_memory_bytes(self, *args, **kw):
        return self.base.stage_memory_bytes(*args, **kw)


def random_instance(seed: int, *, max_devices: int = 4, max_layers: int = 7, max_grid: int = 6):
    rng = random.Random(seed)
    heads = rng.choice([2, 4])
    model = ModelSpec(name=f"rand{seed}", family="llama", num_layers=rng.randint(2, max_layers),
                      hidden=32 * heads, num_heads=heads, num_kv_heads=heads,
                      intermediate=64 * heads, vocab_size=256, max_seq_len=4096)
    batch = rng.randint(1, 4)
    grain = 16
    seq_len = grain * rng.randint(1, max_grid) + rng.choice([0, 0, 5])
    e = 2
    whole = (weight_bytes(model, num_layers=model.num_layers, has_embedding=True, has_head=True,
                          elem_bytes=e)
             + kv_bytes(model, num_layers=model.num_layers, batch=batch, seq_len=seq_len,
                        elem_bytes=e))
    num_dev = rng.randint(1, max_devices)
    num_hosts = rng.randint(1, min(3, num_dev))
    tight = rng.choice([0.15, 0.4, 0.8, 2.0])  # each device's room as a share of the whole model
    hosts, di = [], 0
    for h in range(num_hosts):
        count = num_dev - di if h == num_hosts - 1 else rng.randint(1, num_dev - di - (num_hosts - h - 1))
        devs = []
        for _ in range(count):
            room = whole * tight * rng.uniform(0.5, 2.0)
            devs.append({"name": f"d{di}", "memory_gb": (CONTEXT_BYTES_GPU + room) / GIB,
                         "fp16_tflops": rng.uniform(0.002, 0.1), "fp32_tflops": 0.01,
                         "mem_bandwidth_gbs": rng.uniform(5, 200), "busy_power_w": 100,
                         "idle_power_w": 10})
            di += 1
        hosts.append({"name": f"h{h}", "devices": devs,
                      "intra_link": {"bandwidth_gbps": rng.uniform(1, 100), "latency_s": 1e-5}})
    links = [{"between": [f"h{a}", f"h{b}"], "bandwidth_gbps": rng.uniform(0.05, 5),
              "latency_s": 1e-4} for a in range(num_hosts) for b in range(a + 1, num_hosts)]
    cluster = parse_cluster({"name": f"rand{seed}", "hosts": hosts, "links": links})
    assert cluster.num_devices == num_dev and len(cluster.hosts) == num_hosts, seed
    # Eager attention's score tensors make memory bind often on these instances (the family
    # the search's exhaustive tests were built on).
    base = AnalyticCost(model, cluster, "float16", attention="eager")
    cost = SkewedCost(base, [rng.uniform(0.3, 3.0) for _ in range(model.num_layers)])
    pb = Problem(model=model, cluster=cluster, batch=batch, seq_len=seq_len, dtype="float16",
                 cost=cost, grain_tokens=grain, overlap_comm=seed % 2 == 0)
    return pb


def split_costs(pb: Problem, *, allow_tp: bool = False, units=None):
    units = units or hpipe_units(pb.grain_tokens)(pb.batch, pb.seq_len)
    return build_split_costs(pb.cost, model=pb.model, cluster=pb.cluster, batch=pb.batch,
                             seq_len=pb.seq_len, dtype=pb.dtype, units=units,
                             overlap_comm=pb.overlap_comm,
                             groups=stage_groups(pb.cluster, allow_tp=allow_tp))


PIPELINE_BASELINES = ("base", "gpipe", "gpb", "terapipe")
TP_BASELINES = ("megatron", "tpt")


def baselines(allow_tp: bool) -> tuple[str, ...]:
    return PIPELINE_BASELINES + (TP_BASELINES if allow_tp else ())


def plan_kw(pb: Problem) -> dict:
    return dict(model=pb.model, cluster=pb.cluster, batch=pb.batch, seq_len=pb.seq_len,
                cost=pb.cost, grain_tokens=pb.grain_tokens)


def feasible_baselines(pb: Problem, methods: tuple[str, ...]) -> dict[str, float]:
    out = {}
    for m in methods:
        try:
            out[m] = plan_method(m, **plan_kw(pb)).predicted_latency_s
        except InfeasiblePlanError:
            pass
    return out


def feasible_stages(pb):
    sc = split_costs(pb)
    split = plan_layers(sc, pb.cluster.host_orders())[0]
    return split.stages() if math.isfinite(split.bottleneck_s) else None
