"""Server-sent events for single fits: progress while the loop runs, then the result.

A fit asked for with ``Accept: text/event-stream`` answers 200 at once (after validation and
admission, which still answer 4xx/429 as usual) and streams::

    event: progress
    data: {"epoch": 500, "loss": 0.0213}

    event: result            (the same JSON as the non-streaming response)
    data: {...}

or, for a fit that cannot finish, ``event: error`` with the 422 body (``detail``, and for a
divergence ``"stop_reason": "diverged"`` and ``epoch``). A client that disconnects stops the fit.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from typing import Any

import orjson
from fastapi import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from service.api.errors import fit_error_body
from service.worker import FitError, FitJob, FitResult, FitWorker, Reporter

EVENT_STREAM = "text/event-stream"
#: Progress events per fit when the request does not set progress_every.
DEFAULT_EVENTS = 100

EXAMPLE = (
    'event: progress\ndata: {"epoch": 10, "loss": 0.0912}\n\n'
    'event: progress\ndata: {"epoch": 20, "loss": 0.0311}\n\n'
    'event: result\ndata: {"model": "linear", "params": {...}, ...}\n\n'
)


def wants_stream(request: Request) -> bool:
    return EVENT_STREAM in request.headers.get("accept", "").lower()


def progress_step(epochs: int, progress_every: int | None) -> int:
    return progress_every or max(1, -(-epochs // DEFAULT_EVENTS))


def event(name: str, data: dict[str, Any] | str) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"event: {name}\ndata: {payload}\n\n"


#: Answers built piece by piece in Python (batch answers) are built here, one piece at a time
#: for all of them: every thread doing Python work competes for the GIL with the event loop,
#: and eight answers built in eight threads kept /healthz waiting (p99 ~100 ms in make chaos).
ANSWERS = ThreadPoolExecutor(max_workers=1, thread_name_prefix="answer")


async def _pieces(pieces: Iterator[bytes]) -> AsyncIterator[bytes]:
    """The pieces of ``pieces``, each made in the :data:`ANSWERS` thread."""
    loop = asyncio.get_running_loop()
    while (piece := await loop.run_in_executor(ANSWERS, next, pieces, None)) is not None:
        yield piece


class HoldingStream(StreamingResponse):
    """A streaming response that releases ``resources`` (the admission ticket) when it ends,
    however it ends, even if the stream never started. A synchronous iterator of pieces is
    run in the one :data:`ANSWERS` thread."""

    def __init__(
        self,
        content: AsyncIterator[str] | Iterator[bytes],
        resources: AsyncExitStack,
        media_type: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        body = _pieces(content) if isinstance(content, Iterator) else content
        super().__init__(body, media_type=media_type, headers=headers)
        self._resources = resources

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._resources.aclose()


class EventStream(HoldingStream):
    """Server-sent events, holding the admission ticket until they end."""

    def __init__(self, events: AsyncIterator[str], resources: AsyncExitStack) -> None:
        super().__init__(
            events,
            resources,
            media_type=EVENT_STREAM,
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )


async def fit_events(
    gone_when: Callable[[], Awaitable[None]],
    worker: FitWorker,
    job: FitJob,
    timeout_s: float | None,
    every: int,
    respond: Callable[[FitResult], str],
) -> AsyncIterator[str]:
    """Run the fit, yielding progress events as its chunks finish, then the result (as
    ``respond`` writes it: the same JSON as the plain answer); stop (abandoning the fit) when
    ``gone_when()`` returns: the client went away."""
    loop = asyncio.get_running_loop()
    progress: asyncio.Queue[tuple[int, float]] = asyncio.Queue()

    def report(epoch: int, loss: float) -> None:  # in the fit's thread
        loop.call_soon_threadsafe(progress.put_nowait, (epoch, loss))

    fit = asyncio.ensure_future(worker.fit(job, timeout_s, Reporter(report, every)))
    gone = asyncio.ensure_future(gone_when())
    try:
        while True:
            update = asyncio.ensure_future(progress.get())
            await asyncio.wait({fit, gone, update}, return_when=asyncio.FIRST_COMPLETED)
            if gone.done():
                update.cancel()
                return  # the finally block abandons the fit
            if not update.done():
                update.cancel()
                break
            yield _progress(*update.result())
        while not progress.empty():
            yield _progress(*progress.get_nowait())
        try:
            result = fit.result()
        except FitError as error:
            yield event("error", fit_error_body(error))
            return
        yield event("result", respond(result))
    finally:
        gone.cancel()
        if not fit.done():
            fit.cancel()  # the worker sets the fit's cancel flag: it stops at its next chunk


def _progress(epoch: int, loss: float) -> str:
    return event("progress", {"epoch": epoch, "loss": loss if math.isfinite(loss) else None})


#: Batch entries per streamed piece of a batch answer.
ENTRIES_PER_PIECE = 64


def batch_pieces(
    head: dict[str, Any], count: int, entry: Callable[[int], dict[str, Any]]
) -> Iterator[bytes]:
    """A batch answer ``{**head, "results": [entry(0), ...]}``, a few entries at a time (the
    stream runs this generator in a thread; ``entry`` is called in order). One orjson call
    a piece (one an entry cost twice as much), its brackets dropped; orjson writes NaN and
    infinities as null."""
    yield orjson.dumps(head)[:-1] + b',"results":['
    for start in range(0, count, ENTRIES_PER_PIECE):
        piece = [entry(i) for i in range(start, min(start + ENTRIES_PER_PIECE, count))]
        text = orjson.dumps(piece, option=orjson.OPT_SERIALIZE_NUMPY)[1:-1]
        yield (b"," if start else b"") + text
    yield b"]}"
