"""Local worker processes under a supervisor: spawn, join, watch, stop.

The caller's process is the supervisor, not a rank. It spawns one process per rank (``spawn``,
so each worker starts a clean interpreter with its own torch thread pool), which meet over gloo
(or NCCL) on 127.0.0.1, and then watches them:

- a worker that dies (``kill -9``, an out-of-memory kill, a crash) is noticed within
  ``POLL_S`` from its exit code; the others are stopped and ``WorkerFailedError`` names the
  rank, its device and the signal or exit code;
- a worker that stops answering (SIGSTOP, wedged) is noticed when its heartbeat has been silent
  for ``liveness_s`` (see hpipe/runtime/liveness.py), and the error blames that rank, not the
  ones left waiting for it;
- a worker that raises reports the exception (type, message, traceback); typed errors
  (``ShapeMismatchError``, any ``HPipeError``) are re-raised as the same type;
- the workers ask Linux to SIGKILL them if the supervisor dies (``PR_SET_PDEATHSIG``), so
  nothing is orphaned even when the supervisor is killed; ``stop`` ends every worker (SIGTERM,
  SIGKILL after ``GRACE_S``; a stopped one gets SIGKILL at once). PR_SET_PDEATHSIG fires when
  the *thread* that spawned a worker ends, not only the process: start a pool from a thread
  that outlives it (the main thread, or one kept for the purpose).

Each worker runs ``target(payload, ctx, commands, emit)``: ``commands`` is its own queue of
messages from the supervisor (``WorkerPool.send_all``) and ``emit(msg)`` reaches the
supervisor's ``on_message``. A Session's ranks live for many requests this way; a one-shot
launch (``run_once``) is a pool whose target runs once and emits its result.

[Note: messages are pickled bytes] Messages travel as ``pickle.dumps`` bytes, not as objects:
the queue's own pickler would share tensor storage through file descriptors, which vanish if
the sender exits before the supervisor reads them.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing as mp
import os
import pickle
import queue
import signal
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hpipe.errors import SettingError, WorkerFailedError, reported_error
from hpipe.runtime.liveness import DEFAULT_LIVENESS_S, Heartbeats, describe_silence

log = logging.getLogger(__name__)

POLL_S = 0.2  # supervisor's poll period for exit codes, heartbeats and messages
GRACE_S = 3.0  # SIGTERM -> SIGKILL
SETTLE_S = 1.0  # after a first failure, wait this long for the root cause to show up
# A worker's first heartbeat comes before it imports torch: a new interpreter and hpipe's
# torch-free modules, well under this even on a busy 2-core machine.
STARTUP_S = 10.0
PR_SET_PDEATHSIG = 1

# on_progress(kind, done, total), called in the supervisor; see worker.Progress
OnProgress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class RankContext:
    """What a per-rank target is given: who it is, its joined process groups, where to report."""

    rank: int
    world_size: int
    backend: str  # the data group's; the control group is always gloo (see rank.join_group)
    data_group: Any
    ctrl_group: Any
    progress: OnProgress | None = None  # None where this rank's progress is not wanted
    rank_of_device: dict[int, int] | None = None  # cluster device -> rank; None: rank r holds r
    mark_action: Callable[[int], None] | None = None  # records the action this rank is on


@dataclass(frozen=True)
class WorkerSettings:
    """How the workers meet: plain data, pickled into each spawned process."""

    world_size: int
    addr: str
    port: int
    backend: str = "gloo"
    connect_timeout_s: float = 60.0
    collective_timeout_s: float | None = None  # None: the connect timeout (see Rendezvous)
    cuda_devices: tuple[str, ...] | None = None  # [r]: the CUDA device rank r binds
    progress_ranks: tuple[int, ...] | None = None  # ranks whose ctx.progress emits (None: all)


class WorkerPool:
    """``world_size`` spawned ranks running ``target``, watched from this process.

    ``on_message(msg)`` gets every emitted message (on the watching thread); ``on_failure(exc)``
    is called once when a worker fails, after every worker was stopped. ``describe_rank(r)``
    names rank r in errors ("rank 1 (stage 1, device 'cpu1')").
    """

    def __init__(self, target: Callable, payload: Any, settings: WorkerSettings, *,
                 on_message: Callable[[tuple], None],
                 on_failure: Callable[[Exception], None] | None = None,
                 describe_rank: Callable[[int], str] | None = None,
                 liveness_s: float = DEFAULT_LIVENESS_S, process_name: str = "hpipe-rank",
                 workers_may_finish: bool = False) -> None:
        self.settings = settings
        # A one-shot launch's workers exit 0 when done; a session's exit only when closed.
        self.workers_may_finish = workers_may_finish
        self.on_message = on_message
        self.on_failure = on_failure
        self.describe = describe_rank or (lambda r: f"rank {r}")
        self.liveness_s = liveness_s
        ctx = mp.get_context("spawn")
        self._inbox = ctx.Queue()
        self._commands = [ctx.Queue() for _ in range(settings.world_size)]
        self._beats = Heartbeats(ctx, settings.world_size)
        self._procs = [
            # daemon: should this process exit without stopping them, multiprocessing ends
            # them instead of waiting for workers that serve forever.
            ctx.Process(target=_worker_main, name=f"{process_name}{r}", daemon=True,
                        args=(target, payload, settings, r, self._commands[r], self._inbox,
                              self._beats, os.getpid()))
            for r in range(settings.world_size)]
        self._failures: list[tuple[int, str, str, str]] = []  # (rank, type, message, traceback)
        self._first_failure_at: float | None = None
        self._checked_at = 0.0
        self._closing = False
        self.failed: Exception | None = None
        self._watcher: threading.Thread | None = None

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    # A local pool's rank r holds timeline row r (see rank.rank_devices); a torchrun job's
    # ranks are numbered by its rendezvous instead (hpipe/runtime/job_pool.py).
    rank_of_device = None

    @property
    def serving_ranks(self) -> tuple[int, ...]:
        return tuple(range(self.settings.world_size))

    @property
    def row_of_rank(self) -> dict[int, int]:
        return {r: r for r in range(self.settings.world_size)}

    def positions(self) -> list[int]:
        """The action index each rank is executing now (-1: none); see Schedule.grid."""
        return list(self._beats.positions)

    def start(self, *, watch_in_thread: bool = False) -> None:
        for p in self._procs:
            try:
                p.start()
            except RuntimeError as e:
                if "bootstrapping phase" not in str(e):
                    raise
                # A script that opens a pipeline at import time: each spawned worker imports
                # the script again and would open a pipeline of its own. Python's message
                # names freeze_support, which is not the fix.
                raise SettingError(
                    "a pipeline was opened while this script was being imported by one of "
                    "hpipe's worker processes; put the script's code under "
                    "`if __name__ == \"__main__\":`") from None
        self._beats.created_s = time.monotonic()
        log.info("spawned %d workers (%s) on %s:%d: pids %s", len(self._procs),
                 self.settings.backend, self.settings.addr, self.settings.port, self.pids)
        if watch_in_thread:
            self._watcher = threading.Thread(target=self._watch_forever, name="hpipe-supervisor",
                                             daemon=True)
            self._watcher.start()

    def send_all(self, msg: tuple) -> None:
        """The same command to every rank, in the same order on every rank."""
        for q in self._commands:
            q.put(msg)

    # -- watching ------------------------------------------------------------------------
    def poll(self) -> None:
        """Deliver waiting messages and check on the workers once; raises their failure."""
        try:
            raw = self._inbox.get(timeout=POLL_S)
        except queue.Empty:
            raw = None
        if raw is not None:
            msg = pickle.loads(raw)
            if msg[0] == "error":
                self._failures.append(msg[1:])
                self._first_failure_at = self._first_failure_at or time.monotonic()
            else:
                self.on_message(msg)
            # Drain the queue before looking at exit codes, but look at least every POLL_S:
            # live ranks that keep reporting must not hide a dead one.
            if time.monotonic() - self._checked_at < POLL_S:
                return
        self._checked_at = time.monotonic()
        if self._closing:
            return
        codes = [p.exitcode for p in self._procs]
        ended = [c for c in codes if c is not None and (c != 0 or not self.workers_may_finish)]
        if ended or self._silent():
            self._first_failure_at = self._first_failure_at or time.monotonic()
        if (self._first_failure_at is not None
                and time.monotonic() - self._first_failure_at >= SETTLE_S):
            raise self._root_cause()

    def _silent(self):
        """Live processes whose heartbeat stopped (an exited one is judged by its exit code)."""
        startup_s = self.liveness_s + STARTUP_S
        live = [r for r, p in enumerate(self._procs) if p.exitcode is None]
        return self._beats.silent(live, liveness_s=self.liveness_s, startup_s=startup_s)

    def _watch_forever(self) -> None:
        try:
            while not (self._closing and all(p.exitcode is not None for p in self._procs)):
                self.poll()
        except Exception as e:  # a worker failed: stop the rest, then tell the owner
            self.failed = e
            self.stop()
            if self.on_failure is not None:
                self.on_failure(e)

    def _root_cause(self) -> Exception:
        """The error to report: a typed error first, then a worker that died without a word,
        then one that stopped answering, then the first reported error. A killed worker's peers
        also fail ("connection closed by peer"), so the silent death is the cause and their
        errors are the symptom."""
        where = self.describe
        for rank, tname, message, tb in self._failures:
            error = reported_error(tname, f"{where(rank)}: {message}", rank=rank)
            if not isinstance(error, WorkerFailedError):
                log.debug("worker traceback:\n%s", tb)
                return error
        reported = {f[0] for f in self._failures}
        for rank, p in enumerate(self._procs):
            code = p.exitcode
            if code not in (None, 0) and rank not in reported:
                if code < 0:
                    cause = f"was killed by signal {signal.Signals(-code).name}"
                else:
                    cause = f"exited with code {code} without reporting an error"
                return WorkerFailedError(f"worker {where(rank)}, pid {p.pid}, {cause}; the "
                                         "pipeline was stopped and the other workers ended",
                                         rank=rank)
        for s in self._silent():
            return WorkerFailedError(
                describe_silence(s, pid=self._procs[s.rank].pid, where=where(s.rank))
                + "; the pipeline was stopped and every worker ended", rank=s.rank)
        if self._failures:
            rank, tname, message, tb = self._failures[0]
            log.debug("worker traceback:\n%s", tb)
            return WorkerFailedError(f"worker {where(rank)} failed: {tname}: {message}",
                                     rank=rank)
        rank = next(r for r, p in enumerate(self._procs) if p.exitcode is not None)
        return WorkerFailedError(f"worker {where(rank)}, pid {self._procs[rank].pid}, exited "
                                 "before it was asked to; the pipeline was stopped", rank=rank)

    # -- ending --------------------------------------------------------------------------
    def close(self, *, grace_s: float = GRACE_S) -> None:
        """Ask every rank to finish ("close"), wait up to ``grace_s``, then stop what is left."""
        self._closing = True
        if self.failed is None:
            self.send_all(("close",))
            deadline = time.monotonic() + grace_s
            for p in self._procs:
                if p.pid is not None:  # a start that failed part-way leaves some unstarted
                    p.join(timeout=max(0.0, deadline - time.monotonic()))
        self.stop()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(timeout=GRACE_S)

    def stop(self) -> None:
        """End every worker now: SIGKILL a stopped one, SIGTERM the others, then SIGKILL."""
        self._closing = True
        for p in self._procs:
            if p.pid is not None and p.exitcode is None:
                if _is_stopped(p.pid):
                    p.kill()  # a stopped process never handles SIGTERM
                else:
                    p.terminate()
        deadline = time.monotonic() + GRACE_S
        for p in self._procs:
            if p.pid is not None:
                p.join(timeout=max(0.0, deadline - time.monotonic()))
        for p in self._procs:
            if p.pid is not None and p.exitcode is None:
                p.kill()
                p.join(timeout=GRACE_S)
        for q in (self._inbox, *self._commands):
            q.close()
            q.cancel_join_thread()


def _is_stopped(pid: int) -> bool:
    from hpipe.runtime.liveness import process_state

    return process_state(pid) in ("T", "t")


def run_once(target: Callable, payload: Any, settings: WorkerSettings, *,
             on_progress: OnProgress | None = None,
             on_started: Callable[[list[int]], None] | None = None,
             describe_rank: Callable[[int], str] | None = None,
             liveness_s: float = DEFAULT_LIVENESS_S, process_name: str = "hpipe-rank") -> Any:
    """Run ``target(payload, ctx) -> result`` once on every rank; returns rank 0's result.

    The watching happens on this thread, so Ctrl-C lands here and every worker is stopped.
    """
    box: dict[str, Any] = {}

    def on_message(msg: tuple) -> None:
        if msg[0] == "progress" and on_progress is not None:
            on_progress(*msg[1:])
        elif msg[0] == "result":
            box["result"] = msg[1]

    pool = WorkerPool(_once, (target, payload), settings, on_message=on_message,
                      describe_rank=describe_rank, liveness_s=liveness_s,
                      process_name=process_name, workers_may_finish=True)
    pool.start()
    if on_started is not None:
        on_started(pool.pids)
    try:
        while not ("result" in box and all(p.exitcode == 0 for p in pool._procs)):
            pool.poll()
        return box["result"]
    finally:
        pool.stop()


def _once(target_payload: tuple, ctx: RankContext, commands, emit) -> None:
    """A one-shot rank: run ``target(payload, ctx)`` and emit rank 0's result (no commands are
    read)."""
    target, payload = target_payload
    result = target(payload, ctx)
    if ctx.rank == 0:
        emit(("result", result))


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGKILL this worker when its supervisor dies (no orphans)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the supervisor died before prctl took effect
        os._exit(1)


def _worker_main(target, payload, settings: WorkerSettings, rank: int, commands, inbox,
                 beats: Heartbeats, parent_pid: int) -> None:
    """Entry point of a spawned worker process."""
    _die_with_parent(parent_pid)
    stop_beating = beats.start_beating(rank)
    # SIGTERM from the supervisor: leave at once (the default handler); Ctrl-C reaches the
    # whole foreground process group, so the supervisor handles it and stops us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=os.environ.get("HPIPE_LOG", "WARNING").upper(),
                        format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")

    def emit(msg: tuple) -> None:
        inbox.put(pickle.dumps(msg))  # see [Note: messages are pickled bytes]

    try:
        from hpipe.runtime.rank import Rendezvous, join_group

        s = settings
        rv = Rendezvous(addr=s.addr, port=s.port, rank=rank, world_size=s.world_size,
                        backend=s.backend, connect_timeout_s=s.connect_timeout_s,
                        collective_timeout_s=s.collective_timeout_s)
        if s.cuda_devices is not None:
            import torch

            torch.cuda.set_device(s.cuda_devices[rank])
        data, ctrl = join_group(rv)
        report = s.progress_ranks is None or rank in s.progress_ranks
        progress = ((lambda kind, done, total: emit(("progress", kind, done, total)))
                    if report else None)
        positions = beats.positions

        def mark_action(i: int) -> None:
            positions[rank] = i

        ctx = RankContext(rank=rank, world_size=s.world_size, backend=s.backend,
                          data_group=data, ctrl_group=ctrl, progress=progress,
                          mark_action=mark_action)
        target(payload, ctx, commands, emit)
        import torch.distributed as dist

        dist.destroy_process_group()
    except Exception as e:  # report any failure, typed, to the supervisor; then exit non-zero
        inbox.put(pickle.dumps(("error", rank, type(e).__name__, str(e), traceback.format_exc())))
        inbox.close()
        inbox.join_thread()
        os._exit(1)
    stop_beating()  # before the interpreter finalises (see Heartbeats.start_beating)
    inbox.close()
    inbox.join_thread()
