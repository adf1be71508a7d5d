"""The device groups a pipeline stage may run on: one device, or a tensor-parallel group.

A stage's ``devices`` tuple is its group (``StagePlan.devices``). A tensor-parallel (TP) group
is a run of consecutive devices inside one host: its two all-reduces per layer then stay on the
host's fast link, and because every host order keeps a host's devices adjacent and in their
file order (``ClusterSpec.host_orders``), such a group is adjacent in every order the workload
DP walks.

[design] Groups of at most ``MAX_TP_DEGREE`` = 2 devices: the pairs Megatron-LM and TP-T use
(algorithms.md section 6), and the degree the runtime shards. Larger groups pay 2(k-1) ring
steps per all-reduce and quickly lose on PCIe; raising the constant widens the search.
"""

from __future__ import annotations

from hpipe.cluster import ClusterSpec

Group = tuple[int, ...]  # device indices of one stage, in order

MAX_TP_DEGREE = 2


def host_device_indices(cluster: ClusterSpec) -> list[list[int]]:
    """Each host's device indices, in the host's (pipeline) order."""
    return [[cluster.device_index(n) for n in h.device_names] for h in cluster.hosts]


def single_groups(cluster: ClusterSpec) -> tuple[Group, ...]:
    """Every device alone: a pure pipeline."""
    return tuple((d,) for d in range(cluster.num_devices))


def stage_groups(cluster: ClusterSpec, *, allow_tp: bool = True,
                 max_tp_degree: int = MAX_TP_DEGREE) -> tuple[Group, ...]:
    """Every group a stage may use: each device alone, and (``allow_tp``) every run of 2 ..
    ``max_tp_degree`` consecutive devices of one host, aligned or not."""
    out = list(single_groups(cluster))
    if allow_tp:
        for idx in host_device_indices(cluster):
            for k in range(2, max_tp_degree + 1):
                out += [tuple(idx[i:i + k]) for i in range(len(idx) - k + 1)]
    return tuple(out)


def tp_pairs(cluster: ClusterSpec) -> list[Group]:
    """Megatron's tensor-parallel groups: consecutive *aligned* pairs inside each host
    (all-reduces stay on PCIe); a host with an odd count keeps its last device alone. The
    paper's memory table comes in equal pairs, i.e. TP=2 x PP=3 on its 6 GPUs."""
    groups: list[Group] = []
    for idx in host_device_indices(cluster):
        groups += [tuple(idx[i:i + 2]) for i in range(0, len(idx), 2)]
    return groups
