"""Single-process generation: prefill in token slices, then decode one token at a time.

This is the reference the pipelined runtime is checked against: the same stages, run in order
in one process. A prefill in slices [s_1, ..., s_M] feeds each slice through every stage before
the next one (see [Note: KV cache across slices] in kv_cache.py), so its result must equal one
full prefill up to float rounding.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hpipe.errors import PromptError, PromptTooLongError, SamplingError, SliceError
from hpipe.model.decoder import Stage
from hpipe.spec import ModelSpec

__all__ = ["GenerationResult", "PromptError", "Sampler", "SamplingError", "check_fits", "generate",
           "validate_slices"]


class Sampler:
    """Greedy when temperature == 0; otherwise temperature + nucleus (top-p) sampling, seeded.

    Holds its own ``torch.Generator`` so two runs with the same seed draw the same tokens
    whatever else uses the global RNG.
    """

    def __init__(self, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> None:
        if not math.isfinite(temperature) or temperature < 0:
            raise SamplingError(f"temperature {temperature} is not a number >= 0; use 0 for "
                                "greedy or a finite value > 0")
        if not 0 < top_p <= 1:
            raise SamplingError(f"top_p {top_p} outside (0, 1]; 1 disables nucleus filtering")
        if seed is not None and not -(2**63) <= seed < 2**64:  # torch.Generator's range
            raise SamplingError(f"seed {seed} does not fit in 64 bits; use a smaller seed")
        self.temperature, self.top_p, self.seed = temperature, top_p, seed
        self._generator = None
        if temperature > 0:
            self._generator = torch.Generator()
            if seed is None:
                self._generator.seed()
            else:
                self._generator.manual_seed(seed)

    def __repr__(self) -> str:
        return f"Sampler(temperature={self.temperature}, top_p={self.top_p}, seed={self.seed})"

    def next_token(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (B, V) -> token ids (B,) int64."""
        if self.temperature == 0:
            return logits.argmax(dim=-1)
        probs = torch.softmax(logits.float().cpu() / self.temperature, dim=-1)
        if self.top_p < 1:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            # Drop a token when the tokens strictly more likely already cover top_p; the most
            # likely token always survives.
            drop = sorted_p.cumsum(dim=-1) - sorted_p >= self.top_p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        picked = torch.multinomial(probs, 1, generator=self._generator).squeeze(-1)
        return picked.to(logits.device)


@dataclass(frozen=True)
class GenerationResult:
    """Output of ``generate``. Token counts are per row; rates count all rows."""

    output_ids: tuple[tuple[int, ...], ...]  # new tokens per row, up to (not including) EOS
    prompt_tokens: int  # per row
    prefill_s: float
    decode_s: float
    decode_tok_s: float  # decode steps * batch / decode_s (the first new token comes from prefill)
    prefill_logits: torch.Tensor  # (B, vocab) float32 at the last prompt position
    slices: tuple[int, ...]

    @property
    def prefill_tok_s(self) -> float:
        return len(self.output_ids) * self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0


def validate_slices(slices: Sequence[int] | None, prompt_tokens: int) -> tuple[int, ...]:
    """Positive slice lengths summing to the prompt length; None means one slice."""
    if slices is None:
        return (prompt_tokens,)
    slices = tuple(int(s) for s in slices)
    if any(s <= 0 for s in slices):
        raise SliceError(f"slices {list(slices)} contain a length <= 0; every slice needs >= 1 token")
    if sum(slices) != prompt_tokens:
        raise SliceError(
            f"slices {list(slices)} sum to {sum(slices)} but the prompt has {prompt_tokens} "
            "tokens; give slice lengths that add up to the prompt length")
    return slices


def check_fits(spec: ModelSpec, prompt_tokens: int, max_new_tokens: int) -> None:
    if max_new_tokens < 0:
        raise PromptError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    if prompt_tokens > spec.max_seq_len:
        raise PromptTooLongError(
            f"prompt of {prompt_tokens} tokens exceeds {spec.name}'s context of "
            f"{spec.max_seq_len} tokens; shorten the prompt")
    if prompt_tokens + max_new_tokens > spec.max_seq_len:
        raise PromptTooLongError(
            f"prompt of {prompt_tokens} tokens + {max_new_tokens} new tokens exceeds "
            f"{spec.name}'s context of {spec.max_seq_len} tokens; use --max-new-tokens <= "
            f"{spec.max_seq_len - prompt_tokens}")


