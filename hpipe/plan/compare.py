"""Plan and simulate a set of methods on one setting, keeping OOM and infeasible results as data.

Shared by ``hpipe simulate --method all`` and ``hpipe experiment paper``: both need, per method,
the plan, its simulated Timeline, per-device memory against capacity, and why a method failed.
Pure: no printing, no files.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from hpipe.cluster import ClusterSpec
from hpipe.cost.base import CostModel
from hpipe.errors import InfeasiblePlanError
from hpipe.plan.plan import Plan, StagePlan
from hpipe.schedule import prefill_units
from hpipe.sim import simulate
from hpipe.spec import ModelSpec
from hpipe.timeline import Timeline

# The paper's seven methods, in the order its tables use.
PAPER_METHODS = ("base", "gpipe", "gpb", "megatron", "terapipe", "tpt", "hpipe")


@dataclass(frozen=True)
class MethodResult:
    """One method on one setting.

    - ``timeline`` is None only when no plan could be built at all (``error`` says why).
    - ``memory_bytes``/``capacity_bytes`` are per cluster device, in cluster order; 0 memory
      means the device holds no layers. ``oom_devices`` lists those whose need exceeds capacity:
      the method does not run there, but its would-be timeline is kept for reference.
    """

    method: str
    plan: Plan | None
    timeline: Timeline | None
    device_names: tuple[str, ...]
    memory_bytes: tuple[int, ...]
    capacity_bytes: tuple[int, ...]
    error: str | None = None

    @property
    def oom_devices(self) -> tuple[str, ...]:
        return tuple(n for n, m, c in zip(self.device_names, self.memory_bytes,
                                           self.capacity_bytes) if m > c)

    @property
    def runs(self) -> bool:
        """True when the method has a timeline and fits in memory everywhere."""
        return self.timeline is not None and not self.oom_devices and self.error is None

    @property
    def status(self) -> str:
        if self.oom_devices:
            return "OOM on " + ", ".join(self.oom_devices)
        if self.error is not None:
            return f"infeasible: {self.error}"
        return "ok"


def even_layer_split(num_layers: int, num_devices: int) -> tuple[StagePlan, ...]:
    """algorithms.md section 6: n // N + (j < n % N) layers on device j (no device left empty)."""
    q, r = divmod(num_layers, num_devices)
    stages, start = [], 0
    for j in range(min(num_devices, num_layers)):
        stop = start + q + (1 if j < r else 0)
        stages.append(StagePlan((j,), start, stop))
        start = stop
    return tuple(stages)


def base_plan_unchecked(model: ModelSpec, cluster: ClusterSpec, *, batch: int, seq_len: int,
                        dtype: str) -> Plan:
    """Base as the paper runs it (even split, whole batch, one pass) without any memory check.

    Used only to report *how much* memory Base would need when the planner refuses it, so the
    memory table can show which devices overflow (the paper's "OOM" cells).
    """
    return Plan(method="base", model=model, cluster=cluster, batch=batch, seq_len=seq_len,
                dtype=dtype, stages=even_layer_split(model.num_layers, cluster.num_devices),
                slices=(seq_len,), notes=("unchecked even split, for the memory table only",))


def result_from_plan(plan: Plan, cost: CostModel, *, error: str | None = None,
                     num_decode_steps: int = 0) -> MethodResult:
    """Simulate ``plan`` (its prefill, then ``num_decode_steps`` decode steps) and lay its
    per-row memory onto the cluster's devices."""
    tl = simulate(plan, cost, num_decode_steps=num_decode_steps)
    cluster = plan.cluster
    mem = [0] * cluster.num_devices
    for name, peak in zip(tl.row_names, tl.peak_memory_bytes):
        mem[cluster.device_index(name)] = int(peak)
    return MethodResult(
        method=plan.method, plan=plan, timeline=tl,
        device_names=tuple(d.name for d in cluster.devices), memory_bytes=tuple(mem),
        capacity_bytes=tuple(d.memory_bytes for d in cluster.devices), error=error,
    )


