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

from hpipe.errors import HPipeError, WorkerFailedError
from hpipe.serve.metrics import ServeMetrics
from hpipe.serve.openai_api import APIError
from hpipe.session import Finished, Progress, Request, Session, Tokens

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineSettings:
    model: str  # what open_model reads
    served_name: str  # what clients call it ("model" in requests, /v1/models)
    max_waiting: int = 64  # requests waiting for the pipeline before 429
    restart: bool = True  # reopen the pipeline after a failure; False: stop the server
    liveness_s: float = 15.0
    connect_timeout_s: float = 60.0


class Engine:
    """States: "loading" (workers starting, weights loading) -> "ready"; "broken" after a
    failure until the pipeline is reopened (or for good, without restart); "stopped"."""

    def __init__(self, settings: EngineSettings, plan, *,
                 on_fatal: Callable[[Exception], None] | None = None,
                 on_ready: Callable[[list[int]], None] | None = None) -> None:
        self.settings = settings
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
        self._waiting = 0
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
                                   connect_timeout_s=s.connect_timeout_s,
                                   on_failure=self._on_failure)
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
    def admit(self, prompt_ids: list[int], *, max_new_tokens: int, temperature: float,
              top_p: float, seed: int | None, loop: asyncio.AbstractEventLoop) -> Handle:
        """Queue one request on the pipeline, or raise the APIError that says why not."""
        with self._lock:
            state, session = self.state, self.session
            if state != "ready" or session is None:
                why = ("the model is loading" if state == "loading"
                       else f"the pipeline failed ({self.error}) and is restarting"
                       if state == "broken" and self.settings.restart
                       else "the server is stopping")
                raise APIError(503, f"{why}; retry shortly", type="server_error",
                               code="unavailable", headers={"Retry-After": "5"})
            if self._waiting >= self.settings.max_waiting:
                raise APIError(429, f"{self._waiting} requests are already waiting for the "
                                    f"pipeline (--max-waiting {self.settings.max_waiting}); "
                                    "retry later", type="rate_limit_error",
                               code="queue_full", headers={"Retry-After": str(self._retry_s())})
            self._waiting += 1
            self._set_gauges()
        try:
            stream = session.submit(Request.from_ids(
                prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature,
                top_p=top_p, seed=random.randrange(2**63) if seed is None else seed))
        except (HPipeError, WorkerFailedError, RuntimeError) as e:
            with self._lock:
                self._waiting -= 1
                self._set_gauges()
            if isinstance(e, HPipeError):
                raise APIError(400, str(e)) from None
            raise APIError(503, f"{e}; retry shortly", type="server_error",
                           code="unavailable", headers={"Retry-After": "5"}) from None
        self.metrics.of(self.metrics.prompt_tokens).inc(len(prompt_ids))
        return Handle(self, stream, loop=loop)

    def _retry_s(self) -> int:
        """Seconds until a place in the queue is likely: the recent requests' median time,
        times the requests ahead (the pipeline runs them one after another)."""
        typical = statistics.median(self._recent_e2e_s) if self._recent_e2e_s else 5.0
        return max(1, round(typical * max(1, self._waiting) / 2))

    def _set_gauges(self) -> None:
        self.metrics.of(self.metrics.waiting).set(self._waiting)
        self.metrics.of(self.metrics.running).set(self._running)

    def _started(self) -> None:
        with self._lock:
            self._waiting -= 1
            self._running += 1
            self._set_gauges()

    def _ended(self, started: bool, e2e_s: float) -> None:
        with self._lock:
            if started:
                self._running -= 1
            else:
                self._waiting -= 1
            self._recent_e2e_s.append(e2e_s)
            self._set_gauges()


class Handle:
    """One admitted request: its events as an async iterator, and a way to cancel it."""

    def __init__(self, engine: Engine, stream, *, loop: asyncio.AbstractEventLoop) -> None:
        self.engine = engine
        self.stream = stream
        self.arrived = time.monotonic()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancel_reason: str | None = None
        self._loop = loop
        threading.Thread(target=self._pump, name=f"hpipe-serve-req{stream.id}",
                         daemon=True).start()

    def cancel(self, reason: str = "cancelled") -> None:
        """End the request on every rank (a client that left, or a stop string)."""
        if self.cancel_reason is None:
            self.cancel_reason = reason
        self.stream.cancel()

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
        m, engine = self.engine.metrics, self.engine
        started = False
        last_token_at: float | None = None
        num_tokens = 0
        try:
            for event in self.stream:
                now = time.monotonic()
                if not started:
                    started = True
                    engine._started()
                    m.of(m.queue_time).observe(now - self.arrived)
                if isinstance(event, Tokens):
                    num_tokens += 1
                    if last_token_at is None:
                        m.of(m.ttft).observe(now - self.arrived)
                    else:
                        m.of(m.itl).observe(now - last_token_at)
                    last_token_at = now
                elif isinstance(event, Finished):
                    self._finished(event, started_at=now)
                self._loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except Exception as e:  # the session broke under this request
            m.of(m.failed).inc()
            self._loop.call_soon_threadsafe(self.queue.put_nowait, e)
        finally:
            engine._ended(started, time.monotonic() - self.arrived)

    def _finished(self, done: Finished, *, started_at: float) -> None:
        m = self.engine.metrics
        reason = done.finish_reasons[0] if done.finish_reasons else "stop"
        result = done.result
        if reason == "cancelled" and self.cancel_reason == "stop_string":
            reason = "stop"
        if reason == "cancelled":
            m.of(m.cancelled).inc()
        else:
            m.of(m.success, finished_reason=reason).inc()
        m.of(m.e2e).observe(time.monotonic() - self.arrived)
        if result is not None:
            n = len(result.output_ids[0]) if result.output_ids else 0
            m.of(m.generation_tokens).inc(n)
            tl = result.timeline
            if n > 1 and tl.latency_s > tl.ttft_s:
                m.of(m.tpot).observe((tl.latency_s - tl.ttft_s) / (n - 1))
            m.record_timeline(self.engine.plan, tl)


class _IdsAsText:
    """A model without a tokenizer answers with its token ids, space-separated."""

    def decode(self, ids) -> str:
        return "".join(f" {i}" for i in ids)
