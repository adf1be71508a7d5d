"""Evaluators every planner, baseline and brute-force oracle share, so they are scored alike.

- ``SliceTimes``: t_ij for a slice on each stage, tau = max_j, and whether the slice's
  workspace fits: what the slicing DPs minimise over.
- ``memory_overflows`` / ``check_memory``: per-device memory of a finished plan against the
  device, with a message naming the device, the layers and the shortfall.
- ``Problem.score``: the plan with ``predicted_latency_s`` from the exact simulator: the
  prefill's latency, or with ``decode_steps`` the time to the last output token.
- ``MemoCost``: a cost model's answers remembered for one planning call.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field

import numpy as np

from hpipe.cluster import ClusterSpec
from hpipe.cost.base import CostModel
from hpipe.errors import InfeasiblePlanError
from hpipe.plan.plan import Plan, StagePlan
from hpipe.schedule import prefill_units
from hpipe.sim import simulate_latency
from hpipe.spec import ModelSpec, dtype_bytes

# Plans whose lone prefill computes borrow their host's idle CPU threads (hpipe/lending.py):
# HPipe's own and a user's manual layout. The paper's baselines run as the paper has them.
LENDING_METHODS = ("hpipe", "manual")

GIB = 1024**3  # device memory is sold in GiB ("16 GB" P100 = 16 GiB)


@dataclass(frozen=True)
class Problem:
    """One planning question: this model, on this cluster, for ``batch`` x ``seq_len`` tokens."""

    model: ModelSpec
    cluster: ClusterSpec
    batch: int
    seq_len: int
    dtype: str
    cost: CostModel
    grain_tokens: int
    # True: sends overlap compute (the runtime's non-blocking sends, the simulator's default),
    # so a link is a pipeline resource of its own; False: the paper's t_c + t_t accounting.
    overlap_comm: bool = True
    # The objective (see [Note: planning for decode]): 0, the prefill's latency (the paper's);
    # N > 0, the time to the last token of N decode steps after the first token.
    decode_steps: int = 0
    # False: no plan lends idle cores (hpipe/lending.py), whatever its method.
    lend: bool = True
    _decode_memo: dict = field(default_factory=dict, init=False, repr=False, compare=False,
                               hash=False)
    _orders: list = field(default_factory=list, init=False, repr=False, compare=False,
                          hash=False)

    @property
    def kv_tokens(self) -> int:
        """KV-cache positions each sequence holds at its longest: the prompt, and with
        ``decode_steps`` every token fed back (what the memory checks count)."""
        return self.seq_len + self.decode_steps

    def orders(self) -> list[tuple[int, ...]]:
        """The device orders to plan over (hpipe/plan/orders.py, [Note: host orders]): every
        host order for a few hosts, else the best a search over orders finds, each scored by
        the workload DP's best bottleneck. Computed once per problem."""
        if not self._orders:
            from hpipe.plan.layers import best_bottleneck_s, build_split_costs
            from hpipe.plan.orders import planning_orders

            grain = min(self.grain_tokens, self.seq_len)
            sc = build_split_costs(self.cost, model=self.model, cluster=self.cluster,
                                   batch=self.batch, seq_len=self.seq_len, dtype=self.dtype,
                                   units=((self.batch, grain, self.seq_len - grain),),
                                   overlap_comm=self.overlap_comm)
            self._orders.extend(planning_orders(
                self.cluster, lambda order: best_bottleneck_s(sc, order)))
        return list(self._orders)

    # [Note: planning for decode] With ``decode_steps`` the search minimises TTFT plus the
    # decode steps, every candidate scored the same way. After the first token nothing else
    # is in the pipeline, so each step is one token's trip: back from the last stage to the
    # first, then through every stage and hop at the step's context. That sum (``decode_s``)
    # depends on the split only, so it is added to the prefill's bounds as it is, and they
    # stay lower bounds.
    def decode_s(self, stages: tuple[StagePlan, ...], *, first_rows: int | None = None
                 ) -> float:
        """The decode steps' time through ``stages``, exactly as the simulator times them.
        ``first_rows``: the rows of the prefill's last micro-batch, whose tokens make the
        first hop back (the whole batch by default; 1 gives a lower bound for any plan)."""
        if not self.decode_steps or not stages:
            return 0.0
        first_rows = self.batch if first_rows is None else first_rows
        key = (stages, first_rows)
        hit = self._decode_memo.get(key)
        if hit is not None:
            return hit
        cost, last = self.cost, len(stages) - 1
        act = self.batch * self.model.hidden * dtype_bytes(self.dtype)
        total = sum(cost.transfer_time_s(a.device, b.device, act)
                    for a, b in zip(stages, stages[1:])) * self.decode_steps
        if len(stages) > 1:  # one stage samples and feeds itself: no hop back
            back = stages[-1].device, stages[0].device
            total += cost.transfer_time_s(*back, first_rows * 8)
            total += cost.transfer_time_s(*back, self.batch * 8) * (self.decode_steps - 1)
        for step in range(self.decode_steps):
            for j, st in enumerate(stages):
                total += cost.decode_time_s(st.devices, st.layer_start, st.layer_stop,
                                            batch=self.batch, context=self.seq_len + step,
                                            has_embedding=j == 0, has_head=j == last)
        self._decode_memo[key] = total
        return total

    def objective_s(self, plan: Plan) -> float:
        """What the planner minimises for ``plan``: its simulated prefill latency, or (with
        ``decode_steps``) its time to first token plus the decode steps."""
        lat = simulate_latency(plan, self.cost)
        if not self.decode_steps:
            return lat.prefill_s
        return lat.ttft_s + self.decode_s(plan.stages, first_rows=plan.microbatch_rows()[-1])

    def score(self, plan: Plan) -> Plan:
        """The plan with ``predicted_latency_s`` set to its objective."""
        return dataclasses.replace(plan, predicted_latency_s=self.objective_s(plan))

    def plan(self, method: str, stages: tuple[StagePlan, ...], slices: tuple[int, ...], *,
             num_microbatches: int = 1, slice_table=(), notes=()) -> Plan:
        return Plan(method=method, model=self.model, cluster=self.cluster, batch=self.batch,
                    seq_len=self.seq_len, dtype=self.dtype, stages=stages, slices=slices,
                    num_microbatches=num_microbatches, slice_table=tuple(slice_table),
                    notes=tuple(notes),
                    lend_idle_threads=self.lend and method in LENDING_METHODS)

    def slice_times(self, stages: tuple[StagePlan, ...], *,
                    only_stage: int | None = None) -> SliceTimes:
        return SliceTimes(stages, self.cost, self.model, self.cluster, self.dtype, self.batch,
                          self.kv_tokens, self.overlap_comm, only_stage)


