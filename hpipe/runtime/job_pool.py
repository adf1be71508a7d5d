"""Rank 0's side of one session on a torchrun job: the face of ``pool.WorkerPool`` over the
job's store instead of local processes.

Rank 0 holds its own stage (when the plan uses its device) in a thread of this process, fed from
a local queue; the other ranks get the same commands through the store (hpipe/runtime/job.py)
and report back through it. A watcher thread delivers every report to the session and checks
every rank's heartbeat:

- a rank whose heartbeat is silent for ``liveness_s`` (stopped, wedged, its host gone) breaks
  the session, and the error names it, its host and pid;
- a rank that raises reports the exception, then exits;
- a rank killed outright says nothing: its peers report broken links, and the rank to blame is
  the one whose heartbeat stopped without a word (DEAD_SILENCE_S), not the peers that reported.
  A rank that torchrun's agent ended (SIGTERM, because a process on its host failed) says so
  in its last words and is not blamed either.

On a failure every other rank is told to abort (they exit 1, so each host's torchrun ends), and
the job cannot host another session: its process group has lost a member.
"""

from __future__ import annotations

import datetime
import logging
import queue
import threading
import time
import traceback
from collections.abc import Callable

from hpipe.errors import ClusterError, WorkerFailedError, reported_error
from hpipe.runtime.job import STORE_WAIT_S, SessionSetup, TorchrunJob, model_shape, read_beat
from hpipe.runtime.liveness import HEARTBEAT_S, Silent, describe_silence, process_state
from hpipe.runtime.pool import GRACE_S, POLL_S, RankContext

log = logging.getLogger(__name__)

# A rank that has not beaten for this long while its peers report broken links is taken for
# dead: three missed beats, well past a busy interpreter's scheduling delay.
DEAD_SILENCE_S = 3 * HEARTBEAT_S
# After the first reported failure, wait this long before naming a cause: long enough for a
# killed rank's silence to pass DEAD_SILENCE_S.
SETTLE_S = DEAD_SILENCE_S + 2 * HEARTBEAT_S
TERMINATED = "Terminated"  # the type name of a rank's last words on SIGTERM (job_worker.py)


