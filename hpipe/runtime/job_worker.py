"""Every rank but 0 of a torchrun job: serve the driver's sessions until it ends the job.

``serve_job(job, model)`` waits for session k's setup (hpipe/runtime/job.py), checks that this
host's ``--model`` is the model rank 0 planned for, joins the groups, and runs the same
``serve_rank`` a local session's worker runs, with its command queue fed by a relay thread that
reads the store and its reports written to the store. Between sessions it waits; "end" returns.

How this rank ends otherwise, always with a line that says why:

- rank 0 says "abort" (a session broke): exit 1 at once, even from inside a collective that
  will never finish (the relay thread is not the compute thread);
- rank 0 stops beating for the job's liveness limit, or the store goes away: exit 1;
- this rank's stage raises: the exception is reported to rank 0, then exit 1;
- SIGTERM (torchrun's agent ends a host's workers when one of them failed): a last report says
  so, so that rank 0 blames the rank that failed, then exit 143.
"""

from __future__ import annotations

import datetime
import logging
import queue
import signal
import socket
import sys
import threading
import time
import traceback

from hpipe.errors import PlanMismatchError
from hpipe.runtime.job import STORE_WAIT_S, SessionSetup, TorchrunJob, model_shape, read_beat
from hpipe.runtime.job_pool import TERMINATED
from hpipe.runtime.launch import leave_rank
from hpipe.runtime.liveness import HEARTBEAT_S
from hpipe.runtime.pool import RankContext

log = logging.getLogger(__name__)


class _Reports:
    """This rank's reports to rank 0 for the current session (one connection, one lock)."""

    def __init__(self, job: TorchrunJob) -> None:
        self.store = job.store.another(timeout_s=60.0)
        self.rank = job.rank
        self.prefix: str | None = None
        self.lock = threading.Lock()

    def emit(self, msg: tuple) -> None:
        with self.lock:
            if self.prefix is None:
                return
            n = self.store.add(f"{self.prefix}rep/n")
            self.store.put(f"{self.prefix}rep/{n}", msg)


def _exit(code: int, text: str) -> None:
    """Leave now, from any thread, with one line on stderr."""
    print(f"hpipe: {text}", file=sys.stderr, flush=True)
    leave_rank(code)


def serve_job(job: TorchrunJob, model: str) -> None:
    """Serve every session rank 0 opens on ``job`` until it ends the job."""
    import torch.distributed as dist

    reports = _Reports(job)
    _watch_the_driver(job)
    _last_words_on_sigterm(job, reports)
    k = 0
    while True:
        try:
            setup = job.store.take(f"s{k}/setup")
        except Exception as e:
            _exit(1, f"rank {job.rank}: the job's store went away while waiting for rank 0 ({e})")
        if setup == ("end",):
            break
        if isinstance(setup, tuple) and setup[0] == "error":
            _exit(1, f"rank {job.rank}: rank 0 ended the job: {setup[1]}: {setup[2]}")
        reports.prefix = f"s{k}/"
        try:
            _serve_session(job, k, setup, model, reports)
        except Exception as e:  # tell rank 0 what went wrong here, then leave
            reports.emit(("error", job.rank, type(e).__name__, str(e), traceback.format_exc()))
            _exit(1, f"rank {job.rank}: {type(e).__name__}: {e}")
        k += 1
    job.stop_beating()
    if job.backend is not None:
        dist.destroy_process_group()


