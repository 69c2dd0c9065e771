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
from collections.abc import AsyncIterator, Callable

from starlette.datastructures import Headers
from starlette.middleware.body_limit import RequestBodyLimitMiddleware
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

#: Bodies up to this many times the limit are read and dropped before the 413.
DRAIN_FACTOR = 4


async def drain(chunks: AsyncIterator[bytes], seconds: float) -> None:
    """Read and drop what is left of a body before answering without it, so a client still
    sending reads the answer rather than a connection reset; for at most ``seconds`` (the
    body deadline), keeping nothing."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            async for _ in chunks:
                pass


async def _received(receive: Receive) -> AsyncIterator[bytes]:
    while (message := await receive())["type"] == "http.request":
        yield message.get("body", b"")
        if not message.get("more_body", False):
            return


def too_large(limit: int) -> str:
    return f"request body larger than {limit} bytes (TAPEFIT_MAX_BODY_BYTES)"


class BodyLimit:
    """Refuse a declared Content-Length over ``limit`` (JSON 413), ambiguous framing (400)
    and compressed bodies (415); count the rest."""

    def __init__(self, app: ASGIApp, limit: int, deadline: Callable[[int], float]) -> None:
        """``deadline(length)``: seconds a body of that length may take to arrive."""
        self.app = RequestBodyLimitMiddleware(app, max_body_size=limit)
        self.limit = limit
        self.deadline = deadline

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = self._refusal(Headers(scope=scope)) if scope["type"] == "http" else None
        if refusal is None:
            await self.app(scope, receive, send)
            return
        status, detail, declared = refusal
        if status == 413 and declared <= DRAIN_FACTOR * self.limit:  # far over it: cut off
            await drain(_received(receive), self.deadline(declared))
        # The body is unread (or ambiguous): the connection must not be reused after it.
        response = JSONResponse(
            {"detail": detail}, status_code=status, headers={"Connection": "close"}
        )
        await response(scope, receive, send)

    def _refusal(self, headers: Headers) -> tuple[int, str, int] | None:
        """(status, detail, declared length) for a request refused on its headers alone."""
        encoding = headers.get("content-encoding", "identity").strip().lower()
        if encoding != "identity":
            detail = (
                f"Content-Encoding {encoding!r} is not accepted; send the body uncompressed "
                "(responses are gzip-compressed on request)"
            )
            return 415, detail, 0
        declared = headers.get("content-length")
        if declared is not None and "transfer-encoding" in headers:
            # Two framings for one body: proxies and servers may disagree on where it ends
            # (request smuggling). RFC 9112 says close the connection after it.
            return 400, "a request may not carry both Content-Length and Transfer-Encoding", 0
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return 413, too_large(self.limit), int(declared)
        return None
