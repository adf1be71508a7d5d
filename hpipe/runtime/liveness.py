"""Heartbeats: how a supervisor tells a worker that stopped answering from one that is busy.

Every worker process runs a small thread that stamps ``time.monotonic()`` (one clock for every
process on a Linux machine) into its slot of a shared-memory array every ``HEARTBEAT_S``. The
thread does not depend on the compute loop: a worker computing a long slice, or waiting for
its upstream, still beats. A worker that was stopped (SIGSTOP, a debugger, a frozen VM guest)
or is wedged holding the interpreter stops beating, and the supervisor blames that rank after
``liveness_s`` of silence, instead of the rank that was left waiting for it.

A worker is allowed ``startup_s`` before its first beat. It beats before it imports torch (which
takes seconds on a small machine): spawning an interpreter and unpickling its target touch only
hpipe's torch-free modules (hpipe.runtime and hpipe.session load torch lazily for this).

What this does not see: a device kernel that never returns while the Python thread waits in a
call that releases the interpreter (a hung CUDA synchronize). The heartbeat goes on there, and
the request waits until its receive timeout.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

HEARTBEAT_S = 0.5
DEFAULT_LIVENESS_S = 15.0  # long enough for a busy small machine, short enough that nobody waits long


@dataclass(frozen=True)
class Silent:
    """A rank whose heartbeat stopped: for ``silent_s`` seconds, or never began."""

    rank: int
    silent_s: float
    started: bool


class Heartbeats:
    """One slot per rank in shared memory, written by the workers and read by the supervisor."""

    def __init__(self, mp_context, world_size: int) -> None:
        self.slots = mp_context.Array("d", world_size, lock=False)  # 0.0: no beat yet
        # The action each rank is executing in its stage's list (-1: none), so that a failure
        # can show where every rank was (Schedule.grid).
        self.positions = mp_context.Array("i", [-1] * world_size, lock=False)
        self.created_s = time.monotonic()

    def start_beating(self, rank: int) -> Callable[[], None]:
        """In the worker: a thread that beats until the returned ``stop()`` is called.

        Stop it before the interpreter exits: a daemon thread still running while a process
        with torch loaded finalises can be torn down inside C++ code and abort the process
        after its work is done. That is our best explanation, not a proven one, for a worker
        that died of SIGABRT once at the end of the profile's end-to-end test."""
        slots = self.slots
        stopped = threading.Event()

        def beat() -> None:
            while not stopped.is_set():
                slots[rank] = time.monotonic()
                stopped.wait(HEARTBEAT_S)

        thread = threading.Thread(target=beat, name="hpipe-heartbeat", daemon=True)
        thread.start()

        def stop() -> None:
            stopped.set()
            thread.join()

        return stop

    def silent(self, ranks, *, liveness_s: float, startup_s: float) -> list[Silent]:
        """In the supervisor: the ranks (of ``ranks``) that have not beaten in time."""
        now = time.monotonic()
        out = []
        for r in ranks:
            last = self.slots[r]
            if last == 0.0:
                if now - self.created_s > startup_s:
                    out.append(Silent(r, now - self.created_s, started=False))
            elif now - last > liveness_s:
                out.append(Silent(r, now - last, started=True))
        return out


def process_state(pid: int) -> str:
    """Linux's one-letter state of ``pid`` ('T' stopped, 'R' running, 'S' sleeping, ...), or ''."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def describe_silence(s: Silent, *, pid: int, where: str) -> str:
    """The error message for a silent rank, with what Linux says about its process."""
    state = process_state(pid)
    why = {"T": "its process is stopped (SIGSTOP or a debugger)",
           "t": "its process is stopped by a debugger",
           "D": "its process is blocked in the kernel (a device or disk wait)",
           "Z": "its process has exited"}.get(state, f"process state {state!r}" if state else "")
    if not s.started:
        return (f"worker {where}, pid {pid}, never started answering within {s.silent_s:.0f} s"
                + (f": {why}" if why else ""))
    return (f"worker {where}, pid {pid}, stopped answering: no heartbeat for {s.silent_s:.1f} s"
            + (f"; {why}" if why else ""))
