"""What a Session takes and gives back: a Request, and the events of its Stream (Progress,
Tokens, and a Finished at the end). Plain data and a small queue, shared by the Session's two
modes (hpipe/session.py, hpipe/session_items.py)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hpipe.runtime.request import RunResult

WAIT_POLL_S = 0.25  # waits poll so Ctrl-C reaches the waiting thread


@dataclass(frozen=True)
class Request:
    """What to generate: ``prompt_ids`` (rows of equal length; one row is a batch of 1).

    ``temperature == 0`` is greedy. Decoding stops after ``max_new_tokens`` or, with
    ``stop_at_eos``, once every row has produced an end-of-sequence token.
    """

    prompt_ids: tuple[tuple[int, ...], ...]
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop_at_eos: bool = True
    label: str = ""

    @classmethod
    def from_ids(cls, ids: Sequence[int] | Sequence[Sequence[int]], **kwargs) -> Request:
        """One row of token ids, or a list of rows."""
        rows = [ids] if ids and isinstance(ids[0], int) else list(ids)
        return cls(prompt_ids=tuple(tuple(int(t) for t in row) for row in rows), **kwargs)


# -- events ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Progress:
    """``kind`` "prefill": ``done`` of ``total`` prefill units went through the last stage;
    "decode": ``done`` of at most ``total`` tokens were sampled."""

    request_id: int
    kind: str
    done: int
    total: int


@dataclass(frozen=True)
class Tokens:
    """The token just sampled for each row (a finished row repeats its end-of-sequence id)."""

    request_id: int
    ids: tuple[int, ...]


@dataclass(frozen=True)
class Finished:
    """The end of a request. ``result`` is None for a request cancelled before it started.
    ``finish_reasons`` per row: "stop" (end of sequence), "length" (max_new_tokens) or
    "cancelled"."""

    request_id: int
    result: RunResult | None
    finish_reasons: tuple[str, ...]
    # The tokens per row (before an end of sequence), where there is no result: an interleaved
    # session's requests, and cancelled ones.
    output: tuple[tuple[int, ...], ...] = ()
    # Prompt tokens whose KV came from a kept prefix instead of being prefilled (interleaved
    # sessions; see hpipe/prefix_cache.py).
    cached_tokens: int = 0

    @property
    def output_ids(self) -> tuple[tuple[int, ...], ...]:
        return self.result.output_ids if self.result is not None else self.output


Event = Progress | Tokens | Finished


class Stream:
    """One request's events, in order, ending with ``Finished``; iterate, or wait for
    ``result()``. A failure of the session ends the stream by raising its error."""

    def __init__(self, session, request_id: int) -> None:
        self._session = session
        self.id = request_id
        self._events: queue.Queue = queue.Queue()
        self._final: Finished | BaseException | None = None
        self._done = threading.Event()

    def __iter__(self) -> Iterator[Event]:
        while True:
            try:
                item = self._events.get(timeout=WAIT_POLL_S)
            except queue.Empty:
                continue
            if isinstance(item, BaseException):
                raise item
            yield item
            if isinstance(item, Finished):
                return

    def result(self, timeout: float | None = None) -> Finished:
        """Wait for the end; raise the session's failure if it broke meanwhile."""
        waited = 0.0
        while not self._done.wait(WAIT_POLL_S):
            waited += WAIT_POLL_S
            if timeout is not None and waited >= timeout:
                raise TimeoutError(f"request {self.id} did not finish within {timeout:g} s")
        if isinstance(self._final, BaseException):
            raise self._final
        assert self._final is not None
        return self._final

    def cancel(self) -> bool:
        return self._session.cancel(self.id)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    # -- fed by the session ---------------------------------------------------------------
    def _push(self, event: Event) -> None:
        self._events.put(event)

    def _end(self, final: Finished | BaseException) -> None:
        if self._done.is_set():
            return
        self._final = final
        self._events.put(final)
        self._done.set()
