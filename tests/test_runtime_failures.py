"""Failures end typed and fast: a killed worker, a refused plan, a shape mismatch, no rendezvous.

Only the killed-worker and Ctrl-C tests start worker processes; the refusals must happen before
any worker starts (the launcher is replaced by a tripwire), and the comm checks run two gloo
ranks as threads of this process.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from runtime_harness import Case, plan_for, request_for, slow_cluster

from hpipe.errors import (
    PlanMismatchError,
    PromptTooLongError,
    ShapeMismatchError,
    WorkerFailedError,
)
from hpipe.runtime import check_request, launch_local
from hpipe.runtime.comm import Expected, StageLink

REPO = Path(__file__).resolve().parents[1]


# -- a killed worker ---------------------------------------------------------------------------
def _long_request(tiny_checkpoints):
    from hpipe.model.source import open_model

    path = tiny_checkpoints["llama"]
    spec = open_model(path).spec
    case = Case("long", "llama", layers=(2, 2), slices=(4, 4), max_new_tokens=100)
    req = request_for(case, path, spec, 2, cluster=slow_cluster(2, 300.0))
    return dataclasses.replace(req, eos_token_ids=(), stop_at_eos=False)


def test_killed_worker_ends_the_run_naming_the_rank(tiny_checkpoints):
    req = _long_request(tiny_checkpoints)
    pids: list[int] = []
    killed_at: list[float] = []

    def kill_rank0_once_decoding(kind, done, total):
        if kind == "decode" and done >= 2 and not killed_at:
            os.kill(pids[0], signal.SIGKILL)
            killed_at.append(time.monotonic())

    with pytest.raises(WorkerFailedError) as info:
        launch_local([req], on_started=pids.extend, on_progress=kill_rank0_once_decoding)
    assert killed_at, "the run ended before the worker was killed"
    assert time.monotonic() - killed_at[0] < 30
    assert "rank 0" in str(info.value) and "SIGKILL" in str(info.value)
    for pid in pids:  # every worker is gone
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_ctrl_c_leaves_no_orphan_workers(tiny_checkpoints, tmp_path):
    """SIGINT to a supervisor mid-run: it exits and none of its workers survive."""
    req = _long_request(tiny_checkpoints)
    req_file = tmp_path / "req.pt"
    torch.save([req], req_file)
    pid_file = tmp_path / "pids"
    # The Ctrl-C handler is set in the script: a suite started in the background by a
    # non-interactive shell (`make test &`) inherits SIGINT ignored, and Python keeps it so.
    script = textwrap.dedent(f"""
        import signal, sys, torch
        signal.signal(signal.SIGINT, signal.default_int_handler)
        from hpipe.runtime import launch_local
        def started(pids):
            open({str(pid_file)!r}, "w").write(" ".join(map(str, pids)))
        if __name__ == "__main__":
            try:
                launch_local(torch.load({str(req_file)!r}, weights_only=False), on_started=started)
            except KeyboardInterrupt:
                sys.exit(130)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
    deadline = time.monotonic() + 60
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert pid_file.exists(), "the supervisor never started its workers"
    time.sleep(2.0)  # let the workers get going
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 130
    for pid in map(int, pid_file.read_text().split()):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


# -- refused before any worker starts ----------------------------------------------------------


def _cli(*argv: str) -> int:
    from hpipe.cli import main

    return main(["run", *argv])


def test_plan_for_another_model_is_refused(tiny_checkpoints):
    from hpipe.model.source import open_model

    spec = open_model(tiny_checkpoints["llama"]).spec
    case = Case("mismatch", "llama", layers=(2, 2), slices=(8,))
    req = request_for(case, tiny_checkpoints["llama"], spec, 2)
    other = dataclasses.replace(spec, num_layers=6)
    with pytest.raises(PlanMismatchError, match=r"\(4, 64, 96\).*\(6, 64, 96\)"):
        check_request(req, other)


