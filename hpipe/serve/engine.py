"""The server's side of the Session: open it (and reopen it after a failure), admit requests,
turn each request's session events into an asyncio stream, and keep the metrics.

The Session is thread-based; the HTTP side is asyncio. Each admitted request gets one small
thread that reads its session stream and hands events to the event loop
(``call_soon_threadsafe``), so no session call ever blocks the loop.
"""

from __future__ import annotations

import asyncio
import logging
import random
import statistics
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from hpipe.errors import CapacityError, HPipeError, WorkerFailedError
from hpipe.serve.metrics import ServeMetrics
from hpipe.serve.openai_api import APIError
from hpipe.session import Finished, Progress, Request, Session, Tokens

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineSettings:
    model: str  # what open_model reads
    served_name: str  # what clients call it ("model" in requests, /v1/models)
    max_running: int = 16  # requests on the pipeline at once (see [Note: running and waiting])
    max_waiting: int = 64  # requests queued behind them before 429
    restart: bool = True  # reopen the pipeline after a failure; False: stop the server
    whole_prefill: bool = False  # for comparison: no slicing (see Session.open)
    prefix_reuse: bool = True  # automatic prefix caching (hpipe/prefix_cache.py)
    liveness_s: float = 15.0
    connect_timeout_s: float = 60.0


