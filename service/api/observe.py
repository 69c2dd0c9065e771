"""One pure-ASGI layer that observes every HTTP request: the access log line and the
Prometheus request metrics, from one clock reading and one status.

The metrics are prometheus_client's, under the names and labels Prometheus' FastAPI
instrumentator uses (``http_requests_total`` and ``http_request_duration_seconds`` by
``handler``, ``method`` and ``status``). That library's middleware found each request's route
template by flattening and matching every route of the app on every request (~30 µs for
``/healthz`` here, ~50 µs with its per-request objects: a third of ``/healthz``'s time in
process); here the template is the route FastAPI itself matched (``scope["route"]``, set by
the router), and only a request answered before routing (413, 408, the OpenAPI document) is
looked up among the app's paths. Requests for paths the app does not serve are not counted
(one series per scanner's guess would grow without bound), nor is ``/metrics`` itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from asgi_correlation_id import correlation_id
from opentelemetry import context
from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import tracing
from service.logs import ACCESS_LOGGER

LABELS = ("handler", "method", "status")


class HttpMetrics:
    """The HTTP request metrics of one app (in its registry)."""

    def __init__(self, registry: CollectorRegistry, paths: Callable[[], frozenset[str]]) -> None:
        self.requests = Counter(
            "http_requests_total",
            "Total number of requests by method, status and handler.",
            LABELS,
            registry=registry,
        )
        self.duration = Histogram(
            "http_request_duration_seconds",
            "Duration of HTTP requests in seconds",
            LABELS,
            registry=registry,
        )
        self._paths = paths
        self._known: frozenset[str] | None = None
        self._series: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

    def handler(self, scope: Scope) -> str | None:
        """The route template that served ``scope``, or None if the app has no such path."""
        route = scope.get("route")
        path = getattr(route, "path", None)
        if isinstance(path, str):
            return path
        if self._known is None:  # built on first use: every route exists by then
            self._known = self._paths()
        path = scope["path"]
        return path if path in self._known else None

    def record(self, scope: Scope, status: int, seconds: float) -> None:
        handler = self.handler(scope)
        if handler is None or handler == "/metrics":
            return
        key = (handler, scope["method"], status)
        series = self._series.get(key)
        if series is None:  # labels() resolved once per series, not per request
            labels = (handler, scope["method"], str(status))
            series = self.requests.labels(*labels), self.duration.labels(*labels)
            self._series[key] = series
        series[0].inc()
        series[1].observe(seconds)


class StatusNoted:
    """``send``, noting the response's status as it passes (500 until one is sent)."""

    def __init__(self, send: Send) -> None:
        self.send = send
        self.status = 500

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        await self.send(message)


class ObservedRequests:
    """Times each HTTP request once: one JSON access line (``service.access``, with the
    request id) and the request metrics."""

    def __init__(self, app: ASGIApp, metrics: HttpMetrics) -> None:
        self.app = app
        self.metrics = metrics
        self.log = logging.getLogger(ACCESS_LOGGER)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        noted = StatusNoted(send)
        try:
            await self.app(scope, receive, noted)
        finally:
            status = noted.status
            seconds = time.perf_counter() - start
            self.metrics.record(scope, status, seconds)
            if self.log.isEnabledFor(logging.INFO):
                client = scope.get("client")
                self.log.info(
                    "request",
                    extra={
                        "method": scope["method"],
                        "path": scope["path"],
                        "status": status,
                        "duration_ms": round(seconds * 1000, 3),
                        "client": f"{client[0]}:{client[1]}" if client else None,
                    },
                )


class TracedRequests:
    """The server span of each HTTP request (installed only while tracing is on): a child of
    the client's ``traceparent`` if it sent one, named by the route FastAPI matched, with
    the request id (also carried to every span of the request as baggage) and the status."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {
            key.decode("latin-1"): value.decode("latin-1")
            for key, value in scope["headers"]
            if key in (b"traceparent", b"tracestate", b"baggage")
        }
        parent = tracing.extract(headers)
        method = scope["method"]
        with tracing.span(method, context=parent, kind=tracing.SpanKind.SERVER) as span:
            assert span is not None
            if not span.is_recording():  # not sampled: nothing below is recorded either
                await self.app(scope, receive, send)
                return
            span.set_attribute("http.request.method", method)
            span.set_attribute("url.path", scope["path"])
            request_id = correlation_id.get()
            token = None
            if request_id is not None:
                span.set_attribute(tracing.REQUEST_ID, request_id)
                token = context.attach(tracing.with_request_id(request_id))  # for the spans below
            noted = StatusNoted(send)
            try:
                await self.app(scope, receive, noted)
            finally:
                if token is not None:
                    context.detach(token)
                route = getattr(scope.get("route"), "path", None)
                if isinstance(route, str):
                    span.update_name(f"{method} {route}")
                    span.set_attribute("http.route", route)
                span.set_attribute("http.response.status_code", noted.status)
