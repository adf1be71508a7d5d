"""Tensor parallelism inside one stage: which share of every layer a rank holds, and its modules.

[Note: tensor-parallel stage] A stage whose plan lists several devices (Megatron, TP-T, or an
HPipe plan that found a TP group faster) runs on a group of ranks, Megatron-style
(Shoeybi et al. 2019, section 3). Per layer:

- attention: q/k/v are column-parallel (a rank computes only its query heads and the KV heads
  they read, and caches only those KV heads); the output projection is row-parallel (a rank
  multiplies only its heads' columns), so each rank holds a partial sum of the output;
- MLP: gate/up are column-parallel over the intermediate width, down is row-parallel;
- after each row-parallel projection the partial sums are all-reduced (summed) over the group
  and only then is that projection's bias added, once. Two all-reduces per layer, and after each
  one every rank holds the full hidden state, so the norms and residual adds are replicated.

The embedding is replicated on every rank of a first stage: a lookup costs no compute, and each
rank embedding its own copy of the token ids saves broadcasting the (rows, tokens, hidden)
activations into the group. The head (final norm + LM head) lives only on the group's leader:
only the leader samples and sends, so the others would compute logits nobody reads; a
vocabulary-parallel head would add an all-gather of the logits per unit.

[Note: uneven heads] Head counts need not divide by the group size (SmolLM2-135M: 9 query heads
and 3 KV heads, GQA 3:1). Query heads are split as evenly as possible (5 + 4 at TP=2) and each
rank computes, and caches, every KV head its query heads read: at TP=2 both ranks hold 2 of the
3 KV heads (KV head 1 serves query heads 3-5, which straddle the split). The alternative, whole
KV groups per rank (6 + 3 query heads), computes no KV head twice but gives one rank twice the
other's attention. Measured on two SmolLM2 layers at 2048 prompt tokens, one thread, each
shard timed alone (min of 3, on a shared 2-core machine, so rough): the slower rank of 5 + 4
took 0.50-0.58x of the unsharded layers, the slower rank of 6 + 3 took 0.70-0.89x; the
redundant KV head is ~1.5% of a layer's FLOPs there (and the caches hold 4 KV heads between
them instead of 3). A rank whose heads straddle a KV group runs one attention call per run of
heads sharing KV heads (``gqa_segments``), so no K/V is copied.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hpipe.errors import PlanMismatchError
from hpipe.spec import ModelSpec

# all_reduce(partial) -> the sum over the group (in place or a new tensor). The runtime passes a
# torch.distributed collective over the group; tests pass an in-process stand-in.
AllReduce = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TPShard:
    """Member ``rank`` (0 = the leader) of a tensor-parallel group of ``size``.

    Ranges are half-open: query heads ``[q_heads[0], q_heads[1])``, the KV heads they read,
    and the MLP intermediate channels ``[mlp[0], mlp[1])``.
    """

    rank: int
    size: int
    q_heads: tuple[int, int]
    kv_heads: tuple[int, int]
    mlp: tuple[int, int]

    @property
    def num_heads(self) -> int:
        return self.q_heads[1] - self.q_heads[0]

    @property
    def num_kv_heads(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]

    @property
    def mlp_width(self) -> int:
        return self.mlp[1] - self.mlp[0]


def even_range(total: int, parts: int, index: int) -> tuple[int, int]:
    """Part ``index`` of ``total`` items cut into ``parts`` near-equal runs, larger runs first."""
    q, r = divmod(total, parts)
    start = index * q + min(index, r)
    return start, start + q + (index < r)


def check_tp_size(spec: ModelSpec, size: int, *, where: str = "a tensor-parallel group") -> None:
    """Refuse a group that cannot split ``spec``: every rank needs at least one query head."""
    if not 1 <= size <= spec.num_heads:
        raise PlanMismatchError(
            f"{where} of {size} devices cannot split {spec.name!r}: it has {spec.num_heads} "
            f"attention heads and each device needs at least one; use groups of at most "
            f"{spec.num_heads} devices (or one device per stage)")


def plan_shard(spec: ModelSpec, *, rank: int, size: int) -> TPShard:
    """Rank ``rank``'s share of every layer in a group of ``size`` (see [Note: uneven heads])."""
    check_tp_size(spec, size)
    assert 0 <= rank < size, (rank, size)
    q0, q1 = even_range(spec.num_heads, size, rank)
    return shard_with_heads(spec, rank=rank, size=size, q_heads=(q0, q1),
                            mlp=even_range(spec.intermediate, size, rank))


