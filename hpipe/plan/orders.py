"""Which host orders the planner tries.

[Note: host orders] A pipeline keeps each host's devices together, so a split lives in one
order of the hosts. With H hosts there are H! orders: 24 for four, 40,320 for eight. Up to
``EXHAUSTIVE_HOSTS`` hosts every order is tried, as before. Beyond, orders are searched:

- hosts that hold the same devices and are linked alike to every other host are
  interchangeable, so orders that only swap them are the same order;
- each order is scored by the workload DP's best bottleneck (the planner's own first
  proxy), from a few seeds (the file's order, fastest hosts first, slowest first, largest
  memory first), and improved by swapping two hosts or moving one while that helps;
- the best ``KEEP_ORDERS`` distinct orders found, and their reverses (which host sits at
  the head of the pipeline matters: seed 134 of the exhaustive tests wanted the reversed
  order), are what the planner then searches over.

``tests/test_plan_orders.py`` checks the search against every order on small instances of
six and seven hosts.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

EXHAUSTIVE_HOSTS = 5
KEEP_ORDERS = 4
MAX_SCORED_ORDERS = 400  # order evaluations before the search stops improving


def host_blocks(cluster) -> list[tuple[str, tuple[int, ...]]]:
    """(host name, its device indices) in file order."""
    return [(h.name, tuple(i for i, d in enumerate(cluster.devices) if d.host == h.name))
            for h in cluster.hosts]


def _signature(cluster, name: str, devs: tuple[int, ...], others) -> tuple:
    """What makes two hosts interchangeable: their devices' figures and their links."""
    ds = cluster.devices
    kinds = tuple((ds[i].kind, ds[i].memory_bytes, ds[i].peak_flops("float16"),
                   ds[i].mem_bandwidth_bytes_s, ds[i].slowdown) for i in devs)
    links = []
    for other_name, other in others:
        if other_name != name and other:
            lk = cluster.link(devs[0], other[0])
            links.append((lk.bandwidth_bytes_s, lk.latency_s))
    intra = (cluster.link(devs[0], devs[1]).bandwidth_bytes_s,) if len(devs) > 1 else ()
    return kinds, intra, tuple(sorted(links))


def canonical(order_hosts: tuple[int, ...], classes: list[int]) -> tuple[int, ...]:
    """The order written by host classes (interchangeable hosts get one label)."""
    return tuple(classes[h] for h in order_hosts)


def planning_orders(cluster, score: Callable[[tuple[int, ...]], float]
                    ) -> list[tuple[int, ...]]:
    """Device orders to plan over: every host order for a few hosts, else the best found by
    a local search scored with ``score(device order)`` (lower is better)."""
    blocks = host_blocks(cluster)
    if len(blocks) <= EXHAUSTIVE_HOSTS:
        return cluster.host_orders()

    def devices_of(order_hosts: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(i for h in order_hosts for i in blocks[h][1])

    sigs = [_signature(cluster, name, devs, blocks) for name, devs in blocks]
    label = {s: k for k, s in enumerate(dict.fromkeys(sigs))}
    classes = [label[s] for s in sigs]
    seen: dict[tuple[int, ...], float] = {}  # canonical order -> score

    def value(order_hosts: tuple[int, ...]) -> float:
        key = canonical(order_hosts, classes)
        if key not in seen:
            seen[key] = score(devices_of(order_hosts))
        return seen[key]

    def host_rate(h: int) -> float:
        return sum(cluster.devices[i].peak_flops("float16") for i in blocks[h][1])

    def host_memory(h: int) -> float:
        return sum(cluster.devices[i].memory_bytes for i in blocks[h][1])

    hosts = tuple(range(len(blocks)))
    seeds = [hosts, tuple(sorted(hosts, key=host_rate, reverse=True)),
             tuple(sorted(hosts, key=host_rate)),
             tuple(sorted(hosts, key=host_memory, reverse=True))]
    best: dict[tuple[int, ...], tuple[float, tuple[int, ...]]] = {}
    for seed in dict.fromkeys(seeds):
        current, current_v = seed, value(seed)
        improved = True
        while improved and len(seen) < MAX_SCORED_ORDERS:
            improved = False
            for i, j in itertools.combinations(range(len(hosts)), 2):
                for cand in (_swapped(current, i, j), _moved(current, i, j),
                             _moved(current, j, i)):
                    v = value(cand)
                    if v < current_v:
                        current, current_v, improved = cand, v, True
                        break
                if improved or len(seen) >= MAX_SCORED_ORDERS:
                    break
        key = canonical(current, classes)
        if key not in best or current_v < best[key][0]:
            best[key] = (current_v, current)
    kept = sorted(best.values())[:KEEP_ORDERS]
    out: list[tuple[int, ...]] = []
    for v, order_hosts in kept:
        if not math.isfinite(v) and out:
            continue
        for o in (order_hosts, tuple(reversed(order_hosts))):
            d = devices_of(o)
            if d not in out:
                out.append(d)
    return out


def _swapped(order: tuple[int, ...], i: int, j: int) -> tuple[int, ...]:
    o = list(order)
    o[i], o[j] = o[j], o[i]
    return tuple(o)


def _moved(order: tuple[int, ...], i: int, j: int) -> tuple[int, ...]:
    o = list(order)
    o.insert(j, o.pop(i))
    return tuple(o)
