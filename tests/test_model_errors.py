"""Errors a user can cause are typed ValueErrors whose message names the values and the fix."""

import json
import re

import pytest
import torch

from hpipe.cli import main
from hpipe.errors import (
    PromptTooLongError,
    SliceError,
    UnsupportedArchitectureError,
    WeightsNotFoundError,
)
from hpipe.model.config import spec_from_gguf_metadata, spec_from_hf_config
from hpipe.model.generate import Sampler, SamplingError, generate, validate_slices
from hpipe.model.source import open_model

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_missing_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(WeightsNotFoundError, match=r"no model at .*no-such-model.*smollm2"):
        open_model(missing)


def test_dir_without_safetensors(tmp_path, tiny_checkpoints):
    (tmp_path / "config.json").write_text((tiny_checkpoints["llama"] / "config.json").read_text())
    with pytest.raises(WeightsNotFoundError, match=r"no \*\.safetensors in"):
        open_model(tmp_path)


def test_unsupported_architecture(tmp_path, tiny_checkpoints):
    cfg = json.loads((tiny_checkpoints["llama"] / "config.json").read_text())
    cfg.update(model_type="mamba", architectures=["MambaForCausalLM"])
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError,
                       match=r"'mamba' \(MambaForCausalLM\).*gpt2, gpt_neox, llama, mistral, qwen2"):
        open_model(tmp_path)


