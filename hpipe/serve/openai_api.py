"""The OpenAI wire format: request bodies checked into plain data, and the objects sent back.

Only what the official ``openai`` client and curl send is read. A field hpipe does not support
(``n`` > 1, tools, logprobs, ...) is refused with a 400 that names it, rather than ignored: a
client that asked for two choices must not silently get one. Errors are OpenAI's
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass

# Read and honoured.
CHAT_FIELDS = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature",
               "top_p", "seed", "stop", "stream", "stream_options"}
COMPLETION_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop",
                     "stream", "stream_options"}
# Accepted when they ask for what hpipe does anyway (the default value).
NEUTRAL = {"n": 1, "presence_penalty": 0, "frequency_penalty": 0, "logprobs": None,
           "top_logprobs": None, "tools": None, "tool_choice": None, "functions": None,
           "function_call": None, "response_format": None, "logit_bias": None, "echo": False,
           "best_of": 1, "suffix": None, "parallel_tool_calls": None}
# Accepted and ignored: bookkeeping that does not change the answer.
IGNORED = {"user", "metadata", "store", "service_tier"}
# Beyond OpenAI, as vLLM: generate max_tokens even past an end-of-sequence (benchmarks).
EXTRA = {"ignore_eos"}
DEFAULT_MAX_TOKENS = 256
MAX_STOP_STRINGS = 4  # as OpenAI


class APIError(Exception):
    """An error to answer with, as OpenAI shapes it."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


@dataclass(frozen=True)
class Completion:
    """A checked request: ``messages`` (chat) or ``prompt`` (text, or token ids)."""

    chat: bool
    model: str
    messages: tuple[dict, ...] = ()
    prompt: str | tuple[int, ...] = ""
    max_tokens: int = DEFAULT_MAX_TOKENS
    max_tokens_given: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False


def parse_request(body: object, *, chat: bool) -> Completion:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    known = (CHAT_FIELDS if chat else COMPLETION_FIELDS) | set(NEUTRAL) | IGNORED | EXTRA
    for key in body:
        if key not in known:
            raise APIError(400, f"unsupported field {key!r}", param=key,
                           code="unsupported_field")
    for key, neutral in NEUTRAL.items():
        value = body.get(key, neutral)
        if value not in (neutral, None) and not (value == [] and neutral is None):
            raise APIError(400, f"{key}={value!r} is not supported by hpipe serve "
                                f"(only {neutral!r})", param=key, code="unsupported_value")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "'model' is required (GET /v1/models lists it)", param="model")
    kw: dict = {"chat": chat, "model": model}
    if chat:
        kw["messages"] = _messages(body.get("messages"))
    else:
        kw["prompt"] = _prompt(body.get("prompt"))
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if limit is not None:
        name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        kw["max_tokens"] = _integer(limit, name, low=1)
        kw["max_tokens_given"] = True
    if body.get("temperature") is not None:
        kw["temperature"] = _number(body["temperature"], "temperature", low=0.0, high=2.0)
    if body.get("top_p") is not None:
        kw["top_p"] = _number(body["top_p"], "top_p", low=0.0, high=1.0)
        if kw["top_p"] == 0:
            raise APIError(400, "top_p must be in (0, 1]", param="top_p")
    if body.get("seed") is not None:
        kw["seed"] = _integer(body["seed"], "seed", low=-(2**63), high=2**64 - 1) % 2**63
    kw["stop"] = _stop(body.get("stop"))
    if body.get("ignore_eos") is not None:
        if not isinstance(body["ignore_eos"], bool):
            raise APIError(400, "ignore_eos must be true or false", param="ignore_eos")
        kw["ignore_eos"] = body["ignore_eos"]
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise APIError(400, "stream must be true or false", param="stream")
    kw["stream"] = bool(stream)
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise APIError(400, "stream_options must be an object", param="stream_options")
        kw["include_usage"] = bool(options.get("include_usage", False))
    return Completion(**kw)


def _messages(value) -> tuple[dict, ...]:
    if not isinstance(value, list) or not value:
        raise APIError(400, "'messages' must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant",
                                                             "developer"):
            raise APIError(400, f"messages[{i}] needs a role (system, user or assistant)",
                           param="messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text ones
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise APIError(400, f"messages[{i}]: only text content is supported",
                                   param="messages")
                texts.append(str(part.get("text", "")))
            content = "".join(texts)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be text", param="messages")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": content})
    return tuple(out)


def _prompt(value) -> str | tuple[int, ...]:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]  # a batch of one
    if isinstance(value, str) and value:
        return value
    if (isinstance(value, list) and value
            and all(isinstance(t, int) and not isinstance(t, bool) for t in value)):
        return tuple(value)
    raise APIError(400, "'prompt' must be a non-empty string or a list of token ids (one "
                        "prompt per request)", param="prompt")


def _stop(value) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if (not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and s for s in stops)):
        raise APIError(400, f"stop must be a string or a list of up to {MAX_STOP_STRINGS} "
                            "non-empty strings", param="stop")
    return tuple(stops)


def _number(value, name: str, *, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise APIError(400, f"{name} must be a number", param=name)
    if not low <= value <= high:
        raise APIError(400, f"{name} must be in [{low:g}, {high:g}], got {value}", param=name)
    return float(value)


def _integer(value, name: str, *, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, f"{name} must be an integer", param=name)
    if value < low or (high is not None and value > high):
        raise APIError(400, f"{name} must be >= {low}, got {value}", param=name)
    return value


# -- what goes back ----------------------------------------------------------------------------
def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def full_response(req: Completion, *, rid: str, created: int, model: str, text: str,
                  finish_reason: str, prompt_tokens: int, completion_tokens: int,
                  cached_tokens: int = 0) -> dict:
    if req.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "logprobs": None, "finish_reason": finish_reason}
        kind = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        kind = "text_completion"
    return {"id": rid, "object": kind, "created": created, "model": model,
            "choices": [choice], "usage": usage(prompt_tokens, completion_tokens, cached_tokens)}


def chunk(req: Completion, *, rid: str, created: int, model: str, text: str | None = None,
          role: bool = False, finish_reason: str | None = None) -> dict:
    if req.chat:
        delta: dict = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        kind = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None,
                  "finish_reason": finish_reason}
        kind = "text_completion"
    out = {"id": rid, "object": kind, "created": created, "model": model, "choices": [choice]}
    if req.include_usage:
        out["usage"] = None
    return out


def usage_chunk(req: Completion, *, rid: str, created: int, model: str, prompt_tokens: int,
                completion_tokens: int, cached_tokens: int = 0) -> dict:
    kind = "chat.completion.chunk" if req.chat else "text_completion"
    return {"id": rid, "object": kind, "created": created, "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens, cached_tokens)}


def now() -> int:
    return int(time.time())
