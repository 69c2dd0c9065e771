"""Traces (OpenTelemetry): off unless the standard variables ask for an exporter.

With ``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` set (and
neither ``OTEL_SDK_DISABLED=true`` nor ``OTEL_TRACES_EXPORTER=none``), each process of the
service that does a request's work (the server, its fit process) installs the SDK's tracer
provider with a batching OTLP/HTTP exporter. The SDK reads the other ``OTEL_*`` variables
itself (service name, resource attributes, headers, timeouts, batch sizes). Every span's
resource carries the process that made it (``process.pid``, ``tapefit.process``).

Without them nothing is installed: :func:`span` returns a null context and the HTTP layer
adds no middleware, so tracing off costs nothing measurable (``make bench`` shows both).

A request's spans: the server span (``POST /v1/fits/linear``, the parent a client's
``traceparent`` names), then ``read body``, ``parse``, ``admission`` (the wait for a fit
slot), ``fit`` (in the process that ran it: the context crosses to the fit process with the
job) and ``serialize``. The request id travels as W3C baggage (``tapefit.request_id``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from opentelemetry import baggage, propagate, trace
from opentelemetry import context as otel_context
from opentelemetry.trace import SpanKind

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, Tracer

__all__ = ["SpanKind", "configure", "enabled", "span"]

#: The baggage entry that carries the request id to every span of the request.
REQUEST_ID = "tapefit.request_id"

_provider: TracerProvider | None = None
_tracer: Tracer | None = None


def wanted(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the standard variables ask for traces to be exported."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return False
    return bool(
        environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def configure(process: str, exporter: SpanExporter | None = None, batch: bool = True) -> bool:
    """Trace this process (named ``process`` in its spans' resource) if :func:`wanted`, or
    into ``exporter`` (tests); returns whether tracing is on."""
    global _provider, _tracer
    if exporter is None and not wanted():
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    if exporter is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    resource = Resource.create(
        {"service.name": "tapefit", "process.pid": os.getpid(), "tapefit.process": process}
    )
    provider = TracerProvider(resource=resource)
    processor = BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter)
    provider.add_span_processor(processor)
    shutdown()
    _provider, _tracer = provider, provider.get_tracer("tapefit")
    return True


def shutdown() -> None:
    """Export what is pending and stop tracing (at exit; tests)."""
    global _provider, _tracer
    provider, _provider, _tracer = _provider, None, None
    if provider is not None:
        provider.shutdown()


def enabled() -> bool:
    return _tracer is not None


def span(
    name: str,
    context: Context | None = None,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Mapping[str, Any] | None = None,
    start_time: int | None = None,
) -> contextlib.AbstractContextManager[Span | None]:
    """A span made current for the block (a child of ``context``, else of the current
    span), or a null context while tracing is off."""
    if _tracer is None:
        return contextlib.nullcontext()
    return _tracer.start_as_current_span(
        name,
        context=context,
        kind=kind,
        attributes=dict(attributes or {}),
        start_time=start_time,
    )


def current() -> Context | None:
    """The current context, to carry to another thread; None while tracing is off or the
    current span is not recorded (not sampled): its children would not be either."""
    if _tracer is None or not trace.get_current_span().is_recording():
        return None
    return otel_context.get_current()


def carrier(context: Context | None = None) -> dict[str, str]:
    """The context as W3C headers (``traceparent``, ``baggage``), to carry to another
    process; empty while tracing is off."""
    headers: dict[str, str] = {}
    if _tracer is not None:
        propagate.inject(headers, context=context)
    return headers


def extract(headers: Mapping[str, str]) -> Context:
    """The context a client or another process sent (``traceparent``, ``baggage``)."""
    return propagate.extract(headers)


def with_request_id(request_id: str, context: Context | None = None) -> Context:
    return baggage.set_baggage(REQUEST_ID, request_id, context=context)


def request_id(context: Context | None = None) -> str | None:
    value = baggage.get_baggage(REQUEST_ID, context=context)
    return None if value is None else str(value)
