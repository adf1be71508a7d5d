"""What a pipelined run is asked to do, what it returns, and the checks made before any worker starts.

A ``RunRequest`` is plain, picklable data: every worker gets the same list of requests and runs
its own stage of each. ``check_request`` refuses, in the launching process, everything a user can
get wrong (a plan for another model, a prompt longer than the context, ragged prompts), so a bad
call fails in milliseconds rather than after N processes imported torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from hpipe.errors import PlanMismatchError, PromptShapeError, PromptTooLongError
from hpipe.model.generate import Sampler
from hpipe.model.shard import check_tp_size
from hpipe.plan.plan import Plan
from hpipe.spec import METHODS, ModelSpec
from hpipe.timeline import Timeline

# torch's dtype for each of hpipe.spec.DTYPES.
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class RunRequest:
    """Generate from ``prompt_ids`` (batch rows of equal length) with ``plan``.

    ``model`` is what ``hpipe.model.source.open_model`` accepts: a path or a known name.
    ``temperature == 0`` is greedy. Decoding stops after ``max_new_tokens`` tokens or, with
    ``stop_at_eos``, once every row has produced an end-of-sequence token.
    """

    model: str
    plan: Plan
    prompt_ids: tuple[tuple[int, ...], ...]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop_at_eos: bool = True
    eos_token_ids: tuple[int, ...] = ()
    recv_timeout_s: float = 600.0
    label: str = ""

    @property
    def batch(self) -> int:
        return len(self.prompt_ids)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids[0])

    @property
    def slices(self) -> tuple[int, ...]:
        return self.plan.slices_for(self.prompt_len)

    @property
    def max_tokens(self) -> int:
        """KV-cache room every stage needs: the prompt plus every token fed back in decode."""
        return self.prompt_len + max(0, self.max_new_tokens - 1)


@dataclass(frozen=True, eq=False)
class RunResult:
    """What rank 0 gathers: the tokens, the last prefill logits and the measured timeline."""

    label: str
    output_ids: tuple[tuple[int, ...], ...]  # per row, up to (not including) its first EOS
    prefill_logits: torch.Tensor  # (batch, vocab) float32, at the prompt's last position
    timeline: Timeline
    num_decode_steps: int  # decode steps actually run (fewer than planned after an early EOS)
    # Per timeline row (device): CPU time of its prefill computes, and the part of those
    # computes spent in tensor-parallel all-reduces (0 outside a TP stage).
    prefill_cpu_s: tuple[float, ...] = ()
    prefill_allreduce_s: tuple[float, ...] = ()
    cancelled: bool = False  # the request was cancelled before it finished
    num_stage_loads: tuple[int, ...] = ()  # per row: stage loads its rank had made by then


def fit_plan(plan: Plan, *, batch: int, prompt_len: int) -> Plan:
    """The plan re-targeted to this batch and prompt length.

    HPipe stores a slicing per supported length and looks the incoming one up
    (``Plan.slices_for``); the batch only changes how rows split into micro-batches.
    """
    if (plan.batch, plan.seq_len) == (batch, prompt_len):
        return plan
    return dataclasses.replace(
        plan, batch=batch, seq_len=prompt_len, slices=plan.slices_for(prompt_len),
        num_microbatches=min(plan.num_microbatches, batch), slice_table=())


def check_prompt(prompt_ids, spec: ModelSpec, *, max_new_tokens: int) -> None:
    """Refuse prompts that cannot run on ``spec`` whatever the plan: empty, ragged, beyond the
    context, or token ids outside the vocabulary. ``hpipe run`` calls it before planning, so
    the user hears about the prompt, not about a planner's ``seq_len``."""
    if not prompt_ids or not any(prompt_ids):
        raise PromptShapeError("the prompt is empty: give at least one token")
    lengths = sorted({len(p) for p in prompt_ids})
    if len(lengths) > 1:
        # The decoder has no padding mask, so rows of a batch must be the same length.
        raise PromptShapeError(
            f"prompts of one batch must have the same token count, got lengths {lengths}; "
            "run them in separate batches or trim them to the same length")
    if max_new_tokens < 0:
        raise PromptShapeError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    prompt_len, context = lengths[0], spec.max_seq_len
    if prompt_len > context:
        raise PromptTooLongError(
            f"prompt of {prompt_len} tokens exceeds {spec.name}'s context of {context} "
            f"tokens; shorten the prompt to <= {context} tokens or use a longer-context model")
    if prompt_len + max_new_tokens > context:
        fixes = [f"lower --max-new-tokens to <= {context - prompt_len}"]
        if max_new_tokens < context:  # else no prompt is short enough
            fixes.append(f"shorten the prompt to <= {context - max_new_tokens} tokens")
        raise PromptTooLongError(
            f"prompt of {prompt_len} tokens + {max_new_tokens} new tokens = "
            f"{prompt_len + max_new_tokens} exceeds {spec.name}'s context of {context} tokens; "
            + " or ".join(fixes))
    for bad in sorted({t for row in prompt_ids for t in row if not 0 <= t < spec.vocab_size}):
        raise PromptShapeError(
            f"token id {bad} is outside the vocabulary [0, {spec.vocab_size}) of {spec.name!r}")


def check_plan(plan: Plan, spec: ModelSpec, *, model: str) -> None:
    """Refuse a plan the runtime cannot run with ``model`` (whose spec is ``spec``): made for
    another model, an unknown dtype or method, a tensor-parallel group wider than the heads."""
    mine = (spec.num_layers, spec.hidden, spec.vocab_size)
    theirs = (plan.model.num_layers, plan.model.hidden, plan.model.vocab_size)
    if mine != theirs:
        raise PlanMismatchError(
            f"the plan was made for {plan.model.name!r} (layers, hidden, vocab) = {theirs} but "
            f"the model {model!r} has {mine}; re-plan for this model (drop --plan, or run "
            f"'hpipe plan --model {model}')")
    if plan.dtype not in TORCH_DTYPES:
        raise PlanMismatchError(f"plan dtype {plan.dtype!r} is not one of {sorted(TORCH_DTYPES)}")
    # Every method runs (hpipe.spec.METHODS): Megatron and TP-T (and HPipe, when a
    # tensor-parallel group is faster) put several devices on a stage, which runs
    # Megatron-style, see [Note: tensor-parallel stage] in hpipe/model/shard.py.
    if plan.method not in METHODS:
        raise PlanMismatchError(
            f"method {plan.method!r} has no runtime; run one of {', '.join(METHODS)}")
    for i, st in enumerate(plan.stages):
        if len(st.devices) > 1:
            names = [plan.cluster.devices[d].name for d in st.devices]
            check_tp_size(spec, len(st.devices),
                          where=f"stage {i}'s tensor-parallel group {names}")


def check_request(req: RunRequest, spec: ModelSpec) -> None:
    """Refuse a request that cannot run, naming the values and the fix. Pure; no workers yet."""
    check_prompt(req.prompt_ids, spec, max_new_tokens=req.max_new_tokens)
    # The workers build this Sampler; out-of-range settings must fail here, not in N workers.
    Sampler(temperature=req.temperature, top_p=req.top_p, seed=req.seed)
    check_plan(req.plan, spec, model=req.model)
    plan = req.plan
    if plan.batch != req.batch or plan.seq_len != req.prompt_len:
        raise PlanMismatchError(
            f"plan is for batch {plan.batch} x {plan.seq_len} tokens but the request has "
            f"{req.batch} x {req.prompt_len}; build it with fit_plan(plan, batch=, prompt_len=)")


def dtype_of(plan: Plan) -> torch.dtype:
    return TORCH_DTYPES[plan.dtype]
