"""Our decoder, in gpt-fast's spirit: one stage = a contiguous layer range of one model.

A ``Stage`` holds layers [layer_start, layer_stop) of a LLaMA-family (RMSNorm, RoPE, SwiGLU,
GQA, optional q/k/v bias), GPT-2 (learned positions, LayerNorm, GELU) or GPT-NeoX (partial
rotary, optional parallel residual) model, plus the embedding if it is the first stage and the
final norm + LM head if it is the last. The whole model is the stage [0, num_layers) with both.
Layers are kept under their *global* index (``layers.7.…``) so that parameter names are the same
whichever stage holds them (torchtitan's convention).

Each forward takes a slice of T tokens and the stage's KVCache; see
[Note: KV cache across slices] in kv_cache.py for the position and masking rule.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hpipe.errors import PromptTooLongError, ShapeMismatchError
from hpipe.model.kv_cache import KVCache, PackedCaches
from hpipe.spec import ModelSpec

# scaled_dot_product_attention(enable_gqa=...) exists from torch 2.5; the project admits 2.4.
_SDPA_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


def rope_inv_freq(spec: ModelSpec) -> torch.Tensor:
    """Inverse rotary frequencies (rot_dim / 2,) in float32, with linear or LLaMA-3 scaling.

    Computed exactly as transformers does (int64 arange, then float) so logits match it bit for bit
    where the arithmetic allows.
    """
    rot_dim = int(spec.head_dim * spec.rotary_pct)
    exponents = torch.arange(0, rot_dim, 2, dtype=torch.int64, device="cpu").float() / rot_dim
    inv_freq = 1.0 / (spec.rope_theta**exponents)
    scaling = dict(spec.rope_scaling)
    if spec.rope_type == "linear":
        return inv_freq / scaling["factor"]
    if spec.rope_type == "llama3":
        # LLaMA-3.1: keep high frequencies, divide low ones by `factor`, blend in between
        # (Meta's reference apply_scaling; transformers' _compute_llama3_parameters).
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        return torch.where(is_medium, smoothed, scaled)
    assert spec.rope_type == "default", spec.rope_type
    return inv_freq


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] channels of x (B, H, T, D); the rest pass (NeoX partial rotary)."""
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat((x_rot * cos + _rotate_half(x_rot) * sin, x_pass), dim=-1)


class Norm(nn.Module):
    """RMSNorm (LLaMA) or LayerNorm (GPT-2, NeoX)."""

    def __init__(self, hidden: int, eps: float, *, rms: bool) -> None:
        super().__init__()
        self.eps, self.rms = eps, rms
        self.weight = nn.Parameter(torch.empty(hidden))
        self.bias = None if rms else nn.Parameter(torch.empty(hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.rms:
            return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        # Normalise in float32 then cast back, as LLaMA's reference does: in half precision
        # the mean of squares would lose the small channels.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        gpt = spec.family != "llama"
        self.num_heads, self.num_kv_heads, self.head_dim = (
            spec.num_heads, spec.num_kv_heads, spec.head_dim)
        # (q_start, q_stop, kv_start, kv_stop): query heads [q_start, q_stop) read KV heads
        # [kv_start, kv_stop), evenly. One segment for the whole model; a tensor-parallel shard
        # whose query heads straddle KV groups has several (see [Note: uneven heads] in shard.py).
        self.segments: tuple[tuple[int, int, int, int], ...] = (
            (0, spec.num_heads, 0, spec.num_kv_heads),)
        # q, k, v fused into one matmul (gpt-fast): rows are [q; k; v].
        qkv_out = (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim
        self.wqkv = nn.Linear(spec.hidden, qkv_out, bias=gpt or spec.qkv_bias)
        self.wo = nn.Linear(spec.hidden, spec.hidden, bias=gpt or spec.attn_out_bias)

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None,
        cache: KVCache,
        layer: int,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q_dim, kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.wqkv(x).split([q_dim, kv_dim, kv_dim], dim=-1)
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, D)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if isinstance(cache, PackedCaches):  # see [Note: a slice and decode rows in one forward]
            parts = []
            for first, stop, c in cache.spans:
                ks, vs = c.update(layer, k[:, :, first:stop], v[:, :, first:stop])
                # Only the slice has several tokens; ``mask`` is its own.
                parts.append(self._attend(q[:, :, first:stop], ks, vs,
                                          mask if stop - first > 1 else None))
            y = torch.cat(parts, dim=2)
        else:
            k, v = cache.update(layer, k, v)  # (B, KV, prefix + T, D)
            y = self._attend(q, k, v, mask)
        # (B, H, T, D) -> (B, T, H * D); H * D is C except in a tensor-parallel shard.
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))

    def _attend(self, q, k, v, mask) -> torch.Tensor:
        if len(self.segments) == 1:
            return _attend(q, k, v, mask)
        return torch.cat([_attend(q[:, q0:q1], k[:, k0:k1], v[:, k0:k1], mask)
                          for q0, q1, k0, k1 in self.segments], dim=1)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            mask: torch.Tensor | None) -> torch.Tensor:
    """Causal attention of q (B, H, T, D) over k, v (B, KV, S, D), H a multiple of KV."""
    prefix = k.shape[2] - q.shape[2]
    if mask is not None and _FLASH_CPU is not None and q.device.type == "cpu" and (
            prefix >= SPLIT_PREFIX_RATIO * q.shape[2]):
        return _attend_after_prefix(q, k, v, prefix)
    gqa = {}
    if k.shape[1] != q.shape[1]:
        if _SDPA_GQA:
            # Let SDPA share each K/V head among its query heads: same numbers, and no copy
            # of the whole cache per step (measured 0.5 ms vs 2.4 ms per layer, 3.6k cache).
            gqa = {"enable_gqa": True}
        else:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    # No prefix and several queries: plain causal. One query (decode): sees everything cached.
    # Otherwise an explicit (T, prefix + T) mask offsets the causal diagonal by the prefix.
    is_causal = mask is None and q.shape[2] > 1
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, **gqa)