def stage_unit_times(stages: tuple[StagePlan, ...], cost: CostModel, *, model: ModelSpec,
                     dtype: str, rows: int, tokens: np.ndarray, prefix: int | np.ndarray
                     ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per stage j: (compute, transfer after it) of many units of ``rows`` x ``tokens`` at
    ``prefix`` (one, or one per unit), through the cost model's numpy path
    (``stage_times_many_s``; its ``transfer_time_s`` then takes an array of byte counts too).
    The slicing DP's tau rows and the flow bound's unit table both read it."""
    tokens = np.asarray(tokens, dtype=float)
    act = rows * tokens * model.hidden * dtype_bytes(dtype)
    last = len(stages) - 1
    out = []
    for j, st in enumerate(stages):
        comp = cost.stage_times_many_s(st.devices, st.layer_start, st.layer_stop, batch=rows,
                                       tokens=tokens, prefix=prefix, has_embedding=j == 0,
                                       has_head=j == last)
        comm = (np.zeros_like(comp) if j == last else
                np.asarray(cost.transfer_time_s(st.device, stages[j + 1].device, act)))
        out.append((comp, comm))
    return out


def stage_slice_times(stages: tuple[StagePlan, ...], cost: CostModel, *, model: ModelSpec,
                      dtype: str, rows: int, tokens: int, prefix: int,
                      overlap_comm: bool = True) -> list[float]:
    """t_ij = t_c(s, p; d_j) (+) t_t(l_(j), s, B_j) for every stage j [paper]."""
    act = rows * tokens * model.hidden * dtype_bytes(dtype)
    last = len(stages) - 1
    out = []
    for j, st in enumerate(stages):
        comp = cost.stage_time_s(st.devices, st.layer_start, st.layer_stop, batch=rows,
                                 tokens=tokens, prefix=prefix, has_embedding=j == 0,
                                 has_head=j == last)
        comm = 0.0 if j == last else cost.transfer_time_s(st.device, stages[j + 1].device, act)
        out.append(max(comp, comm) if overlap_comm else comp + comm)
    return out


@dataclass(frozen=True)
class SliceTimes:
    """What the slicing DPs read for fixed stages: ``tau(s, p)`` = max_j t_j(s, p), or stage
    ``only_stage``'s time (TeraPipe's homogeneous assumption), and ``fits(s, p)``: whether a
    slice's workspace fits every device next to its weights and KV cache."""

    stages: tuple[StagePlan, ...]
    cost: CostModel
    model: ModelSpec
    cluster: ClusterSpec
    dtype: str
    batch: int
    seq_len: int  # KV-cache positions per sequence at its longest (for ``fits``)
    overlap_comm: bool = True
    only_stage: int | None = None

    def fits(self, tokens: int, prefix: int) -> bool:
        if self._rooms is not None:  # the cost model's fast path: one workspace per key
            work: dict = {}
            for room, key in self._rooms:
                if key is None:  # nothing to work on: what it holds must fit all the same
                    if room < 0:
                        return False
                    continue
                if key not in work:
                    work[key] = self.cost.unit_workspace_bytes(key, self.batch, tokens, prefix)
                if work[key] > room:
                    return False
            return True
        last = len(self.stages) - 1
        for j, st in enumerate(self.stages):
            need = self.cost.stage_memory_bytes(
                st.devices, st.layer_start, st.layer_stop, batch=self.batch,
                seq_len=self.seq_len, units=((self.batch, tokens, prefix),),
                has_embedding=j == 0, has_head=j == last)
            if need > min(self.cluster.devices[d].memory_bytes for d in st.devices):
                return False
        return True

    @functools.cached_property
    def _rooms(self) -> list[tuple[int, tuple | None]] | None:
        """Per stage: the bytes left for a unit's workspace next to what does not depend on
        it, and the workspace's key (``stage_memory_parts``); None without that fast path.
        need <= capacity  <=>  workspace <= capacity - fixed, so ``fits`` answers the same."""
        parts = getattr(self.cost, "stage_memory_parts", None)
        if parts is None:
            return None
        last = len(self.stages) - 1
        out = []
        for j, st in enumerate(self.stages):
            fixed, key = parts(st.devices, st.layer_start, st.layer_stop, batch=self.batch,
                               seq_len=self.seq_len, has_embedding=j == 0, has_head=j == last)
            cap = min(self.cluster.devices[d].memory_bytes for d in st.devices)
            out.append((cap - fixed, key))
        return out

    def tau(self, tokens: int, prefix: int) -> float:
        t = stage_slice_times(self.stages, self.cost, model=self.model, dtype=self.dtype,
                              rows=self.batch, tokens=tokens, prefix=prefix,
                              overlap_comm=self.overlap_comm)
        return t[self.only_stage] if self.only_stage is not None else max(t)

    def tau_row(self, tokens: np.ndarray, prefix: int) -> np.ndarray:
        """``tau`` for many slice lengths at one prefix: numpy when the cost model offers
        ``stage_times_many_s`` (the analytic one does; its ``transfer_time_s`` then takes an
        array of byte counts too), one call per cell otherwise."""
        if getattr(self.cost, "stage_times_many_s", None) is None:
            return np.array([self.tau(int(t), prefix) for t in tokens])
        per_stage = [np.maximum(comp, comm) if self.overlap_comm else comp + comm
                     for comp, comm in stage_unit_times(
                         self.stages, self.cost, model=self.model, dtype=self.dtype,
                         rows=self.batch, tokens=np.asarray(tokens), prefix=prefix)]
        if self.only_stage is not None:
            return per_stage[self.only_stage]
        return np.max(per_stage, axis=0)

    def tau_or_inf(self, tokens: int, prefix: int) -> float:
        return self.tau(tokens, prefix) if self.fits(tokens, prefix) else math.inf


