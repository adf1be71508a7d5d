"""The error contract (hpipe/commands/contract.py), fault by fault: user errors exit 2 with one
line naming the value and the fix, before any work; runtime failures exit 1 naming the rank;
Ctrl-C 130 and SIGTERM 143 with one line and no worker left; no traceback without --debug; a
JSON error object with --json."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from runtime_harness import all_gone, children_of, write_slow_cluster

from hpipe.cli import main
from hpipe.errors import ModelSpecError
from hpipe.spec import ModelSpec

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "data" / "metric_system.md"


def _one_line_error(capsys, command: str, pattern: str) -> str:
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    assert err.count("\n") == 1, err
    assert err.startswith(f"hpipe {command}: error: "), err
    assert re.search(pattern, err), err
    return out


# -- refused before any work, exit 2 -----------------------------------------------------------
@pytest.fixture
def files(tmp_path):
    (tmp_path / "bin.dat").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00binary" * 8)
    (tmp_path / "cut.json").write_text('{"format": "hpipe-plan", "method": "hp')
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "numeric.yaml").write_text(
        "name: n\nhosts:\n  - name: h\n    devices: [{name: 0, type: cpu}, {name: 1, type: cpu}]\n")
    return tmp_path


@pytest.mark.parametrize("argv,pattern", [
    (["plan", "--cluster", "{d}"], r"--cluster '.*' is a directory; give the file itself"),
    (["plan", "--cluster", "{d}/bin.dat"], r"--cluster '.*bin.dat' is a binary file, not text"),
    (["plan", "--cluster", "{d}/numeric.yaml"],
     r"devices\[0\].name must be a text name, got 0; quote it"),
    (["plan", "--cluster", "local:2", "--model", "smollm2-135m", "--profile", "{d}/bin.dat"],
     r"--profile '.*bin.dat' is a binary file"),
    (["plan", "--cluster", "local:2", "--model", "smollm2-135m", "--profile", "{d}/cut.json"],
     r"--profile '.*cut.json': not a JSON profile"),
    (["plan", "--seq-len", "0"], r"argument --seq-len: must be >= 1, got 0"),
    (["simulate", "--batch", "-1"], r"argument --batch: must be >= 1, got -1"),
    (["experiment", "paper", "--out", "/proc/hpipe-no/such"],
     r"--out '/proc/hpipe-no/such': cannot create it"),
    (["profile", "--model", "smollm2", "--cluster", "local:2", "--out", "{d}/p.json",
      "--max-tokens", "4"], r"--max-tokens/--seq-len: must be >= 32, got 4"),
    (["profile", "--model", "smollm2", "--cluster", "local:2", "--out", "{d}/p.json",
      "--max-tokens", "0"], r"--max-tokens/--seq-len: must be >= 32, got 0"),
    (["profile", "--model", "smollm2", "--cluster", "local:2", "--out", "{d}/p.json",
      "--max-batch", "0"], r"--max-batch/--batch: must be >= 1, got 0"),
    (["profile", "--model", "smollm2", "--cluster", "local:2", "--out", "/proc/p.json"],
     r"--out '/proc/p.json': cannot write in the folder '/proc'"),
    (["generate", "--prompt-file", "{d}/empty.txt"], r"--prompt-file '.*empty.txt' is empty"),
])
def test_bad_input_is_one_line_and_exit_2_before_any_work(files, capsys, argv, pattern):
    argv = [a.replace("{d}", str(files)) for a in argv]
    assert main(argv) == 2
    _one_line_error(capsys, argv[0], pattern)


@pytest.mark.parametrize("flag", ["--plan", "--trace", "--png", "--prompt-file"])
def test_run_refuses_bad_files_before_launch(files, tiny_checkpoints, tripwire, capsys, flag):
    value = {"--plan": "{d}/cut.json", "--trace": "/proc/x.json", "--png": "/proc/x.png",
             "--prompt-file": "{d}/empty.txt"}[flag].replace("{d}", str(files))
    prompt = [] if flag == "--prompt-file" else ["--prompt-ids", "5,6,7"]
    assert main(["run", "--model", str(tiny_checkpoints["llama"]), *prompt, flag, value]) == 2
    pattern = {"--plan": r"--plan '.*cut.json': plan file is not valid JSON",
               "--trace": r"--trace '/proc/x.json': cannot write in the folder '/proc'",
               "--png": r"--png '/proc/x.png': cannot write in the folder '/proc'",
               "--prompt-file": r"is empty"}[flag]
    _one_line_error(capsys, "run", pattern)


def test_a_checkpoint_whose_weights_disagree_with_its_config(tiny_checkpoints, tmp_path, capsys):
    bad = tmp_path / "llama"
    shutil.copytree(tiny_checkpoints["llama"], bad)
    config = json.loads((bad / "config.json").read_text())
    config["intermediate_size"] = 120  # the weights were saved with 112
    (bad / "config.json").write_text(json.dumps(config))
    assert main(["generate", "--model", str(bad), "--prompt-ids", "5,6,7"]) == 2
    _one_line_error(capsys, "generate", r"tensor 'layers.0.mlp.\w+.weight' has shape "
                    r"\(\d+, \d+\) but the model's config makes it \(\d+, \d+\)")


def test_a_failure_with_json_prints_one_json_object(files, capsys):
    assert main(["plan", "--cluster", str(files / "bin.dat"), "--json"]) == 2
    out, err = capsys.readouterr()
    body = json.loads(out)
    assert body["error"]["type"] == "ClusterError" and "binary file" in body["error"]["message"]
    assert err.startswith("hpipe plan: error: ")
    assert main(["plan", "--seq-len", "x", "--json"]) == 2  # refused by the parser, too
    assert json.loads(capsys.readouterr().out)["error"]["type"] == "UsageError"


def test_debug_shows_the_traceback(files, capsys):
    assert main(["plan", "--cluster", str(files / "bin.dat"), "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().splitlines()[-1].startswith("hpipe plan: error:")


def test_model_shapes_that_cannot_be_are_typed_errors_not_asserts():
    with pytest.raises(ModelSpecError, match="hidden 100 is not divisible by num_heads 3"):
        ModelSpec(name="odd", family="llama", num_layers=2, hidden=100, num_heads=3,
                  num_kv_heads=3, intermediate=8, vocab_size=8, max_seq_len=8)
    with pytest.raises(ModelSpecError, match="num_layers must be a positive integer, got 0"):
        ModelSpec(name="none", family="llama", num_layers=0, hidden=8, num_heads=2,
                  num_kv_heads=2, intermediate=8, vocab_size=8, max_seq_len=8)


# -- signals and stopped workers, through the real CLI -----------------------------------------
def _start(argv: list[str]) -> subprocess.Popen:
    # Ctrl-C reaches a foreground program with SIGINT at its default; a test suite started in
    # the background inherits it ignored, so the child restores it.
    return subprocess.Popen([sys.executable, "-m", "hpipe.cli", *argv], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _finish(proc: subprocess.Popen, timeout_s: float) -> tuple[str, str]:
    """The process's output once it exits; killed (and the test failed) if it hangs."""
    try:
        return proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"hung past {timeout_s} s; stderr: {err[-2000:]}") from None


