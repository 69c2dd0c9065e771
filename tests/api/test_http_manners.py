"""HTTP manners: compression both ways, CORS when configured, keep-alive as a setting."""

from __future__ import annotations

import gzip
import json
import re

import httpx
import pytest

from service.__main__ import build_server
from tests.conftest import app_settings, running_app

pytestmark = pytest.mark.anyio


async def test_large_answers_are_gzipped_when_asked(client: httpx.AsyncClient) -> None:
    body = {"n": 20_000, "seed": 1}
    plain = await client.post(
        "/v1/datasets/linear", json=body, headers={"accept-encoding": "identity"}
    )
    packed = await client.post(
        "/v1/datasets/linear", json=body, headers={"accept-encoding": "gzip"}
    )
    assert "content-encoding" not in plain.headers
    assert packed.headers["content-encoding"] == "gzip"
    assert packed.json() == plain.json()  # httpx decoded it
    assert int(packed.headers["content-length"]) < len(plain.content) / 1.5
    small = await client.get("/healthz", headers={"accept-encoding": "gzip"})
    assert "content-encoding" not in small.headers  # under TAPEFIT_GZIP_MIN_BYTES


async def test_pngs_and_event_streams_are_never_compressed(client: httpx.AsyncClient) -> None:
    """gzip on a PNG gains nothing, and a compressed event stream arrives in bursts (or not
    at all until it ends): neither is compressed, however large (httpx would decompress
    silently, so the header is what is checked)."""
    gz = {"accept-encoding": "gzip"}
    x = [float(i) for i in range(200)]
    plot = await client.post(
        "/v1/plots/linear", json={"x": x, "y": [2.0 * v + 1.0 for v in x]}, headers=gz
    )
    assert plot.status_code == 200 and plot.headers["content-type"] == "image/png"
    assert len(plot.content) > 1024 and "content-encoding" not in plot.headers
    stream = await client.post(
        "/v1/fits/gaussian",
        json={"y": [1.0, 2.0, 4.0], "epochs": 2000, "progress_every": 10},
        headers={**gz, "accept": "text/event-stream"},
    )
    assert stream.headers["content-type"].startswith("text/event-stream")
    assert len(stream.content) > 1024 and "content-encoding" not in stream.headers


async def test_compressed_request_bodies_are_415(client: httpx.AsyncClient) -> None:
    content = gzip.compress(json.dumps({"y": [1.0, 2.0, 4.0]}).encode())
    r = await client.post(
        "/v1/fits/gaussian",
        content=content,
        headers={"content-type": "application/json", "content-encoding": "gzip"},
    )
    assert r.status_code == 415
    assert "Content-Encoding 'gzip'" in r.json()["detail"]


