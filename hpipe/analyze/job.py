"""The analysis job: every (document, question) pair not yet in the answers file, several
documents in flight at once, each answer written as it finishes.

[Note: a document's first question goes first] Prefix reuse needs the document prefilled
once before its other questions arrive; sent together they would each prefill it. So a
document's first question is sent alone, and the others follow as soon as its first token
comes back (its prompt's KV cache is then kept on the stages). Meanwhile other documents keep
the pipeline busy: ``in_flight`` documents are worked on at once.
"""

from __future__ import annotations

import concurrent.futures
import sys
import threading
import time
from dataclasses import dataclass, field

from hpipe.analyze.answers import AnswerFile, record
from hpipe.analyze.backends import AskFailed, TooLong
from hpipe.model.prompts import document_question

POLL_S = 0.2  # how often the main thread wakes (for Ctrl-C) while documents run


@dataclass
class Summary:
    documents: int = 0  # in the input
    questions: int = 0  # pairs in the input
    held: int = 0  # pairs the answers file already held (skipped)
    answered: int = 0  # pairs answered now: ok
    too_long: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    wall_s: float = 0.0
    documents_done: int = 0  # documents finished in this run
    stopped: bool = False  # Ctrl-C, or the pipeline failed

    @property
    def documents_per_hour(self) -> float:
        return 3600.0 * self.documents_done / self.wall_s if self.wall_s > 0 else 0.0

    def as_dict(self) -> dict:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["wall_s"] = round(self.wall_s, 3)
        out["documents_per_hour"] = round(self.documents_per_hour, 2)
        return out


@dataclass
class _Progress:
    """``mode``: "bar" (a terminal), "lines" (a plain line per document) or "off"."""

    total: int
    mode: str
    started: float = field(default_factory=time.monotonic)
    done: int = 0
    tokens: int = 0
    _tqdm: object = None

    def __post_init__(self) -> None:
        if self.mode == "bar" and self.total:
            from tqdm import tqdm

            self._tqdm = tqdm(total=self.total, desc="analyze", unit="doc", file=sys.stderr)

    def document_done(self, doc_id: str, tokens: int) -> None:
        self.done += 1
        self.tokens += tokens
        elapsed = max(1e-9, time.monotonic() - self.started)
        rate = self.tokens / elapsed
        if self._tqdm is not None:
            self._tqdm.set_postfix_str(f"{rate:,.0f} tok/s")
            self._tqdm.update(1)
            return
        if self.mode != "lines":
            return
        eta = elapsed / self.done * (self.total - self.done)
        print(f"analyze: {self.done}/{self.total} documents ({doc_id}), {rate:,.0f} tok/s, "
              f"ETA {_clock(eta)}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Job:
    def __init__(self, pairs, answers: AnswerFile, *, in_flight: int = 4,
                 progress: str = "off") -> None:
        self.answers = answers
        self.backend = None
        self.in_flight = in_flight
        assert progress in ("bar", "lines", "off"), progress
        self.progress = progress
        self.summary = Summary(documents=len(pairs), questions=sum(len(q) for _, q in pairs))
        # What the answers file lacks: [(Document, its questions still to answer)].
        self.todo = []
        for doc, questions in pairs:
            rest = [q for q in questions if (doc.id, q) not in answers.done]
            self.summary.held += len(questions) - len(rest)
            if rest:
                self.todo.append((doc, rest))
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._fatal: list[BaseException] = []

    @property
    def needs_model(self) -> bool:
        """Whether any remaining question needs the model (not only unreadable documents)."""
        return any(doc.error is None for doc, _ in self.todo)

    def run(self, backend) -> Summary:
        """Answer what the file lacks through ``backend``. Ctrl-C (KeyboardInterrupt) ends the
        backend's work and re-raises with the file valid; a failed pipeline is re-raised the
        same way."""
        self.backend = backend
        started = time.monotonic()
        todo = self.todo
        progress = _Progress(len(todo), self.progress)
        pool = concurrent.futures.ThreadPoolExecutor(self.in_flight,
                                                     thread_name_prefix="hpipe-analyze-doc")
        try:
            futures = {pool.submit(self._document, doc, qs): doc for doc, qs in todo}
            pending = set(futures)
            while pending and not self._fatal:
                done, pending = concurrent.futures.wait(pending, timeout=POLL_S)
                for f in done:
                    tokens = f.result()
                    with self._lock:
                        self.summary.documents_done += 1
                    progress.document_done(futures[f].id, tokens)
            if self._fatal:
                raise self._fatal[0]
        except BaseException:
            self._stop.set()
            self.summary.stopped = True
            if backend is not None:
                backend.close()  # ends what is in flight: nothing more is written
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            progress.close()
            self.summary.wall_s = time.monotonic() - started
        return self.summary

    def _document(self, doc, questions: list[str]) -> int:
        """Every remaining question of ``doc``; the tokens it processed."""
        if doc.error is not None:
            for q in questions:
                self._write(record(doc.id, q, status="error", error=doc.error))
            return 0
        first, rest = questions[0], questions[1:]
        prefilled = threading.Event()
        tokens = [0]
        t = threading.Thread(target=self._ask, args=(doc, first, prefilled, tokens),
                             name="hpipe-analyze-q")
        t.start()
        while not prefilled.wait(POLL_S) and t.is_alive():
            pass
        started = [t]
        for q in rest:
            if self._stop.is_set():
                break
            th = threading.Thread(target=self._ask, args=(doc, q, None, tokens),
                                  name="hpipe-analyze-q")
            th.start()
            started.append(th)
        for th in started:
            th.join()
        return tokens[0]

    def _ask(self, doc, question: str, prefilled, tokens: list[int]) -> None:
        try:
            if self._stop.is_set():
                return
            try:
                a = self.backend.ask(document_question(doc.text, question), prefilled=prefilled)
            except TooLong as e:
                self._write(record(doc.id, question, status="too_long", error=str(e)))
                return
            except AskFailed as e:
                if not self._stop.is_set():
                    self._write(record(doc.id, question, status="error", error=str(e)))
                return
            self._write(record(doc.id, question, status="ok", answer=a.text,
                               prompt_tokens=a.prompt_tokens, cached_tokens=a.cached_tokens,
                               completion_tokens=a.completion_tokens, prefill_s=a.prefill_s,
                               decode_s=a.decode_s, finish_reason=a.finish_reason))
            with self._lock:
                tokens[0] += (a.prompt_tokens or 0) - a.cached_tokens + a.completion_tokens
        except BaseException as e:  # the pipeline failed: the job stops, the file stays valid
            if not self._stop.is_set():
                with self._lock:
                    self._fatal.append(e)
                self._stop.set()
        finally:
            if prefilled is not None:
                prefilled.set()

    def _write(self, rec: dict) -> None:
        self.answers.write(rec)
        s = self.summary
        with self._lock:
            if rec["status"] == "ok":
                s.answered += 1
                s.prompt_tokens += rec["prompt_tokens"] or 0
                s.cached_tokens += rec["cached_tokens"] or 0
                s.completion_tokens += rec["completion_tokens"] or 0
            elif rec["status"] == "too_long":
                s.too_long += 1
            else:
                s.errors += 1
