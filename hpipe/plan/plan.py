"""Plan: which device runs which layers, and how the prompt is cut into slices.

A Plan is plain data: it round-trips through JSON and is validated on construction, so a
plan file written by ``hpipe plan --json`` can be handed to ``hpipe run --plan``. Every
method (HPipe, the baselines, manual what-if plans) produces this one type.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from hpipe.cluster import ClusterSpec
from hpipe.errors import PlanMismatchError, SliceError, naming_field
from hpipe.spec import DTYPES, METHODS, ModelSpec
from hpipe.textfile import read_text_file

PLAN_FORMAT = "hpipe-plan"
PLAN_VERSION = 1


@dataclass(frozen=True)
class StagePlan:
    """Layers ``[layer_start, layer_stop)`` on ``devices`` (indices into cluster.devices).

    One device is the usual case; two or more form a tensor-parallel group (Megatron, TP-T).
    """

    devices: tuple[int, ...]
    layer_start: int
    layer_stop: int

    @property
    def num_layers(self) -> int:
        return self.layer_stop - self.layer_start

    @property
    def device(self) -> int:
        return self.devices[0]


@dataclass(frozen=True)
class Plan:
    """A complete, executable plan for a batch of ``batch`` prompts of ``seq_len`` tokens.

    - ``stages`` in pipeline order; stage 0 also holds the embedding, the last the final
      norm and head. Devices that get no layers are simply absent.
    - ``slices``: token slices, summing to ``seq_len`` (``(seq_len,)`` = no token pipelining).
    - ``num_microbatches``: the batch is cut into this many micro-batches (GPipe); each
      micro-batch goes through every slice.
    - ``slice_table``: HPipe keeps one slicing scheme per supported length, looked up at run
      time for the incoming prompt length.
    - ``lend_idle_threads``: a prefill compute that runs alone on its host borrows the threads
      of the host's idle CPU workers (hpipe/lending.py); HPipe's and manual plans do, the
      paper's baselines do not.
    """

    method: str
    model: ModelSpec
    cluster: ClusterSpec
    batch: int
    seq_len: int
    dtype: str
    stages: tuple[StagePlan, ...]
    slices: tuple[int, ...]
    num_microbatches: int = 1
    predicted_latency_s: float | None = None
    slice_table: tuple[tuple[int, tuple[int, ...]], ...] = ()
    notes: tuple[str, ...] = field(default=())
    lend_idle_threads: bool = False

    def __post_init__(self) -> None:
        validate_plan(self)

    # -- derived views -------------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def microbatch_rows(self) -> tuple[int, ...]:
        """Rows per micro-batch: as even as possible, larger ones first."""
        q, r = divmod(self.batch, self.num_microbatches)
        return tuple(q + (1 if m < r else 0) for m in range(self.num_microbatches))

    def layer_counts(self) -> tuple[int, ...]:
        return tuple(s.num_layers for s in self.stages)

    # [Note: timeline rows] A timeline has one row per device the plan uses: every device of
    # every stage, in pipeline order (a tensor-parallel stage has a row per member, its leader
    # first). The simulator and the runtime both name rows this way, and a local launch gives
    # rank r the device of row r, so rows, ranks and the two timelines line up.
    @property
    def row_devices(self) -> tuple[int, ...]:
        """The cluster device of each timeline row."""
        return tuple(d for st in self.stages for d in st.devices)

    @property
    def row_names(self) -> tuple[str, ...]:
        return tuple(self.cluster.devices[d].name for d in self.row_devices)

    @property
    def row_stages(self) -> tuple[int, ...]:
        """The stage of each timeline row."""
        return tuple(s for s, st in enumerate(self.stages) for _ in st.devices)

    def stage_rows(self, stage: int) -> tuple[int, ...]:
        """The timeline rows of ``stage``'s devices, its leader first."""
        first = sum(len(st.devices) for st in self.stages[:stage])
        return tuple(range(first, first + len(self.stages[stage].devices)))

    def slices_for(self, length: int) -> tuple[int, ...]:
        """The slicing to use for a prompt of ``length`` tokens (HPipe's run-time lookup)."""
        if length == self.seq_len:
            return self.slices
        table = dict(self.slice_table)
        if length in table:
            return table[length]
        # No stored scheme: the planned one fitted to the length, longest first. A shorter
        # prompt keeps the plan's slice sizes (so fewer slices), not its slice count: 21
        # slices planned for 4096 tokens would cut a 36-token chat into 2-token pieces.
        if length < self.seq_len:
            count, covered = 0, 0
            while covered < length and count < len(self.slices):
                covered += self.slices[count]
                count += 1
            return rescale_slices(self.slices[:count], length)
        return rescale_slices(self.slices, length)

    # -- JSON ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "method": self.method,
            "model": self.model.to_dict(),
            "cluster": self.cluster.to_dict(),
            "batch": self.batch,
            "seq_len": self.seq_len,
            "dtype": self.dtype,
            "stages": [
                {"devices": list(s.devices), "layer_start": s.layer_start, "layer_stop": s.layer_stop}
                for s in self.stages
            ],
            "slices": list(self.slices),
            "num_microbatches": self.num_microbatches,
            "predicted_latency_s": self.predicted_latency_s,
            "slice_table": {str(k): list(v) for k, v in self.slice_table},
            "notes": list(self.notes),
            "lend_idle_threads": self.lend_idle_threads,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        # Files from before the version field have neither key; they read as version 1.
        if d.get("format", PLAN_FORMAT) != PLAN_FORMAT:
            raise PlanMismatchError(f"format {d.get('format')!r} is not an hpipe plan; write "
                                    "one with 'hpipe plan --json > plan.json'")
        if d.get("version", PLAN_VERSION) != PLAN_VERSION:
            raise PlanMismatchError(f"plan file version {d.get('version')!r}; this hpipe reads "
                                    f"version {PLAN_VERSION}: re-plan with 'hpipe plan --json'")
        fix = "write it with 'hpipe plan --json'"

        def field(name: str):
            return naming_field(name, PlanMismatchError, fix)

        with field("model"):
            model = ModelSpec.from_dict(d["model"])
        with field("cluster"):
            cluster = ClusterSpec.from_dict(d["cluster"])
        with field("stages"):
            stages = tuple(
                StagePlan(tuple(int(x) for x in s["devices"]), int(s["layer_start"]),
                          int(s["layer_stop"]))
                for s in d["stages"])
        with field("slice_table"):
            slice_table = tuple(sorted(
                (int(k), tuple(int(x) for x in v))
                for k, v in (d.get("slice_table") or {}).items()))
        with field("plan"):
            return cls(
                method=d["method"], model=model, cluster=cluster, batch=int(d["batch"]),
                seq_len=int(d["seq_len"]), dtype=d["dtype"], stages=stages,
                slices=tuple(int(x) for x in d["slices"]),
                num_microbatches=int(d.get("num_microbatches", 1)),
                predicted_latency_s=d.get("predicted_latency_s"), slice_table=slice_table,
                notes=tuple(str(n) for n in d.get("notes") or ()),
                # Files from before lending have no key: they ran without it.
                lend_idle_threads=bool(d.get("lend_idle_threads", False)),
            )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanMismatchError(f"plan file is not valid JSON ({e}); write it with "
                                    "'hpipe plan --json > plan.json'") from None
        if not isinstance(data, dict):
            raise PlanMismatchError("plan file must hold a JSON object from 'hpipe plan --json'")
        return cls.from_dict(data)


