"""OpenTelemetry traces (issue #36): one fit's span tree with its attributes, a client's
traceparent as the parent, the fit span from the process that ran it, and nothing at all
while no exporter is asked for."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from service import tracing
from tests.conftest import app_settings, running_app
from tests.otlp import receiving
from tests.server import named_processes, serve

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
FIT = {"x": [1000.0, 2000.0, 3000.0, 4000.0], "y": [1.0e7, 1.0e7 + 2.0, 1.0e7 + 4.1, 1.0e7 + 5.9]}
CHILDREN = {"read body", "parse", "admission", "fit", "serialize"}


@pytest.fixture
def exported() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    assert tracing.configure("tapefit-test", exporter=exporter, batch=False)
    try:
        yield exporter
    finally:
        tracing.shutdown()


def test_no_exporter_asked_for_means_no_tracing() -> None:
    """Off costs nothing: no middleware, and every span a null context."""
    from service.api.observe import ObservedRequests, TracedRequests
    from service.app import create_app

    middleware = {
        getattr(m.cls, "__name__", None) for m in create_app(app_settings()).user_middleware
    }
    assert ObservedRequests.__name__ in middleware  # (the list is read right)
    assert TracedRequests.__name__ not in middleware
    assert not tracing.wanted({})
    assert tracing.wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert tracing.wanted({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"})
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}
    assert not tracing.wanted(endpoint | {"OTEL_SDK_DISABLED": "true"})
    assert not tracing.wanted(endpoint | {"OTEL_TRACES_EXPORTER": "none"})
    assert not tracing.enabled() and not tracing.configure("tapefit-test")
    with tracing.span("nothing") as span:
        assert span is None
    assert tracing.carrier() == {}


@pytest.mark.anyio
async def test_one_fit_is_one_span_tree_under_the_clients_traceparent(
    exported: InMemorySpanExporter,
) -> None:
    async with running_app(app_settings()) as client:
        r = await client.post(
            "/v1/fits/linear",
            json=FIT | {"epochs": 300},
            headers={"traceparent": TRACEPARENT, "x-request-id": "trace-me-1"},
        )
    assert r.status_code == 200, r.text
    spans = {s.name: s for s in exported.get_finished_spans()}
    server = spans["POST /v1/fits/linear"]
    assert server.kind is SpanKind.SERVER
    assert f"{server.context.trace_id:032x}" == TRACE_ID
    assert server.parent is not None and f"{server.parent.span_id:016x}" == PARENT_ID
    assert server.attributes is not None
    assert server.attributes["http.route"] == "/v1/fits/linear"
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["tapefit.request_id"] == "trace-me-1"
    for name in CHILDREN:
        child = spans[name]
        assert child.parent is not None and child.parent.span_id == server.context.span_id, name
        assert child.context.trace_id == server.context.trace_id
    fit = spans["fit"].attributes
    assert fit is not None
    assert dict(fit) == {
        "tapefit.model": "linear",
        "tapefit.n": 4,
        "tapefit.epochs": 300,
        "tapefit.optimizer": "sgd",
        "tapefit.request_id": "trace-me-1",
        "tapefit.stop_reason": "max_epochs",
        "tapefit.epochs_run": 300,
    }
    assert spans["admission"].end_time <= spans["fit"].start_time  # type: ignore[operator]


def test_the_fit_span_comes_from_the_fit_process_over_otlp() -> None:
    """The real server with its fit process, exporting by OTLP/HTTP to a receiver here:
    the fit's spans are the fit process's (its pid in their resource), the others the
    server's, all in the client's trace."""
    with (
        receiving() as receiver,
        serve(
            OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url,
            OTEL_BSP_SCHEDULE_DELAY="50",
            TAPEFIT_FIT_PROCESSES="1",
        ) as server,
    ):
        server.wait_warm()
        (fit_pid,) = named_processes(server.mark, "tapefit-fit")
        r = httpx.post(
            f"{server.url}/v1/fits/linear",
            json=FIT,
            headers={"traceparent": TRACEPARENT, "x-request-id": "trace-me-2"},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        spans = receiver.wait_for(TRACE_ID, CHILDREN | {"POST /v1/fits/linear"})
    by_name = {s.name: s for s in spans}
    assert CHILDREN | {"POST /v1/fits/linear"} <= set(by_name), sorted(by_name)
    server_span = by_name["POST /v1/fits/linear"]
    assert server_span.parent_id == PARENT_ID
    assert server_span.resource["process.pid"] == server.process.pid
    for name in ("admission", "fit"):
        assert by_name[name].resource["process.pid"] == fit_pid, name
        assert by_name[name].resource["tapefit.process"] == "tapefit-fit"
        assert by_name[name].parent_id == server_span.span_id
    assert by_name["fit"].attributes["tapefit.request_id"] == "trace-me-2"
    assert by_name["fit"].attributes["tapefit.stop_reason"] == "max_epochs"
    assert by_name["parse"].resource["process.pid"] == server.process.pid