class Engine:
    """States: "loading" (workers starting, weights loading) -> "ready"; "broken" after a
    failure until the pipeline is reopened (or for good, without restart); "stopped"."""

    def __init__(self, settings: EngineSettings, plan, *,
                 on_fatal: Callable[[Exception], None] | None = None,
                 on_ready: Callable[[list[int]], None] | None = None, job=None) -> None:
        self.settings = settings
        self.job = job  # the TorchrunJob the sessions run on (None: local workers)
        self.plan = plan
        self.on_fatal = on_fatal
        self.on_ready = on_ready
        self.metrics = ServeMetrics(settings.served_name)
        self.state = "loading"
        self.error: Exception | None = None
        self.session: Session | None = None
        self.tokenizer = None
        self.spec = None
        self._lock = threading.Lock()
        self._queue: deque[Handle] = deque()  # waiting for a place, in arrival order
        self._running = 0
        self._recent_e2e_s: deque[float] = deque(maxlen=32)

    # -- the pipeline's life ---------------------------------------------------------------
    # [Note: one keeper thread] Workers ask Linux to kill them when the thread that spawned
    # them ends (PR_SET_PDEATHSIG follows the parent *thread*), so every Session is opened by
    # one thread that lives as long as the engine: it opens, waits for a failure or the end,
    # and reopens.
    def start(self) -> None:
        """Open the session in the background: /health says 503 until it is ready."""
        self._wake = threading.Event()
        threading.Thread(target=self._keep, name="hpipe-serve-keeper", daemon=True).start()

    def _keep(self) -> None:
        while True:
            if not self._open():
                return
            self._wake.wait()  # set by a failure or by close()
            self._wake.clear()
            with self._lock:
                if self.state == "stopped" or not self.settings.restart:
                    return
                session, self.state = self.session, "loading"
            self.metrics.of(self.metrics.restarts).inc()
            if session is not None:
                session.close(grace_s=0.0)

    def _open(self) -> bool:
        s = self.settings
        try:
            session = Session.open(model=s.model, plan=self.plan, liveness_s=s.liveness_s,
                                   connect_timeout_s=s.connect_timeout_s, interleave=True,
                                   whole_prefill=s.whole_prefill,
                                   prefix_reuse=s.prefix_reuse, on_failure=self._on_failure,
                                   job=self.job)
        except Exception as e:  # nothing to serve: the server says why and stops
            log.error("the pipeline did not start: %s", e)
            with self._lock:
                self.state, self.error = "broken", e
            if self.on_fatal is not None:
                self.on_fatal(e)
            return False
        with self._lock:
            if self.state == "stopped":
                session.close()
                return False
            self.session, self.tokenizer, self.spec = session, session.tokenizer, session.spec
            self.state, self.error = "ready", None
            self._opened_at, self._busy_seen = time.monotonic(), {}
        log.info("serving %s: pipeline ready, workers %s", s.served_name, session.pids)
        if self.on_ready is not None:
            self.on_ready(session.pids)
        return True

    def _on_failure(self, error: Exception) -> None:
        """The session broke (a worker died or went silent): its requests already ended with
        the error. The keeper reopens it, or the server stops."""
        with self._lock:
            if self.state == "stopped":
                return
            self.state, self.error = "broken", error
        log.error("pipeline failed: %s", error)
        if not self.settings.restart and self.on_fatal is not None:
            self.on_fatal(error)
        self._wake.set()

    def close(self, *, grace_s: float = 5.0) -> None:
        with self._lock:
            self.state = "stopped"
            session = self.session
        if session is not None:
            session.close(grace_s=grace_s)
        wake = getattr(self, "_wake", None)
        if wake is not None:
            wake.set()

    def record_busy(self) -> None:
        """Each device's compute seconds and busy share since the pipeline opened, as its
        ranks report them (an item serves several requests, so this is per device, not per
        request)."""
        session = self.session
        if session is None:
            return
        m = self.metrics
        uptime = max(1e-9, time.monotonic() - self._opened_at)
        plan = self.plan
        for row, seconds in session.busy_seconds().items():
            stage, device = plan.row_stages[row], plan.row_names[row]
            m.of(m.busy, stage=str(stage), device=device).set(min(1.0, seconds / uptime))
            counter = m.of(m.busy_seconds, stage=str(stage), device=device)
            counter.inc(max(0.0, seconds - self._busy_seen.get(row, 0.0)))
            self._busy_seen[row] = max(seconds, self._busy_seen.get(row, 0.0))
        held = session.prefix_stats().get("held_tokens")
        if held is not None:
            m.of(m.prefix_held).set(held)

    def tokenizer_or_ids(self):
        """The tokenizer, or (a checkpoint without one) a stand-in that shows ids as text."""
        from hpipe.model.tokenizer import NoTokenizer

        return _IdsAsText() if isinstance(self.tokenizer, NoTokenizer) else self.tokenizer

    def eos_ids(self) -> tuple[int, ...]:
        if self.tokenizer is None or self.spec is None:
            return ()
        return tuple(self.tokenizer.eos_token_ids or self.spec.eos_token_ids)

    @property
    def pids(self) -> list[int]:
        return self.session.pids if self.session is not None and self.state == "ready" else []

    # -- admission -------------------------------------------------------------------------
    # [Note: running and waiting] Up to max_running requests are on the pipeline at once (the
    # session interleaves them); the next max_waiting wait here, in arrival order, and start as
    # places free; beyond that a request gets 429 with a Retry-After.
    def admit(self, prompt_ids: list[int], *, max_new_tokens: int, temperature: float,
              top_p: float, seed: int | None, loop: asyncio.AbstractEventLoop,
              stop_at_eos: bool = True) -> Handle:
        """Start or queue one request, or raise the APIError that says why not."""
        from hpipe.runtime.request import check_prompt

        with self._lock:
            state, session = self.state, self.session
            if state != "ready" or session is None:
                why = ("the model is loading" if state == "loading"
                       else f"the pipeline failed ({self.error}) and is restarting"
                       if state == "broken" and self.settings.restart
                       else "the server is stopping")
                raise APIError(503, f"{why}; retry shortly", type="server_error",
                               code="unavailable", headers={"Retry-After": "5"})
            try:  # refused now, not after waiting in the queue
                check_prompt([prompt_ids], self.spec, max_new_tokens=max_new_tokens)
                budget = session.kv_token_budget
                need = len(prompt_ids) + max_new_tokens - 1
                if budget is not None and need > budget:
                    raise CapacityError(
                        f"the prompt ({len(prompt_ids)} tokens) and max_tokens "
                        f"({max_new_tokens}) need {need} KV-cache positions on every stage, "
                        f"but the stages hold at most {budget} beside their weights; shorten "
                        "the prompt or lower max_tokens")
            except HPipeError as e:
                raise APIError(400, str(e)) from None
            full = self._running >= self.settings.max_running
            if full and len(self._queue) >= self.settings.max_waiting:
                raise APIError(429, f"{self._running} requests are running and "
                                    f"{len(self._queue)} waiting (--max-running "
                                    f"{self.settings.max_running}, --max-waiting "
                                    f"{self.settings.max_waiting}); retry later",
                               type="rate_limit_error", code="queue_full",
                               headers={"Retry-After": str(self._retry_s())})
            handle = Handle(self, prompt_ids, dict(
                max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                seed=random.randrange(2**63) if seed is None else seed,
                stop_at_eos=stop_at_eos), loop=loop)
            if full:
                self._queue.append(handle)
            else:
                self._running += 1
            self._set_gauges()
        self.metrics.of(self.metrics.prompt_tokens).inc(len(prompt_ids))
        if not full:
            self._start(handle)
        return handle

    def _start(self, handle: Handle) -> None:
        session = self.session
        try:
            if session is None:
                raise WorkerFailedError("the pipeline is not running")
            stream = session.submit(Request.from_ids(handle.prompt_ids, **handle.params))
        except (HPipeError, WorkerFailedError, RuntimeError) as e:
            handle.fail(e)
            self._ended(handle)
            return
        handle.attach(stream)

    def _unqueue(self, handle: Handle) -> bool:
        """Take a request that has not started out of the queue (its client left)."""
        with self._lock:
            if handle in self._queue:
                self._queue.remove(handle)
                self._set_gauges()
                return True
        return False

    def _retry_s(self) -> int:
        """Seconds until a place is likely: the recent requests' median time, times the
        requests queued ahead, over the places that free up."""
        typical = statistics.median(self._recent_e2e_s) if self._recent_e2e_s else 5.0
        ahead = len(self._queue) + 1
        return max(1, round(typical * ahead / max(1, self.settings.max_running)))

    def _set_gauges(self) -> None:
        self.metrics.of(self.metrics.waiting).set(len(self._queue))
        self.metrics.of(self.metrics.running).set(self._running)

    def _ended(self, handle: Handle) -> None:
        """A running request ended: its place goes to the next one waiting."""
        with self._lock:
            self._running -= 1
            self._recent_e2e_s.append(time.monotonic() - handle.arrived)
            nxt = self._queue.popleft() if self._queue else None
            if nxt is not None:
                self._running += 1
            self._set_gauges()
        if nxt is not None:
            self._start(nxt)


