"""The paper's baselines (algorithms.md section 6), each a pure function returning a scored Plan.

| method   | layer split           | unit                                    |
|----------|-----------------------|-----------------------------------------|
| base     | even                  | whole batch, one pass                   |
| gpipe    | even                  | micro-batches, best count by simulation |
| gpb      | HPipe's workload DP   | micro-batches, best count               |
| megatron | even over TP pairs    | micro-batches, best count               |
| terapipe | even                  | TeraPipe's slicing DP (slowest stage)   |
| tpt      | even over TP pairs    | TeraPipe's slicing DP                   |
| manual   | user counts or DP     | user slices or HPipe's slicing DP       |

"Even" = n // N + (j < n % N) layers on device j. A baseline whose fixed split overflows a
device raises InfeasiblePlanError naming it: that is the paper's "OOM". Each baseline's final
configuration is also one of HPipe's candidates (``search.py``, [Note: HPipe contains every
baseline]), so keep the two in step when changing one.
"""

from __future__ import annotations

from hpipe.errors import InfeasiblePlanError, PlanMismatchError
from hpipe.plan.evaluate import Problem, check_memory
from hpipe.plan.groups import Group, single_groups, tp_pairs
from hpipe.plan.layers import even_counts, stages_from_counts
from hpipe.plan.plan import Plan, StagePlan, check_slices
from hpipe.plan.search import (
    best_microbatches,
    plan_hpipe_split,
    plan_slices_for,
    terapipe_slices,
)


def even_stages(pb: Problem, groups) -> tuple[StagePlan, ...]:
    return stages_from_counts(groups, even_counts(pb.model.num_layers, len(groups)))


def _devices(pb: Problem) -> tuple[Group, ...]:
    return single_groups(pb.cluster)


def plan_base(pb: Problem) -> Plan:
    stages = even_stages(pb, _devices(pb))
    plan = pb.plan("base", stages, (pb.seq_len,))
    check_memory(plan, pb.cost, kv_tokens=pb.kv_tokens)
    return pb.score(plan)


def plan_gpipe(pb: Problem) -> Plan:
    return best_microbatches(pb, "gpipe",
                              even_stages(pb, _devices(pb)))


def plan_gpb(pb: Problem) -> Plan:
    return best_microbatches(pb, "gpb", plan_hpipe_split(pb)[0])


def plan_megatron(pb: Problem) -> Plan:
    return best_microbatches(pb, "megatron", even_stages(pb, tp_pairs(pb.cluster)))


def _terapipe_slicing(pb: Problem, method: str, stages: tuple[StagePlan, ...]) -> Plan:
    """TeraPipe's slicing DP against the slowest stage (``search.terapipe_slices``), scored."""
    slices = terapipe_slices(pb, stages)
    if slices is None:
        plan = pb.plan(method, stages, (pb.seq_len,))
        check_memory(plan, pb.cost, kv_tokens=pb.kv_tokens)  # the static part overflows: name the device
        raise InfeasiblePlanError(f"{method}: no slicing at a {pb.grain_tokens}-token grain fits "
                                  f"memory at batch {pb.batch}; fits: a smaller batch")
    return pb.score(pb.plan(method, stages, slices))


def plan_terapipe(pb: Problem) -> Plan:
    return _terapipe_slicing(pb, "terapipe",
                             even_stages(pb, _devices(pb)))


def plan_tpt(pb: Problem) -> Plan:
    return _terapipe_slicing(pb, "tpt", even_stages(pb, tp_pairs(pb.cluster)))


def plan_manual(pb: Problem, *, layers: tuple[int, ...] | None,
                slices: tuple[int, ...] | None) -> Plan:
    """A what-if plan: ``layers`` = layer counts per device in cluster order (0 = unused),
    ``slices`` = token slices. Whatever is not given comes from HPipe's DPs."""
    if layers is not None:
        n, num = pb.model.num_layers, pb.cluster.num_devices
        if len(layers) != num or any(c < 0 for c in layers) or sum(layers) != n:
            raise PlanMismatchError(
                f"--layers {','.join(map(str, layers))}: need {num} non-negative counts (one per "
                f"device of {pb.cluster.name!r}, 0 = unused) summing to {n} layers of "
                f"{pb.model.name!r}; got {len(layers)} counts summing to {sum(layers)}")
        stages = stages_from_counts(_devices(pb), tuple(layers))
    else:
        stages = plan_hpipe_split(pb)[0]
    notes = ("manual: " + ", ".join(
        p for p, v in (("layers", layers), ("slices", slices)) if v is not None),)
    if slices is not None:
        check_slices(tuple(slices), pb.seq_len)
        plan = pb.plan("manual", stages, tuple(slices), notes=notes)
        check_memory(plan, pb.cost, kv_tokens=pb.kv_tokens)
        return pb.score(plan)
    plan = plan_slices_for(pb, stages, method="manual", notes=notes)
    if plan is None:
        check_memory(pb.plan("manual", stages, (pb.seq_len,)), pb.cost, kv_tokens=pb.kv_tokens)
        raise InfeasiblePlanError(f"manual: no slicing fits memory at batch {pb.batch}")
    return plan
