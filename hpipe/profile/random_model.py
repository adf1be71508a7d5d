"""Random-weight LLaMA checkpoints in HF layout, for profiling a preset and for benchmarks.

A layer's time does not depend on the values of its weights, so a preset (``llama-7b``) is
profiled on random weights of its shapes. ``max_layers`` writes only the first layers while
``config.json`` keeps the full depth: the profiler loads a two-block stage, so a 32-layer
model is profiled without writing 32 layers to disk. Written with ``safetensors`` directly, so
library code never imports transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from hpipe.errors import UnsupportedArchitectureError
from hpipe.spec import ModelSpec


def write_random_checkpoint(spec: ModelSpec, out_dir: Path, *, max_layers: int | None = None,
                            seed: int = 0, std: float = 0.02) -> Path:
    """config.json + model.safetensors for ``spec`` (LLaMA family) in ``out_dir``."""
    if spec.family != "llama":
        raise UnsupportedArchitectureError(
            f"random checkpoints are written for the llama family only, not {spec.family!r} "
            f"({spec.name}); profile a real checkpoint of it instead")
    out_dir.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    h, kv, inter = spec.hidden, spec.kv_dim, spec.intermediate

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    tensors = {"model.embed_tokens.weight": rand(spec.vocab_size, h),
               "model.norm.weight": torch.ones(h)}
    if not spec.tie_embeddings:
        tensors["lm_head.weight"] = rand(spec.vocab_size, h)
    n = spec.num_layers if max_layers is None else min(max_layers, spec.num_layers)
    for i in range(n):
        p = f"model.layers.{i}."
        tensors.update({
            p + "input_layernorm.weight": torch.ones(h),
            p + "post_attention_layernorm.weight": torch.ones(h),
            p + "self_attn.q_proj.weight": rand(h, h),
            p + "self_attn.k_proj.weight": rand(kv, h),
            p + "self_attn.v_proj.weight": rand(kv, h),
            p + "self_attn.o_proj.weight": rand(h, h),
            p + "mlp.gate_proj.weight": rand(inter, h),
            p + "mlp.up_proj.weight": rand(inter, h),
            p + "mlp.down_proj.weight": rand(h, inter),
        })
    save_file(tensors, str(out_dir / "model.safetensors"))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "_name_or_path": spec.name,
        "hidden_size": h, "intermediate_size": inter, "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads, "num_key_value_heads": spec.num_kv_heads,
        "vocab_size": spec.vocab_size, "max_position_embeddings": spec.max_seq_len,
        "rms_norm_eps": spec.norm_eps, "rope_theta": spec.rope_theta, "hidden_act": "silu",
        "tie_word_embeddings": spec.tie_embeddings, "bos_token_id": 1, "eos_token_id": 2,
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=1))
    return out_dir
