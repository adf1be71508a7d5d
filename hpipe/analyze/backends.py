"""Where ``hpipe analyze`` asks its questions: a Session it opens in this process, or any
OpenAI-compatible server (``hpipe serve`` first among them). Both answer one user turn at a
time, safely from many threads, and time it the same way: ``prefill_s`` from sending to the
first token, ``decode_s`` from there to the end.

Prefix reuse is the backend's: a Session (and ``hpipe serve``) keeps each prompt's KV cache
and a question on an already prefilled document prefills only itself; ``cached_tokens`` says
how much was reused (``usage.prompt_tokens_details.cached_tokens`` from a server; 0 when a
server does not say).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass

from hpipe.errors import CapacityError, HPipeError, InputFileError, PromptTooLongError


class TooLong(Exception):
    """The prompt (and the answer it may grow) does not fit the model or the pipeline."""


class AskFailed(Exception):
    """One question failed (the answer gets status "error"); the job goes on."""


@dataclass(frozen=True)
class Settings:
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class Answer:
    text: str
    finish_reason: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    prefill_s: float
    decode_s: float


class SessionBackend:
    """Questions through an interleaved Session (many at once, prefixes reused)."""

    def __init__(self, session, settings: Settings) -> None:
        self.session = session
        self.settings = settings
        self.tokenizer = session.tokenizer
        self.context = session.spec.max_seq_len
        self.name = session.model

    def ask(self, user_turn: str, *, prefilled: threading.Event | None = None) -> Answer:
        from hpipe.session import Finished, Request, Tokens

        s, tok = self.settings, self.tokenizer
        ids = tok.encode(tok.chat_messages([{"role": "user", "content": user_turn}]))
        if len(ids) + s.max_new_tokens > self.context:
            raise TooLong(f"the prompt has {len(ids)} tokens and --max-new-tokens is "
                          f"{s.max_new_tokens}: more than the model's context of "
                          f"{self.context} tokens")
        sent = time.monotonic()
        try:
            stream = self.session.submit(Request.from_ids(
                ids, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                top_p=s.top_p, seed=s.seed))
        except (CapacityError, PromptTooLongError) as e:
            raise TooLong(str(e)) from None
        except HPipeError as e:  # anything else this one prompt cannot do; the job goes on
            raise AskFailed(str(e)) from None
        first = None
        done = None
        for event in stream:
            if isinstance(event, Tokens) and first is None:
                first = time.monotonic()
                if prefilled is not None:
                    prefilled.set()
            elif isinstance(event, Finished):
                done = event
        end = time.monotonic()
        first = end if first is None else first
        reason = done.finish_reasons[0] if done and done.finish_reasons else "stop"
        if reason == "cancelled":
            raise AskFailed("cancelled")
        out = done.output_ids[0] if done and done.output_ids else ()
        return Answer(tok.decode(list(out)).strip(), reason, len(ids), done.cached_tokens,
                      len(out), first - sent, end - first)

    def close(self) -> None:
        self.session.close(grace_s=0.0)


class ServerBackend:
    """Questions through an OpenAI-compatible server's /v1/chat/completions, streamed."""

    def __init__(self, url: str, settings: Settings, *, api_key: str | None = None,
                 model: str | None = None, timeout_s: float = 3600.0) -> None:
        import httpx

        self.url = url.rstrip("/")
        if not self.url.endswith("/v1"):
            self.url += "/v1"
        self.settings = settings
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=self.url, headers=headers,
                                   timeout=httpx.Timeout(timeout_s, connect=10.0))
        self.name = model or self._first_model()

    def _first_model(self) -> str:
        """The server's first model; checks the URL and the key before any work."""
        import httpx

        try:
            r = self.client.get("/models")
        except httpx.HTTPError as e:
            raise InputFileError(f"--server {self.url}: cannot reach it ({e}); start the "
                                 "server (e.g. 'hpipe serve') or fix the URL") from None
        if r.status_code == 401:
            raise InputFileError(f"--server {self.url} refused the API key (401); pass the "
                                 "server's key with --api-key")
        if r.status_code != 200:
            raise InputFileError(f"--server {self.url}/models answered {r.status_code}: "
                                 f"{_message(r)}")
        models = r.json().get("data") or []
        if not models:
            raise InputFileError(f"--server {self.url} serves no model")
        return models[0]["id"]

    def ask(self, user_turn: str, *, prefilled: threading.Event | None = None) -> Answer:
        import httpx

        s = self.settings
        body = {"model": self.name, "messages": [{"role": "user", "content": user_turn}],
                "max_tokens": s.max_new_tokens, "temperature": s.temperature, "top_p": s.top_p,
                "seed": s.seed, "stream": True, "stream_options": {"include_usage": True}}
        sent = time.monotonic()
        first = None
        parts: list[str] = []
        reason, usage = "stop", {}
        try:
            with self.client.stream("POST", "/chat/completions", json=body) as r:
                if r.status_code != 200:
                    r.read()
                    message = _message(r)
                    if r.status_code == 400 and ("context" in message or "KV-cache" in message):
                        raise TooLong(message)
                    raise AskFailed(f"the server answered {r.status_code}: {message}")
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        raise AskFailed(chunk["error"].get("message", str(chunk["error"])))
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    for choice in chunk.get("choices") or []:
                        text = (choice.get("delta") or {}).get("content")
                        if text:
                            if first is None:
                                first = time.monotonic()
                                if prefilled is not None:
                                    prefilled.set()
                            parts.append(text)
                        if choice.get("finish_reason"):
                            reason = choice["finish_reason"]
        except httpx.HTTPError as e:
            raise AskFailed(f"the server connection failed: {e}") from None
        end = time.monotonic()
        first = end if first is None else first
        details = usage.get("prompt_tokens_details") or {}
        return Answer("".join(parts).strip(), reason, usage.get("prompt_tokens"),
                      details.get("cached_tokens") or 0, usage.get("completion_tokens", 0),
                      first - sent, end - first)

    def close(self) -> None:
        self.client.close()


def _message(r) -> str:
    try:
        err = r.json().get("error")
        return err.get("message", str(err)) if isinstance(err, dict) else str(err or r.text)
    except (ValueError, AttributeError):
        return r.text[:200]