def test_cli_refuses_layer_count_dtype_and_length_before_launch(tiny_checkpoints, tmp_path,
                                                                 tripwire, capsys):
    from hpipe.cluster import local_cluster
    from hpipe.model.source import open_model

    path = str(tiny_checkpoints["llama"])
    spec = open_model(path).spec
    ids = ",".join(str(i) for i in range(3, 19))  # 16 tokens
    # A plan made for a 6-layer variant of the model.
    wrong = plan_for(Case("w", "llama", layers=(3, 3), slices=(16,)),
                     dataclasses.replace(spec, num_layers=6), local_cluster(2))
    (tmp_path / "wrong.json").write_text(wrong.to_json())
    assert _cli("--model", path, "--prompt-ids", ids, "--max-new-tokens", "2",
                "--plan", str(tmp_path / "wrong.json")) == 2
    assert "re-plan" in capsys.readouterr().err
    # A float16 plan run with --dtype float32.
    f16 = dataclasses.replace(plan_for(Case("h", "llama", layers=(2, 2), slices=(16,)), spec,
                                       local_cluster(2)), dtype="float16")
    (tmp_path / "f16.json").write_text(f16.to_json())
    assert _cli("--model", path, "--prompt-ids", ids, "--max-new-tokens", "2",
                "--plan", str(tmp_path / "f16.json"), "--dtype", "float32") == 2
    assert "float16" in capsys.readouterr().err
    # --layers that do not add up to the model's 4 layers.
    assert _cli("--model", path, "--prompt-ids", ids, "--max-new-tokens", "2",
                "--layers", "3,3") == 2
    assert capsys.readouterr().err
    # Prompt + new tokens beyond the 128-token context.
    long_ids = ",".join(["5"] * 120)
    assert _cli("--model", path, "--prompt-ids", long_ids, "--max-new-tokens", "20") == 2
    assert "context of 128" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    # An empty --prompt-ids used to end in an IndexError traceback from the planner call.
    (["--prompt-ids", ""], "the prompt is empty"),
    (["--prompt-ids", " ; "], "the prompt is empty"),
    # Sampling settings used to pass here and fail in every worker, after the launch.
    # Out-of-range numbers are refused by the parser, with the range.
    (["--prompt-ids", "5,6", "--temperature", "-1"], "--temperature: must be >= 0, got -1"),
    (["--prompt-ids", "5,6", "--top-p", "0"], r"--top-p: must be in \(0, 1\], got 0"),
    (["--prompt-ids", "5,6", "--connect-timeout", "0"], "--connect-timeout: must be > 0, got 0"),
    (["--prompt-ids", "5,6", "--liveness", "-2"], "--liveness: must be > 0, got -2"),
    (["--prompt-ids", "5,6", "--seed", "nan"], "--seed: 'nan' is not an integer"),
    # Over the context: the prompt's length, not a planner's '--seq-len' (run has no such flag).
    (["--prompt-ids", ",".join(["5"] * 130)],
     "prompt of 130 tokens exceeds llama's context of 128 tokens; shorten the prompt to <= 128"),
    # New tokens alone over the context: no prompt length fixes it (it said '<= -72 tokens').
    (["--prompt-ids", "5,6", "--max-new-tokens", "200"],
     r"202 exceeds llama's context of 128 tokens; lower --max-new-tokens to <= 126$"),
])
def test_cli_refuses_prompt_and_sampling_mistakes_before_launch(tiny_checkpoints, tripwire,
                                                                capsys, argv, message):
    assert _cli("--model", str(tiny_checkpoints["llama"]), "--max-new-tokens", "2", *argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hpipe run: error: ") and "seq-len" not in err
    assert re.search(message, err), err


def test_cli_refuses_a_cluster_or_method_the_plan_was_not_made_for(tiny_checkpoints, tmp_path,
                                                                   tripwire, capsys):
    # Both used to be ignored: the plan ran on its own cluster and method, and the report named
    # the --cluster given (or the default local:2) instead of the cluster that ran.
    from hpipe.cluster import local_cluster
    from hpipe.model.source import open_model

    path = str(tiny_checkpoints["llama"])
    spec = open_model(path).spec
    plan = plan_for(Case("p", "llama", layers=(1, 3), slices=(4,)), spec, local_cluster(2))
    (tmp_path / "plan.json").write_text(plan.to_json())
    common = ("--model", path, "--prompt-ids", "5,6,7,8", "--max-new-tokens", "2",
              "--plan", str(tmp_path / "plan.json"))
    assert _cli(*common, "--cluster", "local:3") == 2
    assert re.search(r"--cluster 'local:3' is not the cluster the plan .* was made for "
                     r"\('local:2': cpu0, cpu1\)", capsys.readouterr().err)
    assert _cli(*common, "--method", "base") == 2
    assert re.search(r"--method base but the plan .* is a manual plan", capsys.readouterr().err)


def test_cli_runs_a_plan_on_its_own_cluster_by_default(tiny_checkpoints, tmp_path):
    from hpipe.cli import build_parser
    from hpipe.cluster import load_cluster
    from hpipe.commands.run import resolve_cluster
    from hpipe.model.source import open_model

    spec = open_model(tiny_checkpoints["llama"]).spec
    slow2 = load_cluster(str(Path(__file__).parent.parent / "examples" / "slow2.yaml"))
    plan = plan_for(Case("p", "llama", layers=(1, 3), slices=(4,)), spec, slow2)
    (tmp_path / "plan.json").write_text(plan.to_json())
    args = build_parser().parse_args(["run", "--model", "m", "--prompt-ids", "1",
                                      "--plan", str(tmp_path / "plan.json")])
    assert resolve_cluster(args) == slow2  # not local:2, the default without a plan


def test_cli_refuses_a_cuda_device_this_machine_lacks_before_launch(tiny_checkpoints, tmp_path,
                                                                    tripwire, capsys):
    # It launched, and the worker died on torch's "no attribute '_cuda_setDevice'".
    (tmp_path / "gpu.yaml").write_text(
        "hosts:\n- name: box\n  devices:\n  - {name: g0, type: t4, torch_device: 'cuda:99'}\n")
    assert _cli("--model", str(tiny_checkpoints["llama"]), "--prompt-ids", "5,6,7",
                "--max-new-tokens", "2", "--cluster", str(tmp_path / "gpu.yaml")) == 2
    assert re.search(r"error: device 'g0' .* torch_device 'cuda:99', but torch here sees \d+ "
                     r"CUDA device\(s\); set its torch_device to cpu", capsys.readouterr().err)


def test_prompt_too_long_is_typed(tiny_checkpoints):
    from hpipe.model.source import open_model

    spec = open_model(tiny_checkpoints["llama"]).spec
    with pytest.raises(PromptTooLongError, match="128"):
        request_for(Case("long", "llama", layers=(2, 2), slices=(100, 20), max_new_tokens=10),
                    tiny_checkpoints["llama"], spec, 2)


# -- the wire: shape checks and timeouts, two gloo ranks as threads ----------------------------
def _linked_pair(timeout_s: float = 10.0) -> tuple[StageLink, StageLink]:
    store = dist.HashStore()
    groups: dict[int, dist.ProcessGroup] = {}

    def make(rank: int) -> None:
        groups[rank] = dist.ProcessGroupGloo(store, rank, 2, datetime.timedelta(seconds=timeout_s))

    threads = [threading.Thread(target=make, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cpu = torch.device("cpu")
    return tuple(StageLink(groups[r], rank=r, compute_device=cpu, wire_device=cpu,
                           recv_timeout_s=timeout_s) for r in range(2))


def test_shape_mismatch_is_typed_names_both_and_does_not_hang():
    a, b = _linked_pair()
    sent = a.isend(torch.ones(1, 4, 8), dst=1, unit=3)
    t0 = time.monotonic()
    with pytest.raises(ShapeMismatchError) as info:
        b.recv(Expected(src=0, unit=3, shape=(1, 4, 16), dtype=torch.float32))
    assert "(1, 4, 16)" in str(info.value) and "(1, 4, 8)" in str(info.value)
    sent.join()  # the payload was drained: the sender is not left blocked
    assert time.monotonic() - t0 < 5
    # The link still works for the next, well-formed message.
    nxt = a.isend(torch.arange(6.0).view(1, 2, 3), dst=1, unit=4)
    got = b.recv(Expected(src=0, unit=4, shape=(1, 2, 3), dtype=torch.float32))
    nxt.join()
    assert torch.equal(got.tensor, torch.arange(6.0).view(1, 2, 3))


def test_dtype_and_unit_mismatches_are_typed():
    a, b = _linked_pair()
    a.isend(torch.ones(2, 3, dtype=torch.float16), dst=1, unit=0)
    with pytest.raises(ShapeMismatchError, match="float16"):
        b.recv(Expected(src=0, unit=0, shape=(2, 3), dtype=torch.float32))
    a.isend(torch.ones(2, 3), dst=1, unit=5)
    with pytest.raises(ShapeMismatchError, match="unit 4.*unit 5"):
        b.recv(Expected(src=0, unit=4, shape=(2, 3), dtype=torch.float32))


def test_stop_marker_and_silent_peer():
    a, b = _linked_pair(timeout_s=1.0)
    a.isend(None, dst=1, unit=9, stop=True)
    assert b.recv(Expected(src=0, unit=9, shape=(1,), dtype=torch.int64)).stop
    t0 = time.monotonic()
    with pytest.raises(WorkerFailedError, match="rank 1 waiting .* from rank 0"):
        b.recv(Expected(src=0, unit=10, shape=(1,), dtype=torch.int64))
    assert time.monotonic() - t0 < 5


def test_unreachable_rendezvous_times_out_naming_the_address():
    from hpipe.runtime.launch import free_port
    from hpipe.runtime.rank import Rendezvous, join_group

    port = free_port()
    rv = Rendezvous(addr="127.0.0.1", port=port, rank=1, world_size=2, backend="gloo",
                    connect_timeout_s=2.0)
    t0 = time.monotonic()
    with pytest.raises(WorkerFailedError, match=f"rank 1 .*127.0.0.1:{port}"):
        join_group(rv)
    assert time.monotonic() - t0 < 30
    assert not dist.is_initialized()
