"""Why nothing fits, and what would: the message of an InfeasiblePlanError.

A user who asks for a model the cluster cannot hold gets which device runs out of memory by how
much, and the nearest settings that fit (a smaller batch, a shorter sequence, more devices).
Pure: it only re-asks the cost model's memory question with other numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from hpipe.cluster import ClusterSpec
from hpipe.cost.base import CostModel
from hpipe.plan.layers import max_stops, stops_fit
from hpipe.spec import ModelSpec

GIB = 1024**3  # device memory is sold in GiB ("16 GB" P100 = 16 GiB)

# units(batch, seq_len) -> the (rows, tokens, prefix) work units whose workspace must fit.
UnitsFn = Callable[[int, int], tuple[tuple[int, int, int], ...]]


def split_fits(cost: CostModel, *, model: ModelSpec, cluster: ClusterSpec, batch: int,
               seq_len: int, units: UnitsFn) -> bool:
    stops = max_stops(cost, model=model, cluster=cluster, batch=batch, seq_len=seq_len,
                      units=units(batch, seq_len))
    return stops_fit(stops, model.num_layers, memory_orders(cluster))


def memory_orders(cluster: ClusterSpec) -> list[tuple[int, ...]]:
    """Orders in which to ask whether the layers fit memory at all: every host order for a
    few hosts; beyond, the file's and the hosts by memory, largest and smallest first (the
    embedding and the head, the largest blocks, then land on the largest hosts)."""
    from hpipe.plan.orders import EXHAUSTIVE_HOSTS, host_blocks

    blocks = host_blocks(cluster)
    if len(blocks) <= EXHAUSTIVE_HOSTS:
        return cluster.host_orders()

    def mem(block) -> int:
        return sum(cluster.devices[i].memory_bytes for i in block[1])

    out = []
    for hosts in (blocks, sorted(blocks, key=mem, reverse=True), sorted(blocks, key=mem)):
        order = tuple(i for _, devs in hosts for i in devs)
        if order not in out:
            out.append(order)
    return out


def largest_fitting(ok: Callable[[int], bool], hi: int) -> int:
    """Largest x in [1, hi] with ok(x), for ok monotone decreasing; 0 if none."""
    lo = 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _elem_bytes(cost: CostModel) -> int:
    from hpipe.spec import dtype_bytes

    return dtype_bytes(getattr(cost, "dtype", "float16"))


def _whole_cluster_shortfall(model: ModelSpec, cluster: ClusterSpec, *, batch: int,
                             seq_len: int, elem_bytes: int) -> str:
    """"; the weights (X GiB) and KV cache (Y GiB) exceed the cluster's Z GiB by W" when they
    do: no split can help then, only more memory."""
    from hpipe.cost.memory import context_bytes, kv_bytes

    weights = model.total_params() * elem_bytes
    kv = kv_bytes(model, num_layers=model.num_layers, batch=batch, seq_len=seq_len,
                  elem_bytes=elem_bytes)
    room = sum(d.memory_bytes - context_bytes(d) for d in cluster.devices)
    if weights + kv <= room:
        return ""
    return (f"; its weights ({weights / GIB:.1f} GiB) and KV cache ({kv / GIB:.1f} GiB) alone "
            f"exceed the {room / GIB:.1f} GiB the cluster's devices hold beside their "
            f"runtimes, by {(weights + kv - room) / GIB:.1f} GiB")


def explain_no_split(cost: CostModel, *, model: ModelSpec, cluster: ClusterSpec, batch: int,
                     seq_len: int, units: UnitsFn) -> str:
    """The message for "no contiguous split of the layers fits any host order"."""
    n = model.num_layers
    u = units(batch, seq_len)
    stops = max_stops(cost, model=model, cluster=cluster, batch=batch, seq_len=seq_len, units=u)
    # Layers each device could hold in the middle of the pipeline (no embedding, no head).
    cap = {g[0]: int(stops[g][1]) - 1 if n > 1 else int(stops[g][0]) for g in stops}
    held = ", ".join(f"{cluster.devices[d].name} {cap[d]}" for d in cap)
    # The even split's worst device, in the house style "layers [a, b) need X GB on 'dev'".
    worst, start, num = None, 0, cluster.num_devices
    for j in range(num):
        c = n // num + (j < n % num)
        if c == 0:
            continue
        need = cost.stage_memory_bytes((j,), start, start + c, batch=batch, seq_len=seq_len,
                                       units=u, has_embedding=start == 0,
                                       has_head=start + c == n)
        over = need - cluster.devices[j].memory_bytes
        if worst is None or over > worst[0]:
            worst = (over, j, start, start + c, need)
        start += c
    msg = (f"model {model.name!r} ({n} layers) fits no split over cluster {cluster.name!r} at "
           f"batch {batch}, seq_len {seq_len}: the devices hold at most {sum(cap.values())} "
           f"layers ({held})")
    if worst is not None and worst[0] > 0:
        _, j, a, b, need = worst
        dev = cluster.devices[j]
        msg += (f"; e.g. layers [{a}, {b}) need {need / GIB:.1f} GiB on {dev.name!r} "
                f"({dev.memory_bytes / GIB:.1f} GiB)")
    msg += _whole_cluster_shortfall(model, cluster, batch=batch, seq_len=seq_len,
                                    elem_bytes=_elem_bytes(cost))
    fixes = []
    b_ok = largest_fitting(lambda b: split_fits(cost, model=model, cluster=cluster, batch=b,
                                         seq_len=seq_len, units=units), batch - 1)
    if b_ok:
        fixes.append(f"batch <= {b_ok}")
    s_ok = largest_fitting(lambda s: split_fits(cost, model=model, cluster=cluster, batch=batch,
                                         seq_len=s, units=units), seq_len - 1)
    if s_ok:
        fixes.append(f"seq_len <= {s_ok}")
    big = max(cap, key=lambda d: cap[d])
    if cap[big] > 0:
        extra = math.ceil(max(1, n - sum(cap.values())) / cap[big])
        fixes.append(f"about {extra} more device(s) like {cluster.devices[big].name!r}")
    if model.num_layers and not fixes:
        fixes.append("a device with more memory")
    return msg + "; fits: " + ", or ".join(fixes)
