"""The HTTP side: FastAPI routes in OpenAI's shapes, the bearer-token and body-size guard, the limits.

Every refusal is an OpenAI-style error body ({"error": {"message", "type", "param", "code"}}) with a
4xx status, raised before the request reaches the engine: 400 for a bad field (malformed JSON and
schema errors included), 401 for a missing or wrong key, 404 for an unknown model or route, 413 for
a body over the size limit. The engine runs in its own thread; each request waits on an asyncio
queue that the engine feeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..models.generate import encode_prompt
from ..runtime.http import Guard
from .engine import Engine
from .jobs import Job, Settings, sendable
from .openapi import document
from .responses import Reply, Tokens, error_body
from .schemas import Body, ChatBody, CompletionBody


@dataclass
class Limits:
    max_body_bytes: int = 1 << 20  # a request body over this: 413
    max_tokens: int = 1024  # max_tokens over this: 400
    max_n: int = 16  # completions per prompt
    max_prompts: int = 64  # prompts in one completions request (--max-prompts); n x prompts <= --max-batch
    max_stop: int = 4  # stop strings (OpenAI's limit)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def _error(status: int, message: str, **kw) -> JSONResponse:
    return JSONResponse(error_body(message, **kw), status_code=status)


def guard(app, api_key: str | None, max_body: int) -> Guard:
    """The bearer token (every route but /health) and the body-size limit, answered in OpenAI's shape."""
    def error(status: int, message: str, code: str | None) -> dict:
        return error_body(message, "authentication_error" if status == 401 else "invalid_request_error", code=code)

    return Guard(app, api_key, max_body, error)


def create_app(engine: Engine, limits: Limits, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="prefalign serve", version="1", docs_url=None, redoc_url=None,  # pages that load a CDN's script
                  description="OpenAI-compatible completions and chat completions from local models, batched.")
    _handlers(app)
    document(app, engine, limits, api_key)

    @app.get("/health", summary="liveness (no key needed)")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models", summary="the served models")
    async def models() -> dict:
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "prefalign",
             "root": s.base.path, "parent": s.base.path if s.adapter else None, "max_model_len": s.context}
            for name, s in engine.served.items()]}

    @app.get("/stats", summary="the scheduler's counters: steps, rows and requests per step (docs/metrics.md)")
    async def stats() -> dict:
        return engine.stats()

    @app.post("/v1/completions", summary="text completion (OpenAI's legacy completions)")
    async def completions(body: CompletionBody, request: Request):
        served = _served(engine, body.model)
        if len(body.prompts()) > limits.max_prompts:
            raise APIError(400, f"{len(body.prompts())} prompts: this server takes at most {limits.max_prompts} per "
                           "request (--max-prompts)", "prompt")
        prompts = [_prompt_ids(served, p, i) for i, p in enumerate(body.prompts())]
        max_tokens = min(16, limits.max_tokens) if body.max_tokens is None else body.max_tokens
        if max_tokens == 0 and not body.echo:
            raise APIError(400, "max_tokens: 0 only with echo (scoring the prompt)", "max_tokens")
        settings = _settings(body, served, prompts, max_tokens, limits, body.logprobs, body.echo, engine.max_batch)
        texts = [p if isinstance(p, str) else served.tokenizer.decode(p) for p in body.prompts()] if body.echo else None
        return await _run(engine, request, body, served, prompts, settings, chat=False, echo_texts=texts)

    @app.post("/v1/chat/completions", summary="chat completion (the model's chat template applied)")
    async def chat(body: ChatBody, request: Request):
        served = _served(engine, body.model)
        if not served.has_chat_template:
            raise APIError(400, f"model {body.model!r} has no chat template in its tokenizer: use /v1/completions, "
                           "or start the server with --chat-template FILE", "messages", "no_chat_template")
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        try:
            messages = [{**m.model_dump(exclude_none=True), "content": m.text()} for m in body.messages]
            prompt = encode_prompt(served.tokenizer, messages)
        except Exception as e:  # noqa: BLE001  the template's own refusal (roles, order): the client's to fix
            raise APIError(400, f"the chat template cannot render these messages: {e}", "messages") from None
        default = served.context - len(prompt)
        max_tokens = body.limit() if body.limit() is not None else min(limits.max_tokens, max(default, 1))
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        settings = _settings(body, served, [prompt], max_tokens, limits, logprobs, False, engine.max_batch)
        return await _run(engine, request, body, served, [prompt], settings, chat=True)

    return app


def _served(engine: Engine, name: str):
    if name not in engine.served:
        raise APIError(404, f"the model {name!r} does not exist; served: {', '.join(engine.served)}", "model",
                       "model_not_found", "not_found_error")
    return engine.served[name]


def _prompt_ids(served, prompt, i: int) -> list[int]:
    if isinstance(prompt, str):
        ids = encode_prompt(served.tokenizer, prompt)
    else:
        vocab = len(served.tokenizer)
        if any(not 0 <= t < vocab for t in prompt):
            raise APIError(400, f"prompt {i}: token ids must be in [0, {vocab})", "prompt")
        ids = list(prompt)
    if not ids:
        raise APIError(400, f"prompt {i} is empty", "prompt")
    return ids