def plan_memory_bytes(plan: Plan, cost: CostModel, *, kv_tokens: int | None = None
                      ) -> list[tuple[int, int]]:
    """(stage index, bytes per device of that stage) for the plan's own work units, with KV
    caches of ``kv_tokens`` positions (default: the prompt's)."""
    units = tuple(sorted({(u.rows, u.tokens, u.prefix) for u in prefill_units(plan)}))
    last = plan.num_stages - 1
    return [(j, cost.stage_memory_bytes(st.devices, st.layer_start, st.layer_stop,
                                        batch=plan.batch, seq_len=kv_tokens or plan.seq_len,
                                        units=units,
                                        has_embedding=j == 0, has_head=j == last))
            for j, st in enumerate(plan.stages)]


def memory_overflows(plan: Plan, cost: CostModel, *, kv_tokens: int | None = None
                     ) -> list[str]:
    """One line per device that runs out of memory, e.g. "layers [0, 12) need 17.9 GB on
    'p100-3' (16.0 GB)"; empty when the plan fits."""
    out = []
    for j, need in plan_memory_bytes(plan, cost, kv_tokens=kv_tokens):
        st = plan.stages[j]
        for d in st.devices:
            dev = plan.cluster.devices[d]
            if need > dev.memory_bytes:
                out.append(f"layers [{st.layer_start}, {st.layer_stop}) need {need / GIB:.1f} GiB "
                           f"on {dev.name!r} ({dev.memory_bytes / GIB:.1f} GiB, over by "
                           f"{(need - dev.memory_bytes) / GIB:.1f} GiB)")
    return out


