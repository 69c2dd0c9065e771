"""Metrics as a contract: on a fresh app, one request of each outcome, and every documented
metric name and label read back exactly (a missing sample fails, never counts as 0)."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import app_settings, running_app

pytestmark = pytest.mark.anyio

Y = [1.0, 2.0, 4.0, 3.5]


Table = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str) -> Table:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(
    table: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    key = (name, frozenset(labels.items()))
    assert key in table, f"no sample {name}{labels}"
    return table[key]


async def test_every_documented_metric_with_its_labels() -> None:
    settings = app_settings(max_concurrent_fits=1, max_queued_fits=0, epochs_per_call=1)
    async with running_app(settings) as c:
        g = "/v1/fits/gaussian"
        outcomes = {
            "max_epochs": {"y": Y, "epochs": 5},
            "loss_tolerance": {"y": Y, "epochs": 5000, "tolerance": 1e-3, "patience": 2},
            "gradient_tolerance": {"y": Y, "epochs": 5000, "gradient_tolerance": 1e-3},
            "step_tolerance": {"y": Y, "optimizer": "newton"},
            "timeout": {"y": Y, "epochs": 100_000, "timeout_s": 0.2},
        }
        for body in outcomes.values():
            assert (await c.post(g, json=body)).status_code == 200
        assert (await c.post(g, json={"y": Y, "learning_rate": 50.0})).status_code == 422
        assert (await c.post(g, json={"y": [2.0, 2.0]})).status_code == 422  # constant data
        r = await c.post("/v1/fits/linear/batch", json={"datasets": [{"x": [0, 1], "y": [1, 2]}]})
        assert r.status_code == 200
        long = asyncio.create_task(c.post(g, json={"y": Y, "epochs": 100_000}))
        await asyncio.sleep(0.3)
        assert (await c.post(g, json={"y": Y})).status_code == 429  # overloaded
        long.cancel()  # the client goes away: the fit is cancelled
        await asyncio.sleep(0.3)
        table = samples((await c.get("/metrics")).text)

    for outcome in outcomes:
        assert value(table, "tapefit_fits_total", model="gaussian", outcome=outcome) == 1.0
    assert value(table, "tapefit_fits_total", model="gaussian", outcome="diverged") == 1.0
    assert value(table, "tapefit_fits_total", model="linear_batch", outcome="batch") == 1.0
    assert value(table, "tapefit_fits_total", model="gaussian", outcome="cancelled") == 1.0
    assert value(table, "tapefit_fit_rejections_total", reason="overloaded") == 1.0
    assert value(table, "tapefit_fits_in_flight") == 0.0
    assert value(table, "tapefit_fits_running") == 0.0
    assert value(table, "tapefit_warm_up_complete") == 1.0
    assert value(table, "tapefit_memory_charged_bytes") == 0.0
    assert value(table, "tapefit_memory_budget_bytes") > 0.0
    assert value(table, "tapefit_fit_epochs_total", model="gaussian") > 5.0
    assert value(table, "tapefit_fit_duration_seconds_count", model="gaussian") >= 7.0
    assert value(table, "tapefit_parse_duration_seconds_count", where="inline") >= 9.0
    assert value(table, "tapefit_parser_restarts_total") == 0.0
    status = value(
        table, "http_requests_total", handler="/v1/fits/gaussian", method="POST", status="200"
    )
    assert status == 5.0
    assert (
        value(
            table, "http_requests_total", handler="/v1/fits/gaussian", method="POST", status="429"
        )
        == 1.0
    )
    assert (
        value(
            table,
            "http_request_duration_seconds_count",
            handler="/v1/fits/linear/batch",
            method="POST",
            status="200",
        )
        == 1.0
    )


async def test_requests_are_counted_by_the_route_that_served_them() -> None:
    """A body refused before routing (413) counts under its route; a HEAD counts as the GET
    that answered it; a path the app does not serve, and /metrics itself, are not counted."""
    async with running_app(app_settings(max_body_bytes=1024)) as c:
        big = {"y": [1.0e7 + 0.1 * i for i in range(200)]}
        assert (await c.post("/v1/fits/gaussian", json=big)).status_code == 413
        assert (await c.head("/readyz")).status_code == 200
        assert (await c.get("/no/such/path")).status_code == 404
        assert (await c.get("/openapi.json")).status_code == 200
        await c.get("/metrics")
        text = (await c.get("/metrics")).text
        table = samples(text)
    labels = {"handler": "/v1/fits/gaussian", "method": "POST", "status": "413"}
    assert value(table, "http_requests_total", **labels) == 1.0
    assert value(table, "http_request_duration_seconds_count", **labels) == 1.0
    assert value(table, "http_requests_total", handler="/readyz", method="GET", status="200") == 1
    assert (
        value(table, "http_requests_total", handler="/openapi.json", method="GET", status="200")
        == 1.0
    )
    assert "/no/such/path" not in text and 'handler="/metrics"' not in text
