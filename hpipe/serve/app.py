"""The HTTP endpoints: OpenAI's /v1/chat/completions, /v1/completions and /v1/models, with
/health and Prometheus /metrics, on the Engine (which owns the Session).

Streams are Server-Sent Events: ``data: {chunk}`` lines, ``data: [DONE]`` at the end, and SSE
comments (``: prefill 3/12 slices``) while a prompt prefills or waits, which clients ignore and
proxies take as traffic. A client that disconnects cancels its request on every rank.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from hpipe.errors import HPipeError
from hpipe.serve import openai_api as oa
from hpipe.serve.engine import Engine, Handle
from hpipe.serve.text import TextStream
from hpipe.session import Finished, Progress, Tokens

log = logging.getLogger(__name__)

KEEPALIVE_S = 5.0  # an SSE comment at least this often while nothing else is sent
DISCONNECT_POLL_S = 0.5  # a non-streaming request checks its client this often


def build_app(engine: Engine, *, api_key: str | None = None,
              keepalive_s: float = KEEPALIVE_S) -> FastAPI:
    app = FastAPI(title="hpipe serve", docs_url=None, redoc_url=None)
    served = engine.settings.served_name

    @app.exception_handler(oa.APIError)
    async def api_error(_request: Request, e: oa.APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if given != f"Bearer {api_key}":
            raise oa.APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY' "
                                   "with the --api-key the server was started with",
                              type="authentication_error", code="invalid_api_key")

    @app.get("/health")
    async def health():
        state = engine.state
        body = {"status": "ok" if state == "ready" else state, "model": served,
                "workers": engine.pids}
        if engine.error is not None and state != "ready":
            body["error"] = str(engine.error)
        return JSONResponse(body, status_code=200 if state == "ready" else 503)

    @app.get("/metrics")
    async def metrics():
        engine.record_busy()  # the busy time the ranks reported since the last request ended
        return Response(engine.metrics.exposition(),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [{"id": served, "object": "model",
                                            "created": STARTED, "owned_by": "hpipe"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await complete(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    async def complete(request: Request, *, chat: bool):
        check_key(request)
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise oa.APIError(400, "the request body is not valid JSON") from None
        req = oa.parse_request(body, chat=chat)
        if req.model != served:
            raise oa.APIError(404, f"the model {req.model!r} does not exist; this server serves "
                                   f"{served!r}", param="model", code="model_not_found")
        ids, max_tokens = prompt_and_budget(engine, req)
        handle = engine.admit(ids, max_new_tokens=max_tokens, temperature=req.temperature,
                              top_p=req.top_p, seed=req.seed, stop_at_eos=not req.ignore_eos,
                              loop=asyncio.get_running_loop())
        rid, created = oa.new_id(chat), oa.now()
        if req.stream:
            return StreamingResponse(sse(handle, req, rid=rid, created=created,
                                         prompt_tokens=len(ids)),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await whole(request, handle, req, rid=rid, created=created,
                           prompt_tokens=len(ids))

    async def whole(request: Request, handle: Handle, req: oa.Completion, *, rid: str,
                    created: int, prompt_tokens: int):
        text = TextStream(engine.tokenizer_or_ids(), req.stop)
        collect = asyncio.ensure_future(_collect(
            handle, text, set() if req.ignore_eos else set(engine.eos_ids())))
        try:
            while not collect.done():
                await asyncio.wait({collect}, timeout=DISCONNECT_POLL_S)
                if not collect.done() and await request.is_disconnected():
                    handle.cancel("disconnected")
            reason, num_tokens, cached = collect.result()
        except HPipeError as e:
            raise oa.APIError(400, str(e)) from None
        except Exception as e:
            raise oa.APIError(500, f"the pipeline failed during this request: {e}",
                              type="server_error", code="worker_failed") from None
        return oa.full_response(req, rid=rid, created=created, model=served, text=text.text,
                                finish_reason=reason, prompt_tokens=prompt_tokens,
                                completion_tokens=num_tokens, cached_tokens=cached)

    async def sse(handle: Handle, req: oa.Completion, *, rid: str, created: int,
                  prompt_tokens: int) -> AsyncIterator[str]:
        text = TextStream(engine.tokenizer_or_ids(), req.stop)
        eos = set() if req.ignore_eos else set(engine.eos_ids())
        kw = {"rid": rid, "created": created, "model": served}
        finished = False
        num_tokens = 0
        try:
            if req.chat:
                yield _data(oa.chunk(req, **kw, role=True, text=""))
            while not finished:
                try:
                    event = await handle.next_event(keepalive_s)
                except asyncio.TimeoutError:
                    yield ": waiting\n\n"  # for proxies; clients ignore comments
                    continue
                if isinstance(event, Progress) and event.kind == "prefill":
                    yield f": prefill {event.done}/{event.total} slices\n\n"
                elif isinstance(event, Tokens):
                    tok = event.ids[0]
                    if tok in eos or text.stopped:
                        continue
                    num_tokens += 1
                    delta = text.push(tok)
                    if text.stopped:
                        handle.cancel("stop_string")
                    if delta:
                        yield _data(oa.chunk(req, **kw, text=delta))
                elif isinstance(event, Finished):
                    finished = True
                    tail = text.finish()
                    if tail:
                        yield _data(oa.chunk(req, **kw, text=tail))
                    reason = _reason(event, text)
                    yield _data(oa.chunk(req, **kw, finish_reason=reason))
                    if req.include_usage:
                        yield _data(oa.usage_chunk(req, **kw, prompt_tokens=prompt_tokens,
                                                   completion_tokens=num_tokens,
                                                   cached_tokens=event.cached_tokens))
        except Exception as e:  # the pipeline failed mid-stream: a last event says so
            finished = True
            err = oa.APIError(500, f"the pipeline failed during this request: {e}",
                              type="server_error", code="worker_failed")
            yield _data(err.body())
        finally:
            if not finished:  # the client went away (the task was cancelled)
                handle.cancel("disconnected")
        yield "data: [DONE]\n\n"

    return app


STARTED = int(time.time())


async def _collect(handle: Handle, text: TextStream, eos: set[int]) -> tuple[str, int, int]:
    """The request's text into ``text``; its finish reason, completion and cached tokens."""
    num_tokens = 0
    async for event in handle.events():
        if isinstance(event, Tokens):
            tok = event.ids[0]
            if tok in eos or text.stopped:
                continue
            num_tokens += 1
            text.push(tok)
            if text.stopped:
                handle.cancel("stop_string")
        elif isinstance(event, Finished):
            text.finish()
            return _reason(event, text), num_tokens, event.cached_tokens
    raise RuntimeError("the request ended without a result")


