"""Request bodies are parsed here: inline when small, else in a parser process; figures are
drawn there too.

pydantic holds the GIL for a whole parse, so a large JSON body parsed on the event loop
would stall every other request. Bodies above ``TAPEFIT_PARSE_INLINE_MAX_BYTES`` go to a
parser process (:mod:`service.api.parser_pool`); every parse there has a deadline, and a
parser that dies or hangs in any state is replaced and the request answered 503
(:class:`~service.api.parser_pool.ParserFailed`), so no admission place ever leaks. Until the
processes are up (they start after readiness), large bodies are parsed in a thread.

The app owns one :class:`BodyParsers`; its lifespan starts and stops it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram

from service.api.parser_pool import PARSER_RESERVE_BYTES, ParserPool
from service.settings import Settings

T = TypeVar("T")

#: A parse in a parser process may take this long, plus a second per PARSE_MIN_BYTES_PER_S
#: of body (a 40 MB body parses in ~0.3 s): past that the parser is dead or wedged.
PARSE_DEADLINE_S = 5.0
PARSE_MIN_BYTES_PER_S = 10 * 1024 * 1024
#: A figure is drawn from at most MAX_SCATTER points (service.plots) in well under a second;
#: past this its process is dead or wedged.
DRAW_DEADLINE_S = 30.0


class BodyParsers:
    """Runs pure parse functions ``fn(body, context)`` where they cost the event loop least."""

    def __init__(self, settings: Settings, registry: CollectorRegistry) -> None:
        self.settings = settings
        self._pool: ParserPool | None = None
        self._lock = threading.Lock()
        self._closed = False
        self.restarts = Counter(
            "tapefit_parser_restarts",
            "Parser processes replaced: dead, past a deadline, or over their memory reserve.",
            registry=registry,
        )
        self.duration = Histogram(
            "tapefit_parse_duration_seconds",
            "Wall time of parsing and validating a request body.",
            ["where"],
            buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=registry,
        )
        self.draw_duration = Histogram(
            "tapefit_draw_duration_seconds",
            "Wall time of drawing a plot's PNG, and where it ran.",
            ["where"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry,
        )

    def start(self) -> None:
        """Start the parser processes (blocking: seconds; the lifespan runs it in a thread)."""
        if self.settings.parse_processes < 1:
            return
        pool: ParserPool | None = ParserPool(
            self.settings.parse_processes,
            on_restart=self.restarts.inc,
            max_rss_bytes=PARSER_RESERVE_BYTES,
        )
        with self._lock:
            if not self._closed:
                self._pool, pool = pool, None
        if pool is not None:  # closed while starting
            pool.close()

    async def stop(self) -> None:
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:  # whatever the parser is doing, it is not waited for
            await asyncio.to_thread(pool.close)

    async def parse(
        self, fn: Callable[[bytes, dict[str, Any]], T], body: bytes, ctx: dict[str, Any]
    ) -> T:
        """Run a pure parse function: inline when small, else in a parser process (in a
        thread until the parser processes are up)."""
        start = time.perf_counter()
        pool = self._pool
        if len(body) <= self.settings.parse_inline_max_bytes:
            result, where = fn(body, ctx), "inline"
        elif pool is None:
            result, where = await asyncio.to_thread(fn, body, ctx), "thread"
        else:
            deadline = PARSE_DEADLINE_S + len(body) / PARSE_MIN_BYTES_PER_S
            call = partial(pool.call, fn, body, ctx, deadline_s=deadline)
            result, where = await asyncio.to_thread(call), "process"
        self.duration.labels(where).observe(time.perf_counter() - start)
        return result

    async def draw(self, drawing: Callable[[], bytes]) -> bytes:
        """A figure's PNG, drawn in a parser process (in a thread until they are up).

        ``drawing`` is picklable (a ``partial`` of a :mod:`service.plots` function and its
        arrays). matplotlib holds the GIL while it renders, and the young collection of the
        ~11k objects one figure makes took 43-57 ms in the server: in a parser process, both
        stay away from the event loop, and matplotlib is never imported by the server."""
        start = time.perf_counter()
        pool = self._pool
        if pool is None:
            png, where = await asyncio.to_thread(drawing), "thread"
        else:
            call = partial(pool.call, drawing, deadline_s=DRAW_DEADLINE_S)
            png, where = await asyncio.to_thread(call), "process"
        self.draw_duration.labels(where).observe(time.perf_counter() - start)
        return png
