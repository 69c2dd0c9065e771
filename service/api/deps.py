"""FastAPI dependencies as ``Annotated`` aliases (async: sync ones would cost a thread hop).

A fit route enters :func:`admission` and gets an admission ticket with the worker, the
:class:`Caller` (is it still there; does it want server-sent events) and the parsed,
validated body (:meth:`Admitted.body`). Each dependency FastAPI solves costs tens of µs on
every request, so there are few, and the app's parts come from its state.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from prometheus_client import CollectorRegistry

from service.admission import Ticket
from service.api.bodies import BodyParsers
from service.api.parsing import BINARY_MEDIA_TYPES, Parsed
from service.api.report import wants_text
from service.api.requests import (
    BinaryParser,
    JsonParser,
    parse_request,
    unless_disconnected,
    wait_for_disconnect,
)
from service.api.streaming import wants_stream
from service.worker import FitWorker

T = TypeVar("T")


async def get_worker(request: Request) -> FitWorker:
    worker: FitWorker = request.app.state.worker
    return worker


WorkerDep = Annotated[FitWorker, Depends(get_worker)]


async def get_registry(request: Request) -> CollectorRegistry:
    registry: CollectorRegistry = request.app.state.registry
    return registry


RegistryDep = Annotated[CollectorRegistry, Depends(get_registry)]


@dataclass(frozen=True, slots=True)
class Caller:
    """The client on the other end of the request."""

    _request: Request

    @property
    def wants_events(self) -> bool:
        """It asked for server-sent events (``Accept: text/event-stream``)."""
        return wants_stream(self._request)

    @property
    def wants_report(self) -> bool:
        """It asked for the plain-text fit report (``Accept: text/plain``)."""
        return wants_text(self._request.headers.get("accept", ""))

    async def gone(self) -> None:
        """Returns when the client disconnects."""
        await wait_for_disconnect(self._request)

    async def unless_gone(self, work: Awaitable[T]) -> T:
        """Await ``work``, cancelled (which abandons a fit) if the client disconnects first."""
        return await unless_disconnected(self._request, work)


@dataclass(frozen=True, slots=True)
class Admitted:
    """A request's admission ticket (:mod:`service.admission`), released when the route's
    ``async with admission(request)`` block ends, or, once :meth:`hand_over` gave it to a
    streamed answer, when that ends; with the worker that runs its fit and the
    :class:`Caller` it answers."""

    ticket: Ticket
    _resources: AsyncExitStack
    worker: FitWorker
    caller: Caller

    def hand_over(self) -> AsyncExitStack:
        return self._resources.pop_all()

    async def body(
        self,
        parse_json: JsonParser[Any],
        parse_binary: BinaryParser[Any] | None = None,
        *,
        json: bool = True,
        binary_types: tuple[str, ...] = BINARY_MEDIA_TYPES,
    ) -> Parsed[Any]:
        """The validated body: JSON (unless ``json`` is False) and/or, with
        ``parse_binary``, a binary body (one of ``binary_types``) with the options in the
        query string; read after admission, charged to the ticket."""
        request = self.caller._request  # the Caller of this module
        state = request.app.state
        return await parse_request(
            request,
            state.bodies,
            state.settings,
            parse_json,
            parse_binary,
            self.ticket,
            json=json,
            binary_types=binary_types,
        )

    async def draw(self, drawing: Callable[[], bytes]) -> bytes:
        """A figure's PNG, drawn off the server process while the ticket is held
        (:meth:`service.api.bodies.BodyParsers.draw`)."""
        bodies: BodyParsers = self.caller._request.app.state.bodies
        return await bodies.draw(drawing)


@asynccontextmanager
async def admission(request: Request) -> AsyncIterator[Admitted]:
    """Refused at once (before the body is read) when the service is not serving or every
    place is taken; exceptions of the route pass through the ticket (refusals are counted).

    A context manager the route enters itself, not a FastAPI dependency: solving a
    generator dependency (and its body's) cost ~60 µs a request, a tenth of a small fit's
    whole request."""
    worker: FitWorker = request.app.state.worker
    async with AsyncExitStack() as resources:
        ticket = await resources.enter_async_context(worker.admit())
        yield Admitted(ticket, resources, worker, Caller(request))


def parsed_body(parse_json: JsonParser[Any]) -> Callable[..., Awaitable[Parsed[Any]]]:
    """A dependency giving a validated JSON body, for routes that run no fit (nothing to
    admit)."""

    async def body(request: Request) -> Parsed[Any]:
        state = request.app.state
        return await parse_request(request, state.bodies, state.settings, parse_json)

    return body
