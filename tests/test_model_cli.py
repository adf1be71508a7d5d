"""``hpipe generate``: JSON output, slices, sampling reproducibility."""

import json

import pytest

from hpipe.cli import main

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _json_run(capsys, *argv) -> dict:
    assert main(["generate", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_generate_json_ids_and_slices(tiny_checkpoints, capsys):
    path = str(tiny_checkpoints["neox"])
    ids = "5,17,33,8,9,60,2,4,11,70"
    whole = _json_run(capsys, "--model", path, "--prompt-ids", ids, "--max-new-tokens", "5")
    sliced = _json_run(capsys, "--model", path, "--prompt-ids", ids, "--max-new-tokens", "5",
                       "--slices", "6,3,1")
    assert whole["prompt_tokens"] == 10 and sliced["slices"] == [6, 3, 1]
    assert whole["prefill_latency_s"] == whole["prefill_s"]  # `hpipe run --json`'s key too
    assert {"prompt_tokens", "output_ids", "text", "prefill_s", "decode_tok_s"} <= whole.keys()
    assert whole["text"] is None  # a tiny checkpoint without tokenizer.json: ids only
    # Achieved bandwidth as gpt-fast reports it: the bytes 4 decode steps read over their time.
    from hpipe.cost.memory import decode_read_bytes
    from hpipe.model.source import open_model

    spec = open_model(path).spec
    per_step = decode_read_bytes(spec, batch=1, context=10 + 2, elem_bytes=4)
    assert whole["decode_gb_s"] == pytest.approx(per_step * 4 / whole["decode_s"] / 1e9)
    assert sliced["output_ids"] == whole["output_ids"]


def test_generate_seeded_sampling_reproducible(tiny_checkpoints, capsys):
    args = ["--model", str(tiny_checkpoints["llama"]), "--prompt-ids", "5,6,7", "--max-new-tokens",
            "12", "--temperature", "1.5", "--top-p", "0.9"]
    a = _json_run(capsys, *args, "--seed", "7")
    b = _json_run(capsys, *args, "--seed", "7")
    greedy = _json_run(capsys, "--model", str(tiny_checkpoints["llama"]), "--prompt-ids", "5,6,7",
                       "--max-new-tokens", "12")
    assert a["output_ids"] == b["output_ids"]
    assert a["output_ids"] != greedy["output_ids"]  # temperature 1.5 on spread logits: not argmax


def test_generate_smollm2_chat_text(smollm2, capsys, monkeypatch):
    # Reuse the session's opened GGUF (parsing its metadata costs ~5 s); the CLI path is the same.
    monkeypatch.setattr("hpipe.model.source.open_model", lambda name: smollm2)
    out = _json_run(capsys, "--model", "smollm2", "--prompt", "What is the capital of France?",
                    "--max-new-tokens", "12")
    assert "Paris" in out["text"]
    assert out["prompt_tokens"] == len(smollm2.tokenizer.encode(
        smollm2.tokenizer.chat_prompt("What is the capital of France?")))


@pytest.mark.parametrize("flags", [(), ("--no-chat",), ("--chat",)])
def test_run_feeds_the_same_prompt_ids_as_generate(smollm2, flags):
    # `hpipe run --prompt TEXT` used to skip the chat template that `hpipe generate --prompt TEXT`
    # applies by default, so the pipeline answered another prompt than the reference (SmolLM2
    # ended at once on the raw question).
    from hpipe.cli import _prompt_ids, build_parser
    from hpipe.commands.run import prompt_rows

    text = ["--prompt", "What is the capital of France?", *flags]
    run_args = build_parser().parse_args(["run", "--model", "smollm2", *text])
    gen_args = build_parser().parse_args(["generate", "--model", "smollm2", *text])
    ids = _prompt_ids(gen_args, smollm2.tokenizer)
    assert prompt_rows(run_args, smollm2.tokenizer) == [ids]
    raw = smollm2.tokenizer.encode("What is the capital of France?")
    assert (ids == raw) == (flags == ("--no-chat",))


def test_run_refuses_chat_and_question_without_text(smollm2):
    from hpipe.cli import build_parser
    from hpipe.commands.run import prompt_rows
    from hpipe.errors import PromptShapeError

    for flag in (["--chat"], ["--question", "why?"]):
        args = build_parser().parse_args(["run", "--model", "smollm2", "--prompt-ids", "1,2", *flag])
        with pytest.raises(PromptShapeError, match=f"{flag[0]} needs text"):
            prompt_rows(args, smollm2.tokenizer)


def test_generate_threads_sets_torch_threads(tiny_checkpoints, capsys):
    import torch

    before = torch.get_num_threads()
    try:
        out = _json_run(capsys, "--model", str(tiny_checkpoints["llama"]), "--prompt-ids",
                        "5,6,7", "--max-new-tokens", "2", "--threads", "2")
        assert out["threads"] == 2 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_generate_refuses_zero_threads(capsys):
    assert main(["generate", "--prompt", "hi", "--threads", "0"]) == 2
    assert "--threads" in capsys.readouterr().err
