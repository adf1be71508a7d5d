"""Our decoder against transformers on tiny random checkpoints of every supported variant.

Both sides load the same safetensors; we go through our own loader (name mapping, Conv1D
transposes, NeoX qkv reorder, q/k/v fusion). 1e-4 absolute on float32 logits is far above
reordering noise (~1e-6 here) and far below any real mistake (a wrong rotary or norm moves
logits by O(0.1)).
"""

import pytest
import torch

from hpipe.model.generate import generate
from hpipe.model.source import open_model

pytestmark = pytest.mark.usefixtures("torch_one_thread")

LOGIT_ATOL = 1e-4


def _hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _prompt(vocab: int, batch: int = 2, tokens: int = 40, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, tokens), generator=g)


@torch.inference_mode()
def test_logits_match_transformers(tiny_checkpoint):
    src = open_model(tiny_checkpoint)
    ours = src.load_model()
    ids = _prompt(src.spec.vocab_size)
    logits = ours(ids, ours.new_cache(batch=2, max_tokens=ids.shape[1]))
    ref = _hf_model(tiny_checkpoint)(ids).logits
    assert logits.shape == ref.shape
    err = (logits - ref).abs().max().item()
    assert err < LOGIT_ATOL, f"{tiny_checkpoint.name}: max |ours - hf| = {err:.2e}"


@torch.inference_mode()
def test_greedy_tokens_match_transformers(tiny_checkpoint):
    src = open_model(tiny_checkpoint)
    ids = _prompt(src.spec.vocab_size, batch=1, tokens=12, seed=2)
    new_tokens = 16
    ours = generate(src, ids, max_new_tokens=new_tokens, eos_token_ids=())
    # Reference: transformers' full forward recomputed each step (no cache), argmax.
    hf = _hf_model(tiny_checkpoint)
    seq = ids
    for _ in range(new_tokens):
        nxt = hf(seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert list(ours.output_ids[0]) == seq[0, ids.shape[1]:].tolist()


def test_spec_reads_variant_switches(tiny_checkpoints):
    spec = {v: open_model(p).spec for v, p in tiny_checkpoints.items()}
    assert spec["llama"].tie_embeddings and spec["llama"].num_kv_heads == 2
    assert not spec["llama_untied"].tie_embeddings and spec["llama_untied"].rope_theta == 500000.0
    assert spec["llama3_rope"].rope_type == "llama3"
    assert dict(spec["llama3_rope"].rope_scaling)["original_max_position_embeddings"] == 32
    assert spec["qwen2"].qkv_bias and not spec["qwen2"].attn_out_bias
    assert spec["gpt2"].family == "gpt2" and spec["gpt2"].activation == "gelu_tanh"
    assert spec["neox"].rotary_pct == pytest.approx(0.25) and spec["neox"].parallel_residual
    assert not spec["neox_sequential"].parallel_residual
