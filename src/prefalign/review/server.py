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
    item: int
    verdict: Literal["a", "b", "tie", "both_bad"]
    comment: str = Field("", max_length=10_000)
    better: str = Field("", max_length=100_000)


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
    from fastapi.responses import Response

    app = fastapi.FastAPI(title="prefalign review", docs_url=None, redoc_url=None)  # the docs page loads a CDN's script
    pages = {route: ((STATIC / name).read_bytes(), kind) for route, (name, kind) in FILES.items()}

    app.add_middleware(SecurityHeaders)
    for route, (body, kind) in pages.items():
        app.get(route, include_in_schema=False)(_static(body, kind))

    @app.get("/api/next")
    def next_item(annotator: str = Query(..., min_length=1, max_length=64, pattern=NAME)) -> dict:
        return store.next_for(annotator)

    @app.post("/api/judge")
    def judge(req: JudgeRequest) -> dict:
        try:
            saved = store.judge(req.annotator, req.item, req.verdict, req.comment, req.better)
        except Conflict as e:
            raise HTTPException(409, str(e)) from None
        return {"saved": saved, **store.next_for(req.annotator)}

    @app.post("/api/undo")
    def undo(req: AnnotatorRequest) -> dict:
        undone = store.undo(req.annotator)
        return {"undone": undone, **store.next_for(req.annotator)}

    @app.get("/api/summary")
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


def _static(body: bytes, kind: str):
    from fastapi.responses import Response

    def page() -> Response:
        return Response(body, media_type=kind)

    return page


def guarded(store: Store, api_key: str | None = None):
    """The app behind the key check (/api routes) and the body-size limit."""
    return Guard(make_app(store), api_key, MAX_BODY, detail_body, open_paths={*FILES, "/favicon.ico", "/health"})


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
