"""The review page's server: FastAPI on uvicorn, one page (HTML, JS and CSS shipped in static/, no
build step, nothing fetched from elsewhere) and a small JSON API over the `Store`.

  GET  /                      the page (?annotator=NAME)
  GET  /api/next?annotator=   the item to judge (held for this annotator) and their progress
  POST /api/judge             {annotator, item, verdict: a|b|tie|both_bad, comment, better}: committed,
                              then the sides' names and the next item
  POST /api/undo              {annotator}: their last judgement removed; that item comes back
  GET  /api/summary           counts and agreement; verdict counts, the arena's models and win-rate only
                              once every item has its k judgements (until then annotators see no tally)
  GET  /health

Off loopback it needs a key (`--api-key`): every /api route then checks `Authorization: Bearer KEY`,
which the page sends (it reads `?key=` once, keeps it for the tab and takes it out of the address). The
page, its script and /health need none: they hold no data. A request body over MAX_BODY is a 413.

Answers reach the page as JSON strings and are written with `textContent`, never parsed as HTML; the
Content-Security-Policy allows only this server's own script, so even markup that slipped through
could run nothing. The endpoints are plain `def`s: uvicorn runs them on its thread pool, each with
its own SQLite connection (the store's transactions serialise the writers).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..errors import ConfigError
from ..runtime.http import Guard, detail_body, is_loopback
from .store import Conflict, Store
from .summary import summarise

STATIC = Path(__file__).parent / "static"
FILES = {"/": ("page.html", "text/html; charset=utf-8"), "/page.js": ("page.js", "text/javascript; charset=utf-8"),
         "/page.css": ("page.css", "text/css; charset=utf-8")}
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",  # the page must always ask the server, which holds the state
}
NAME = r"^[^\x00-\x1f\x7f]*\S[^\x00-\x1f\x7f]*$"  # any printable name that is not blank
MAX_BODY = 1 << 20  # bytes: a judgement with the longest comment and answer the page allows is well under


class AnnotatorRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    annotator: str = Field(..., min_length=1, max_length=64, pattern=NAME)


class JudgeRequest(AnnotatorRequest):
    item: int = Field(..., ge=1, lt=2**63)  # an item's id (SQLite's INTEGER; a larger one was a 500)
    verdict: Literal["a", "b", "tie", "both_bad"]
    comment: str = Field("", max_length=10_000)
    better: str = Field("", max_length=100_000)


class View(BaseModel):
    id: int
    prompt: str
    a: str
    b: str


class Progress(BaseModel):
    done: int
    total: int
    items: int
    items_complete: int
    per_item: int


class Next(BaseModel):
    """What /api/next answers (and /api/judge and /api/undo with it): the item to show, or null when
    nothing is left for this annotator, and their progress."""

    item: View | None
    progress: Progress


class Saved(BaseModel):
    item: int
    verdict: Literal["a", "b", "tie", "both_bad"]
    a_name: str
    b_name: str


class Judged(Next):
    saved: Saved


class Undone(BaseModel):
    item: int
    verdict: Literal["a", "b", "tie", "both_bad"]
    comment: str
    better: str


class Undid(Next):
    undone: Undone | None


class Detail(BaseModel):
    detail: str


# the answers the page's API gives besides 200 and FastAPI's 422 (a field that does not validate)
REFUSALS = {400: "a body that cannot be parsed (not UTF-8 JSON)",
            401: "no key or a wrong key (a server started with --api-key)",
            409: "an item not shown to this annotator, or judged by them already",
            413: f"a body over {MAX_BODY} bytes"}


def _fastapi():
    try:
        import fastapi
        import uvicorn
    except ImportError:
        raise ConfigError("the review page needs the serve extra: pip install 'prefalign[serve]' (fastapi, "
                          "uvicorn)") from None
    return fastapi, uvicorn


def make_app(store: Store):
    fastapi, _ = _fastapi()
    from fastapi import HTTPException, Query
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import Response

    app = fastapi.FastAPI(title="prefalign review", docs_url=None, redoc_url=None)  # the docs page loads a CDN's script
    pages = {route: ((STATIC / name).read_bytes(), kind) for route, (name, kind) in FILES.items()}

    app.add_middleware(SecurityHeaders)
    app.add_exception_handler(RequestValidationError, _invalid)
    for route, (body, kind) in pages.items():
        app.get(route, include_in_schema=False)(_static(body, kind))

    @app.get("/api/next", response_model=None, responses=_answers(Next))
    def next_item(annotator: str = Query(..., min_length=1, max_length=64, pattern=NAME)) -> dict:
        return store.next_for(annotator)

    @app.post("/api/judge", response_model=None, responses=_answers(Judged, 400, 409))
    def judge(req: JudgeRequest) -> dict:
        try:
            saved = store.judge(req.annotator, req.item, req.verdict, req.comment, req.better)
        except Conflict as e:
            raise HTTPException(409, str(e)) from None
        return {"saved": saved, **store.next_for(req.annotator)}

    @app.post("/api/undo", response_model=None, responses=_answers(Undid, 400))
    def undo(req: AnnotatorRequest) -> dict:
        undone = store.undo(req.annotator)
        return {"undone": undone, **store.next_for(req.annotator)}

    @app.get("/api/summary", responses=_answers(None))
    def summary() -> dict:
        items, meta = store.items_with_judgements(), store.meta()
        complete = all(len(it["judgements"]) >= meta["per_item"] for it in items)
        return summarise(items, meta, blind=not complete)  # no running tally for those still labelling

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        return Response(status_code=204)  # no icon, and no 404 in the browser's console

    @app.get("/health")
    def health() -> dict:
        return {"ok": True}

    return app


async def _invalid(_, e):
    """FastAPI's 422, without the input it echoes: a body of `{"item": 1e999}` (or NaN) echoed back is
    not JSON, and the answer was a 500."""
    from fastapi.responses import JSONResponse

    detail = [{"loc": list(x.get("loc", ())), "msg": x.get("msg", ""), "type": x.get("type", "")} for x in e.errors()]
    return JSONResponse({"detail": detail}, status_code=422)


class SecurityHeaders:
    """ASGI middleware: HEADERS on every response. (Plain ASGI, not starlette's BaseHTTPMiddleware, which
    runs the app in a task of its own and turns the guard's 413 raised while the body streams in into
    FastAPI's 400 "error parsing the body".)"""

    def __init__(self, app):
        self.app = app
        self.raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in HEADERS.items()]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        names = {k for k, _ in self.raw}

        async def with_headers(message):
            if message["type"] == "http.response.start":
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() not in names]
                message = {**message, "headers": kept + self.raw}
            await send(message)

        await self.app(scope, receive, with_headers)


