"""ModelSpec: the shape of a decoder, enough to plan, simulate and build it.

Planning and simulation need only shapes (layers, hidden size, heads, vocabulary), so the
presets below carry no weights. The model code reads the remaining fields (norm kind, rotary
settings, biases) to build a real decoder; loaders for HF ``config.json`` and GGUF metadata
live in ``hpipe.model.config`` and return this same type.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass

from hpipe.errors import ModelSpecError, UnknownPresetError

FAMILIES = ("llama", "gpt2", "neox")
# The planners, by the paper's names; "manual" is a user-given split and/or slicing. Every one
# plans, simulates and runs.
METHODS = ("hpipe", "base", "gpipe", "gpb", "megatron", "terapipe", "tpt", "manual")
# Compute and wire dtypes, by torch's names.
DTYPES = ("float16", "bfloat16", "float32")


# What a plan is made for (hpipe plan --objective): the prefill's latency (the paper's), one
# request's whole latency with its decode steps, or output tokens/s of many running requests.
OBJECTIVES = ("prefill", "latency", "throughput")


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of ``dtype`` (one of DTYPES)."""
    return 4 if dtype == "float32" else 2


@dataclass(frozen=True)
class ModelSpec:
    """Shape and architecture switches of a decoder-only transformer.

    ``family`` picks the block structure:
      - "llama": RMSNorm, rotary, SwiGLU MLP, grouped-query attention (LLaMA, Mistral, Qwen2, SmolLM);
      - "gpt2":  LayerNorm, learned absolute positions, GELU MLP, biases everywhere;
      - "neox":  LayerNorm, partial rotary, GELU MLP, optional parallel residual.
    """

    name: str
    family: str
    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    intermediate: int
    vocab_size: int
    max_seq_len: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # LLaMA-3 style rope scaling as sorted (key, value) pairs, e.g. (("factor", 8.0), ...).
    # A tuple keeps the dataclass hashable and frozen.
    rope_scaling: tuple[tuple[str, float], ...] = ()
    rotary_pct: float = 1.0  # fraction of head_dim that is rotated (GPT-NeoX uses 0.25)
    parallel_residual: bool = False  # GPT-NeoX: x + attn(ln1(x)) + mlp(ln2(x))
    qkv_bias: bool = False  # Qwen2 has q/k/v biases; GPT-2/NeoX have all biases
    tie_embeddings: bool = False
    activation: str = "silu"  # "silu" (SwiGLU), "gelu" (exact), "gelu_tanh" (GPT-2 "gelu_new")
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Added for the real decoder (hpipe.model); defaults keep the presets unchanged.
    rope_type: str = "default"  # "default", "linear" or "llama3"; its numbers sit in rope_scaling
    attn_out_bias: bool = False  # LLaMA configs with attention_bias=True also bias o_proj
    mlp_bias: bool = False  # LLaMA configs with mlp_bias=True

    def __post_init__(self) -> None:
        # A config file or a plan file can carry any of these: typed errors, not asserts.
        if self.family not in FAMILIES:
            raise ModelSpecError(f"model {self.name!r}: family {self.family!r} is not one of "
                                 f"{FAMILIES}")
        sizes = {"num_layers": self.num_layers, "hidden": self.hidden,
                 "num_heads": self.num_heads, "num_kv_heads": self.num_kv_heads,
                 "intermediate": self.intermediate, "vocab_size": self.vocab_size,
                 "max_seq_len": self.max_seq_len}
        for field_name, value in sizes.items():
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                raise ModelSpecError(f"model {self.name!r}: {field_name} must be a positive "
                                     f"integer, got {value!r}")
        if self.hidden % self.num_heads:
            raise ModelSpecError(f"model {self.name!r}: hidden {self.hidden} is not divisible "
                                 f"by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ModelSpecError(f"model {self.name!r}: num_heads {self.num_heads} is not "
                                 f"divisible by num_kv_heads {self.num_kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.num_heads

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def layer_flops(self, *, batch: int, tokens: int, prefix: int) -> float:
        """FLOPs of one block on ``batch`` rows of ``tokens`` after ``prefix`` cached ones:
        the matmuls over its weights plus causal attention over the earlier keys
        (algorithms.md section 2; the analytic cost model, the bound and the serving slice
        cap all price work with it)."""
        return (2.0 * batch * tokens * self.params_per_layer()
                + 4.0 * batch * self.hidden * tokens * (prefix + tokens / 2.0))

    def params_per_layer(self) -> int:
        """Weights of one transformer block (norm weights included, biases approximated)."""
        h, kv = self.hidden, self.kv_dim
        attn = h * h + 2 * h * kv + h * h  # q, k, v, o
        if self.family == "llama":
            mlp = 3 * h * self.intermediate  # gate, up, down
            norms = 2 * h
        else:
            mlp = 2 * h * self.intermediate + self.intermediate + h  # fc, proj + biases
            norms = 4 * h
            attn += 3 * h + h  # qkv and out biases
        return attn + mlp + norms

    def embedding_params(self) -> int:
        """Token embedding, plus the learned position table for GPT-2."""
        pos = self.max_seq_len * self.hidden if self.family == "gpt2" else 0
        return self.vocab_size * self.hidden + pos

    def head_params(self) -> int:
        """Final norm plus the LM head (counted even when tied: each stage holds its own copy)."""
        return self.vocab_size * self.hidden + self.hidden

    def total_params(self) -> int:
        head = self.head_params() - (self.vocab_size * self.hidden if self.tie_embeddings else 0)
        return self.num_layers * self.params_per_layer() + self.embedding_params() + head

    def kv_bytes_per_token_per_layer(self, bytes_per_elem: int) -> int:
        return 2 * self.kv_dim * bytes_per_elem

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["rope_scaling"] = dict(self.rope_scaling)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelSpec:
        d = dict(d)
        d["rope_scaling"] = tuple(sorted((d.get("rope_scaling") or {}).items()))
        d["eos_token_ids"] = tuple(d.get("eos_token_ids") or ())
        return cls(**d)


# Exact-name presets, shapes only. Sources: the LLaMA, LLaMA-2 and LLaMA-3 model cards /
# config.json files; GPT-3 sizes from Brown et al. 2020, Table 2.1 (the paper's "GPT3-2B" is
# GPT-3 2.7B: 32 layers, d_model 2560, 32 heads, as TeraPipe's config also has it).
_LLAMA31_ROPE = (("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
                 ("original_max_position_embeddings", 8192.0))
_PRESETS: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec(name="llama-7b", family="llama", num_layers=32, hidden=4096, num_heads=32,
                  num_kv_heads=32, intermediate=11008, vocab_size=32000, max_seq_len=2048,
                  norm_eps=1e-6),
        ModelSpec(name="llama-13b", family="llama", num_layers=40, hidden=5120, num_heads=40,
                  num_kv_heads=40, intermediate=13824, vocab_size=32000, max_seq_len=2048,
                  norm_eps=1e-6),
        # LLaMA-2 7B with a 32k context (rope-scaled long-context fine-tunes such as
        # LLaMA-2-7B-32K keep these shapes); used for the sequence-length sweep up to 32k.
        ModelSpec(name="llama-2-7b-32k", family="llama", num_layers=32, hidden=4096,
                  num_heads=32, num_kv_heads=32, intermediate=11008, vocab_size=32000,
                  max_seq_len=32768, norm_eps=1e-5),
        ModelSpec(name="llama-3-8b", family="llama", num_layers=32, hidden=4096, num_heads=32,
                  num_kv_heads=8, intermediate=14336, vocab_size=128256, max_seq_len=8192,
                  rope_theta=500000.0),
        ModelSpec(name="llama-70b", family="llama", num_layers=80, hidden=8192, num_heads=64,
                  num_kv_heads=8, intermediate=28672, vocab_size=32000, max_seq_len=4096),
        ModelSpec(name="gpt3-2.7b", family="gpt2", num_layers=32, hidden=2560, num_heads=32,
                  num_kv_heads=32, intermediate=4 * 2560, vocab_size=50257, max_seq_len=2048,
                  activation="gelu_tanh", qkv_bias=True, tie_embeddings=True),
        ModelSpec(name="gpt3-6.7b", family="gpt2", num_layers=32, hidden=4096, num_heads=32,
                  num_kv_heads=32, intermediate=4 * 4096, vocab_size=50257, max_seq_len=2048,
                  activation="gelu_tanh", qkv_bias=True, tie_embeddings=True),
        ModelSpec(name="smollm2-135m", family="llama", num_layers=30, hidden=576, num_heads=9,
                  num_kv_heads=3, intermediate=1536, vocab_size=49152, max_seq_len=8192,
                  rope_theta=100000.0, tie_embeddings=True),
        # Llama-3.1 (config.json of meta-llama/Llama-3.1-{8B,70B,405B}): 128k context through
        # llama3 rope scaling of an 8k original.
        *(ModelSpec(name=f"llama-3.1-{size}", family="llama", num_layers=layers, hidden=hidden,
                    num_heads=heads, num_kv_heads=8, intermediate=inter, vocab_size=128256,
                    max_seq_len=131072, rope_theta=500000.0, rope_type="llama3",
                    rope_scaling=_LLAMA31_ROPE, eos_token_ids=(128001, 128008, 128009))
          for size, layers, hidden, heads, inter in (
              ("8b", 32, 4096, 32, 14336), ("70b", 80, 8192, 64, 28672),
              ("405b", 126, 16384, 128, 53248))),
        # Qwen2.5 (config.json of Qwen/Qwen2.5-{7B,32B,72B}): q/k/v biases; 32k native context
        # (the model cards reach 128k with YaRN, which the runtime does not implement).
        *(ModelSpec(name=f"qwen2.5-{size}", family="llama", num_layers=layers, hidden=hidden,
                    num_heads=heads, num_kv_heads=kv, intermediate=inter, vocab_size=152064,
                    max_seq_len=32768, rope_theta=1000000.0, norm_eps=1e-6, qkv_bias=True)
          for size, layers, hidden, heads, kv, inter in (
              ("7b", 28, 3584, 28, 4, 18944), ("32b", 64, 5120, 40, 8, 27648),
              ("72b", 80, 8192, 64, 8, 29568))),
        # Mistral-7B v0.3 (config.json of mistralai/Mistral-7B-v0.3).
        ModelSpec(name="mistral-7b", family="llama", num_layers=32, hidden=4096, num_heads=32,
                  num_kv_heads=8, intermediate=14336, vocab_size=32768, max_seq_len=32768,
                  rope_theta=1000000.0),
    )
}


def preset_names() -> tuple[str, ...]:
    return tuple(sorted(_PRESETS))


def model_preset(name: str) -> ModelSpec:
    """The preset called exactly ``name``; an unknown name lists the valid ones."""
    try:
        return _PRESETS[name]
    except KeyError:
        raise UnknownPresetError(
            f"unknown model preset {name!r}; valid presets: {', '.join(preset_names())} "
            "(or pass a path to an HF model dir or a GGUF file)"
        ) from None
