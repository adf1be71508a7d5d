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
device raises InfeasiblePlanError naming it: that is the paper's "OOM".
"""

from __future__ import annotations

from hpipe.errors import InfeasiblePlanError, PlanMismatchError
from hpipe.plan.evaluate import (
    Problem,
    check_memory,
    scored,
    stage_slice_times,
)
from hpipe.plan.plan import Plan, StagePlan, check_slices
from hpipe.plan.search import best_microbatches, plan_hpipe_split, plan_slices_for
from hpipe.plan.slices import plan_slicing


def even_counts(num_layers: int, num_parts: int) -> tuple[int, ...]:
    return tuple(num_layers // num_parts + (j < num_layers % num_parts) for j in range(num_parts))


def stages_from_counts(groups: list[tuple[int, ...]], counts: tuple[int, ...]
                       ) -> tuple[StagePlan, ...]:
    """Stages for ``counts`` layers on each group in order; groups with 0 layers are dropped."""
    out, start = [], 0
    for g, c in zip(groups, counts):
        if c:
            out.append(StagePlan(tuple(g), start, start + c))
            start += c
    return tuple(out)


def even_stages(pb: Problem, groups: list[tuple[int, ...]]) -> tuple[StagePlan, ...]:
    return stages_from_counts(groups, even_counts(pb.model.num_layers, len(groups)))


def tp_pairs(pb: Problem) -> list[tuple[int, ...]]:
    """Megatron's tensor-parallel groups: consecutive pairs inside each host (all-reduces stay
    on PCIe); a host with an odd count keeps its last device alone. The paper's memory table
    comes in equal pairs, i.e. TP=2 x PP=3 on its 6 GPUs."""
    groups = []
    for h in pb.cluster.hosts:
        idx = [pb.cluster.device_index(n) for n in h.device_names]
        groups += [tuple(idx[i:i + 2]) for i in range(0, len(idx), 2)]
    return groups


def plan_base(pb: Problem) -> Plan:
    stages = even_stages(pb, [(d,) for d in range(pb.cluster.num_devices)])
    plan = pb.plan("base", stages, (pb.seq_len,))
    check_memory(plan, pb.cost)
    return scored(plan, pb.cost)


def plan_gpipe(pb: Problem) -> Plan:
    return best_microbatches(pb, "gpipe",
                              even_stages(pb, [(d,) for d in range(pb.cluster.num_devices)]))


def plan_gpb(pb: Problem) -> Plan:
    return best_microbatches(pb, "gpb", plan_hpipe_split(pb)[0])


def plan_megatron(pb: Problem) -> Plan:
    return best_microbatches(pb, "megatron", even_stages(pb, tp_pairs(pb)))


def _terapipe_slicing(pb: Problem, method: str, stages: tuple[StagePlan, ...]) -> Plan:
    """TeraPipe's DP assumes every stage costs the same, so it plans against one stage: the
    slowest over the whole prefill. Its pick is its own estimate's best (no re-scoring)."""
    full = stage_slice_times(stages, pb.cost, model=pb.model, dtype=pb.dtype, rows=pb.batch,
                             tokens=pb.seq_len, prefix=0, overlap_comm=pb.overlap_comm)
    slowest = max(range(len(stages)), key=lambda j: full[j])
    st = pb.slice_times(stages, only_stage=slowest)
    res = plan_slicing(st.tau, fits_fn=st.fits, tau_row_fn=st.tau_row, seq_len=pb.seq_len,
                       grain_tokens=pb.grain_tokens, num_stages=len(stages), num_candidates=1)
    if res is None:
        plan = pb.plan(method, stages, (pb.seq_len,))
        check_memory(plan, pb.cost)  # the static part overflows: name the device
        raise InfeasiblePlanError(f"{method}: no slicing at a {pb.grain_tokens}-token grain fits "
                                  f"memory at batch {pb.batch}; fits: a smaller batch")
    return scored(pb.plan(method, stages, res.slices), pb.cost)


def plan_terapipe(pb: Problem) -> Plan:
    return _terapipe_slicing(pb, "terapipe",
                             even_stages(pb, [(d,) for d in range(pb.cluster.num_devices)]))


def plan_tpt(pb: Problem) -> Plan:
    return _terapipe_slicing(pb, "tpt", even_stages(pb, tp_pairs(pb)))


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
        stages = stages_from_counts([(d,) for d in range(num)], tuple(layers))
    else:
        stages = plan_hpipe_split(pb)[0]
    notes = ("manual: " + ", ".join(
        p for p, v in (("layers", layers), ("slices", slices)) if v is not None),)
    if slices is not None:
        check_slices(tuple(slices), pb.seq_len)
        plan = pb.plan("manual", stages, tuple(slices), notes=notes)
        check_memory(plan, pb.cost)
        return scored(plan, pb.cost)
    plan = plan_slices_for(pb, stages, method="manual", notes=notes)
    if plan is None:
        check_memory(pb.plan("manual", stages, (pb.seq_len,)), pb.cost)
        raise InfeasiblePlanError(f"manual: no slicing fits memory at batch {pb.batch}")
    return plan