def _serve_session(job: TorchrunJob, k: int, setup: SessionSetup, model: str,
                   reports: _Reports) -> None:
    import torch.distributed as dist

    from hpipe.model.source import open_model
    from hpipe.runtime.rank import COLLECTIVE_TIMEOUT_S, build_tp_groups, serve_rank

    serving = job.rank in setup.serving
    try:  # answer rank 0 before joining any group (see JobPool._wait_for_acks)
        if serving:
            mine = model_shape(open_model(model).spec)
            if mine != setup.model_shape:
                raise PlanMismatchError(
                    f"--model {model} on {job.where(job.rank)} has (layers, hidden, heads, kv "
                    f"heads, vocab) {mine}, but rank 0 planned for {setup.model_shape}; give "
                    "every host the same model")
    except Exception as e:
        job.store.put(f"s{k}/ack/{job.rank}", ("error", type(e).__name__, str(e)))
        _exit(1, f"rank {job.rank}: {type(e).__name__}: {e}")
    job.store.put(f"s{k}/ack/{job.rank}", ("ok",))
    job.join_process_group(setup.backend)
    ctrl = dist.new_group(list(setup.serving), backend="gloo",
                          timeout=datetime.timedelta(seconds=STORE_WAIT_S))
    commands: queue.Queue = queue.Queue()
    relay = threading.Thread(target=_relay, args=(job, f"s{k}/", commands), daemon=True,
                             name="hpipe-job-relay")
    relay.start()
    if serving:
        def mark_action(i: int) -> None:
            job.position = i

        ctx = RankContext(rank=job.rank, world_size=job.world_size, backend=job.backend,
                          data_group=dist.group.WORLD, ctrl_group=ctrl,
                          rank_of_device=setup.rank_of_device, mark_action=mark_action)
        serve_rank(setup.plan, model, ctx, commands, reports.emit)
    else:  # the plan leaves this device out; the groups are still made by every rank
        build_tp_groups([setup.plan], backend=job.backend, rank_of_device=setup.rank_of_device,
                        timeout_s=COLLECTIVE_TIMEOUT_S)
        while commands.get()[0] != "close":
            pass
    relay.join()
    reports.emit(("closed", job.rank))
    dist.destroy_process_group(ctrl)


def _relay(job: TorchrunJob, prefix: str, commands: queue.Queue) -> None:
    """Rank 0's commands of one session, in order, into this rank's queue; "abort" ends the
    process here and now."""
    store = job.store.another()
    readers = job.world_size - 1
    n = 0
    while True:
        n += 1
        key = f"{prefix}cmd/{n}"
        try:
            msg = store.take(key)
            if store.add(key + "/acks") == readers:  # the last reader tidies up
                store.delete(key, key + "/acks")
        except Exception as e:
            _exit(1, f"rank {job.rank}: the job's store went away ({e}); ending")
        if msg[0] == "abort":
            _exit(1, f"rank {job.rank}: rank 0 ended the session: {msg[1]}")
        commands.put(msg)
        if msg[0] == "close":
            return


def _watch_the_driver(job: TorchrunJob) -> None:
    """Leave when rank 0 stops beating for the job's liveness limit: nobody would ever send
    this rank another command, and torchrun on this host would wait forever."""
    store = job.store.another(timeout_s=60.0)

    def watch() -> None:
        last, seen = -1, time.monotonic()
        while True:
            time.sleep(HEARTBEAT_S)
            try:
                count, _ = read_beat(store.beats([0])[0])
            except Exception as e:
                _exit(1, f"rank {job.rank}: the job's store went away ({e}); ending")
            now = time.monotonic()
            if count != last:
                last, seen = count, now
            elif now - seen > job.liveness_s:
                m = job.members[0]
                _exit(1, f"rank {job.rank}: rank 0 (the driver, on {job.where(0)}, pid {m.pid}) "
                         f"stopped answering: no heartbeat for {now - seen:.1f} s; ending")

    threading.Thread(target=watch, name="hpipe-job-driver-watch", daemon=True).start()


def _last_words_on_sigterm(job: TorchrunJob, reports: _Reports) -> None:
    """On SIGTERM, report it before leaving. Python runs a signal handler only on the main
    thread, which may sit in a collective for hours, so the handler's only job is to wake
    ``set_wakeup_fd``'s socket, and a thread of its own does the rest."""
    if threading.current_thread() is not threading.main_thread():
        return
    rsock, wsock = socket.socketpair()
    wsock.setblocking(False)
    signal.signal(signal.SIGTERM, lambda *_: None)
    signal.set_wakeup_fd(wsock.fileno(), warn_on_full_buffer=False)

    def last_words() -> None:
        while True:
            data = rsock.recv(64)
            if signal.SIGTERM in data:
                break
        try:
            reports.emit(("error", job.rank, TERMINATED,
                          "received SIGTERM (torchrun's agent ends a host's workers when one "
                          "of them fails)", ""))
        finally:
            _exit(143, f"rank {job.rank}: received SIGTERM; ending")

    threading.Thread(target=last_words, name="hpipe-job-last-words", daemon=True).start()
