"""``hpipe experiment paper`` end to end (shortened length sweep), and ``hpipe simulate --json``."""

import argparse
import json

import pytest

from hpipe.commands import simulate
from hpipe.experiment import PaperExperiment

pytest.importorskip("hpipe.plan.api")


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("paper")
    # The full sweep goes to 32k; two lengths exercise the same code in a fraction of the time.
    exp = PaperExperiment(out_dir=out, sweep_lengths=(2048, 4096))
    return out, exp.run()


def test_experiment_writes_every_table_and_figure(paper_run):
    out, summary = paper_run
    for model in ("llama-7b", "gpt3-2.7b"):
        for suffix in ("performance.md", "memory.md", "energy.md", "ablation.md", "timeline.png",
                       "timeline_trace.json", "even_uniform_trace.json", "hpipe_trace.json"):
            path = out / f"{model}_{suffix}"
            assert path.is_file() and path.stat().st_size > 200, path
    for name in ("ablation.png", "seq_sweep.png", "scaling.md", "seq_sweep.md", "report.md",
                 "summary.json", "llama-13b_performance.md"):
        assert (out / name).is_file(), name
    assert (out / "llama-7b_timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    trace = json.loads((out / "llama-7b_timeline_trace.json").read_text())
    assert {m["method"] for m in trace["otherData"]["hpipe"]} >= {"manual", "hpipe"}
    assert set(summary["files"]) <= {p.name for p in out.iterdir()}


def test_report_puts_paper_numbers_beside_ours(paper_run):
    out, summary = paper_run
    report = (out / "report.md").read_text()
    for paper_figure in ("9.06x", "2.06-2.28x", "33.1-39.3%", "20.3", "2.24", "11479", "8713"):
        assert paper_figure in report, paper_figure
    assert "| paper |" in report and "| ours |" in report
    h = summary["headline"]
    assert h["vs_base_latency_x"]["llama-7b"] > 1  # HPipe beats Base
    assert summary["bound"]["bound_s"] < summary["bound"]["hpipe_latency_s"]
    shares = summary["bound"]["shares"]
    assert sum(shares.values()) == pytest.approx(1.0)  # the gap breakdown is exhaustive


def test_experiment_runs_the_papers_pure_pipeline_and_reports_tp_beside_it(paper_run):
    out, summary = paper_run
    for name, tp in summary["tensor_parallel"].items():
        pure = summary["models"][name]["methods"]["hpipe"]
        assert all("+" not in devs for devs in pure["layers"]), pure["layers"]
        assert tp["runs"] and tp["latency_s"] <= pure["latency_s"], name
    report = (out / "report.md").read_text()
    assert "with TP pairs allowed" in report and "`--no-tp`" in report


def test_the_report_plans_for_each_objective_and_says_where_decode_changes_the_plan(paper_run):
    out, summary = paper_run
    rows = {r["objective"]: r for r in summary["objectives"]["rows"]}
    assert rows["latency"]["latency_s"] < rows["prefill"]["latency_s"]
    assert rows["throughput"]["decode_tok_s"] > rows["prefill"]["decode_tok_s"]
    report = (out / "report.md").read_text()
    assert "## Planning for decode as well" in report
    assert report.count("decode changes the plan to") == 2


def test_ablation_covers_1_to_128_uniform_slices(paper_run):
    _, summary = paper_run
    abl = summary["ablation"]["llama-7b"]
    assert [int(n) for n in abl["uniform"]] == [1, 2, 4, 8, 16, 32, 64, 128]
    assert sum(abl["dynamic_slices"]) == 2048


def _simulate(argv):
    parser = argparse.ArgumentParser()
    simulate.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["simulate", *argv])


def test_simulate_all_json_parses_and_writes_png_and_trace(tmp_path, capsys):
    png, trace = tmp_path / "all.png", tmp_path / "all.json"
    args = _simulate(["--method", "all", "--json", "--png", str(png), "--trace", str(trace)])
    assert simulate.run(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["methods"]) == {"base", "gpipe", "gpb", "megatron", "terapipe", "tpt", "hpipe"}
    hp = out["methods"]["hpipe"]
    assert hp["runs"] and hp["summary"]["prefill_latency_s"] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 30_000
    pids = {e["pid"] for e in json.loads(trace.read_text())["traceEvents"]}
    assert len(pids) == sum(1 for m in out["methods"].values() if m["summary"])


def test_simulate_bad_input_is_one_line_and_exit_2(capsys):
    from hpipe.cli import main

    assert main(["simulate", "--model", "no-such-model"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no-such-model" in err
    assert main(["simulate", "--seq-len", "4096"]) == 2  # beyond llama-7b's 2048 context
    assert "4096" in capsys.readouterr().err