def check_memory(plan: Plan, cost: CostModel, *, hint: str = "",
                 kv_tokens: int | None = None) -> None:
    over = memory_overflows(plan, cost, kv_tokens=kv_tokens)
    if over:
        raise InfeasiblePlanError(
            f"{plan.method}: {'; '.join(over)} at batch {plan.batch}, seq_len {plan.seq_len}, "
            f"{plan.num_microbatches} micro-batch(es), {len(plan.slices)} slice(s)"
            + (f"; fits: {hint}" if hint else ""))


class MemoCost:
    """A cost model that remembers its answers, for one planning call: the search asks the same
    questions many times (neighbouring splits share all stages but one or two, and every
    candidate slicing of a split shares its units' stage times). Same answers, less time."""

    def __init__(self, cost: CostModel):
        self.base = cost
        self.times_tp_groups = cost.times_tp_groups
        many = getattr(cost, "stage_times_many_s", None)
        if many is not None:  # the numpy fast path of SliceTimes.tau_row, unremembered
            self.stage_times_many_s = many
        lent = getattr(cost, "lent_speedup", None)
        if lent is not None:  # a measured speed-up of lent threads (hpipe/lending.py)
            self.lent_speedup = lent
        if getattr(cost, "stage_memory_parts", None) is not None:  # SliceTimes.fits's
            self.stage_memory_parts = cost.stage_memory_parts
            self.unit_workspace_bytes = cost.unit_workspace_bytes
            self.memory_class = cost.memory_class
        self._time: dict = {}
        self._transfer: dict = {}
        self._memory: dict = {}

    @staticmethod
    def _remember(table: dict, key, compute):
        if key not in table:
            table[key] = compute()
        return table[key]

    def stage_time_s(self, devices, layer_start, layer_stop, *, batch, tokens, prefix,
                     has_embedding, has_head):
        # Inline, not through _remember: the planner calls this millions of times on big
        # clusters, and a closure per call was a fifth of its time.
        key = (devices, layer_start, layer_stop, batch, tokens, prefix, has_embedding, has_head)
        t = self._time.get(key)
        if t is None:
            t = self._time[key] = self.base.stage_time_s(
                devices, layer_start, layer_stop, batch=batch, tokens=tokens, prefix=prefix,
                has_embedding=has_embedding, has_head=has_head)
        return t

    def decode_time_s(self, devices, layer_start, layer_stop, *, batch, context,
                      has_embedding, has_head):
        key = ("decode", devices, layer_start, layer_stop, batch, context, has_embedding,
               has_head)
        return self._remember(self._time, key, lambda: self.base.decode_time_s(
            devices, layer_start, layer_stop, batch=batch, context=context,
            has_embedding=has_embedding, has_head=has_head))

    def transfer_time_s(self, src, dst, num_bytes):
        if isinstance(num_bytes, np.ndarray):
            return self.base.transfer_time_s(src, dst, num_bytes)
        key = (src, dst, num_bytes)
        t = self._transfer.get(key)
        if t is None:
            t = self._transfer[key] = self.base.transfer_time_s(src, dst, num_bytes)
        return t

    def stage_memory_bytes(self, devices, layer_start, layer_stop, *, batch, seq_len, units,
                           has_embedding, has_head):
        key = (devices, layer_start, layer_stop, batch, seq_len, units, has_embedding, has_head)
        return self._remember(self._memory, key, lambda: self.base.stage_memory_bytes(
            devices, layer_start, layer_stop, batch=batch, seq_len=seq_len, units=units,
            has_embedding=has_embedding, has_head=has_head))
