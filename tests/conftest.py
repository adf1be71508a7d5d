"""Shared fixtures: tiny random HF checkpoints of every supported variant, and SmolLM2.

Reuse them in any test that needs a real model on disk:

- ``tiny_checkpoints``  (session) dict variant name -> HF model dir, written once by
  transformers' ``save_pretrained`` and loaded through our real loader (``open_model(path)``).
  Variants (see ``TINY_VARIANTS``): llama (GQA, tied), llama_untied, llama3_rope (LLaMA-3 rope
  scaling), qwen2 (q/k/v bias), llama_bias_linear_rope, mistral, qwen2_tied, gpt2 (Conv1D weights), neox (partial rotary + parallel
  residual), neox_sequential, and llama_sharded (same shapes as llama, many safetensors shards
  with an index json, for partial-read tests).
- ``tiny_checkpoint``   (parametrised) one dir per parity variant, for tests that should run
  on every architecture.
- ``smollm2_gguf`` / ``smollm2`` / ``smollm2_model``  (session) the SmolLM2-135M-Instruct GGUF
  path, its ModelSource, and the whole model as one float32 Stage (loaded once: ~4 s).

- ``torch_one_thread``  run a test with ``torch.set_num_threads(1)``. The model tests use it
  (``pytestmark``): their tensors are tiny, and on a 2-core machine shared with any other busy
  process two OpenMP threads spin at every barrier, which made the tiny-model tests ~6x slower
  (50 s vs 8 s measured).

transformers is imported lazily so that test files which do not use these fixtures do not pay
for it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# `hpipe run` / `demo` plan from a quick calibration of the machine by default
# (hpipe/profile/quick.py). The tests pin the analytic model instead, so a test's plan is the
# same on every machine and no test pays a calibration it does not test; subprocesses inherit
# this. tests/test_quick_calibration.py turns it back on.
os.environ.setdefault("HPIPE_CALIBRATION", "off")

# Small enough that the whole parity suite runs in seconds; heads > kv_heads where the family
# allows, so GQA is exercised. initializer_range 0.2 (not 0.02) spreads the logits so that greedy
# argmax is decided by clear margins, not by float rounding.
_COMMON = dict(vocab_size=96, initializer_range=0.2)
_LLAMA = dict(hidden_size=64, intermediate_size=112, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
              bos_token_id=1, eos_token_id=2, **_COMMON)
TINY_VARIANTS: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", _LLAMA),
    "llama_untied": ("LlamaConfig", {**_LLAMA, "tie_word_embeddings": False,
                                     "num_key_value_heads": 4, "rope_theta": 500000.0}),
    "llama3_rope": ("LlamaConfig", {**_LLAMA, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}}),
    "qwen2": ("Qwen2Config", {**_LLAMA, "tie_word_embeddings": False}),
    # Switches a user's own checkpoint may carry: biases everywhere in LLaMA, linear rope
    # scaling; Mistral's model_type; Qwen2 with tied embeddings (as Qwen2-0.5B ships).
    "llama_bias_linear_rope": ("LlamaConfig", {**_LLAMA, "attention_bias": True, "mlp_bias": True,
                                               "rope_scaling": {"rope_type": "linear",
                                                                "factor": 2.0}}),
    "mistral": ("MistralConfig", {**_LLAMA, "sliding_window": None}),
    "qwen2_tied": ("Qwen2Config", _LLAMA),
    "gpt2": ("GPT2Config", dict(n_embd=64, n_layer=4, n_head=4, n_positions=128,
                                bos_token_id=0, eos_token_id=2, **_COMMON)),
    "neox": ("GPTNeoXConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                   num_attention_heads=4, rotary_pct=0.25,
                                   use_parallel_residual=True, max_position_embeddings=128,
                                   bos_token_id=0, eos_token_id=2, **_COMMON)),
    "neox_sequential": ("GPTNeoXConfig", dict(hidden_size=64, intermediate_size=128,
                                              num_hidden_layers=4, num_attention_heads=4,
                                              rotary_pct=0.5, use_parallel_residual=False,
                                              max_position_embeddings=128, bos_token_id=0,
                                              eos_token_id=2, **_COMMON)),
}
PARITY_VARIANTS = tuple(TINY_VARIANTS)
SHARDED = "llama_sharded"


def write_tiny_checkpoint(out_dir: Path, variant: str, *, seed: int = 0,
                          max_shard_size: str | None = None) -> Path:
    """Save a random-weight transformers model of ``variant`` to ``out_dir``; return the dir."""
    import torch
    import transformers

    config_cls, kwargs = TINY_VARIANTS[variant]
    config = getattr(transformers, config_cls)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    extra = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **extra)
    return out_dir


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_checkpoints")
    out = {v: write_tiny_checkpoint(root / v, v) for v in TINY_VARIANTS}
    # ~40 KB shards: the llama weights (~0.3 MB) spread over several files + an index json.
    out[SHARDED] = write_tiny_checkpoint(root / SHARDED, "llama", max_shard_size="40KB")
    return out


@pytest.fixture(params=PARITY_VARIANTS)
def tiny_checkpoint(request, tiny_checkpoints) -> Path:
    return tiny_checkpoints[request.param]


@pytest.fixture
def torch_one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from hpipe.errors import WeightsNotFoundError
    from hpipe.model.source import find_smollm2_gguf

    try:
        return find_smollm2_gguf()
    except WeightsNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    from hpipe.model.source import open_model

    return open_model(smollm2_gguf)


@pytest.fixture(scope="session")
def smollm2_model(smollm2):
    return smollm2.load_model()


@pytest.fixture
def netns2():
    """Two emulated hosts (network namespaces, hpipe.netns), each uplink shaped to 200 Mbit/s:
    slow enough to see, fast enough for tests. Skips, with the reason, without root or
    iproute2; always torn down."""
    from hpipe.netns import netns_network, netns_unavailable_reason

    reason = netns_unavailable_reason()
    if reason:
        pytest.skip(reason)
    with netns_network(2, rates_mbit=200) as net:
        yield net


@pytest.fixture
def tripwire(monkeypatch):
    """Fail the test if anything tries to start workers (for requests refused before launch)."""
    def no_launch(*_a, **_k):
        raise AssertionError("a worker was started for a request that should be refused")

    monkeypatch.setattr("hpipe.runtime.launch_local", no_launch)
    monkeypatch.setattr("hpipe.runtime.launch.launch_local", no_launch)