def evaluate_methods(
    methods: Sequence[str],
    *,
    model: ModelSpec,
    cluster: ClusterSpec,
    batch: int,
    seq_len: int,
    dtype: str = "float16",
    cost: CostModel | None = None,
    grain_tokens: int | None = None,
    allow_tp: bool = True,
    num_decode_steps: int = 0,
    objective: str = "prefill",
    concurrency: int = 1,
) -> dict[str, MethodResult]:
    """Plan each method with the planner's front door and simulate it, with
    ``num_decode_steps`` decode steps after the prefill (``allow_tp``: whether HPipe may use
    tensor-parallel stages). ``objective`` is HPipe's (the baselines keep their own rules;
    with "latency" their choices are scored by it too); its decode length is
    ``num_decode_steps + 1`` tokens.

    A method the planner finds infeasible is kept as a result with ``error`` set; for Base we
    still simulate the unchecked even split so its memory row can show where it overflows.
    """
    from hpipe.cost import cost_model
    from hpipe.plan.api import plan_method

    cost = cost or cost_model(model, cluster, dtype)
    names = tuple(d.name for d in cluster.devices)
    caps = tuple(d.memory_bytes for d in cluster.devices)
    out: dict[str, MethodResult] = {}
    for method in methods:
        try:
            own = objective if method == "hpipe" or objective == "latency" else "prefill"
            plan = plan_method(method, model=model, cluster=cluster, batch=batch,
                               seq_len=seq_len, dtype=dtype, cost=cost,
                               grain_tokens=grain_tokens, allow_tp=allow_tp, objective=own,
                               max_new_tokens=num_decode_steps + 1, concurrency=concurrency)
        except InfeasiblePlanError as e:  # argument errors (seq-len, dtype) propagate
            if method == "base":
                unchecked = base_plan_unchecked(model, cluster, batch=batch, seq_len=seq_len,
                                                dtype=dtype)
                out[method] = result_from_plan(unchecked, cost, error=str(e),
                                               num_decode_steps=num_decode_steps)
            else:
                out[method] = MethodResult(method, None, None, names, (0,) * len(names), caps,
                                           error=str(e))
            continue
        out[method] = result_from_plan(plan, cost, num_decode_steps=num_decode_steps)
    return out


def compare_objectives(*, model: ModelSpec, cluster: ClusterSpec, batch: int, seq_len: int,
                       dtype: str, cost: CostModel, max_new_tokens: int, concurrency: int,
                       allow_tp: bool = True, grain_tokens: int | None = None) -> list[dict]:
    """HPipe's plan for each objective and how each does on all of them: time to first
    token and time per output token of one request of ``batch`` x ``seq_len`` +
    ``max_new_tokens``, output tokens/s with ``concurrency`` such requests decoding, and the
    fullest device under the objective's own load (``concurrency`` requests for throughput,
    ``batch`` rows otherwise, each at its full length). One row per objective; ``error`` where it does not fit."""
    from hpipe.plan.api import plan_method
    from hpipe.plan.evaluate import Problem
    from hpipe.plan.throughput import decode_tok_s
    from hpipe.spec import OBJECTIVES

    rows = []
    kv_tokens, context = seq_len + max_new_tokens, seq_len + max_new_tokens // 2
    for objective in OBJECTIVES:
        try:
            plan = plan_method("hpipe", model=model, cluster=cluster, batch=batch,
                               seq_len=seq_len, dtype=dtype, cost=cost, allow_tp=allow_tp,
                               grain_tokens=grain_tokens, objective=objective,
                               max_new_tokens=max_new_tokens, concurrency=concurrency)
        except InfeasiblePlanError as e:
            rows.append({"objective": objective, "error": str(e)})
            continue
        tl = simulate(plan, cost, num_decode_steps=max(0, max_new_tokens - 1))
        one = Problem(model=model, cluster=cluster, batch=1, seq_len=seq_len, dtype=dtype,
                      cost=cost, grain_tokens=grain_tokens or 16)
        fullest = 0.0
        last = plan.num_stages - 1
        load = concurrency if objective == "throughput" else batch  # the objective's own
        for j, st in enumerate(plan.stages):
            need = cost.stage_memory_bytes(
                st.devices, st.layer_start, st.layer_stop, batch=load,
                seq_len=kv_tokens, units=tuple(sorted({(u.rows, u.tokens, u.prefix)
                                                       for u in prefill_units(plan)})),
                has_embedding=j == 0, has_head=j == last)
            cap = min(cluster.devices[d].memory_bytes for d in st.devices)
            fullest = max(fullest, need / cap)
        rows.append({
            "objective": objective,
            "layers": [[cluster.devices[d].name for d in s.devices] + [s.num_layers]
                       for s in plan.stages],
            "num_slices": len(plan.slices),
            "ttft_s": tl.ttft_s, "tpot_s": tl.tpot_s, "latency_s": tl.latency_s,
            "decode_tok_s": decode_tok_s(one, plan.stages, concurrency=concurrency,
                                         context=context),
            "fullest_memory_share": fullest,
        })
    return rows
