"""Turning an HTTP request into a validated request, and waiting on work while watching
for the client to go away. Shared by every route that takes a fit body."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel

from service import tracing
from service.admission import Ticket, body_cost
from service.api.bodies import BodyParsers
from service.api.errors import BodyTimeout, ClientDisconnected, UnsupportedMediaType
from service.api.parsing import BINARY_MEDIA_TYPES, Invalid, Parsed
from service.api.schemas import limits_context
from service.settings import Settings
from service.worker import read_outcome

RequestT = TypeVar("RequestT", bound=BaseModel)
T = TypeVar("T")

JsonParser = Callable[[bytes, dict[str, Any]], "Parsed[RequestT] | Invalid"]
BinaryParser = Callable[
    [bytes, str, Mapping[str, str], dict[str, Any]], "Parsed[RequestT] | Invalid"
]


JSON = "application/json"


def media_type(request: Request, accepted: tuple[str, ...]) -> str:
    content_type = request.headers.get("content-type", JSON)
    media = content_type.split(";", 1)[0].strip().lower()
    if media not in accepted:
        raise UnsupportedMediaType(content_type, accepted)
    return media


async def read_body(
    request: Request, settings: Settings, ticket: Ticket | None, binary: bool
) -> bytes:
    """The body, charged to ``ticket`` as it arrives (all at once for a declared length,
    before reading), within the body deadline (:class:`BodyTimeout`: 408)."""
    declared = request.headers.get("content-length")
    charged = 0
    if ticket is not None and declared is not None and declared.isdigit():
        charged = int(declared)
        ticket.charge_bytes(body_cost(charged, binary).bytes)
    deadline = asyncio.get_running_loop().time() + settings.body_timeout_s
    chunks: list[bytes] = []
    received = 0
    try:
        async with asyncio.timeout_at(deadline) as timeout:  # one timer, moved as bytes come
            async for chunk in request.stream():
                if not chunk:  # the stream's end
                    continue
                chunks.append(chunk)
                received += len(chunk)
                deadline += len(chunk) / settings.body_min_bytes_per_s
                timeout.reschedule(deadline)
                if ticket is not None and received > charged:  # undeclared, or over it
                    charged = max(received, 2 * charged)
                    ticket.charge_bytes(body_cost(charged, binary).bytes)
    except TimeoutError:
        raise BodyTimeout(
            f"the request body did not arrive in time ({received} bytes after "
            f"{settings.body_timeout_s:g} s plus 1 s per "
            f"{settings.body_min_bytes_per_s} bytes; TAPEFIT_BODY_TIMEOUT_S)"
        ) from None
    return b"".join(chunks)


async def parse_request(
    request: Request,
    bodies: BodyParsers,
    settings: Settings,
    parse_json: JsonParser[RequestT],
    parse_binary: BinaryParser[RequestT] | None = None,
    ticket: Ticket | None = None,
    *,
    json: bool = True,
    binary_types: tuple[str, ...] = BINARY_MEDIA_TYPES,
) -> Parsed[RequestT]:
    """The validated request: JSON (parsed off the loop when large; unless ``json`` is
    False), or, with ``parse_binary``, a binary body (one of ``binary_types``) whose options
    are in the query string. Any other Content-Type is refused (415) before the body is
    read. The body is read within its deadline and, with a ``ticket``, charged to it."""
    accepted = ((JSON,) if json else ()) + (binary_types if parse_binary else ())
    media = media_type(request, accepted)
    with tracing.span("read body"):
        body = await read_body(request, settings, ticket, binary=media != JSON)
    with tracing.span("parse", attributes={"tapefit.body_bytes": len(body)}):
        return await _parse(request, bodies, settings, body, media, parse_json, parse_binary)


async def _parse(
    request: Request,
    bodies: BodyParsers,
    settings: Settings,
    body: bytes,
    media: str,
    parse_json: JsonParser[RequestT],
    parse_binary: BinaryParser[RequestT] | None,
) -> Parsed[RequestT]:
    context = limits_context(
        settings.max_points,
        settings.max_epochs,
        settings.max_work,
        settings.max_batch,
        settings.max_batch_history,
        settings.max_dataset_points,
        settings.max_expression_work,
        settings.max_expression_complexity,
        settings.max_starts,
    )
    if media == JSON:
        if request.query_params:  # never silently ignored
            raise RequestValidationError(
                [
                    {
                        "loc": ["query", name],
                        "msg": "with a JSON body, options go inside it",
                        "type": "query_with_json_body",
                    }
                    for name in request.query_params
                ]
            )
        parsed = await bodies.parse(parse_json, body, context)
    else:  # numpy decoding: no per-number Python objects; off the loop when large
        assert parse_binary is not None
        query = request.query_params
        if len(body) <= settings.parse_inline_max_bytes:
            parsed = parse_binary(body, media, query, context)
        else:
            parsed = await asyncio.to_thread(parse_binary, body, media, query, context)
    if isinstance(parsed, Invalid):
        raise RequestValidationError(parsed.errors)
    return parsed


async def wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; if the client disconnects first, cancel it (which abandons the fit)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            # Cancelling only asks: the task is not done yet, so its result is not read here
            # (that raised InvalidStateError, a 500); whatever it ends with is collected.
            task.cancel()
            task.add_done_callback(read_outcome)
    if not task.done() or task.cancelled():
        raise ClientDisconnected
    return task.result()
