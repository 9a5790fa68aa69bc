"""What both HTTP servers (`prefalign serve`, `prefalign review`) put in front of their app: which
addresses bind without a key, and an ASGI guard for the bearer token and the request-body size.

Kept free of torch and of the servers' own modules (serve and review are siblings in the layers); the
guard needs starlette (both servers' extra brings it), imported when it runs, so `is_loopback` can
refuse an address before anything heavy loads.
"""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Callable, Collection


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and `localhost` only: any other name could resolve to an exposed address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def detail_body(status: int, message: str, code: str | None = None) -> dict:
    """FastAPI's own error shape ({"detail": ...}), for a server that answers in it."""
    return {"detail": message}


class Guard:
    """ASGI middleware: the bearer token on every route but `open_paths` (when a key is set), and the
    body-size limit, checked on Content-Length and, for a body sent without one, on the bytes as they
    arrive (then the app's handler for HTTPException answers the 413). `error(status, message, code)`
    makes the body of the answers the guard gives itself."""

    def __init__(self, app, api_key: str | None, max_body: int, error: Callable[[int, str, str | None], dict],
                 open_paths: Collection[str] = ("/health",)):
        # an empty key (PREFALIGN_API_KEY= set but blank) is no key, as check_host takes it; it used to
        # demand the header "Bearer " with nothing after it
        self.app, self.api_key, self.max_body, self.error = app, api_key or None, max_body, error
        self.open_paths = open_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.api_key is not None and scope["path"] not in self.open_paths:
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not secrets.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                return await self._answer(401, "invalid or missing API key (Authorization: Bearer KEY)",
                                          "invalid_api_key")(scope, receive, send)
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return await self._answer(413, f"request body of {int(length)} bytes is over the limit of "
                                           f"{self.max_body}", "request_too_large")(scope, receive, send)
        from starlette.exceptions import HTTPException

        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body:
                raise HTTPException(413, f"request body is over the limit of {self.max_body} bytes")
            return message

        await self.app(scope, counted, send)

    def _answer(self, status: int, message: str, code: str):
        from starlette.responses import JSONResponse

        return JSONResponse(self.error(status, message, code), status_code=status)
