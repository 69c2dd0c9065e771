"""What tracing costs: small fits under load (wrk, 16 connections) against a server with
tracing off (no OTEL_EXPORTER_OTLP_ENDPOINT: nothing installed), one exporting every request's
spans by OTLP/HTTP to a receiver in this process, and one traced but sampling none of them,
one after another in one run."""

from __future__ import annotations

from dataclasses import dataclass

from bench.load import Load, load
from tests.otlp import receiving
from tests.server import serve

SMALL_FIT = b'{"x": [0.0, 1.0, 2.0, 3.0], "y": [1.0, 3.1, 4.9, 7.2]}'


@dataclass
class TracingCost:
    off: Load
    sampled: Load
    unsampled: Load
    spans: int


def _measured(seconds: int, **env: str) -> Load:
    with serve(TAPEFIT_LOG_LEVEL="warning", **env) as server:
        server.wait_warm()
        load(server.url, "/v1/fits/linear", SMALL_FIT, 2)  # warm the path
        return load(server.url, "/v1/fits/linear", SMALL_FIT, seconds)


def run(seconds: int) -> TracingCost:
    off = _measured(seconds)
    with receiving() as receiver:
        sampled = _measured(seconds, OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url)
        spans = len(receiver.spans)
        unsampled = _measured(
            seconds,
            OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url,
            OTEL_TRACES_SAMPLER="parentbased_traceidratio",
            OTEL_TRACES_SAMPLER_ARG="0",
        )
    return TracingCost(off, sampled, unsampled, spans)


def report(c: TracingCost) -> str:
    lines = [
        "Tracing (small fits, 16 connections, one server after another):",
        "",
        "| tracing | req/s | p50 | p99 | vs off |",
        "|---|---|---|---|---|",
    ]
    for name, r in (
        ("off (no OTLP endpoint)", c.off),
        ("on, every request sampled", c.sampled),
        ("on, none sampled", c.unsampled),
    ):
        lines.append(
            f"| {name} | {r.rps:,.0f} | {r.p50_ms:.2f} ms | {r.p99_ms:.2f} ms "
            f"| {r.rps / c.off.rps:.2f}x |"
        )
    lines.append("")
    lines.append(f"(spans received from the sampled run: {c.spans:,})")
    return "\n".join(lines)
