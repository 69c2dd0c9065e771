"""Probes and the OpenAPI document."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from service.app import create_app
from tests.conftest import app_settings

pytestmark = pytest.mark.anyio


async def test_healthz_and_readyz(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    r = await client.get("/readyz")
    assert r.status_code == 200
    assert r.json() == {"status": "ready"}


async def test_metrics_say_when_every_path_is_warm(client: httpx.AsyncClient) -> None:
    # The fixture waited for the background warm-ups; the gauge is set by their callback.
    for _ in range(100):
        if "tapefit_warm_up_complete 1.0" in (await client.get("/metrics")).text:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("tapefit_warm_up_complete never became 1")


async def test_readyz_is_503_until_warm() -> None:
    app = create_app(app_settings())  # lifespan not run: the worker never started
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://tapefit") as c:
        r = await c.get("/readyz")
        assert r.status_code == 503
        assert r.json() == {"status": "starting"}
        assert r.headers["retry-after"] == "1"
        assert (await c.get("/healthz")).status_code == 200
        r = await c.post("/v1/fits/gaussian", json={"y": [1.0, 2.0]})
        assert r.status_code == 503
        assert r.headers["retry-after"] == "1"
        assert r.json() == {"detail": "the service is warming up"}


async def test_openapi_documents_bodies_examples_and_statuses(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    schemas = spec["components"]["schemas"]
    for path, model in [
        ("/v1/fits/linear", "LinearFitRequest"),
        ("/v1/fits/gaussian", "GaussianFitRequest"),
    ]:
        op = spec["paths"][path]["post"]
        content = op["requestBody"]["content"]["application/json"]
        assert content["schema"] == {"$ref": f"#/components/schemas/{model}"}
        example = next(iter(content["examples"].values()))["value"]
        r = await client.post(path, json=example)
        assert r.status_code == 200, r.text
        assert {"200", "413", "415", "422", "429", "503"} <= set(op["responses"])
        assert op["summary"] and op["description"]
        for name, prop in schemas[model]["properties"].items():
            assert prop.get("description"), f"{model}.{name} has no description"
    defaults = schemas["LinearFitRequest"]["properties"]
    assert defaults["learning_rate"]["default"] == 0.1
    assert defaults["epochs"]["default"] == 1000


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("caller-42", True),
        ("x" * 128, True),
        ("x" * 129, False),  # too long
        ("has space", False),
        ("tab\there", False),  # not printable
        ("naïve", False),  # not ASCII
    ],
)
async def test_request_ids_are_kept_only_when_short_printable_ascii(
    client: httpx.AsyncClient, given: str, kept: bool
) -> None:
    r = await client.get("/healthz", headers={b"X-Request-ID": given.encode("utf-8")})
    echoed = r.headers["x-request-id"]
    assert (echoed == given) is kept
    if not kept:  # a fresh id instead: 32 hex digits
        assert len(echoed) == 32 and int(echoed, 16) >= 0
