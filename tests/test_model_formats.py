"""Checkpoint formats beyond the fixtures' defaults: an HF tokenizer dir, and a GGUF we write.

The GGUF test writes a tiny LLaMA (GQA) the way llama.cpp's converter does (Q/K rows permuted,
``output.weight`` omitted when tied, metadata under ``llama.*``) and checks our loader against
transformers on the original safetensors: it exercises the permutation with kv_heads < heads
and the GGUF spec reader on a file other than SmolLM2's.
"""

import json

import pytest
import torch

from hpipe.model.source import open_model
from hpipe.model.tokenizer import tokenizer_from_hf_dir

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _write_llama_gguf(hf_dir, out_path) -> None:
    import gguf
    from safetensors.torch import load_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    w = load_file(hf_dir / "model.safetensors")
    writer = gguf.GGUFWriter(str(out_path), "llama")
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    writer.add_vocab_size(cfg["vocab_size"])
    # Arrays of strings and numbers, as a real file's vocabulary has (no "gpt2" tokenizer model:
    # the loader must then fall back to ids only).
    writer.add_token_list([f"tok{i}" for i in range(cfg["vocab_size"])])
    writer.add_token_types([1] * cfg["vocab_size"])
    names = {"embed_tokens": "token_embd", "norm": "output_norm"}
    sub = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
           "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
           "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
           "mlp.down_proj": "ffn_down"}
    for name, t in w.items():
        parts = name.removeprefix("model.").removesuffix(".weight")
        if parts.startswith("layers."):
            _, i, rest = parts.split(".", 2)
            if rest == "self_attn.q_proj":
                t = _llama_cpp_permute(t, cfg["num_attention_heads"])
            elif rest == "self_attn.k_proj":
                t = _llama_cpp_permute(t, cfg["num_key_value_heads"])
            gname = f"blk.{i}.{sub[rest]}.weight"
        else:
            gname = f"{names[parts]}.weight"
        writer.add_tensor(gname, t.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@torch.inference_mode()
def test_gguf_written_like_llama_cpp_matches_transformers(tiny_checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM

    hf_dir = tiny_checkpoints["llama"]  # tied, 4 heads over 2 kv heads
    path = tmp_path / "tiny-llama.gguf"
    _write_llama_gguf(hf_dir, path)
    src = open_model(path)
    assert src.spec.num_kv_heads == 2 and src.spec.tie_embeddings
    model = src.load_model()
    ids = torch.randint(3, src.spec.vocab_size, (1, 24), generator=torch.Generator().manual_seed(5))
    ours = model(ids, model.new_cache(batch=1, max_tokens=24))
    ref = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()(ids).logits
    assert (ours - ref).abs().max().item() < 1e-4


def test_gguf_parser_agrees_with_gguf_reader(tiny_checkpoints, tmp_path):
    import gguf
    import numpy as np

    from hpipe.model.gguf_file import GGUFFile

    path = tmp_path / "tiny-llama.gguf"
    _write_llama_gguf(tiny_checkpoints["llama"], path)
    ours, ref = GGUFFile(path), gguf.GGUFReader(path)
    ref_meta = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert ours.metadata.keys() == ref_meta.keys()
    for key, value in ref_meta.items():
        assert ours.metadata[key] == pytest.approx(value) if isinstance(value, float) else (
            ours.metadata[key] == value), key
    assert [t.name for t in ref.tensors] == list(ours.tensors)
    for t in ref.tensors:
        info = ours.tensors[t.name]
        assert info.shape == tuple(int(d) for d in t.shape) and info.ggml_type == int(t.tensor_type)
        assert np.array_equal(ours.tensor_data(info), t.data), t.name


def test_hf_tokenizer_dir_roundtrip(smollm2, tmp_path):
    """tokenizer.json + tokenizer_config.json (template, specials) + generation_config eos."""
    smollm2.tokenizer.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": smollm2.tokenizer.chat_template,
        "bos_token": {"content": "<|im_start|>"}, "eos_token": "<|im_end|>"}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    tok = tokenizer_from_hf_dir(tmp_path, eos_token_ids=(2,))
    prompt = tok.chat_prompt("Hi there")
    assert prompt == smollm2.tokenizer.chat_prompt("Hi there")
    assert tok.encode(prompt) == smollm2.tokenizer.encode(prompt)
    assert tok.eos_token_ids == (2, 0)
    assert tok.decode(tok.encode("naïve café 42")) == "naïve café 42"


def test_bos_not_doubled_when_prompt_text_carries_it(smollm2, tmp_path):
    from tokenizers import processors

    backend = smollm2.tokenizer.backend
    backend_copy = type(backend).from_str(backend.to_str())
    backend_copy.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
    backend_copy.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|endoftext|>"}))
    tok = tokenizer_from_hf_dir(tmp_path, eos_token_ids=())
    assert tok.encode("hello")[0] == 0  # BOS added to plain text
    assert tok.encode("<|endoftext|>hello").count(0) == 1  # but not twice
