"""A Session owns a running pipeline: workers started once, weights loaded once, many requests.

    from hpipe.session import Request, Session

    with Session.open(model="smollm2", cluster="local:2", seq_len=2048) as session:
        stream = session.submit(Request.from_ids(ids, max_new_tokens=32))
        for event in stream:                 # Progress, then Tokens as they are sampled
            ...
        done = stream.result()               # Finished: the RunResult, finish reasons

Opening plans (or takes a plan), spawns one worker per device the plan uses, joins them into
process groups once and has each load its stage's weights once; ``open`` returns when every
stage is loaded. Requests then travel to the workers as messages (``hpipe.runtime.rank``'s
``serve_rank``), one after another in the order they were submitted; any thread may submit,
and each submission gets its own stream of events. ``cancel`` ends a queued request at once
and a running one within one slice or decode step.

Liveness: the supervisor (``hpipe.runtime.pool``) watches exit codes and heartbeats. A worker
that dies, or stops answering for ``liveness_s``, breaks the session: its running and queued
requests end with a ``WorkerFailedError`` naming that rank, every worker is ended, and further
submissions are refused with the same cause. A new session can be opened at once.

An idle session holds no pending collective, so it waits for hours; the connect timeout only
bounds joining.

Two modes. By default requests run one after another, each through its plan's static schedule
(the action lists the simulator times), so each Finished carries a measured Timeline: what
``hpipe run`` and the demo use. With ``interleave=True`` (``hpipe serve``) many one-row requests
share the pipeline at once, prefill slices taking turns with decode steps
(hpipe/interleave.py, hpipe/session_items.py).

Interleaved sessions also keep the KV caches of prefilled prompts, and a request whose prompt
starts like a kept one prefills only the rest (hpipe/prefix_cache.py).

Across hosts, under torchrun, rank 0 opens sessions on the job (``Session.open(...,
job=TorchrunJob.join(env))``) and holds its own stage in a thread, while every other rank runs
``serve_job(job, model)`` until rank 0 ends the job (hpipe/runtime/job.py; the README has the
example). The API, the modes and the liveness rules are the same; a session that breaks there
breaks the job (its process group lost a member).
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from hpipe.cluster import ClusterSpec, load_cluster
from hpipe.errors import PlanMismatchError, WorkerFailedError
from hpipe.plan.plan import Plan
from hpipe.runtime.liveness import DEFAULT_LIVENESS_S
from hpipe.session_events import (
    WAIT_POLL_S,
    Event,
    Finished,
    Progress,
    Request,
    Stream,
    Tokens,
)

if TYPE_CHECKING:  # not at import: a spawned worker unpickles this module's target first
    from hpipe.runtime.request import RunRequest

# The events and requests live in session_events.py; they are part of this module's API.
__all__ = ["Event", "Finished", "Progress", "Request", "Session", "SessionClosedError", "Stream",
           "Tokens"]

log = logging.getLogger(__name__)

CLOSE_GRACE_S = 5.0  # close(): how long a running request may take to finish before the kill


class SessionClosedError(RuntimeError):
    """A request submitted to a session that was closed."""


@dataclass
class _Job:
    stream: Stream
    run: RunRequest
    outcomes: list = field(default_factory=list)


# -- the session -------------------------------------------------------------------------------
class Session:
    """A running pipeline; make one with ``Session.open``. Thread-safe."""

    def __init__(self, *, model: str, plan: Plan, spec, tokenizer, liveness_s: float,
                 connect_timeout_s: float,
                 on_failure: Callable[[Exception], None] | None = None) -> None:
        self.model = model
        self.plan = plan
        self.spec = spec
        self.tokenizer = tokenizer
        self.liveness_s = liveness_s
        self.connect_timeout_s = connect_timeout_s
        self.on_failure = on_failure
        self.state = "loading"  # -> "ready" -> "closed", or "broken"
        self.error: Exception | None = None
        self.num_stage_loads: dict[int, int] = {}  # rank -> loads, as reported when ready
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._queue: deque[_Job] = deque()
        self._running: _Job | None = None
        self._pool = None
        self._dispatcher: threading.Thread | None = None
        self._items = None  # InterleavedRuns in interleaved mode (hpipe/session_items.py)
        self._job = None  # the TorchrunJob this session runs on, if any

    # -- opening -------------------------------------------------------------------------
    @classmethod
    def open(cls, *, model: str, plan: Plan | None = None, cluster: ClusterSpec | str = "local:2",
             method: str = "hpipe", seq_len: int | None = None, batch: int = 1,
             dtype: str = "float32", cost=None, allow_tp: bool = True,
             liveness_s: float = DEFAULT_LIVENESS_S, connect_timeout_s: float = 60.0,
             wait: bool = True, interleave: bool = False, whole_prefill: bool = False,
             prefix_reuse: bool = True, on_failure: Callable[[Exception], None] | None = None,
             job=None) -> Session:
        """Plan (unless ``plan`` is given), start the workers and, with ``wait``, return once
        every stage has loaded its weights (raising if a worker failed meanwhile).

        Without a plan, ``method`` is planned on ``cluster`` for ``batch`` prompts of
        ``seq_len`` tokens (default: the model's context, capped at 4096); prompts of other
        lengths use the plan's slicing rescaled (``Plan.slices_for``). ``cost`` is a cost
        model (e.g. fitted from a profile), None for the analytic one. ``on_failure(error)``
        is called (on the supervisor's thread) once the session breaks. ``interleave``: run
        many one-row requests at once, prefill slices taking turns with decode steps
        (hpipe/interleave.py), instead of one whole request after another; with
        ``whole_prefill`` each prompt goes in one piece (what servers without slicing do: for
        comparisons). ``prefix_reuse`` (interleaved only): a prompt that starts like one
        prefilled before takes that prefix's KV cache instead of prefilling it again
        (hpipe/prefix_cache.py).

        ``job``: a ``TorchrunJob`` this process is rank 0 of; the session's ranks are then the
        job's processes on every host (see the module docstring), not local workers.

        Open it from a thread that outlives it (the main thread, or one kept for it): Linux
        ends the workers when the thread that spawned them ends (see hpipe/runtime/pool.py).
        """
        from hpipe.model.source import open_model
        from hpipe.runtime.launch import check_local_devices
        from hpipe.runtime.request import check_plan

        if liveness_s <= 0 or connect_timeout_s <= 0:
            raise PlanMismatchError(f"liveness_s ({liveness_s:g}) and connect_timeout_s "
                                    f"({connect_timeout_s:g}) must be > 0 seconds")
        source = open_model(model)
        spec = source.spec
        if plan is None:
            from hpipe.plan.api import plan_method

            cluster = load_cluster(cluster) if isinstance(cluster, str) else cluster
            plan = plan_method(method, model=spec, cluster=cluster, batch=batch,
                               seq_len=seq_len or min(spec.max_seq_len, 4096), dtype=dtype,
                               cost=cost, allow_tp=allow_tp)
        check_plan(plan, spec, model=model)
        if job is None:  # across hosts, each rank finds out about its own device
            check_local_devices([plan])
        session = cls(model=model, plan=plan, spec=spec, tokenizer=source.tokenizer,
                      liveness_s=liveness_s, connect_timeout_s=connect_timeout_s,
                      on_failure=on_failure)
        session._job = job
        if interleave:
            from hpipe.cost.memory import kv_token_budget
            from hpipe.session_items import InterleavedRuns

            session._items = InterleavedRuns(session, depth=plan.num_stages,
                                             kv_token_budget=kv_token_budget(plan),
                                             whole_prefill=whole_prefill,
                                             prefix_reuse=prefix_reuse)
        try:
            session._start()
            if wait:
                session.wait_ready()
        except BaseException:  # a failed load, Ctrl-C or SIGTERM while loading: end the workers
            session.close(grace_s=0.0)
            raise
        return session

    def _start(self) -> None:
        from hpipe.runtime.launch import cuda_devices_of, free_port, warn_if_oversubscribed
        from hpipe.runtime.pool import WorkerPool, WorkerSettings
        from hpipe.runtime.rank import (
            COLLECTIVE_TIMEOUT_S,
            describe_rank,
            pick_backend,
            rank_devices,
        )

        plan = self.plan
        if self._job is not None:
            from hpipe.runtime.job_pool import JobPool

            self._pool = JobPool(self._job, plan, self.model, self.spec,
                                 on_message=self._on_message, on_failure=self._on_failure,
                                 liveness_s=self.liveness_s)
            self._pool.start()
            self._start_dispatch()
            return
        backend = pick_backend([plan])
        warn_if_oversubscribed([plan.cluster])
        world = len(rank_devices(plan))
        settings = WorkerSettings(
            world_size=world, addr="127.0.0.1", port=free_port(), backend=backend,
            connect_timeout_s=self.connect_timeout_s, collective_timeout_s=COLLECTIVE_TIMEOUT_S,
            cuda_devices=cuda_devices_of(plan) if backend == "nccl" else None)
        self._pool = WorkerPool(
            _serve_target, (plan, self.model), settings, on_message=self._on_message,
            on_failure=self._on_failure, describe_rank=lambda r: describe_rank(plan, r),
            liveness_s=self.liveness_s, process_name="hpipe-session-rank")
        self._pool.start(watch_in_thread=True)
        self._start_dispatch()

    def _start_dispatch(self) -> None:
        if self._items is not None:
            self._items.start()
            return
        self._dispatcher = threading.Thread(target=self._dispatch_loop, daemon=True,
                                            name="hpipe-session-dispatch")
        self._dispatcher.start()

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until every stage is loaded; raise the failure if the session broke first."""
        waited = 0.0
        with self._cond:
            while self.state == "loading":
                self._cond.wait(WAIT_POLL_S)
                waited += WAIT_POLL_S
                if timeout is not None and waited >= timeout:
                    raise TimeoutError(f"the session's workers did not load within {timeout:g} s")
            if self.state == "broken":
                assert self.error is not None
                raise self.error

    @property
    def pids(self) -> list[int]:
        """The worker processes' ids, by rank (under torchrun: every rank of the job, on
        whatever host it runs)."""
        return self._pool.pids if self._pool is not None else []

    @property
    def device_ranks(self) -> dict[str, int]:
        """Which rank holds each device the plan uses (by device name): locally the timeline
        row; under torchrun whatever rank the job gave the process on that device's host."""
        if self._pool is None:
            return {}
        rank_of_device = self._pool.rank_of_device or {
            d: r for r, d in enumerate(self.plan.row_devices)}
        return {self.plan.cluster.devices[d].name: rank_of_device[d]
                for d in self.plan.row_devices}

    def busy_seconds(self) -> dict[int, float]:
        """An interleaved session's compute seconds per timeline row (a device) so far, as the
        ranks report them (about once a second); empty otherwise."""
        if self._items is None:
            return {}
        rows = self._pool.row_of_rank
        return {rows[r]: s for r, s in self._items.busy_s.items()}

    def prefix_stats(self) -> dict[str, int]:
        """An interleaved session's prefix reuse so far: prompt tokens of admitted requests
        (``queried_tokens``), how many came from kept prefixes (``hit_tokens``), and the
        positions kept now (``held_tokens``); empty when it does not reuse prefixes."""
        prefixes = self._items.sched.prefixes if self._items is not None else None
        if prefixes is None:
            return {}
        with self._cond:
            return {"queried_tokens": prefixes.queried_tokens, "hit_tokens": prefixes.hit_tokens,
                    "held_tokens": prefixes.held_tokens}

    @property
    def kv_token_budget(self) -> int | None:
        """KV positions an interleaved session may hold over all its requests (None: one
        request at a time, whatever fits its plan)."""
        return self._items.sched.kv_token_budget if self._items is not None else None

    @property
    def world_size(self) -> int:
        """The ranks that hold a part of the plan (each reports once per request)."""
        return len(self._pool.serving_ranks) if self._pool is not None else 0

    # -- requests ------------------------------------------------------------------------
    def submit(self, request: Request) -> Stream:
        """Queue ``request``; returns its stream at once. Bad input raises here (typed, naming
        the value), before anything reaches the workers."""
        from hpipe.model.generate import Sampler
        from hpipe.runtime.request import RunRequest, check_prompt, check_request, fit_plan

        rows = [list(r) for r in request.prompt_ids]
        check_prompt(rows, self.spec, max_new_tokens=request.max_new_tokens)
        Sampler(temperature=request.temperature, top_p=request.top_p, seed=request.seed)
        eos = tuple(self.tokenizer.eos_token_ids or self.spec.eos_token_ids)
        if self._items is not None:
            with self._cond:
                self._raise_if_unusable()
                stream = Stream(self, next(self._ids))
                self._items.submit(stream.id, stream, request, eos=eos)
                self._cond.notify_all()
            return stream
        plan = fit_plan(self.plan, batch=len(rows), prompt_len=len(rows[0]))
        from hpipe.runtime.rank import COLLECTIVE_TIMEOUT_S

        run = RunRequest(model=self.model, plan=plan, prompt_ids=request.prompt_ids,
                         max_new_tokens=request.max_new_tokens,
                         temperature=request.temperature, top_p=request.top_p,
                         seed=request.seed, stop_at_eos=request.stop_at_eos, eos_token_ids=eos,
                         recv_timeout_s=COLLECTIVE_TIMEOUT_S,
                         label=request.label or plan.method)
        check_request(run, self.spec)
        with self._cond:
            self._raise_if_unusable()
            job = _Job(Stream(self, next(self._ids)), run)
            self._queue.append(job)
            self._cond.notify_all()
        return job.stream

    def generate(self, request: Request, timeout: float | None = None) -> Finished:
        """Submit and wait for the end."""
        return self.submit(request).result(timeout)

    def cancel(self, request_id: int) -> bool:
        """End a request: a queued one at once, a running one within a slice or a decode step.
        False when it is unknown or already finished."""
        if self._items is not None:
            with self._cond:
                done = self._items.cancel(request_id)
                self._cond.notify_all()
            return done
        with self._cond:
            for job in self._queue:
                if job.stream.id == request_id:
                    self._queue.remove(job)
                    reasons = ("cancelled",) * job.run.batch
                    job.stream._end(Finished(request_id, None, reasons))
                    return True
            running = self._running
            if (running is None or running.stream.id != request_id or running.stream.done
                    or self.state != "ready"):
                return False
        self._pool.send_all(("cancel", request_id))
        return True

    def _raise_if_unusable(self) -> None:
        if self.state == "broken":
            raise WorkerFailedError(f"the session is broken ({self.error}); open a new one")
        if self.state == "closed":
            raise SessionClosedError("the session is closed; open a new one")

    def _dispatch_loop(self) -> None:
        """Hand the workers one request at a time, in submission order."""
        while True:
            with self._cond:
                while self.state == "loading" or (self.state == "ready" and not self._queue):
                    self._cond.wait()
                if self.state != "ready":
                    return
                job = self._queue.popleft()
                self._running = job
            self._pool.send_all(("run", job.stream.id, job.run))
            while not job.stream._done.wait(WAIT_POLL_S):
                pass
            with self._cond:
                self._running = None
                self._cond.notify_all()

    # -- messages from the workers (on the supervisor's thread) ----------------------------
    def _on_message(self, msg: tuple) -> None:
        kind = msg[0]
        if self._items is not None and self._items.on_message(msg):
            return
        if kind == "ready":
            with self._cond:
                self.num_stage_loads[msg[1]] = msg[2]
                if len(self.num_stage_loads) == self.world_size and self.state == "loading":
                    self.state = "ready"
                    log.info("session ready: %d workers, pids %s", self.world_size, self.pids)
                self._cond.notify_all()
            return
        job = self._running
        if job is None or job.stream.id != msg[1]:
            return  # a late message of a request that already ended
        if kind == "token":
            job.stream._push(Tokens(msg[1], tuple(msg[2])))
        elif kind == "progress":
            job.stream._push(Progress(msg[1], msg[2], msg[3], msg[4]))
        elif kind == "outcome":
            if msg[3] is not None:
                job.outcomes.append(msg[3])
            if len(job.outcomes) == self.world_size:
                self._finish(job)

    def _finish(self, job: _Job) -> None:
        from hpipe.runtime.rank import assemble_result

        result = assemble_result(job.run, job.outcomes)
        n = job.run.max_new_tokens
        reasons = tuple("cancelled" if result.cancelled else
                        ("length" if len(row) >= n else "stop") for row in result.output_ids)
        job.stream._end(Finished(job.stream.id, result, reasons))

    def _on_failure(self, error: Exception) -> None:
        """A worker died or went silent: the pool has ended every worker; fail what is left."""
        log.warning("session broken: %s", error)
        with self._cond:
            if self.state == "closed":
                return
            self.state, self.error = "broken", error
            jobs = ([self._running] if self._running else []) + list(self._queue)
            self._queue.clear()
            streams = self._items.fail_all(error) if self._items is not None else []
            self._cond.notify_all()
        for stream in streams:
            stream._end(error)
        running = self._running
        for job in jobs:
            if job is running:
                job.stream._end(self._with_grid(error, job))
            else:
                job.stream._end(error)
        if self.on_failure is not None:
            self.on_failure(error)

    def _with_grid(self, error: Exception, job: _Job) -> Exception:
        """``error`` with the running request's grid appended (same type, same rank)."""
        text = f"{error}\n{self._where_ranks_were(job)}"
        if isinstance(error, WorkerFailedError):
            return WorkerFailedError(text, rank=error.rank)
        return type(error)(text)

    def _where_ranks_were(self, job: _Job) -> str:
        """The running request's schedule around the action each stage's leader was on."""
        from hpipe.runtime.rank import stage_ranks
        from hpipe.schedule import build_schedule

        run = job.run
        sched = build_schedule(run.plan, num_decode_steps=max(0, run.max_new_tokens - 1),
                               slices=run.slices)
        positions = self._pool.positions()
        ranks_of = stage_ranks(run.plan, self._pool.rank_of_device)
        at = {s: positions[ranks[0]] for s, ranks in enumerate(ranks_of)}
        return ("where each stage was when it failed (its action in brackets; R receive, "
                "C compute, S send, then the unit):\n" + sched.grid(at, around=4))

    # -- closing -------------------------------------------------------------------------
    def close(self, *, grace_s: float = CLOSE_GRACE_S) -> None:
        """Cancel queued requests, give a running one ``grace_s`` to finish, end every worker."""
        with self._cond:
            if self.state == "closed":
                return
            was_broken = self.state == "broken"
            queued = list(self._queue)
            self._queue.clear()
            running = self._running
        for job in queued:
            job.stream._end(Finished(job.stream.id, None, ("cancelled",) * job.run.batch))
        if self._items is not None:
            with self._cond:
                for rid in list(self._items.reqs):
                    self._items.cancel(rid)
        if running is not None and not was_broken:
            self._pool.send_all(("cancel", running.stream.id))
            running.stream._done.wait(grace_s)
        with self._cond:
            self.state = "closed"
            self._cond.notify_all()
        if running is not None:
            running.stream._end(SessionClosedError("the session was closed during the request"))
        if self._pool is not None:
            self._pool.close(grace_s=grace_s)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Session({self.model!r}, {self.plan.method} on {self.plan.cluster.name}, "
                f"{self.state}, pids {self.pids})")


def _serve_target(plan_model: tuple, ctx, commands, emit) -> None:
    """Each worker's life in a session (module level: spawn pickles it by name)."""
    from hpipe.runtime.rank import serve_rank

    plan, model = plan_model
    serve_rank(plan, model, ctx, commands, emit)

