"""SmolLM2-135M-Instruct from its GGUF as shipped: parity with transformers, tokenizer, answers.

Tolerance for logits vs transformers' own GGUF load: both sides dequantize the same Q4_1/Q8_0
blocks with the gguf package and undo the same Q/K permutation, so the float32 weights are
identical, and our kernels are the ones transformers calls (SDPA, rotate-half RoPE, float32
RMSNorm). Observed difference: exactly 0 on 2048 tokens (benchmarks/model_speed.py). We allow
1e-4 absolute, the same bound as the tiny-model parity, on logits that reach ~30: a different
BLAS blocking would stay far inside it, a real mistake (RoPE layout, an un-permuted Q) gives O(1).
"""

import pytest
import torch

from hpipe.demo import DOCUMENT_PATH, EXPECTED_ANSWER, demo_prompt_text
from hpipe.model.generate import generate

pytestmark = pytest.mark.usefixtures("torch_one_thread")

SMOLLM2_LOGIT_ATOL = 1e-4


@pytest.fixture(scope="module")
def hf_gguf_model(smollm2_gguf):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from model_speed import load_transformers  # transformers' GGUF reader into its LlamaForCausalLM

    return load_transformers(smollm2_gguf)


def test_spec_from_gguf_matches_preset(smollm2):
    from hpipe.spec import model_preset

    preset, spec = model_preset("smollm2-135m"), smollm2.spec
    for field in ("family", "num_layers", "hidden", "num_heads", "num_kv_heads", "intermediate",
                  "vocab_size", "max_seq_len", "rope_theta", "tie_embeddings"):
        assert getattr(spec, field) == getattr(preset, field), field
    assert spec.eos_token_ids == (2,)  # <|im_end|>


@torch.inference_mode()
def test_logits_match_transformers_gguf_load(smollm2, smollm2_model, hf_gguf_model):
    prompt = smollm2.tokenizer.chat_prompt("Explain in two sentences why the sky is blue.")
    ids = torch.tensor([smollm2.tokenizer.encode(prompt) * 6])  # ~300 tokens
    ours = smollm2_model(ids, smollm2_model.new_cache(batch=1, max_tokens=ids.shape[1]))
    ref = hf_gguf_model(ids, use_cache=False).logits
    err = (ours - ref).abs().max().item()
    assert err < SMOLLM2_LOGIT_ATOL, f"max |ours - hf| = {err:.2e}"
    assert torch.equal(ours[0].argmax(-1), ref[0].argmax(-1))


def test_tokenizer_matches_transformers_gguf_tokenizer(smollm2, smollm2_gguf):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    texts = [
        "Hello world 12345 it's 3.14159!",
        "  leading spaces\n\nnew\tlines and  double  spaces ",
        "Ünïcödé — naïve café, 東京, emoji 🚀",
        smollm2.tokenizer.chat_prompt("What is the capital of France?"),
        DOCUMENT_PATH.read_text()[:3000],
    ]
    for text in texts:
        ours = smollm2.tokenizer.encode(text)
        assert ours == hf.encode(text, add_special_tokens=False), text[:40]
        assert smollm2.tokenizer.decode(ours) == hf.decode(ours, skip_special_tokens=True)


def test_chat_template_renders_chatml(smollm2):
    prompt = smollm2.tokenizer.chat_prompt("Hi")
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert prompt.startswith("<|im_start|>system\n")
    ids = smollm2.tokenizer.encode(prompt)
    assert ids[0] == 1 and ids.count(1) == 3  # <|im_start|> as single special tokens


def test_answers_capital_of_france(smollm2, smollm2_model):
    tok = smollm2.tokenizer
    ids = tok.encode(tok.chat_prompt("What is the capital of France?"))
    result = generate(smollm2_model, [ids], max_new_tokens=16, eos_token_ids=tok.eos_token_ids)
    assert "Paris" in tok.decode(result.output_ids[0])


def test_sliced_prefill_same_answer(smollm2, smollm2_model):
    tok = smollm2.tokenizer
    ids = tok.encode(tok.chat_prompt("Name three primary colours."))
    n = len(ids)
    whole = generate(smollm2_model, [ids], max_new_tokens=10, eos_token_ids=())
    sliced = generate(smollm2_model, [ids], max_new_tokens=10, slices=(n - 11, 7, 1, 3),
                      eos_token_ids=())
    assert sliced.output_ids == whole.output_ids
    assert (sliced.prefill_logits - whole.prefill_logits).abs().max().item() < 1e-4


def test_demo_prompt_fits_and_names_answer(smollm2):
    document = DOCUMENT_PATH.read_text()
    assert EXPECTED_ANSWER in document
    ids = smollm2.tokenizer.encode(smollm2.tokenizer.chat_prompt(demo_prompt_text(document)))
    assert 3000 <= len(ids) <= smollm2.spec.max_seq_len
