"""ModelSpec from a checkpoint's own description: an HF ``config.json`` or GGUF metadata.

Both readers return the planner's ``ModelSpec`` (hpipe.spec), so a real checkpoint and a shape
preset are interchangeable everywhere above the model code. Anything the decoder does not
implement is refused here, up front, with the name of what was found and what is supported,
rather than producing wrong numbers later.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from hpipe.errors import HPipeError, ModelSpecError, UnsupportedArchitectureError
from hpipe.spec import ModelSpec

# HF model_type -> our family. Mistral and Qwen2 are LLaMA blocks (Qwen2 adds q/k/v biases).
HF_MODEL_TYPES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "gpt2": "gpt2",
    "gpt_neox": "neox",
}
# GGUF general.architecture values we read; llama.cpp stores Mistral and SmolLM as "llama".
GGUF_ARCHITECTURES = ("llama", "qwen2")
ROPE_TYPES = ("default", "linear", "llama3")
# HF activation names -> ModelSpec.activation.
_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
}


def _unsupported(kind: str, found: str, supported: Collection[str]) -> UnsupportedArchitectureError:
    return UnsupportedArchitectureError(
        f"unsupported {kind} {found!r}; hpipe implements {', '.join(sorted(supported))}"
    )


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _rope(cfg: Mapping[str, Any]) -> tuple[float, str, tuple[tuple[str, float], ...], float]:
    """(rope_theta, rope_type, scaling numbers, partial_rotary_factor) from either config style.

    transformers 5 writes one ``rope_parameters`` dict; 4.x wrote ``rope_theta`` (or NeoX's
    ``rotary_emb_base``) beside a ``rope_scaling`` dict whose type key was "type" or "rope_type".
    """
    params = dict(cfg.get("rope_parameters") or {})
    scaling = dict(cfg.get("rope_scaling") or {})
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", cfg.get("rope_theta", cfg.get("rotary_emb_base", 10000.0)))
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise _unsupported("rope scaling type", str(rope_type), ROPE_TYPES)
    partial = merged.get("partial_rotary_factor", cfg.get("rotary_pct", 1.0))
    numbers = {
        k: float(v)
        for k, v in merged.items()
        if k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    }
    return float(theta), str(rope_type), tuple(sorted(numbers.items())), float(partial)


def _activation(name: str) -> str:
    if name not in _ACTIVATIONS:
        raise _unsupported("activation", name, _ACTIVATIONS)
    return _ACTIVATIONS[name]


def spec_from_hf_config(config: Mapping[str, Any] | str | Path, *, name: str | None = None) -> ModelSpec:
    """Read a ModelSpec from an HF config dict, a ``config.json`` path, or a model directory."""
    if not isinstance(config, Mapping):
        path = Path(config)
        path = path / "config.json" if path.is_dir() else path
        name = name or path.parent.name
        try:
            config = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ModelSpecError(f"cannot read HF config {str(path)!r}: {e}") from e
    cfg = dict(config)
    model_type = cfg.get("model_type", "")
    if model_type not in HF_MODEL_TYPES:
        arch = ", ".join(cfg.get("architectures") or []) or "?"
        raise UnsupportedArchitectureError(
            f"unsupported architecture {model_type!r} ({arch}); hpipe implements model types "
            f"{', '.join(sorted(HF_MODEL_TYPES))}"
        )
    name = name or cfg.get("_name_or_path") or model_type
    try:
        return _spec_from_hf_dict(cfg, model_type, str(name))
    except KeyError as e:
        raise ModelSpecError(f"HF config of {name!r} has no {e.args[0]!r}, which a "
                             f"{model_type} config needs; is its config.json complete?") from None
    except (TypeError, ValueError, ZeroDivisionError) as e:
        if isinstance(e, HPipeError):  # already names the field
            raise
        raise ModelSpecError(f"HF config of {name!r} has a field of the wrong type or value: "
                             f"{type(e).__name__}: {e}") from None


def _spec_from_hf_dict(cfg: dict, model_type: str, name: str) -> ModelSpec:
    family = HF_MODEL_TYPES[model_type]
    common = dict(
        name=str(name),
        family=family,
        vocab_size=int(cfg["vocab_size"]),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos_ids(cfg.get("eos_token_id")),
    )
    if family == "gpt2":
        return _gpt2_spec(cfg, common)
    hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    head_dim = cfg.get("head_dim") or hidden // heads
    if head_dim * heads != hidden:
        # ModelSpec derives head_dim from hidden / heads; a decoupled head_dim would need a new
        # field that the planner's memory model also understands.
        raise _unsupported("head_dim", f"{head_dim} (hidden {hidden} / {heads} heads)",
                           [f"hidden / num_heads = {hidden // heads}"])
    theta, rope_type, scaling, partial = _rope(cfg)
    max_seq_len = int(cfg.get("max_position_embeddings", 2048))
    if cfg.get("use_sliding_window") or (model_type == "mistral" and cfg.get("sliding_window")):
        # We attend over the whole prefix; cap the context at the window so that what we compute
        # is what the model computes.
        max_seq_len = min(max_seq_len, int(cfg["sliding_window"]))
    if family == "neox":
        return ModelSpec(
            **common, num_layers=int(cfg["num_hidden_layers"]), hidden=hidden, num_heads=heads,
            num_kv_heads=heads, intermediate=int(cfg["intermediate_size"]),
            max_seq_len=max_seq_len, norm_eps=float(cfg.get("layer_norm_eps", 1e-5)),
            rope_theta=theta, rope_type=rope_type, rope_scaling=scaling, rotary_pct=partial,
            parallel_residual=bool(cfg.get("use_parallel_residual", True)), qkv_bias=True,
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            activation=_activation(cfg.get("hidden_act", "gelu")),
        )
    if cfg.get("hidden_act", "silu") not in ("silu", "swish"):
        raise _unsupported("LLaMA MLP activation", cfg["hidden_act"], ["silu"])
    attention_bias = bool(cfg.get("attention_bias", False))
    return ModelSpec(
        **common, num_layers=int(cfg["num_hidden_layers"]), hidden=hidden, num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        intermediate=int(cfg["intermediate_size"]), max_seq_len=max_seq_len,
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_type=rope_type,
        rope_scaling=scaling, rotary_pct=partial,
        qkv_bias=attention_bias or model_type == "qwen2", attn_out_bias=attention_bias,
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), activation="silu",
    )


def _gpt2_spec(cfg: dict, common: dict) -> ModelSpec:
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if cfg.get(flag):
            raise _unsupported("GPT-2 option", f"{flag}=true", [f"{flag}=false"])
    if cfg.get("add_cross_attention"):
        raise _unsupported("GPT-2 option", "add_cross_attention=true", ["decoder-only"])
    hidden = int(cfg["n_embd"])
    return ModelSpec(
        **common, num_layers=int(cfg["n_layer"]), hidden=hidden, num_heads=int(cfg["n_head"]),
        num_kv_heads=int(cfg["n_head"]), intermediate=int(cfg.get("n_inner") or 4 * hidden),
        max_seq_len=int(cfg.get("n_positions", 1024)),
        norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)), qkv_bias=True,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        activation=_activation(cfg.get("activation_function", "gelu_new")),
    )


def spec_from_gguf_metadata(
    metadata: Mapping[str, Any], tensor_names: Collection[str], *, name: str
) -> ModelSpec:
    """Read a ModelSpec from GGUF key/values (already decoded to Python values).

    ``tensor_names`` settles what the metadata leaves implicit: an absent ``output.weight``
    means the head is tied to the embedding, and ``blk.0.attn_q.bias`` means q/k/v biases.
    """
    arch = metadata.get("general.architecture", "?")
    if arch not in GGUF_ARCHITECTURES:
        raise _unsupported("GGUF architecture", str(arch), GGUF_ARCHITECTURES)
    if "rope_freqs.weight" in tensor_names:
        # LLaMA-3.1 GGUFs carry their rope scaling as a per-frequency tensor; not read yet.
        raise _unsupported("GGUF rope scaling", "rope_freqs.weight", ["none", "linear"])

    def key(suffix: str, default: Any = None) -> Any:
        return metadata.get(f"{arch}.{suffix}", default)

    kv_heads = key("attention.head_count_kv", key("attention.head_count"))
    if not isinstance(kv_heads, int):
        raise _unsupported("per-layer head_count_kv", str(kv_heads), ["one value for all layers"])
    rope_type, scaling = "default", ()
    scaling_type = key("rope.scaling.type", "none")
    if scaling_type == "linear":
        rope_type, scaling = "linear", (("factor", float(key("rope.scaling.factor"))),)
    elif scaling_type != "none":
        raise _unsupported("GGUF rope scaling", str(scaling_type), ["none", "linear"])
    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    rot_dim = key("rope.dimension_count", hidden // heads)
    tokens = metadata.get("tokenizer.ggml.tokens") or ()
    eos = metadata.get("tokenizer.ggml.eos_token_id")
    return ModelSpec(
        name=name, family="llama", num_layers=int(key("block_count")), hidden=hidden,
        num_heads=heads, num_kv_heads=int(kv_heads), intermediate=int(key("feed_forward_length")),
        vocab_size=int(key("vocab_size", len(tokens))), max_seq_len=int(key("context_length")),
        norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(key("rope.freq_base", 10000.0)), rope_type=rope_type,
        rope_scaling=scaling, rotary_pct=rot_dim / (hidden // heads),
        qkv_bias="blk.0.attn_q.bias" in tensor_names,
        tie_embeddings="output.weight" not in tensor_names, activation="silu",
        bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=_eos_ids(eos),
    )
