"""The OpenAPI schema `prefalign serve` publishes (/openapi.json), made to say what the server does, so
that a client generated from it, and a fuzzer (tests/faults/test_http_fuzz.py runs schemathesis on it),
can trust it:
- the request bodies' limits are this server's: `model` one of the served names, `max_tokens` at most
  --max-tokens, `n` at most its limit, `stop` at most 4 strings, at most --max-prompts prompts;
- the answers are the shapes sent: 200 with the completion (JSON, or server-sent events with
  `stream: true`), and the errors in OpenAI's shape with the status codes the server gives (400 for
  any bad field, where FastAPI would say 422; 401 without the key; 404 for an unknown model; 413 for
  a body over --max-body);
- with --api-key, the bearer scheme, on every route but /health.
What a schema cannot say (n x prompts over --max-batch, a prompt over the context) is a 400 too.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from .schemas import NEUTRAL


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]  # None: echo's first prompt token (nothing before it to score it)
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length"] | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: None
    choices: list[CompletionChoice]
    usage: Usage


class TokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TokenLogprob):
    top_logprobs: list[TokenLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: None
    choices: list[ChatChoice]
    usage: Usage


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: None
    choices: list[CompletionChoice]  # each with the text since the last chunk
    usage: Usage | None = None  # stream_options.include_usage: null, and the totals in the last chunk


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    system_fingerprint: None
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class Model(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    parent: str | None
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[Model]


class Health(BaseModel):
    status: Literal["ok"]


ANSWERS = {"/v1/completions": Completion, "/v1/chat/completions": ChatCompletion, "/v1/models": ModelList,
           "/health": Health}
CHUNKS = {"/v1/completions": CompletionChunk, "/v1/chat/completions": ChatCompletionChunk}
ERRORS = {400: "a bad field (malformed JSON included), or a request over a limit", 401: "no key or a wrong key",
          404: "no such model", 413: "a body over --max-body"}


def _events(chunk: str) -> dict:
    """A server-sent event of a stream: `data:` a chunk, an error (ErrorBody), or the final [DONE]."""
    json_of = {"anyOf": [{"$ref": f"#/components/schemas/{chunk}"}, {"$ref": "#/components/schemas/ErrorBody"}]}
    data = {"anyOf": [{"const": "[DONE]"},
                      {"type": "string", "contentMediaType": "application/json", "contentSchema": json_of}]}
    return {"type": "object", "required": ["data"], "properties": {"data": data},
            "description": "stream: true: one event per chunk, then data: [DONE]"}


def document(app, engine, limits, api_key: str | None) -> None:
    """Make `app`'s /openapi.json the honest one (built once, on its first request)."""
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            app.openapi_schema = _honest(schema, engine, limits, api_key)
        return app.openapi_schema

    app.openapi = openapi


def _honest(schema: dict, engine, limits, api_key: str | None) -> dict:
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):  # FastAPI's 422, which this server never sends
        components.pop(name, None)
    for model in (ErrorBody, *ANSWERS.values(), *CHUNKS.values()):
        found = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(found.pop("$defs", {}))
        components[model.__name__] = found
    vocab = min(len(s.tokenizer) for s in engine.served.values())
    for body in ("CompletionBody", "ChatBody"):
        _limit(components[body]["properties"], vocab, list(engine.served), limits, engine.max_batch)
    if api_key:
        schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    for path, methods in schema["paths"].items():
        for operation in methods.values():
            _answers(path, operation, api_key)
    return schema


def _limit(props: dict, vocab: int, served: list[str], limits, max_batch: int) -> None:
    props["model"]["enum"] = list(served)
    props["n"]["maximum"] = min(limits.max_n, max_batch)
    for key in ("max_tokens", "max_completion_tokens"):
        for branch in props.get(key, {}).get("anyOf", []):
            if branch.get("type") == "integer":
                branch["maximum"] = limits.max_tokens
    for branch in props["stop"]["anyOf"]:
        if branch.get("type") == "array":
            branch["maxItems"] = limits.max_stop
    for branch in props.get("prompt", {}).get("anyOf", []):
        _prompt(branch, vocab, limits.max_prompts)
    for key, neutral in NEUTRAL.items():  # accepted at their neutral value only
        if key in props:
            # None's neutral forms are the ones the body accepts: null, {} and [] (make faults: `{}` was
            # accepted while the schema said null only)
            props[key] = {"anyOf": [{"type": "null"}, {"type": "object", "maxProperties": 0},
                                    {"type": "array", "maxItems": 0}]} if neutral is None else {"enum": [neutral]}


def _prompt(branch: dict, vocab: int, max_prompts: int) -> None:
    """No empty prompt, token ids in the vocabulary, at most --max-prompts prompts."""
    if branch.get("type") == "string":
        branch["minLength"] = 1
        return
    branch["minItems"] = 1
    items = branch["items"]
    if items.get("type") == "integer":  # one prompt of token ids
        items.update(minimum=0, maximum=vocab - 1)
        return
    branch["maxItems"] = max_prompts
    if items.get("type") == "string":
        items["minLength"] = 1
    else:
        items["minItems"] = 1
        items["items"].update(minimum=0, maximum=vocab - 1)


def _answers(path: str, operation: dict, api_key: str | None) -> None:
    responses = operation["responses"]
    responses.pop("422", None)
    if path in ANSWERS:
        content: dict[str, Any] = {"application/json": {"schema": {"$ref": f"#/components/schemas/"
                                                                           f"{ANSWERS[path].__name__}"}}}
        if "requestBody" in operation:
            content["text/event-stream"] = {"schema": _events(CHUNKS[path].__name__)}
        responses["200"]["content"] = content
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    codes = ([400, 404, 413] if "requestBody" in operation else []) + ([401] if api_key and path != "/health" else [])
    for code in codes:
        responses[str(code)] = {"description": ERRORS[code], "content": error}
    if api_key and path != "/health":
        operation["security"] = [{"bearer": []}]