async def test_cors_is_off_by_default_and_answers_preflights_when_configured(
    client: httpx.AsyncClient,
) -> None:
    origin = {"origin": "https://app.example"}
    r = await client.post("/v1/fits/gaussian", json={"y": [1.0, 2.0, 4.0]}, headers=origin)
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    async with running_app(app_settings(cors_origins=["https://app.example"])) as c:
        preflight = await c.options(
            "/v1/fits/gaussian",
            headers={
                **origin,
                "access-control-request-method": "POST",
                "access-control-request-headers": "content-type,x-request-id",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        assert "POST" in preflight.headers["access-control-allow-methods"]
        r = await c.post("/v1/fits/gaussian", json={"y": [1.0, 2.0, 4.0]}, headers=origin)
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
        other = await c.post(
            "/v1/fits/gaussian",
            json={"y": [1.0, 2.0, 4.0]},
            headers={"origin": "https://elsewhere.example"},
        )
        assert "access-control-allow-origin" not in other.headers


def test_keep_alive_is_a_setting() -> None:
    assert build_server(app_settings()).config.timeout_keep_alive == 75
    assert build_server(app_settings(keep_alive_s=20)).config.timeout_keep_alive == 20


@pytest.mark.parametrize(
    "path", ["/healthz", "/readyz", "/metrics", "/docs", "/redoc", "/openapi.json"]
)
async def test_head_works_wherever_get_does(client: httpx.AsyncClient, path: str) -> None:
    got = await client.get(path)
    head = await client.head(path)
    assert head.status_code == got.status_code == 200
    assert head.content == b""
    assert head.headers["content-type"] == got.headers["content-type"]
    assert (await client.head("/v1/fits/linear")).status_code == 405  # no GET there either


async def test_the_openapi_document_has_an_etag_and_answers_304(client: httpx.AsyncClient) -> None:
    first = await client.get("/openapi.json")
    etag = first.headers["etag"]
    assert first.json()["info"]["title"] == "tapefit"
    again = await client.get("/openapi.json", headers={"if-none-match": etag})
    assert again.status_code == 304
    assert again.content == b""
    assert again.headers["etag"] == etag
    for other in ('"stale"', 'W/"stale", "other"'):
        changed = await client.get("/openapi.json", headers={"if-none-match": other})
        assert changed.status_code == 200
        assert changed.json() == first.json()
    weak = await client.get("/openapi.json", headers={"if-none-match": f'"x", W/{etag}'})
    assert weak.status_code == 304


async def test_the_openapi_document_is_ready_for_generators(client: httpx.AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()
    operations = [op for path in document["paths"].values() for op in path.values()]
    ids = [op["operationId"] for op in operations]
    assert len(set(ids)) == len(ids)
    assert all(i.isidentifier() and "_v1_" not in i and not i.endswith("_post") for i in ids)
    assert {"fit_linear", "fit_gaussian_batch", "plot_linear_binary", "healthz"} <= set(ids)
    declared = {tag["name"] for tag in document["tags"]}
    assert all(tag["description"] for tag in document["tags"])
    assert {t for op in operations for t in op["tags"]} <= declared
    assert document["servers"] and document["info"]["license"]["name"]
    assert document["info"]["contact"]["name"]
    schemas = document["components"]["schemas"]
    # Generic models get readable names, and the choices are components of their own.
    assert {"LinearReference", "GaussianReference", "Optimizer", "Scaling", "Reduction"} <= set(
        schemas
    )
    assert schemas["Optimizer"]["enum"] == ["sgd", "momentum", "adam", "newton"]
    # What every answer carries is required, so typed clients need no None checks.
    answers = ("LinearFitResponse", "GaussianFitResponse", "LinearStats", "GaussianStats")
    for name in (*answers, "LinearBatchItem", "Dataset"):
        assert set(schemas[name]["properties"]) == set(schemas[name]["required"]), name
    assert {"stats", "warnings", "converged", "seed"} <= set(
        schemas["LinearFitResponse"]["required"]
    )
    # Error bodies are written by handlers: their optional fields stay optional.
    assert "ctx" not in schemas["ValidationErrorItem"]["required"]


def test_routes_never_read_the_raw_request() -> None:
    """Routes get parsed, validated bodies, never bytes: a route that runs a fit takes the
    request only to enter ``admission(request)`` (whose ``Admitted.body`` reads and parses
    it, after admission, charged to the ticket); the data-set routes get theirs from a
    dependency; health and the docs take none. (Fit routes enter admission themselves, not
    through a FastAPI dependency: solving one cost ~60 µs a request.)"""
    import inspect
    import typing

    from fastapi.routing import APIRoute
    from starlette.requests import Request

    from service.api.models import BUILT_IN
    from service.api.routes import datasets, expressions, fits, health, plots

    routers = [fits.router(BUILT_IN.values()), plots.router(BUILT_IN.values())]
    routers += [expressions.router, datasets.router, health.router]
    routes = [r for router in routers for r in router.routes if isinstance(r, APIRoute)]
    assert len(routes) == 22  # 8 fits, 4 plots, 5 expressions, 2 datasets, 2 probes, metrics
    admitted = set()
    for route in routes:
        hints = typing.get_type_hints(route.endpoint, include_extras=True)
        source = inspect.getsource(route.endpoint)
        for name in inspect.signature(route.endpoint).parameters:
            if hints.get(name) is Request:
                assert "async with admission(request) as admitted:" in source, route.path
                uses = re.findall(r"(?<![.\w])request\b", source)
                assert len(uses) == 2, (route.path, "the request used beyond that")
                admitted.add(route.path)
    assert admitted == {
        *(
            f"/v1/fits/{name}{kind}"
            for name in BUILT_IN
            for kind in ("", "/binary", "/batch", "/batch/binary")
        ),
        *(f"/v1/plots/{name}{kind}" for name in BUILT_IN for kind in ("", "/binary")),
        "/v1/fits/expression",
        "/v1/fits/expression/batch",
        "/v1/fits/expression/batch/binary",
        "/v1/plots/expression",
    }