def _reason(done: Finished, text: TextStream) -> str:
    if text.stopped:
        return "stop"
    reason = done.finish_reasons[0] if done.finish_reasons else "stop"
    return "length" if reason == "cancelled" else reason


def _data(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def prompt_and_budget(engine: Engine, req: oa.Completion) -> tuple[list[int], int]:
    """The prompt's token ids and max_tokens, refused (400) when they exceed the context."""
    tok, spec = engine.tokenizer, engine.spec
    if tok is None or spec is None:
        raise oa.APIError(503, "the model is loading; retry shortly", type="server_error",
                          code="unavailable", headers={"Retry-After": "5"})
    try:
        if req.chat:
            ids = tok.encode(tok.chat_messages(list(req.messages)))
        elif isinstance(req.prompt, str):
            ids = tok.encode(req.prompt)
        else:
            ids = list(req.prompt)
    except HPipeError as e:  # no tokenizer, a template that does not render
        raise oa.APIError(400, str(e), param="messages" if req.chat else "prompt") from None
    context = spec.max_seq_len
    if len(ids) >= context:
        raise oa.APIError(400, f"the prompt has {len(ids)} tokens, but this model's context is "
                               f"{context} tokens; shorten it", param="messages"
                          if req.chat else "prompt", code="context_length_exceeded")
    max_tokens = req.max_tokens if req.max_tokens_given else min(req.max_tokens,
                                                                 context - len(ids))
    if len(ids) + max_tokens > context:
        raise oa.APIError(400, f"the prompt has {len(ids)} tokens and max_tokens is "
                               f"{max_tokens}: {len(ids) + max_tokens} tokens exceed this "
                               f"model's context of {context}; lower max_tokens to <= "
                               f"{context - len(ids)} or shorten the prompt", param="max_tokens",
                          code="context_length_exceeded")
    return ids, max_tokens