def _answers(model: type[BaseModel] | None, *codes: int) -> dict:
    """An /api route's documented answers: its 200 (when `model`), the codes it gives itself, and the
    guard's 401 and 413 (which come before any route)."""
    out: dict = {code: {"model": Detail, "description": REFUSALS[code]} for code in (*codes, 401, 413)}
    if model is not None:
        out[200] = {"model": model}
    return out


def _static(body: bytes, kind: str):
    from fastapi.responses import Response

    def page() -> Response:
        return Response(body, media_type=kind)

    return page


def guarded(store: Store, api_key: str | None = None):
    """The app behind the key check (/api routes) and the body-size limit."""
    app = make_app(store)
    if api_key:
        _bearer(app)
    return Guard(app, api_key, MAX_BODY, detail_body, open_paths={*FILES, "/favicon.ico", "/health"})


def _bearer(app) -> None:
    """/openapi.json says what the guard does: the bearer token on every /api route."""
    plain = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = plain()
            schema.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            for path, methods in schema["paths"].items():
                for operation in methods.values():
                    if path.startswith("/api/"):
                        operation["security"] = [{"bearer": []}]
        return app.openapi_schema

    app.openapi = openapi


def check_host(host: str, api_key: str | None) -> None:
    if not is_loopback(host) and not api_key:
        raise ConfigError(f"--host {host} is not a loopback address: anyone who can reach it could label and read "
                          "the answers; give --api-key KEY (or PREFALIGN_REVIEW_KEY) and open the page with &key=KEY")


def serve(store: Store, host: str = "127.0.0.1", port: int = 8008, log: Callable[[str], None] = print,
          api_key: str | None = None) -> None:
    """Bind and listen first (port 0: any free port) so the printed address is the one served and
    answers at once, then serve until interrupted."""
    check_host(host, api_key)
    _, uvicorn = _fastapi()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)  # connections made from now on wait in the backlog until uvicorn accepts them
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    key = "&key=YOUR_KEY" if api_key else ""
    log(f"review: http://{shown}:{bound}/?annotator=YOUR_NAME{key}  ({store.path}; Ctrl+C stops, nothing is lost)")
    config = uvicorn.Config(guarded(store, api_key), log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[sock])