def _as_batch(prompt_ids) -> torch.Tensor:
    if isinstance(prompt_ids, torch.Tensor):
        ids = prompt_ids.long()
        ids = ids[None] if ids.dim() == 1 else ids
    else:
        rows = [list(prompt_ids)] if prompt_ids and isinstance(prompt_ids[0], int) else prompt_ids
        lengths = {len(r) for r in rows}
        if len(lengths) > 1:
            raise PromptError(f"prompt rows have lengths {sorted(lengths)}; a batch needs equal lengths")
        ids = torch.tensor(rows, dtype=torch.long)
    if ids.dim() != 2 or ids.numel() == 0:
        raise PromptError(f"prompt ids of shape {tuple(ids.shape)}; need a non-empty (batch, tokens)")
    return ids


def _stages_of(model) -> list[Stage]:
    if isinstance(model, Stage):
        return [model]
    if hasattr(model, "load_model"):  # a ModelSource
        return [model.load_model()]
    stages = list(model)
    assert stages and stages[0].has_embedding and stages[-1].has_head, (
        "stages must start with the embedding and end with the head")
    return stages


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def generate(
    model, prompt_ids, *, max_new_tokens: int, slices: Sequence[int] | None = None,
    sampler: Sampler | None = None, eos_token_ids: Sequence[int] | None = None,
) -> GenerationResult:
    """Prefill ``prompt_ids`` in ``slices`` through the stages in order, then decode.

    ``model`` is a ModelSource (loads the whole model), one Stage, or stages in pipeline order.
    Stops a row at its first EOS (``eos_token_ids``, default the spec's) and the batch when all
    rows stopped or ``max_new_tokens`` were made.
    """
    stages = _stages_of(model)
    spec = stages[0].spec
    ids = _as_batch(prompt_ids).to(stages[0].device)
    batch, prompt_tokens = ids.shape
    slices = validate_slices(slices, prompt_tokens)
    check_fits(spec, prompt_tokens, max_new_tokens)
    # The embedding lookup would fail with a bare IndexError on an id past the vocabulary.
    bad = ids[(ids < 0) | (ids >= spec.vocab_size)]
    if bad.numel():
        raise PromptError(f"token id {int(bad[0])} is outside the vocabulary "
                          f"[0, {spec.vocab_size}) of {spec.name!r}")
    sampler = sampler or Sampler()
    eos = set(spec.eos_token_ids if eos_token_ids is None else eos_token_ids)
    caches = [s.new_cache(batch=batch, max_tokens=prompt_tokens + max_new_tokens) for s in stages]

    def run(x: torch.Tensor) -> torch.Tensor:
        for stage, cache in zip(stages, caches):
            if x.device != stage.device:
                x = x.to(stage.device)
            x = stage(x, cache, last_only=stage.has_head)
        return x[:, -1]  # (B, vocab)

    _sync(stages[-1].device)
    t0 = time.perf_counter()
    start = 0
    for size in slices:
        logits = run(ids[:, start : start + size])
        start += size
    _sync(stages[-1].device)
    prefill_s = time.perf_counter() - t0
    prefill_logits = logits.float().cpu()

    out: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch
    steps = 0
    t0 = time.perf_counter()
    for i in range(max_new_tokens):
        token = sampler.next_token(logits)  # (B,)
        for row, t in enumerate(token.tolist()):
            if not done[row]:
                if t in eos:
                    done[row] = True
                else:
                    out[row].append(t)
        if all(done) or i == max_new_tokens - 1:
            break
        logits = run(token[:, None].to(stages[0].device))
        steps += 1
    _sync(stages[-1].device)
    decode_s = time.perf_counter() - t0
    return GenerationResult(
        output_ids=tuple(tuple(r) for r in out), prompt_tokens=prompt_tokens, prefill_s=prefill_s,
        decode_s=decode_s, decode_tok_s=steps * batch / decode_s if steps else 0.0,
        prefill_logits=prefill_logits, slices=slices)
