"""Request body limits, answered in the API's JSON error shape.

Starlette's ``RequestBodyLimitMiddleware`` counts the bytes of every body (chunked, or lying
about its length) and raises a 413 ``HTTPException`` that the app's handlers render as JSON.
For a declared ``Content-Length`` over the limit, though, it replaces whatever the app
answers with a ``text/plain`` 413, which generated clients cannot parse. So a declared length
is refused here first, before the body is read, with the JSON body every other error has;
both sit inside the request-id middleware, so the 413 carries ``X-Request-ID``.
"""

from __future__ import annotations

import asyncio
import contextlib

from starlette.datastructures import Headers
from starlette.middleware.body_limit import RequestBodyLimitMiddleware
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

#: Bodies up to this many times the limit are read and dropped before the 413, within
#: DRAIN_S plus a second per DRAIN_BYTES_PER_S.
DRAIN_FACTOR = 4
DRAIN_S = 5.0
DRAIN_BYTES_PER_S = 1024 * 1024


def too_large(limit: int) -> str:
    return f"request body larger than {limit} bytes (TAPEFIT_MAX_BODY_BYTES)"


class BodyLimit:
    """Refuse a declared Content-Length over ``limit`` (JSON 413), ambiguous framing (400)
    and compressed bodies (415); count the rest."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = RequestBodyLimitMiddleware(app, max_body_size=limit)
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = Headers(scope=scope)
            declared = headers.get("content-length")
            encoding = headers.get("content-encoding", "identity").strip().lower()
            if encoding != "identity":
                response = JSONResponse(
                    {
                        "detail": f"Content-Encoding {encoding!r} is not accepted; send the body "
                        "uncompressed (responses are gzip-compressed on request)"
                    },
                    status_code=415,
                    headers={"Connection": "close"},
                )
                await response(scope, receive, send)
                return
            if declared is not None and "transfer-encoding" in headers:
                # Two framings for one body: proxies and servers may disagree on where it
                # ends (request smuggling). RFC 9112 says close the connection after it.
                response = JSONResponse(
                    {"detail": "a request may not carry both Content-Length and Transfer-Encoding"},
                    status_code=400,
                    headers={"Connection": "close"},
                )
                await response(scope, receive, send)
                return
            if declared is not None and declared.isdigit() and int(declared) > self.limit:
                await self._drain(receive, int(declared))
                response = JSONResponse(
                    {"detail": too_large(self.limit)},
                    status_code=413,
                    headers={"Connection": "close"},  # the unread body must not be parsed
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _drain(self, receive: Receive, declared: int) -> None:
        """Read and drop a body somewhat over the limit, so the client reads the 413 rather
        than a reset; one far over it (more than DRAIN_FACTOR times) is cut off."""
        if declared > DRAIN_FACTOR * self.limit:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(DRAIN_S + declared / DRAIN_BYTES_PER_S):
                while (message := await receive())["type"] == "http.request":
                    if not message.get("more_body", False):
                        return