# [Note: a slice after a long prefix] A slice of T tokens after P cached ones attends with an
# explicit (T, P + T) mask, which SDPA's CPU kernels apply to every block of scores. Only the
# last T x T block needs it: every query sees every cached key. So past a prefix of
# SPLIT_PREFIX_RATIO x T, attention runs as two fused kernels that return their log-sum-exp,
# one unmasked over the prefix (the query heads of one KV head side by side on the query axis,
# so no K/V copy) and one causal over the slice's own keys, merged exactly by their
# log-sum-exps. Measured per SmolLM2 layer, one thread: 1.08-1.09x faster at prefix 3840-3900
# (slices of 64-256), 1.04x at 1024 after 256, and 0.76x at 256 after 256, hence the ratio.
SPLIT_PREFIX_RATIO = 4
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _attend_after_prefix(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         prefix: int) -> torch.Tensor:
    """``_attend`` for a slice after ``prefix`` cached keys (see the note above)."""
    B, H, T, D = q.shape
    KV = k.shape[1]
    g = H // KV
    grouped = q.reshape(B, KV, g * T, D)  # query head h = KV head h // g, g of them in a row
    o1, l1 = _FLASH_CPU(grouped, k[:, :, :prefix], v[:, :, :prefix], 0.0, False)[:2]
    k2, v2 = k[:, :, prefix:], v[:, :, prefix:]
    if g > 1:  # T keys only: a small copy
        k2, v2 = k2.repeat_interleave(g, dim=1), v2.repeat_interleave(g, dim=1)
    o2, l2 = _FLASH_CPU(q, k2, v2, 0.0, True)[:2]  # T x T: causal is the right alignment
    l1 = l1.reshape(B, H, T, 1)
    l2 = l2.reshape(B, H, T, 1)
    top = torch.maximum(l1, l2)
    w1, w2 = (l1 - top).exp(), (l2 - top).exp()
    out = (o1.reshape(B, H, T, D).float() * w1 + o2.float() * w2) / (w1 + w2)
    return out.to(q.dtype)


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.gated = spec.family == "llama"
        bias = not self.gated or spec.mlp_bias
        self.w_up = nn.Linear(spec.hidden, spec.intermediate, bias=bias)
        self.w_down = nn.Linear(spec.intermediate, spec.hidden, bias=bias)
        self.w_gate = nn.Linear(spec.hidden, spec.intermediate, bias=bias) if self.gated else None
        self.approximate = "tanh" if spec.activation == "gelu_tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:  # SwiGLU
            return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))
        return self.w_down(F.gelu(self.w_up(x), approximate=self.approximate))


