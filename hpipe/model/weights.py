"""Read one stage's tensors, and only those, from safetensors shards or a GGUF file.

Two layers:
- *readers* fetch a checkpoint tensor by its checkpoint name (``SafetensorsReader`` opens only
  the shards that hold the names asked for, via the index json; ``GGUFTensorReader``
  dequantizes one GGUF tensor at a time from the memory-mapped file). Each records the names it
  read in ``names_read``, which is how the tests prove a stage reads only its own tensors.
- *layouts* map our parameter names (decoder.py) to checkpoint names plus the reshaping that
  turns them into our layout: fusing q/k/v, transposing GPT-2's Conv1D weights, reordering
  NeoX's per-head interleaved qkv, undoing llama.cpp's Q/K row permutation.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from hpipe.errors import WeightsNotFoundError
from hpipe.spec import ModelSpec


def _safe_open(path: Path):
    """safe_open, with a missing or damaged file named (a truncated download, an index json
    that lists a shard that is not there) instead of the library's bare error."""
    try:
        return safe_open(path, framework="pt")
    except (SafetensorError, OSError) as e:
        raise WeightsNotFoundError(
            f"cannot read safetensors file {str(path)!r}: {e}; re-download or re-save the "
            "checkpoint") from None


class SafetensorsReader:
    """Tensors of an HF model directory: one ``model.safetensors`` or shards plus an index json."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = Path(model_dir)
        index = self.model_dir / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise WeightsNotFoundError(f"cannot read the shard index {str(index)!r}: "
                                           f"{type(e).__name__}: {e}") from None
            self._shard_of = {name: self.model_dir / f for name, f in weight_map.items()}
        else:
            files = sorted(self.model_dir.glob("*.safetensors"))
            if not files:
                raise WeightsNotFoundError(
                    f"no *.safetensors in {str(self.model_dir)!r}; hpipe reads safetensors only "
                    "(re-save the model with save_pretrained(..., safe_serialization=True))")
            self._shard_of = {}
            for f in files:  # headers only: safe_open reads the JSON header, not the data
                with _safe_open(f) as handle:
                    self._shard_of.update({name: f for name in handle.keys()})
        self._handles: dict[Path, object] = {}
        self.names_read: list[str] = []

    def names(self) -> frozenset[str]:
        return frozenset(self._shard_of)

    @property
    def shards_opened(self) -> tuple[Path, ...]:
        return tuple(self._handles)

    def read(self, name: str) -> torch.Tensor:
        shard = self._shard_of[name]
        if shard not in self._handles:
            self._handles[shard] = _safe_open(shard)
        self.names_read.append(name)
        return self._handles[shard].get_tensor(name)


class GGUFTensorReader:
    """Tensors of a GGUF file by GGUF name, dequantized to float32 in PyTorch's (out, in) layout."""

    def __init__(self, gguf_file) -> None:  # a gguf_file.GGUFFile: header parsed, data memory-mapped
        self._file = gguf_file
        self.names_read: list[str] = []

    def names(self) -> frozenset[str]:
        return frozenset(self._file.tensors)

    def read(self, name: str) -> torch.Tensor:
        from gguf import GGMLQuantizationType, dequantize

        info = self._file.tensors[name]
        self.names_read.append(name)
        # Touches only this tensor's bytes of the memory map.
        array = dequantize(self._file.tensor_data(info), GGMLQuantizationType(info.ggml_type))
        # GGUF lists dims fastest-first (ne0 = columns); PyTorch wants them slowest-first.
        shape = tuple(reversed(info.shape))
        return torch.from_numpy(np.array(array, dtype=np.float32, copy=True).reshape(shape))