class Handle:
    """One admitted request: its events as an async iterator, and a way to cancel it."""

    def __init__(self, engine: Engine, prompt_ids: list[int], params: dict, *,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.engine = engine
        self.prompt_ids = prompt_ids
        self.params = params
        self.arrived = time.monotonic()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancel_reason: str | None = None
        self.stream = None
        self.first_token_at: float | None = None
        self._loop = loop

    def attach(self, stream) -> None:
        """Started on the pipeline: read its session stream from now on."""
        self.stream = stream
        if self.cancel_reason is not None:
            stream.cancel()
        threading.Thread(target=self._pump, name=f"hpipe-serve-req{stream.id}",
                         daemon=True).start()

    def fail(self, error: Exception) -> None:
        self._loop.call_soon_threadsafe(self.queue.put_nowait, error)

    def cancel(self, reason: str = "cancelled") -> None:
        """End the request on every rank (a client that left, or a stop string); a request
        still waiting leaves the queue."""
        if self.cancel_reason is None:
            self.cancel_reason = reason
        if self.stream is not None:
            self.stream.cancel()
        elif self.engine._unqueue(self):
            m = self.engine.metrics
            m.of(m.cancelled).inc()
            self._loop.call_soon_threadsafe(self.queue.put_nowait,
                                            Finished(-1, None, ("cancelled",), ((),)))

    async def next_event(self, timeout_s: float) -> Progress | Tokens | Finished:
        """The next event, or TimeoutError after ``timeout_s`` (nothing is lost: a queue get
        may be cancelled, unlike an async generator's step, which a timeout would close)."""
        item = await asyncio.wait_for(self.queue.get(), timeout_s)
        if isinstance(item, BaseException):
            raise item
        return item

    async def events(self) -> AsyncIterator[Progress | Tokens | Finished]:
        while True:
            item = await self.queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if isinstance(item, Finished):
                return

    def _pump(self) -> None:
        """Session stream -> the event loop, with the request's metrics on the way."""
        m = self.engine.metrics
        started = False
        last_token_at: float | None = None
        try:
            for event in self.stream:
                now = time.monotonic()
                if not started:
                    started = True
                    m.of(m.queue_time).observe(now - self.arrived)
                if isinstance(event, Tokens):
                    if last_token_at is None:
                        m.of(m.ttft).observe(now - self.arrived)
                        self.first_token_at = now
                    else:
                        m.of(m.itl).observe(now - last_token_at)
                    last_token_at = now
                elif isinstance(event, Finished):
                    self._finished(event)
                self._loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except Exception as e:  # the session broke under this request
            m.of(m.failed).inc()
            self._loop.call_soon_threadsafe(self.queue.put_nowait, e)
        finally:
            self.engine._ended(self)

    def _finished(self, done: Finished) -> None:
        m = self.engine.metrics
        reason = done.finish_reasons[0] if done.finish_reasons else "stop"
        if reason == "cancelled" and self.cancel_reason == "stop_string":
            reason = "stop"
        if reason == "cancelled":
            m.of(m.cancelled).inc()
        else:
            m.of(m.success, finished_reason=reason).inc()
        m.of(m.e2e).observe(time.monotonic() - self.arrived)
        n = len(done.output_ids[0]) if done.output_ids else 0
        m.of(m.generation_tokens).inc(n)
        m.of(m.prefix_queries).inc(len(self.prompt_ids))
        m.of(m.prefix_hits).inc(done.cached_tokens)
        if n > 1 and self.first_token_at is not None:
            m.of(m.tpot).observe((time.monotonic() - self.first_token_at) / (n - 1))
        self.engine.record_busy()


class _IdsAsText:
    """A model without a tokenizer answers with its token ids, space-separated."""

    def decode(self, ids) -> str:
        return "".join(f" {i}" for i in ids)
