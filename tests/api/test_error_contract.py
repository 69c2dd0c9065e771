"""Every status the service sends, on every route that can send it: the body's shape, the
content type, X-Request-ID, and Retry-After where the README promises one."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager

from service.app import create_app
from tests.conftest import app_settings, running_app

pytestmark = pytest.mark.anyio

#: (route, a valid body) for every POST route.
ROUTES: list[tuple[str, dict[str, Any]]] = [
    ("/v1/fits/linear", {"x": [0.0, 1.0, 2.0], "y": [1.0, 3.0, 4.0], "seed": 1}),
    ("/v1/fits/gaussian", {"y": [1.0, 2.0, 4.0]}),
    ("/v1/fits/linear/batch", {"datasets": [{"x": [0.0, 1.0], "y": [1.0, 3.0]}], "seed": 1}),
    ("/v1/fits/gaussian/batch", {"datasets": [{"y": [1.0, 2.0, 4.0]}]}),
    ("/v1/plots/linear", {"x": [0.0, 1.0, 2.0], "y": [1.0, 3.0, 4.0], "seed": 1}),
    ("/v1/plots/gaussian", {"y": [1.0, 2.0, 4.0]}),
    ("/v1/datasets/linear", {"n": 10, "seed": 1}),
    ("/v1/datasets/gaussian", {"n": 10, "seed": 1}),
]
ADMITTED = [r for r in ROUTES if "/datasets/" not in r[0]]  # the routes that run a fit
IDS = [r[0].removeprefix("/v1/") for r in ROUTES]


def assert_error(
    r: httpx.Response, status: int, request_id: str | None = None, retry_after: int = 1
) -> Any:
    """The shared error contract: JSON {"detail": ...}, the request id, and for 429 and 503
    the Retry-After the policy computed."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    if request_id is None:  # a fresh one
        assert r.headers["x-request-id"]
    else:
        assert r.headers["x-request-id"] == request_id
    body = r.json()
    assert set(body) >= {"detail"} and body["detail"]
    if status in (429, 503):
        assert int(r.headers["retry-after"]) == retry_after
    return body["detail"]


@pytest.mark.parametrize(("url", "body"), ROUTES, ids=IDS)
async def test_404_405_415_422(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> None:
    assert_error(await client.post(url + "/nope", json=body), 404)
    r = await client.get(url, headers={"X-Request-ID": "get-1"})
    assert_error(r, 405, "get-1")
    assert r.headers["allow"] == "POST"
    detail = assert_error(
        await client.post(url, content=b"x", headers={"content-type": "text/plain"}), 415
    )
    assert "application/json" in detail
    detail = assert_error(await client.post(url, json={**body, "bogus": 1}), 422)
    assert detail[0]["loc"] == ["body", "bogus"] and detail[0]["type"] == "extra_forbidden"


@pytest.mark.parametrize(("url", "body"), ROUTES, ids=IDS)
async def test_413_whether_declared_or_counted(url: str, body: dict[str, Any]) -> None:
    async with running_app(app_settings(max_body_bytes=1024)) as c:
        big = {**body, "padding": "x" * 2000}
        detail = assert_error(
            await c.post(url, json=big, headers={"X-Request-ID": "r1"}), 413, "r1"
        )
        assert "TAPEFIT_MAX_BODY_BYTES" in detail

        async def chunks() -> Any:
            yield b'{"padding": "' + b"x" * 2000 + b'"}'

        r = await c.post(url, content=chunks(), headers={"content-type": "application/json"})
        assert_error(r, 413)


async def test_429_on_every_admitted_route_while_the_places_are_taken() -> None:
    settings = app_settings(max_concurrent_fits=1, max_queued_fits=0, epochs_per_call=1)
    async with running_app(settings) as c:
        long = asyncio.create_task(
            c.post("/v1/fits/gaussian", json={"y": [1.0, 2.0, 4.0], "epochs": 100_000})
        )
        await asyncio.sleep(0.5)
        admission = c._transport.app.state.worker.admission  # type: ignore[attr-defined]
        # The policy: the admitted work's expected seconds over the slots, rounded up.
        expected = max(1, math.ceil(admission.seconds / admission.slots))
        for url, body in ADMITTED:
            detail = assert_error(await c.post(url, json=body), 429, retry_after=expected)
            assert f"retry after {expected} s" in detail
            r = await c.post(url, json=body, headers={"accept": "text/event-stream"})
            if "/fits/" in url and "/batch" not in url:
                assert_error(r, 429, retry_after=expected)  # the stream is refused as plainly
        for url, body in ROUTES:
            if url not in dict(ADMITTED):
                r = await c.post(url, json=body)
                assert r.status_code == 200  # making data needs no fit place
        long.cancel()
        metrics = (await c.get("/metrics")).text
        assert 'tapefit_fit_rejections_total{reason="overloaded"} ' in metrics


async def test_503_while_warming_up_and_while_draining() -> None:
    app = create_app(app_settings())
    async with LifespanManager(app, startup_timeout=120):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://tapefit") as c:
            worker = app.state.worker
            await app.state.worker_started
            worker.ready = False  # as while the compiled loops warm up
            r = await c.get("/readyz")
            assert r.status_code == 503 and r.json() == {"status": "starting"}
            for url, body in ADMITTED:
                assert "warming up" in assert_error(await c.post(url, json=body), 503)
            worker.ready = True
            assert (await c.get("/readyz")).status_code == 200
            worker.begin_drain()
            r = await c.get("/readyz")
            assert r.status_code == 503 and r.json() == {"status": "stopping"}
            assert r.headers["retry-after"] == "1"
            for url, body in ADMITTED:
                detail = assert_error(await c.post(url, json=body), 503)
                assert "shutting down" in detail
            metrics = (await c.get("/metrics")).text
            assert 'tapefit_fit_rejections_total{reason="unavailable"} ' in metrics