def _wait_for_workers(proc: subprocess.Popen, count: int, timeout_s: float = 60) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        kids = children_of(proc.pid)
        if len(kids) >= count:
            time.sleep(2.0)  # past start-up: loading, or into the first request
            return children_of(proc.pid)
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"no workers after {timeout_s} s: {proc.communicate()}")


@pytest.mark.parametrize("sig,code,word", [(signal.SIGINT, 130, "interrupted (Ctrl-C)"),
                                           (signal.SIGTERM, 143, "terminated (SIGTERM)")])
def test_ctrl_c_and_sigterm_end_a_run_with_one_line_and_no_worker_left(tiny_checkpoints,
                                                                       tmp_path, sig, code, word):
    write_slow_cluster(tmp_path / "slow.yaml", 300)
    proc = _start(["run", "--model", str(tiny_checkpoints["llama"]), "--cluster",
                   str(tmp_path / "slow.yaml"), "--prompt-ids", "5,6,7,8,9,10",
                   "--max-new-tokens", "100"])
    workers = _wait_for_workers(proc, 2)
    proc.send_signal(sig)
    _, err = _finish(proc, 30)
    assert proc.returncode == code, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(f"hpipe run: {word}")
    assert all_gone(workers), "a worker outlived the run"


@pytest.mark.parametrize("argv", [
    ["generate", "--prompt-file", str(DOC), "--max-new-tokens", "4"],
    ["profile", "--model", "{llama}", "--cluster", "{slow}", "--out", "{d}/p.json", "--quick"],
], ids=["generate", "profile"])
def test_ctrl_c_in_other_commands_is_one_line(tiny_checkpoints, tmp_path, argv):
    write_slow_cluster(tmp_path / "slow.yaml", 300)
    argv = [a.format(llama=tiny_checkpoints["llama"], slow=tmp_path / "slow.yaml", d=tmp_path)
            for a in argv]
    proc = _start(argv)
    workers = _wait_for_workers(proc, 2) if argv[0] == "profile" else []
    if not workers:
        time.sleep(6.0)  # into the 3.6k-token prefill
    proc.send_signal(signal.SIGINT)
    _, err = _finish(proc, 30)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted (Ctrl-C)" in err.strip().splitlines()[-1]
    assert all_gone(workers)


def test_a_stopped_worker_in_a_tensor_parallel_run_is_named_within_the_liveness_limit(
        tiny_checkpoints, tmp_path):
    """A SIGSTOP'd member of a TP pair used to hang the run for ~600 s; the pipeline case
    blamed the rank that was waiting. Now: exit 1 within the limit, naming the stopped rank,
    and the JSON error carries it."""
    write_slow_cluster(tmp_path / "slow.yaml", 300)
    proc = _start(["run", "--model", str(tiny_checkpoints["llama"]), "--cluster",
                   str(tmp_path / "slow.yaml"), "--method", "megatron", "--prompt-ids",
                   "5,6,7,8,9,10", "--max-new-tokens", "100", "--liveness", "3", "--json"])
    workers = _wait_for_workers(proc, 2)
    rank1 = workers[-1]  # spawned last
    os.kill(rank1, signal.SIGSTOP)
    stopped_at = time.monotonic()
    out, err = _finish(proc, 60)
    assert time.monotonic() - stopped_at < 3 + 15
    assert proc.returncode == 1, err
    assert "Traceback" not in err
    assert re.search(r"hpipe run: failed: worker rank 1 .*stopped answering", err), err
    body = json.loads(out.strip().splitlines()[-1])["error"]
    assert body["type"] == "WorkerFailedError" and body["rank"] == 1
    assert all_gone(workers)