class JobPool:
    """One session's ranks on a torchrun job, watched from rank 0. See the module docstring."""

    def __init__(self, job: TorchrunJob, plan, model: str, spec, *,
                 on_message: Callable[[tuple], None],
                 on_failure: Callable[[Exception], None] | None = None,
                 liveness_s: float) -> None:
        from hpipe.runtime.rank import pick_backend, ranks_by_host

        if job.rank != 0:
            raise RuntimeError("only rank 0 of a torchrun job opens sessions")
        if job.broken is not None or job.ended:
            raise WorkerFailedError(f"this torchrun job can host no more sessions ({job.broken or 'ended'}); "
                                    "start it again")
        self.job = job
        self.plan = plan
        self.model = model
        self.on_message = on_message
        self.on_failure = on_failure
        self.liveness_s = liveness_s
        self.prefix = f"s{job.next_session}/"
        job.next_session += 1
        try:
            if job.world_size != plan.cluster.num_devices:
                raise ClusterError(
                    f"torchrun started {job.world_size} processes but cluster "
                    f"{plan.cluster.name!r} has {plan.cluster.num_devices} devices; start one "
                    "process per device (--nnodes x --nproc-per-node)")
            self.rank_of_device = ranks_by_host(
                plan.cluster, [(m.host, m.local_rank) for m in job.members])
        except ClusterError as e:
            job.store.put(self.prefix + "setup", ("error", type(e).__name__, str(e)))
            job.broken = e
            raise
        self.serving_ranks = tuple(sorted(self.rank_of_device[d] for d in plan.row_devices))
        self.row_of_rank = {self.rank_of_device[d]: row for row, d in enumerate(plan.row_devices)}
        self.setup = SessionSetup(plan=plan, model_shape=model_shape(spec),
                                  backend=pick_backend([plan]),
                                  rank_of_device=self.rank_of_device,
                                  serving=self.serving_ranks)
        self._remote = [r for r in range(job.world_size) if r != 0]
        self._inbox: queue.Queue = queue.Queue()
        self._local_cmds: queue.Queue = queue.Queue()
        self._cmd_seq = 0
        self._cmd_lock = threading.Lock()  # one numbering of commands, whoever sends
        self._failures: list[tuple[int, str, str, str]] = []
        self._first_failure_at: float | None = None
        self._closed_ranks: set[int] = set()
        self._last_beat = {r: (-1, time.monotonic()) for r in self._remote}  # count, when seen
        self._positions = [-1] * job.world_size
        self._beats_read_at = 0.0
        self._beat_store = None  # the watcher thread's own connection (made in that thread)
        self._closing = False
        self.failed: Exception | None = None
        self._threads: list[threading.Thread] = []
        self._stage: threading.Thread | None = None
        self._ctrl = None

    # -- the WorkerPool face -------------------------------------------------------------
    @property
    def pids(self) -> list[int]:
        return self.job.pids

    def positions(self) -> list[int]:
        self._positions[0] = self.job.position
        return list(self._positions)

    def describe(self, rank: int) -> str:
        """"rank 1 (stage 1, device 'cpu1' on host 'h1')" for errors."""
        from hpipe.runtime.rank import stage_ranks

        for s, ranks in enumerate(stage_ranks(self.plan, self.rank_of_device)):
            if rank in ranks:
                device = self.plan.cluster.devices[self.plan.stages[s].devices[ranks.index(rank)]]
                return f"rank {rank} (stage {s}, device {device.name!r} on {self.job.where(rank)})"
        return f"rank {rank} ({self.job.where(rank)})"

    def start(self, *, watch_in_thread: bool = True) -> None:
        """Tell every rank the session, join the groups, start rank 0's stage and the watcher."""
        import torch.distributed as dist

        job = self.job
        job.store.put(self.prefix + "setup", self.setup)
        self._wait_for_acks()
        job.join_process_group(self.setup.backend)
        # Collective over the whole job, in the same order on every rank (job_worker.py).
        self._ctrl = dist.new_group(list(self.serving_ranks), backend="gloo",
                                    timeout=datetime.timedelta(seconds=STORE_WAIT_S))
        self._spawn(self._read_reports, "hpipe-job-reports")
        if 0 in self.serving_ranks:
            self._stage = self._spawn(self._run_stage, "hpipe-job-stage0")
        else:
            from hpipe.runtime.rank import COLLECTIVE_TIMEOUT_S, build_tp_groups

            build_tp_groups([self.plan], backend=job.backend, rank_of_device=self.rank_of_device,
                            timeout_s=COLLECTIVE_TIMEOUT_S)
        log.info("session %s on the torchrun job: ranks %s serve, pids %s",
                 self.prefix.rstrip("/"), self.serving_ranks, self.pids)
        self._spawn(self._watch_forever, "hpipe-job-supervisor")

    def _wait_for_acks(self) -> None:
        """Every other rank checks the setup against its own host (its model) and answers
        before anyone joins a group: a rank that cannot serve says why here, instead of
        leaving the others in a group that waits for it."""
        job, waiting = self.job, set(self._remote)
        deadline = time.monotonic() + job.connect_timeout_s
        while waiting:
            for r in sorted(waiting):
                key = f"{self.prefix}ack/{r}"
                if job.store.has(key):
                    waiting.discard(r)
                    ack = job.store.take(key)
                    if ack[0] == "error":
                        error = reported_error(ack[1], f"{self.describe(r)}: {ack[2]}", rank=r)
                        job.broken = error
                        raise error
            if waiting and time.monotonic() > deadline:
                error = WorkerFailedError(
                    f"ranks {sorted(waiting)} ({', '.join(self.describe(r) for r in sorted(waiting))}) "
                    f"did not take up the session within {job.connect_timeout_s:g} s")
                job.broken = error
                raise error
            time.sleep(0.02)

    def _spawn(self, fn, name: str) -> threading.Thread:
        t = threading.Thread(target=fn, name=name, daemon=True)
        t.start()
        self._threads.append(t)
        return t

    def send_all(self, msg: tuple) -> None:
        """The same command to every rank, in the same order on every rank."""
        with self._cmd_lock:
            self._local_cmds.put(msg)
            self._cmd_seq += 1
            self.job.store.put(f"{self.prefix}cmd/{self._cmd_seq}", msg)

    # -- rank 0's own stage ----------------------------------------------------------------
    def _run_stage(self) -> None:
        import torch.distributed as dist

        from hpipe.runtime.rank import serve_rank

        job = self.job

        def mark_action(i: int) -> None:
            job.position = i

        ctx = RankContext(rank=0, world_size=job.world_size, backend=job.backend,
                          data_group=dist.group.WORLD, ctrl_group=self._ctrl,
                          rank_of_device=self.rank_of_device, mark_action=mark_action)
        try:
            serve_rank(self.plan, self.model, ctx, self._local_cmds, self._inbox.put)
        except Exception as e:
            self._inbox.put(("error", 0, type(e).__name__, str(e), traceback.format_exc()))

    # -- reports -----------------------------------------------------------------------------
    def _read_reports(self) -> None:
        """Every report of the other ranks, in the order they were numbered, to the inbox."""
        store = self.job.store.another()
        n = 0
        while True:
            n += 1
            key = f"{self.prefix}rep/{n}"
            try:
                msg = store.take(key)
                store.delete(key)
            except Exception as e:
                if not self._closing:
                    log.debug("report reader stopped: %s", e)
                return
            if msg == ("reader-stop",):
                return
            self._inbox.put(msg)

    def _stop_reader(self) -> None:
        n = self.job.store.add(f"{self.prefix}rep/n")
        self.job.store.put(f"{self.prefix}rep/{n}", ("reader-stop",))

    # -- watching ------------------------------------------------------------------------
    def poll(self) -> None:
        """Deliver waiting reports and check the heartbeats once; raises the failure."""
        try:
            msg = self._inbox.get(timeout=POLL_S)
        except queue.Empty:
            msg = None
        if msg is not None:
            if msg[0] == "error":
                self._failures.append(msg[1:])
                self._first_failure_at = self._first_failure_at or time.monotonic()
            elif msg[0] == "closed":
                self._closed_ranks.add(msg[1])
            elif not self._closing:
                self.on_message(msg)
        self._check_beats()
        if self._closing:
            return
        if self._silent(self.liveness_s):
            self._first_failure_at = self._first_failure_at or time.monotonic()
        if (self._first_failure_at is not None
                and time.monotonic() - self._first_failure_at >= SETTLE_S):
            raise self._root_cause()

    def _check_beats(self) -> None:
        now = time.monotonic()
        if now - self._beats_read_at < POLL_S:
            return
        self._beats_read_at = now
        try:
            values = self._beat_store.beats(self._remote)
        except Exception as e:  # the store itself is gone: the job's host agent ended
            if not self._closing and self._first_failure_at is None:
                self._failures.append((0, "WorkerFailedError",
                                       f"the job's store stopped answering ({e})", ""))
                self._first_failure_at = now
            return
        for r, v in zip(self._remote, values):
            count, action = read_beat(v)
            self._positions[r] = action
            if count != self._last_beat[r][0]:
                self._last_beat[r] = (count, now)

    def _silent(self, limit_s: float) -> list[Silent]:
        now = time.monotonic()
        out = [Silent(r, now - seen, started=True) for r, (_, seen) in self._last_beat.items()
               if now - seen > limit_s]
        return sorted(out, key=lambda s: -s.silent_s)

    def _watch_forever(self) -> None:
        self._beat_store = self.job.store.another(timeout_s=60.0)
        try:
            while not self._closing:
                self.poll()
        except Exception as e:
            self.failed = e
            self.stop()
            if self.on_failure is not None:
                self.on_failure(e)

    def _root_cause(self) -> Exception:
        """A typed error first; then a rank that went silent without a word (killed); then one
        silent past the liveness limit; then the first reported error, last words last."""
        where = self.describe
        for rank, tname, message, tb in self._failures:
            error = reported_error(tname, f"{where(rank)}: {message}", rank=rank)
            if not isinstance(error, WorkerFailedError):
                log.debug("worker traceback:\n%s", tb)
                return error
        reported = {f[0] for f in self._failures}
        for s in self._silent(DEAD_SILENCE_S):
            if s.rank in reported:
                continue
            pid = self.job.members[s.rank].pid
            if self.job.on_this_machine(s.rank):  # emulated hosts: /proc says what happened
                text = describe_silence(s, pid=pid, where=where(s.rank))
                if not process_state(pid):
                    text += "; its process has exited"
            else:
                text = (f"worker {where(s.rank)}, pid {pid}, stopped answering: no heartbeat for "
                        f"{s.silent_s:.1f} s (if it died, torchrun on {self.job.where(s.rank)} "
                        "shows how)")
            return WorkerFailedError(text + "; the session was stopped and the other ranks "
                                     "told to end", rank=s.rank)
        told = sorted(self._failures, key=lambda f: f[1] == TERMINATED)
        if told:
            rank, tname, message, tb = told[0]
            log.debug("worker traceback:\n%s", tb)
            return WorkerFailedError(f"worker {where(rank)} failed: {tname}: {message}",
                                     rank=rank)
        return WorkerFailedError("the session failed without a cause to name")

    # -- ending --------------------------------------------------------------------------
    def close(self, *, grace_s: float = GRACE_S) -> None:
        """Ask every rank to end the session, wait up to ``grace_s`` for each to say it did,
        then abort the ones that did not."""
        import torch.distributed as dist

        if self.failed is None and not self._closing:
            self.send_all(("close",))
            deadline = time.monotonic() + max(grace_s, GRACE_S)
            while (len(self._closed_ranks) < len(self._remote)
                   and time.monotonic() < deadline and self.failed is None):
                time.sleep(POLL_S / 4)
            if self._stage is not None:
                self._stage.join(timeout=max(0.0, deadline - time.monotonic()))
            missing = sorted(set(self._remote) - self._closed_ranks)
            if missing or (self._stage is not None and self._stage.is_alive()):
                self.failed = WorkerFailedError(
                    f"ranks {missing or [0]} did not end the session within {grace_s:g} s")
        self._closing = True
        if self.failed is not None:
            self.stop()
            return
        self._stop_reader()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=GRACE_S)
        if self._ctrl is not None:
            dist.destroy_process_group(self._ctrl)

    def stop(self) -> None:
        """After a failure: tell every other rank to abort, and end this job's sessions."""
        self._closing = True
        error = self.failed or WorkerFailedError("the session was stopped")
        if self.job.broken is None:
            self.job.broken = error
            try:
                with self._cmd_lock:
                    self._cmd_seq += 1
                    self.job.store.put(f"{self.prefix}cmd/{self._cmd_seq}",
                                       ("abort", str(error).splitlines()[0]))
            except Exception as e:
                log.debug("could not tell the ranks to abort: %s", e)
        self._local_cmds.put(("close",))