def unpermute_qk(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's convert-time Q/K row permutation (its ``permute``), rows (heads * head_dim, ...).

    llama.cpp rotates interleaved channel pairs (GPT-J style); HF and we rotate halves. The
    converter reorders each head's rows from [half0 | half1] to pairs (x0, x_{d/2}, x1, ...);
    this puts them back.
    """
    rest = w.shape[1:]
    return (w.reshape(num_heads, w.shape[0] // num_heads // 2, 2, *rest)
            .transpose(1, 2).reshape(w.shape))


@dataclass(frozen=True)
class TensorSource:
    """Where one of our parameters comes from: checkpoint names and how to combine them."""

    names: tuple[str, ...]
    combine: Callable[..., torch.Tensor] = lambda t: t


def _cat(*ts: torch.Tensor) -> torch.Tensor:
    return torch.cat(ts, dim=0)


def _t(t: torch.Tensor) -> torch.Tensor:
    return t.t().contiguous()  # GPT-2's Conv1D stores (in, out); nn.Linear wants (out, in)


def _one(name: str, combine=None) -> TensorSource:
    return TensorSource((name,), combine) if combine else TensorSource((name,))


def _find_prefix(names: frozenset[str], suffix: str, candidates: tuple[str, ...]) -> str:
    for prefix in candidates:
        if prefix + suffix in names:
            return prefix
    raise WeightsNotFoundError(
        f"checkpoint has no {suffix!r} under any of the prefixes {candidates}; is it a "
        "causal-LM checkpoint of the architecture its config.json names?")


def hf_layout(spec: ModelSpec, names: frozenset[str]) -> Callable[[str], dict[str, TensorSource]]:
    """Map for an HF checkpoint: part -> {our name: TensorSource}; part is "embed", "head" or a layer index."""
    if spec.family == "llama":
        p = _find_prefix(names, "layers.0.input_layernorm.weight", ("model.", ""))
        embed, norm = p + "embed_tokens.weight", p + "norm.weight"
        head = "lm_head.weight"
    elif spec.family == "gpt2":
        p = _find_prefix(names, "h.0.ln_1.weight", ("transformer.", ""))
        embed, norm, head = p + "wte.weight", p + "ln_f.weight", "lm_head.weight"
    else:
        p = _find_prefix(names, "layers.0.input_layernorm.weight", ("gpt_neox.", ""))
        embed, norm, head = p + "embed_in.weight", p + "final_layer_norm.weight", "embed_out.weight"
    if spec.tie_embeddings:  # an untied config without its head tensor fails in the read, by name
        head = embed

    def part(which: str | int) -> dict[str, TensorSource]:
        if which == "embed":
            out = {"embed.tok.weight": _one(embed)}
            if spec.family == "gpt2":
                out["embed.pos.weight"] = _one(p + "wpe.weight")
            return out
        if which == "head":
            out = {"norm.weight": _one(norm), "head.weight": _one(head)}
            if spec.family != "llama":
                out["norm.bias"] = _one(norm.replace(".weight", ".bias"))
            return out
        return {f"layers.{which}.{k}": v for k, v in _layer_sources(spec, p, int(which)).items()}

    return part


def _layer_sources(spec: ModelSpec, p: str, i: int) -> dict[str, TensorSource]:
    if spec.family == "llama":
        a, m = f"{p}layers.{i}.self_attn.", f"{p}layers.{i}.mlp."
        out = {
            "attn_norm.weight": _one(f"{p}layers.{i}.input_layernorm.weight"),
            "mlp_norm.weight": _one(f"{p}layers.{i}.post_attention_layernorm.weight"),
            "attn.wqkv.weight": TensorSource(tuple(f"{a}{x}_proj.weight" for x in "qkv"), _cat),
            "attn.wo.weight": _one(f"{a}o_proj.weight"),
            "mlp.w_gate.weight": _one(f"{m}gate_proj.weight"),
            "mlp.w_up.weight": _one(f"{m}up_proj.weight"),
            "mlp.w_down.weight": _one(f"{m}down_proj.weight"),
        }
        if spec.qkv_bias:
            out["attn.wqkv.bias"] = TensorSource(tuple(f"{a}{x}_proj.bias" for x in "qkv"), _cat)
        if spec.attn_out_bias:
            out["attn.wo.bias"] = _one(f"{a}o_proj.bias")
        if spec.mlp_bias:
            for ours, theirs in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj")):
                out[f"mlp.{ours}.bias"] = _one(f"{m}{theirs}.bias")
        return out
    if spec.family == "gpt2":
        b = f"{p}h.{i}."
        pairs = {"attn_norm": ("ln_1", None), "mlp_norm": ("ln_2", None),
                 "attn.wqkv": ("attn.c_attn", _t), "attn.wo": ("attn.c_proj", _t),
                 "mlp.w_up": ("mlp.c_fc", _t), "mlp.w_down": ("mlp.c_proj", _t)}
    else:
        b = f"{p}layers.{i}."
        pairs = {"attn_norm": ("input_layernorm", None),
                 "mlp_norm": ("post_attention_layernorm", None),
                 "attn.wqkv": ("attention.query_key_value", _neox_qkv(spec)),
                 "attn.wo": ("attention.dense", None),
                 "mlp.w_up": ("mlp.dense_h_to_4h", None), "mlp.w_down": ("mlp.dense_4h_to_h", None)}
    out = {}
    for ours, (theirs, fix) in pairs.items():
        out[f"{ours}.weight"] = _one(f"{b}{theirs}.weight", fix)
        # Biases: Conv1D's are already (out,); NeoX's fused qkv bias needs the same reorder.
        bias_fix = fix if fix is not _t else None
        out[f"{ours}.bias"] = _one(f"{b}{theirs}.bias", bias_fix)
    return out


def _neox_qkv(spec: ModelSpec) -> Callable[[torch.Tensor], torch.Tensor]:
    """NeoX fuses qkv per head, rows (heads, [q|k|v], head_dim); we want ([q|k|v], heads, head_dim)."""
    h, d = spec.num_heads, spec.head_dim

    def reorder(w: torch.Tensor) -> torch.Tensor:
        rest = w.shape[1:]
        return w.reshape(h, 3, d, *rest).transpose(0, 1).reshape(w.shape).contiguous()

    return reorder


def gguf_layout(
    spec: ModelSpec, names: frozenset[str], *, permuted_qk: bool
) -> Callable[[str], dict[str, TensorSource]]:
    """Map for a llama.cpp GGUF of the LLaMA family (``permuted_qk`` for arch "llama", not "qwen2")."""
    head = "token_embd.weight" if spec.tie_embeddings or "output.weight" not in names else "output.weight"
    q_fix = (lambda t: unpermute_qk(t, spec.num_heads)) if permuted_qk else (lambda t: t)
    k_fix = (lambda t: unpermute_qk(t, spec.num_kv_heads)) if permuted_qk else (lambda t: t)

    def qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.cat((q_fix(q), k_fix(k), v), dim=0)

    def part(which: str | int) -> dict[str, TensorSource]:
        if which == "embed":
            return {"embed.tok.weight": _one("token_embd.weight")}
        if which == "head":
            return {"norm.weight": _one("output_norm.weight"), "head.weight": _one(head)}
        b = f"blk.{which}."
        out = {
            "attn_norm.weight": _one(b + "attn_norm.weight"),
            "mlp_norm.weight": _one(b + "ffn_norm.weight"),
            "attn.wqkv.weight": TensorSource(tuple(f"{b}attn_{x}.weight" for x in "qkv"), qkv),
            "attn.wo.weight": _one(b + "attn_output.weight"),
            "mlp.w_gate.weight": _one(b + "ffn_gate.weight"),
            "mlp.w_up.weight": _one(b + "ffn_up.weight"),
            "mlp.w_down.weight": _one(b + "ffn_down.weight"),
        }
        if spec.qkv_bias:
            out["attn.wqkv.bias"] = TensorSource(tuple(f"{b}attn_{x}.bias" for x in "qkv"), qkv)
        return {f"layers.{which}.{k}": v for k, v in out.items()}

    return part


def stage_sources(
    layout: Callable[[str], dict[str, TensorSource]], *, layer_start: int, layer_stop: int,
    has_embedding: bool, has_head: bool,
) -> dict[str, TensorSource]:
    """Every parameter of the stage [layer_start, layer_stop) and where it comes from."""
    out: dict[str, TensorSource] = {}
    if has_embedding:
        out.update(layout("embed"))
    for i in range(layer_start, layer_stop):
        out.update(layout(i))
    if has_head:
        out.update(layout("head"))
    return out


def read_stage_tensors(
    reader, sources: dict[str, TensorSource], *, dtype: torch.dtype, device: torch.device | str,
    select: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Read each checkpoint tensor once (a tied embedding serves two parameters), combine, convert.

    ``select(name, full)`` keeps part of each combined tensor (a tensor-parallel rank's shard,
    ``shard.shard_tensor``) before conversion, so only that part stays resident: the full
    tensor lives one parameter at a time. The reads themselves are whole tensors (a GGUF block
    spans a row, and fusing q/k/v or undoing llama.cpp's permutation needs the whole tensor)."""
    missing = sorted({n for s in sources.values() for n in s.names} - reader.names())
    if missing:
        raise WeightsNotFoundError(
            f"checkpoint lacks {len(missing)} tensors the model needs, e.g. {missing[:3]}; "
            "is the config consistent with the weights?")
    uses = Counter(n for s in sources.values() for n in s.names)
    memo: dict[str, torch.Tensor] = {}
    out = {}
    for ours, src in sources.items():
        parts = []
        for n in src.names:
            t = memo[n] if n in memo else reader.read(n)
            if uses[n] > 1:
                memo[n] = t
            parts.append(t)
        full = src.combine(*parts)
        out[ours] = (full if select is None else select(ours, full)).to(device=device, dtype=dtype)
    return out