def test_unsupported_rope_type_and_gguf_arch():
    with pytest.raises(UnsupportedArchitectureError, match=r"rope scaling type 'yarn'.*llama3"):
        spec_from_hf_config({"model_type": "llama", "vocab_size": 10, "hidden_size": 8,
                             "num_attention_heads": 2, "num_hidden_layers": 1,
                             "intermediate_size": 16,
                             "rope_parameters": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(UnsupportedArchitectureError, match=r"GGUF architecture 'phi3'.*llama, qwen2"):
        spec_from_gguf_metadata({"general.architecture": "phi3"}, (), name="x")


def test_prompt_longer_than_context(tiny_checkpoints):
    src = open_model(tiny_checkpoints["llama"])  # max_position_embeddings = 128
    with pytest.raises(PromptTooLongError, match=r"prompt of 130 tokens exceeds .*context of 128"):
        generate(src, [[5] * 130], max_new_tokens=1)
    with pytest.raises(PromptTooLongError, match=r"120 tokens \+ 20 new tokens.*<= 8"):
        generate(src, [[5] * 120], max_new_tokens=20)


def test_cache_overflow_is_typed(tiny_checkpoints):
    model = open_model(tiny_checkpoints["gpt2"]).load_model()
    cache = model.new_cache(batch=1, max_tokens=4)
    with pytest.raises(PromptTooLongError, match=r"holds 0 of 4 tokens and cannot take 5"):
        model(torch.ones(1, 5, dtype=torch.long), cache)


def test_slices_not_summing_to_prompt():
    with pytest.raises(SliceError, match=r"sum to 7 but the prompt has 10 tokens"):
        validate_slices([4, 3], 10)
    with pytest.raises(SliceError, match=r"length <= 0"):
        validate_slices([10, 0], 10)


def test_bad_sampling_settings():
    with pytest.raises(SamplingError, match=r"top_p 1.5 outside"):
        Sampler(temperature=1.0, top_p=1.5)
    # nan reached torch.multinomial ("probability tensor contains inf, nan"); a seed past 64
    # bits was a bare "Overflow when unpacking long long".
    with pytest.raises(SamplingError, match=r"temperature nan is not a number >= 0"):
        Sampler(temperature=float("nan"))
    with pytest.raises(SamplingError, match=r"seed 18446744073709551616 does not fit in 64 bits"):
        Sampler(temperature=1.0, seed=2**64)


def test_cli_prints_one_line_and_exits_2(tiny_checkpoints, capsys):
    code = main(["generate", "--model", str(tiny_checkpoints["llama"]),
                 "--prompt-ids", "5,6,7,8,9", "--slices", "2,2", "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "slices [2, 2] sum to 4 but the prompt has 5 tokens" in err


def test_cli_missing_model_exits_2(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nope.gguf"), "--prompt", "hi"]) == 2
    assert "no model at" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    # Each of these was a traceback (IndexError from the embedding, torch's AssertionError and
    # RuntimeError) or a KV-cache message that did not name the flag.
    (["--prompt-ids", "5,1000"], r"token id 1000 is outside the vocabulary \[0, 96\) of 'llama'"),
    (["--prompt-ids", "5,6", "--max-new-tokens", "-1"], "--max-new-tokens: must be >= 0, got -1"),
    (["--prompt-ids", "5,6", "--device", "tpu"], "--device 'tpu' is not a torch device"),
    pytest.param(["--prompt-ids", "5,6", "--device", "cuda"], "sees no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has CUDA")),
    (["--prompt-file", "."], "--prompt-file '.' is not a file"),
    (["--prompt-file", "__binary__"], r"is not UTF-8 text \(byte 1: invalid start byte\)"),
])
def test_generate_cli_input_mistakes_are_one_line(tiny_checkpoints, capsys, tmp_path, argv,
                                                  message):
    if "__binary__" in argv:  # a binary file given as the prompt: a UnicodeDecodeError before
        (tmp_path / "bin.txt").write_bytes(b"a\xff\xfe")
        argv = [str(tmp_path / "bin.txt") if a == "__binary__" else a for a in argv]
    assert main(["generate", "--model", str(tiny_checkpoints["llama"]), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert re.search(message, err), err


@pytest.mark.parametrize("template,match", [
    ("{% for m in messages %}{{ m['content'] }{% endfor %}", "TemplateSyntaxError: unexpected '}'"),
    ("{{ raise_exception('System role required') }}", "TemplateError: System role required"),
])
def test_a_chat_template_that_fails_is_a_typed_error_naming_no_chat(template, match):
    # A user's checkpoint may ship a template that raises for a lone user turn or does not
    # parse; it was a jinja2 traceback from both generate and run.
    from tokenizers import Tokenizer as Backend
    from tokenizers import models

    from hpipe.errors import ChatTemplateError
    from hpipe.model.tokenizer import Tokenizer

    backend = Backend(models.WordLevel(vocab={"<unk>": 0, "hi": 1}, unk_token="<unk>"))
    tok = Tokenizer(backend, eos_token_ids=(), bos_token=None, eos_token=None,
                    chat_template=template)
    with pytest.raises(ChatTemplateError, match=f"{match}; pass --no-chat"):
        tok.chat_prompt("hi")


def _copy_checkpoint(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_damaged_checkpoint_files_are_named(tmp_path, tiny_checkpoints):
    # Each was a traceback (KeyError, SafetensorError, tokenizers' bare Exception).
    from hpipe.errors import ModelSpecError, TokenizerNotFoundError

    bad = _copy_checkpoint(tiny_checkpoints["llama"], tmp_path / "no_layers")
    cfg = json.loads((bad / "config.json").read_text())
    del cfg["num_hidden_layers"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelSpecError, match=r"has no 'num_hidden_layers', which a llama config"):
        open_model(bad)

    bad = _copy_checkpoint(tiny_checkpoints["llama"], tmp_path / "truncated")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(WeightsNotFoundError, match=r"cannot read safetensors file .*truncated"):
        open_model(bad).load_model()

    bad = _copy_checkpoint(tiny_checkpoints["llama_sharded"], tmp_path / "lost_shard")
    shard = sorted(bad.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(WeightsNotFoundError, match=f"cannot read safetensors file .*{shard.name}"):
        open_model(bad).load_model()

    bad = _copy_checkpoint(tiny_checkpoints["llama"], tmp_path / "bad_tokenizer")
    (bad / "tokenizer.json").write_text("{not json")
    src = open_model(bad)  # ids still work
    assert generate(src.load_model(), [[5, 6]], max_new_tokens=2).output_ids
    with pytest.raises(TokenizerNotFoundError, match=r"cannot read the tokenizer of .*--prompt-ids"):
        src.tokenizer.encode("hi")


def test_truncated_gguf_is_named_when_opened(tmp_path, smollm2_gguf):
    # A cut download: a struct.error traceback (header) or a reshape error in every worker (data).
    data = smollm2_gguf.read_bytes()
    for name, size, match in [("header.gguf", 5000, r"header ends early at 5000 bytes"),
                              ("data.gguf", len(data) - 1000, r"tensor '.*' ends at byte"),
                              ("empty.gguf", 0, r"not a GGUF file \(too short\)")]:
        (tmp_path / name).write_bytes(data[:size])
        with pytest.raises(WeightsNotFoundError, match=match):
            open_model(tmp_path / name)