def read_plan(path: str | Path) -> Plan:
    """A plan file from ``hpipe plan --json``, refused by name when it is not one."""
    text = read_text_file(path, what="--plan", error=PlanMismatchError)
    try:
        return Plan.from_json(text)
    except PlanMismatchError as e:
        raise PlanMismatchError(f"--plan {str(path)!r}: {e}") from None


def rescale_slices(slices: tuple[int, ...], length: int) -> tuple[int, ...]:
    """Scale a slicing to another total length, keeping its shape (longer first)."""
    total = sum(slices)
    out = [max(1, round(s * length / total)) for s in slices]
    out = [s for s in out if s > 0][: max(1, length)]
    while sum(out) > length:
        i = max(range(len(out)), key=lambda k: out[k])
        out[i] -= 1
        out = [s for s in out if s > 0]
    out[0] += length - sum(out)
    return tuple(out)


def check_slices(slices: tuple[int, ...], length: int) -> None:
    """Slices must be positive and sum to the prompt length; the message says what they sum to."""
    if not slices or any(int(s) <= 0 for s in slices):
        raise SliceError(f"slices must be positive token counts, got {list(slices)}")
    if sum(slices) != length:
        raise SliceError(
            f"slices {list(slices)} sum to {sum(slices)} tokens but the prompt has {length}; "
            f"make them sum to {length}"
        )


def validate_plan(plan: Plan) -> None:
    """Structural checks; a user-made plan file that fails gets a PlanMismatchError."""
    if plan.method not in METHODS:
        raise PlanMismatchError(f"unknown method {plan.method!r}; valid: {', '.join(METHODS)}")
    if plan.dtype not in DTYPES:
        raise PlanMismatchError(f"unknown dtype {plan.dtype!r}; valid: {', '.join(DTYPES)}")
    if plan.batch < 1 or not 1 <= plan.num_microbatches <= plan.batch:
        raise PlanMismatchError(
            f"batch {plan.batch} with {plan.num_microbatches} micro-batches: need 1 <= micro-batches <= batch"
        )
    check_slices(plan.slices, plan.seq_len)
    if not plan.stages:
        raise PlanMismatchError("plan has no stages")
    expect, used = 0, set()
    for i, s in enumerate(plan.stages):
        if s.layer_start != expect or s.layer_stop <= s.layer_start:
            raise PlanMismatchError(
                f"stage {i} covers layers [{s.layer_start}, {s.layer_stop}) but should start at "
                f"{expect} and be non-empty: stages must tile [0, {plan.model.num_layers}) in order"
            )
        for d in s.devices:
            if not 0 <= d < plan.cluster.num_devices or d in used:
                raise PlanMismatchError(
                    f"stage {i} uses device index {d}: out of range for {plan.cluster.num_devices} devices or used twice"
                )
            used.add(d)
        expect = s.layer_stop
    if expect != plan.model.num_layers:
        raise PlanMismatchError(
            f"plan covers {expect} layers but model {plan.model.name!r} has {plan.model.num_layers}"
        )
