"""Torchrun jobs on this machine for the tests: each "host" is one torchrun (static rendezvous
on 127.0.0.1, ``HPIPE_HOST`` naming its cluster host), so a job across hosts runs without
network namespaces or root. ``job_driver.py`` is the program a test's job runs."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from runtime_harness import children_of

from hpipe.runtime.launch import free_port

DRIVER = Path(__file__).with_name("job_driver.py")


@dataclass
class Host:
    """One torchrun: its cluster host name, processes, and where its output goes."""

    name: str
    num_procs: int
    proc: subprocess.Popen | None = None
    out: Path | None = None
    err: Path | None = None

    def text(self) -> tuple[str, str]:
        return self.out.read_text(), self.err.read_text()


def torchrun(hosts: list[Host], program: list[str] | list[list[str]], tmp: Path, *,
             port: int | None = None, env: dict[str, str] | None = None) -> list[Host]:
    """Start one torchrun per host (node rank = position in ``hosts``) running ``program`` (or
    ``program[k]`` on host k); returns at once."""
    port = port or free_port()
    programs = program if isinstance(program[0], list) else [program] * len(hosts)
    for k, (h, program) in enumerate(zip(hosts, programs)):
        h.out, h.err = tmp / f"{h.name}.out", tmp / f"{h.name}.err"
        argv = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={len(hosts)}",
                f"--node-rank={k}", f"--nproc-per-node={h.num_procs}", "--master-addr=127.0.0.1",
                f"--master-port={port}", "--max-restarts=0", *program]
        h.proc = subprocess.Popen(argv, stdout=h.out.open("w"), stderr=h.err.open("w"),
                                  env={**os.environ, **(env or {}), "HPIPE_HOST": h.name},
                                  start_new_session=True)
    return hosts


def wait_all(hosts: list[Host], timeout_s: float = 120) -> list[int]:
    deadline = time.monotonic() + timeout_s
    try:
        return [h.proc.wait(timeout=max(1.0, deadline - time.monotonic())) for h in hosts]
    except subprocess.TimeoutExpired:
        stop_all(hosts)
        raise AssertionError("a torchrun host did not finish:\n" + "\n".join(
            f"--- {h.name} stderr:\n{h.err.read_text()[-3000:]}" for h in hosts)) from None


def workers_of(host: Host) -> list[int]:
    """The worker processes under a host's torchrun."""
    return [p for p in children_of(host.proc.pid) if "hpipe" in _cmdline(p) or
            "job_driver" in _cmdline(p)]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""


def stop_all(hosts: list[Host]) -> None:
    """SIGKILL every host's torchrun and its workers (stopped ones too)."""
    for h in hosts:
        if h.proc is None:
            continue
        for pid in [*workers_of(h), h.proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            h.proc.wait(timeout=10)


def run_driver(hosts: list[Host], config: dict, tmp: Path, **kw) -> list[Host]:
    """Start ``job_driver.py`` on every host with ``config`` (see job_driver.py)."""
    path = tmp / "config.json"
    path.write_text(json.dumps(config))
    return torchrun(hosts, [str(DRIVER), str(path)], tmp, **kw)


def driver_result(hosts: list[Host]) -> dict:
    """What rank 0's driver printed (its last stdout line), from whichever host ran it."""
    printed = [h.out.read_text().strip().splitlines() for h in hosts]
    assert sum(bool(lines) for lines in printed) == 1, "exactly one rank prints:\n" + "\n".join(
        f"--- {h.name} stderr:\n{h.err.read_text()[-3000:]}" for h in hosts)
    return json.loads(next(lines for lines in printed if lines)[-1])