def _settings(body: Body, served, prompts: list[list[int]], max_tokens: int, limits: Limits,
              logprobs: int | None, echo: bool, max_batch: int) -> Settings:
    if max_tokens > limits.max_tokens:
        raise APIError(400, f"max_tokens is {max_tokens}; this server allows at most {limits.max_tokens}",
                       "max_tokens")
    if body.n > limits.max_n:
        raise APIError(400, f"n is {body.n}; this server allows at most {limits.max_n}", "n")
    if len(body.stops()) > limits.max_stop:
        raise APIError(400, f"at most {limits.max_stop} stop strings", "stop")
    if body.n * len(prompts) > max_batch:  # a request's rows are decoded together: they must fit in one batch
        raise APIError(400, f"n x prompts is {body.n} x {len(prompts)} = {body.n * len(prompts)} completions; this "
                       f"server decodes at most {max_batch} together (--max-batch): send fewer per request", "n")
    longest = max((len(p) for p in prompts), default=0)
    if longest + max_tokens > served.context:
        raise APIError(400, f"this model's maximum context length is {served.context} tokens; the request asks for "
                       f"{longest + max_tokens} ({longest} in the prompt, {max_tokens} in the completion)",
                       "max_tokens", "context_length_exceeded")
    return Settings(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                    stop=body.stops(), seed=body.seed, logprobs=logprobs, ignore_eos=body.ignore_eos, echo=echo)


async def _run(engine: Engine, request: Request, body: Body, served, prompts, settings: Settings, *, chat: bool,
               echo_texts: list[str] | None = None):
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    job = Job(body.model, prompts, body.n, settings, lambda e: loop.call_soon_threadsafe(events.put_nowait, e))
    reply = Reply(job, chat, Tokens(served.tokenizer, body.return_tokens_as_token_ids), echo_texts,
                  with_logprobs=settings.logprobs is not None)
    engine.submit(job)
    if not body.stream:
        try:
            if not await _until_done(job, events, request):
                return Response(status_code=499)  # nobody reads it: the client closed the connection
        finally:
            job.cancelled.set()  # a client gone before the end: its rows leave the batch
        return reply.whole()
    usage = bool((body.stream_options or {}).get("include_usage"))
    return StreamingResponse(_stream(job, reply, events, usage), media_type="text/event-stream")


async def _until_done(job: Job, events: asyncio.Queue, request: Request) -> bool:
    """Wait for every row to finish (True), or for the client to disconnect (False: FastAPI would not
    cancel this handler, and the rows would decode to max_tokens for nobody). The body has been read,
    so the next ASGI message the client's side can send is http.disconnect."""
    async def finished() -> None:
        while not all(r.finish for r in job.rows):
            if (event := await events.get())[0] == "error":
                raise APIError(500, event[1], kind="server_error")

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    done_task, gone_task = asyncio.ensure_future(finished()), asyncio.ensure_future(gone())
    try:
        await asyncio.wait({done_task, gone_task}, return_when=asyncio.FIRST_COMPLETED)
        answered = done_task.done()
    finally:
        for task in (done_task, gone_task):
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    if answered:
        done_task.result()  # raises the engine's error, if it sent one (a 500)
    return answered


async def _stream(job: Job, reply: Reply, events: asyncio.Queue, usage: bool):
    stops = job.settings.stop
    try:
        while True:
            event = await events.get()
            if event[0] == "error":
                yield f"data: {json.dumps(error_body(event[1], 'server_error'))}\n\n"
                break
            for chunk in reply.chunks(lambda text: sendable(text, stops)):
                if usage:  # OpenAI: with include_usage every chunk has a usage field, null but in the last
                    chunk["usage"] = None
                yield f"data: {json.dumps(chunk)}\n\n"
            if all(r.finish for r in job.rows):
                if usage:
                    yield f"data: {json.dumps(reply.usage_chunk())}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()


def _handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return _error(e.status, e.message, kind=e.kind, param=e.param, code=e.code)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, e: RequestValidationError):
        problems = []
        for item in e.errors():
            if item.get("type") == "json_invalid":
                problems.append(f"the body is not valid JSON ({item.get('ctx', {}).get('error', 'malformed')} at "
                                f"character {item['loc'][-1]})")
                continue
            where = ".".join(str(x) for x in item.get("loc", ()) if x != "body")
            problems.append(f"{where or 'body'}: {item.get('msg', '').removeprefix('Value error, ')}")
        first = e.errors()[0].get("loc", ()) if e.errors() else ()
        param = ".".join(str(x) for x in first if x != "body") or None
        return _error(400, "; ".join(problems) or "invalid request", param=param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, e: StarletteHTTPException):
        kind = {404: "not_found_error", 413: "invalid_request_error"}.get(e.status_code, "invalid_request_error")
        return _error(e.status_code, str(e.detail), kind=kind)
