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

import re
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple

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


class ActionKind(str, Enum):
    """What a stage does with a unit. A ``str`` Enum, so ``kind == "recv"`` still reads."""

    RECV = "recv"
    COMPUTE = "compute"
    SEND = "send"

    @property
    def letter(self) -> str:
        return self.value[0].upper()

    @classmethod
    def from_str(cls, text: str) -> ActionKind:
        """"R" / "recv", "C" / "compute", "S" / "send"."""
        for kind in cls:
            if text in (kind.value, kind.letter):
                return kind
        raise ValueError(f"unknown action kind {text!r}; one of R, C, S")


class Action(NamedTuple):
    """One step of a stage's list. A NamedTuple rather than a frozen dataclass: the planner
    builds a schedule per candidate plan, tens of thousands of actions each on big clusters,
    and a frozen dataclass is several times slower to construct."""

    kind: ActionKind
    stage: int
    unit: int
    peer: int | None = None  # the stage sent to / received from
    payload: str = HIDDEN

    def __repr__(self) -> str:
        return f"{self.stage}{self.kind.letter}{self.unit}"

    @classmethod
    def from_str(cls, text: str) -> Action:
        """``"1C3"`` -> stage 1 computes unit 3 (peers and payloads are not in the short form)."""
        m = re.fullmatch(r"(\d+)([A-Za-z])(\d+)", text.strip())
        if m is None:
            raise ValueError(f"action {text!r} is not STAGE KIND UNIT, e.g. 1C3")
        return cls(ActionKind.from_str(m.group(2)), int(m.group(1)), int(m.group(3)))


@dataclass(frozen=True)
class Schedule:
    num_stages: int
    units: tuple[WorkUnit, ...]
    actions: tuple[tuple[Action, ...], ...]  # one tuple per stage, in execution order

    def grid(self, at: dict[int, int] | None = None, *, around: int | None = None) -> str:
        """One line per stage, e.g. ``stage 1: R0 C0 S0 R1 [C1] S1``; for error messages.

        ``at[s]`` is the index of the action stage s was executing, shown in brackets; with
        ``around``, each line keeps only that many actions either side of it (decode lists are
        thousands long).
        """
        lines = []
        for s, acts in enumerate(self.actions):
            pos = (at or {}).get(s)
            words = [f"[{repr(a)[len(str(s)):]}]" if i == pos else repr(a)[len(str(s)):]
                     for i, a in enumerate(acts)]
            if around is not None:
                centre = pos if pos is not None and pos >= 0 else 0
                lo, hi = max(0, centre - around), min(len(words), centre + around + 1)
                words = (["..."] if lo else []) + words[lo:hi] + (["..."] if hi < len(words) else [])
            lines.append(f"stage {s}: " + " ".join(words))
        return "\n".join(lines)


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
                acts[s].append(Action(ActionKind.RECV, s, unit, s - 1))
            acts[s].append(Action(ActionKind.COMPUTE, s, unit))
            if s < n - 1:
                acts[s].append(Action(ActionKind.SEND, s, unit, s + 1))

    for u in units:
        through_stages(u.index)
    last_prefill = units[-1].index
    for step in range(num_decode_steps):
        u = WorkUnit(len(units), "decode", 0, step, 0, plan.batch, seq_len + step, 1)
        units.append(u)
        # The token this step consumes was sampled on the last stage after the previous unit.
        prev = last_prefill if step == 0 else u.index - 1
        if n > 1:
            acts[n - 1].append(Action(ActionKind.SEND, n - 1, prev, 0, TOKEN))
            acts[0].append(Action(ActionKind.RECV, 0, prev, n - 1, TOKEN))
        through_stages(u.index)
    return Schedule(n, tuple(units), tuple(tuple(a) for a in acts))
