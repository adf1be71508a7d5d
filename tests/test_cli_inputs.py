"""Bad input through the planning CLI: one clear line, exit 2, nothing half-done."""

import pytest

from hpipe.cli import main
from hpipe.errors import PlanMismatchError
from hpipe.plan.plan import Plan


def test_simulate_all_refuses_a_sequence_beyond_context_instead_of_a_table(capsys):
    assert main(["simulate", "--method", "all", "--seq-len", "4096"]) == 2
    err = capsys.readouterr().err
    assert "exceeds" in err and "2048" in err


@pytest.mark.parametrize("text,match", [
    ("not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    ('{"method": "hpipe"}', "missing field"),
])
def test_malformed_plan_files_are_refused_by_name(text, match):
    with pytest.raises(PlanMismatchError, match=match):
        Plan.from_json(text)


def test_plan_accepts_the_bundled_model_name(capsys):
    assert main(["plan", "--model", "smollm2", "--cluster", "local:2", "--seq-len", "512",
                 "--batch", "1", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "layers [  0," in out and "cpu1" in out


def test_layer_lists_are_checked_by_argparse(capsys):
    assert main(["plan", "--method", "manual", "--layers", "8,x"]) == 2
    err = capsys.readouterr().err
    assert "hpipe plan: error: argument --layers: '8,x' is not a comma-separated" in err


def test_run_text_report_shows_the_ids_of_a_model_without_tokenizer():
    # It printed "(no tokenizer; ids in --json)": the run's output was lost unless re-run.
    from hpipe.commands.run import format_report

    stage = {"device": "cpu0", "layers": [0, 4], "busy_prefill_s": 0.1, "busy_decode_s": 0.1,
             "peak_memory_bytes": 2**20, "tp_degree": 1, "prefill_allreduce_s": 0.0}
    rep = {"model": "tiny", "cluster": "local:1", "cost_model": "analytic", "method": "hpipe",
           "batch": 2,
           "prompt_tokens": 4, "slices": [4], "emulated": False,
           "output": {"text": [None, None], "ids": [[7, 8, 9], [3]]},
           "prefill_latency_s": 0.1, "predicted_prefill_latency_s": 0.1, "prefill_tok_s": 80.0,
           "ttft_s": 0.1, "decode_tok_s": 10.0, "decode_gb_s": 1.2, "num_decode_steps": 2,
           "latency_s": 0.3,
           "stages": [stage]}
    assert format_report(rep).splitlines()[:4] == ["7 8 9", "", "3", ""]


def test_output_paths_are_prepared_before_the_work(tmp_path, capsys, tripwire):
    # A --png/--trace/--out in a folder that did not exist was a FileNotFoundError traceback
    # after the simulation, the run, or minutes of profiling, whose results it then lost.
    png = tmp_path / "new" / "sub" / "base.png"
    assert main(["simulate", "--method", "base", "--seq-len", "256", "--batch", "1",
                 "--png", str(png)]) == 0
    assert png.stat().st_size > 0
    capsys.readouterr()
    assert main(["simulate", "--method", "base", "--seq-len", "256", "--batch", "1",
                 "--trace", str(tmp_path)]) == 2
    assert f"--trace {str(tmp_path)!r} is a directory" in capsys.readouterr().err
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["run", "--model", "m", "--prompt-ids", "1,2", "--trace",
                 str(blocker / "t.json")]) == 2  # refused before the model is even opened
    assert "cannot create its folder" in capsys.readouterr().err
    assert main(["profile", "--model", "llama-7b", "--cluster", "local:1", "--out",
                 str(blocker / "p.json")]) == 2
    assert "--out" in capsys.readouterr().err


def test_simulate_times_decode_and_a_given_plan(tmp_path, capsys):
    """--max-new-tokens adds TTFT / TPOT / total per method; --plan FILE and --layers time a
    plan that was not planned here, and the same plan gives the same figures both ways."""
    import json

    args = ["--cluster", "paper", "--model", "llama-7b", "--seq-len", "2048", "--batch", "1",
            "--no-tp", "--max-new-tokens", "65", "--json"]
    assert main(["simulate", *args]) == 0
    out = json.loads(capsys.readouterr().out)
    hp = out["methods"]["hpipe"]["summary"]
    assert hp["num_decode_steps"] == 64
    assert hp["latency_s"] == pytest.approx(hp["ttft_s"] + 64 * hp["tpot_s"])
    assert 0.015 < hp["tpot_s"] < 0.035  # read-bound decode, not the prefill model at 1 token
    assert main(["plan", "--cluster", "paper", "--model", "llama-7b", "--seq-len", "2048",
                 "--batch", "1", "--no-tp", "--json"]) == 0
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(capsys.readouterr().out)
    assert main(["simulate", "--plan", str(plan_file), "--max-new-tokens", "65", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)["methods"]["hpipe"]["summary"]
    assert again["latency_s"] == pytest.approx(hp["latency_s"])
    layers = [b - a for a, b in (s["layers"] for s in out["methods"]["hpipe"]["plan"]["stages"])]
    slices = out["methods"]["hpipe"]["plan"]["slices"]
    assert main(["simulate", *args[:-1], "--layers", ",".join(map(str, layers)), "--slices",
                 ",".join(map(str, slices))]) == 0
    text = capsys.readouterr().out
    assert "tpot_ms" in text and "manual" in text
    assert main(["simulate", "--plan", str(plan_file), "--layers", "16,16"]) == 2
    assert "give either --plan or --layers/--slices" in capsys.readouterr().err
