"""Lower a Plan to per-stage action lists: the one schedule both the simulator and runtime use.

[Note: one schedule, two consumers] The simulator (``hpipe.sim``) times exactly these lists and
the runtime (``hpipe.runtime``) executes exactly these lists, so a measured timeline can be laid
over its prediction action by action.

A *work unit* is one (micro-batch, token slice) pair in the prefill, or one decode step.
Each stage runs, per unit in order: ``recv`` (not on stage 0 in the prefill), ``compute``,
``send`` (not on the last stage in the prefill). In decode the last stage samples a token
and sends it back to stage 0, which closes the loop. Compact repr, after
torch.distributed.pipelining: ``R3`` receive unit 3, ``C3`` compute, ``S3`` send.
"""

from __future__ import annotations

from dataclasses import dataclass

from hpipe.plan.plan import Plan

HIDDEN = "hidden"  # payload: activations (rows, tokens, hidden)
TOKEN = "token"  # payload: sampled token ids (rows,)


@dataclass(frozen=True)
class WorkUnit:
    """Rows ``[row_start, row_start + rows)`` of the batch, tokens ``[prefix, prefix + tokens)``."""

    index: int
    phase: str  # "prefill" | "decode"
    microbatch: int
    slice_index: int  # slice number in the prefill, step number in decode
    row_start: int
    rows: int
    prefix: int
    tokens: int


@dataclass(frozen=True)
class Action:
    kind: str  # "recv" | "compute" | "send"
    stage: int
    unit: int
    peer: int | None = None  # the stage sent to / received from
    payload: str = HIDDEN

    def __repr__(self) -> str:
        return f"{self.stage}{self.kind[0].upper()}{self.unit}"


@dataclass(frozen=True)
class Schedule:
    num_stages: int
    units: tuple[WorkUnit, ...]
    actions: tuple[tuple[Action, ...], ...]  # one tuple per stage, in execution order

    def grid(self) -> str:
        """One line per stage, e.g. ``stage 1: R0 C0 S0 R1 C1 S1``; for error messages."""
        return "\n".join(
            f"stage {s}: " + " ".join(repr(a)[len(str(s)):] for a in acts)
            for s, acts in enumerate(self.actions)
        )


def prefill_units(plan: Plan, *, slices: tuple[int, ...] | None = None) -> tuple[WorkUnit, ...]:
    """Micro-batch-major order: each micro-batch streams all its slices before the next.

    Slices of one micro-batch must go in order (slice i attends to slices < i through the KV
    cache); micro-batches are independent rows.
    """
    slices = plan.slices if slices is None else slices
    units, row = [], 0
    for m, rows in enumerate(plan.microbatch_rows()):
        prefix = 0
        for i, tokens in enumerate(slices):
            units.append(WorkUnit(len(units), "prefill", m, i, row, rows, prefix, tokens))
            prefix += tokens
        row += rows
    return tuple(units)


def build_schedule(
    plan: Plan, *, num_decode_steps: int = 0, slices: tuple[int, ...] | None = None
) -> Schedule:
    """Per-stage action lists for the prefill and ``num_decode_steps`` decode steps.

    Decode runs the whole batch as one unit per step (rows 0..batch) at prefix
    ``seq_len + step``. The token for step 0 comes from the prefill's last logits, sampled on
    the last stage; each step's token goes back to stage 0 for the next.
    """
    n = plan.num_stages
    units = list(prefill_units(plan, slices=slices))
    seq_len = sum(slices) if slices is not None else plan.seq_len
    acts: list[list[Action]] = [[] for _ in range(n)]

    def through_stages(unit: int) -> None:
        """Each stage receives the unit from the one before, computes it, sends it on."""
        for s in range(n):
            if s > 0:
                acts[s].append(Action("recv", s, unit, s - 1))
            acts[s].append(Action("compute", s, unit))
            if s < n - 1:
                acts[s].append(Action("send", s, unit, s + 1))

    for u in units:
        through_stages(u.index)
    last_prefill = units[-1].index
    for step in range(num_decode_steps):
        u = WorkUnit(len(units), "decode", 0, step, 0, plan.batch, seq_len + step, 1)
        units.append(u)
        # The token this step consumes was sampled on the last stage after the previous unit.
        prev = last_prefill if step == 0 else u.index - 1
        if n > 1:
            acts[n - 1].append(Action("send", n - 1, prev, 0, TOKEN))
            acts[0].append(Action("recv", 0, prev, n - 1, TOKEN))
        through_stages(u.index)
    return Schedule(n, tuple(units), tuple(tuple(a) for a in acts))