def shard_with_heads(spec: ModelSpec, *, rank: int, size: int, q_heads: tuple[int, int],
                     mlp: tuple[int, int]) -> TPShard:
    """A shard with the given query heads; its KV heads are the ones those heads read."""
    rep = spec.num_heads // spec.num_kv_heads  # query heads per KV head
    q0, q1 = q_heads
    assert 0 <= q0 < q1 <= spec.num_heads and 0 <= mlp[0] <= mlp[1] <= spec.intermediate
    return TPShard(rank=rank, size=size, q_heads=(q0, q1),
                   kv_heads=(q0 // rep, (q1 - 1) // rep + 1), mlp=mlp)


def gqa_segments(spec: ModelSpec, tp: TPShard) -> tuple[tuple[int, int, int, int], ...]:
    """Local (q_start, q_stop, kv_start, kv_stop) runs in which each KV head serves the same
    number of query heads, so each run is one grouped attention call. Whole KV groups give one
    run; a split inside a group gives a short run on either side (5 heads of 3:1 GQA starting at
    head 0 -> [0, 3) on KV 0 and [3, 5) on KV 1)."""
    rep = spec.num_heads // spec.num_kv_heads
    runs: list[list[int]] = []  # [kv head (global), query heads it serves here]
    for h in range(*tp.q_heads):
        if runs and runs[-1][0] == h // rep:
            runs[-1][1] += 1
        else:
            runs.append([h // rep, 1])
    segments: list[list[int]] = []
    q = 0
    for kv, n in runs:
        kv_local = kv - tp.kv_heads[0]
        last = segments[-1] if segments else None
        if last is not None and (last[1] - last[0]) == n * (last[3] - last[2]):
            last[1], last[3] = last[1] + n, kv_local + 1  # same ratio: widen the run
        else:
            segments.append([q, q + n, kv_local, kv_local + 1])
        q += n
    return tuple(tuple(s) for s in segments)


def shard_tensor(spec: ModelSpec, tp: TPShard, name: str, t: torch.Tensor) -> torch.Tensor:
    """This rank's part of parameter ``name`` (our names, decoder.py) of the full tensor ``t``.

    A copy, so the full tensor can be freed. Norms, embedding, head and the row-parallel
    biases (added once, after the all-reduce) are returned whole.
    """
    d = spec.head_dim
    q_dim, kv_dim = spec.num_heads * d, spec.num_kv_heads * d
    if name.endswith("attn.wqkv.weight") or name.endswith("attn.wqkv.bias"):
        (q0, q1), (k0, k1) = tp.q_heads, tp.kv_heads
        rows = torch.cat([torch.arange(q0 * d, q1 * d),  # rows are [q; k; v]
                          q_dim + torch.arange(k0 * d, k1 * d),
                          q_dim + kv_dim + torch.arange(k0 * d, k1 * d)])
        return t.index_select(0, rows)
    if name.endswith("attn.wo.weight"):  # (hidden, heads * d): this rank's heads' columns
        return t[:, tp.q_heads[0] * d:tp.q_heads[1] * d].clone()
    if any(name.endswith(f"mlp.{w}.{p}") for w in ("w_gate", "w_up") for p in ("weight", "bias")):
        return t[tp.mlp[0]:tp.mlp[1]].clone()
    if name.endswith("mlp.w_down.weight"):  # (hidden, intermediate)
        return t[:, tp.mlp[0]:tp.mlp[1]].clone()
    return t


class ReducedLinear(nn.Module):
    """Row-parallel linear: this rank's input columns; the partial sums are all-reduced and the
    bias is added once, after the sum (parameter names as nn.Linear's, so checkpoints load)."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool,
                 all_reduce: AllReduce) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.all_reduce = all_reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.all_reduce(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias


def shard_modules_(stage, tp: TPShard, all_reduce: AllReduce) -> None:
    """Resize ``stage``'s layers, in place, to ``tp``'s share (built on the meta device, before
    ``load_state_dict(assign=True)`` puts the shard's tensors in)."""
    spec, d = stage.spec, stage.spec.head_dim
    segments = gqa_segments(spec, tp)
    for block in stage.layers.values():
        attn, mlp = block.attn, block.mlp
        attn.num_heads, attn.num_kv_heads, attn.segments = tp.num_heads, tp.num_kv_heads, segments
        attn.wqkv = nn.Linear(spec.hidden, (tp.num_heads + 2 * tp.num_kv_heads) * d,
                              bias=attn.wqkv.bias is not None)
        attn.wo = ReducedLinear(tp.num_heads * d, spec.hidden, bias=attn.wo.bias is not None,
                                all_reduce=all_reduce)
        for name in ("w_gate", "w_up"):
            if getattr(mlp, name) is not None:
                has_bias = getattr(mlp, name).bias is not None
                setattr(mlp, name, nn.Linear(spec.hidden, tp.mlp_width, bias=has_bias))
        mlp.w_down = ReducedLinear(tp.mlp_width, spec.hidden, bias=mlp.w_down.bias is not None,
                                   all_reduce=all_reduce)
    stage.num_kv_heads = tp.num_kv_heads
    stage.tp = tp


def shard_stage(stage, tp: TPShard, all_reduce: AllReduce, *, has_head: bool | None = None):
    """``tp``'s share of an already loaded full ``stage``, as a new Stage (the loader instead
    slices tensor by tensor as it reads, see ModelSource.load_stage). ``has_head`` defaults
    to the leader keeping the head (see [Note: tensor-parallel stage])."""
    from hpipe.model.decoder import Stage

    keep_head = stage.has_head and (tp.rank == 0 if has_head is None else has_head)
    state = {k: shard_tensor(stage.spec, tp, k, v) for k, v in stage.state_dict().items()
             if keep_head or not k.startswith(("norm.", "head."))}
    with torch.device("meta"):
        out = Stage(stage.spec, layer_start=stage.layer_start, layer_stop=stage.layer_stop,
                    has_embedding=stage.has_embedding, has_head=keep_head)
        shard_modules_(out, tp, all_reduce)
    out.load_state_dict(state, strict=True, assign=True)
    if out.has_head and out.embed is not None and stage.head.weight is stage.embed.tok.weight:
        out.head.weight = out.embed.tok.weight  # tied: one tensor, as in the checkpoint
    out.empty_dtype = stage.dtype
    return out.to(stage.device).eval().requires_grad_(False)