class Block(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        rms = spec.family == "llama"
        self.attn_norm = Norm(spec.hidden, spec.norm_eps, rms=rms)
        self.attn = Attention(spec)
        self.mlp_norm = Norm(spec.hidden, spec.norm_eps, rms=rms)
        self.mlp = MLP(spec)
        self.parallel_residual = spec.family == "neox" and spec.parallel_residual

    def forward(self, x, rotary, cache: KVCache, layer: int, mask) -> torch.Tensor:
        h = self.attn(self.attn_norm(x), rotary, cache, layer, mask)
        if self.parallel_residual:  # GPT-NeoX: x + attn(ln1(x)) + mlp(ln2(x))
            return x + h + self.mlp(self.mlp_norm(x))
        x = x + h
        return x + self.mlp(self.mlp_norm(x))


class Embedding(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        # Weights given, so no random init: the loader assigns the checkpoint's, and
        # nn.Embedding's normal_ on the meta device imports torch._dynamo (1-1.7 s of every
        # process that loads a first stage; Linear's init does not).
        self.tok = nn.Embedding(spec.vocab_size, spec.hidden,
                                _weight=torch.empty(spec.vocab_size, spec.hidden))
        self.pos = (nn.Embedding(spec.max_seq_len, spec.hidden,
                                 _weight=torch.empty(spec.max_seq_len, spec.hidden))
                    if spec.family == "gpt2" else None)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``positions``: (T,), each token's position in its own sequence."""
        x = self.tok(ids)
        if self.pos is not None:  # GPT-2's learned absolute positions, offset by the prefix
            x = x + self.pos(positions)
        return x


class Stage(nn.Module):
    """Layers [layer_start, layer_stop) of ``spec``, with or without embedding and head.

    Parameters start uninitialised: ``ModelSource.load_stage`` builds the stage on the meta
    device and assigns the checkpoint's tensors, so nothing is allocated twice.
    """

    def __init__(
        self, spec: ModelSpec, *, layer_start: int, layer_stop: int, has_embedding: bool,
        has_head: bool,
    ) -> None:
        super().__init__()
        assert 0 <= layer_start <= layer_stop <= spec.num_layers, (
            f"layer range [{layer_start}, {layer_stop}) outside [0, {spec.num_layers})")
        self.spec = spec
        self.layer_start, self.layer_stop = layer_start, layer_stop
        self.has_embedding, self.has_head = has_embedding, has_head
        self.empty_dtype = torch.float32  # what an empty stage accepts; load_stage sets it
        self.num_kv_heads = spec.num_kv_heads  # KV heads this stage caches (fewer in a TP shard)
        self.tp = None  # a shard.TPShard when this stage is one rank's share of a TP group
        self.embed = Embedding(spec) if has_embedding else None
        self.layers = nn.ModuleDict(
            {str(i): Block(spec) for i in range(layer_start, layer_stop)})
        self.norm = Norm(spec.hidden, spec.norm_eps, rms=spec.family == "llama") if has_head else None
        self.head = nn.Linear(spec.hidden, spec.vocab_size, bias=False) if has_head else None
        if spec.family != "gpt2":
            # Explicit CPU device: the loader builds the stage under the meta device, and this
            # buffer is computed, not loaded.
            self.register_buffer("inv_freq", rope_inv_freq(spec), persistent=False)
        else:
            self.inv_freq = None

    @property
    def num_layers(self) -> int:
        return self.layer_stop - self.layer_start

    @property
    def dtype(self) -> torch.dtype:
        floats = (p.dtype for p in self.parameters() if p.is_floating_point())
        # A middle stage with no layers (a device the plan leaves empty) has no parameters.
        return next(floats, self.empty_dtype)

    @property
    def device(self) -> torch.device:
        return next((p.device for p in self.parameters()), torch.device("cpu"))

    def new_cache(self, *, batch: int = 1, max_tokens: int | None = None) -> KVCache:
        """A KV cache for this stage's layers; ``max_tokens`` defaults to the model's context."""
        max_tokens = self.spec.max_seq_len if max_tokens is None else max_tokens
        if max_tokens > self.spec.max_seq_len:
            raise PromptTooLongError(
                f"a cache of {max_tokens} tokens exceeds {self.spec.name}'s context of "
                f"{self.spec.max_seq_len} tokens; ask for max_tokens <= {self.spec.max_seq_len}")
        return KVCache(
            num_layers=self.num_layers, batch=batch, num_kv_heads=self.num_kv_heads,
            head_dim=self.spec.head_dim, max_tokens=max_tokens, dtype=self.dtype,
            device=self.device)

    def _check_input(self, x: torch.Tensor, cache: KVCache) -> None:
        if self.has_embedding:
            ok = x.dim() == 2 and x.dtype == torch.int64
            want = "int64 token ids (B, T)"
        else:
            ok = x.dim() == 3 and x.shape[-1] == self.spec.hidden and x.dtype == self.dtype
            want = f"{self.dtype} hidden states (B, T, {self.spec.hidden})"
        if not ok:
            raise ShapeMismatchError(
                f"stage [{self.layer_start}, {self.layer_stop}) expects {want}, "
                f"got {x.dtype} {tuple(x.shape)}")
        if x.shape[0] != cache.batch:
            raise ShapeMismatchError(f"batch {x.shape[0]} != cache batch {cache.batch}")

    def _rotary(self, positions: torch.Tensor, like: torch.Tensor):
        """cos, sin (T, rot_dim) at ``positions`` (T,), or None for learned positions."""
        if self.inv_freq is None:
            return None
        freqs = torch.outer(positions.float(), self.inv_freq.float())  # (T, rot_dim / 2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (T, rot_dim), rotate-half layout
        return emb.cos().to(like.dtype), emb.sin().to(like.dtype)

    def forward_packed(self, x: torch.Tensor, caches: PackedCaches, *,
                       piece_logits: bool = True) -> torch.Tensor:
        """A slice of one sequence and one decode token of each of several others, as one
        token axis: x (1, T + N) ids or (1, T + N, hidden) (see [Note: a slice and decode rows
        in one forward]). Returns the hidden states, or the last stage's float32 logits at
        each sequence's last token (1, K, vocab): the slice's first (unless not
        ``piece_logits``), then the rows'."""
        self._check_input(x, caches)
        if x.shape[1] != caches.num_tokens:
            raise ShapeMismatchError(
                f"a packed forward over {caches.num_tokens} tokens got {x.shape[1]}")
        caches.check_room()
        positions = torch.tensor(caches.positions, device=x.device)
        h = self.embed(x, positions) if self.embed is not None else x
        rotary = self._rotary(positions, h)
        mask = None
        if caches.piece is not None and caches.piece.length > 0 and caches.piece_tokens > 1:
            mask = _prefix_mask(caches.piece.length, caches.piece_tokens, h.device)
        for local, block in enumerate(self.layers.values()):
            h = block(h, rotary, caches, local, mask)
        caches.advance()
        if self.head is None:
            return h
        at = caches.last_tokens
        if caches.piece is not None and not piece_logits:
            at = at[1:]
        return self.head(self.norm(h[:, at])).float()

    def forward(
        self, x: torch.Tensor, cache: KVCache, *, last_only: bool = False
    ) -> torch.Tensor:
        """Run one slice. x: ids (B, T) or hidden (B, T, hidden); returns hidden or float32 logits.

        ``last_only`` computes logits for the last position only (B, 1, vocab): a prefill needs
        just that one, and the full (T, vocab) product would dominate small models' time.
        """
        self._check_input(x, cache)
        start, num_tokens = cache.length, x.shape[1]
        cache.check_room(num_tokens)
        positions = torch.arange(start, start + num_tokens, device=x.device)
        h = self.embed(x, positions) if self.embed is not None else x
        rotary = self._rotary(positions, h)
        mask = _prefix_mask(start, num_tokens, h.device) if start > 0 and num_tokens > 1 else None
        for local, block in enumerate(self.layers.values()):
            h = block(h, rotary, cache, local, mask)
        cache.advance(num_tokens)
        if self.head is None:
            return h
        if last_only:
            h = h[:, -1:]
        return self.head(self.norm(h)).float()


def _prefix_mask(prefix: int, num_tokens: int, device) -> torch.Tensor:
    """(T, prefix + T), True = attend: query i sees key j iff j <= prefix + i."""
    key_pos = torch.arange(prefix + num_tokens, device=device)
    query_pos = torch.arange(prefix, prefix + num_tokens, device=device)
    return key_pos[None, :] <= query_pos[:, None]
