"""Binary request bodies: application/x-npy and application/octet-stream."""

from __future__ import annotations

import io
import json
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import pytest

from tests.conftest import app_settings, running_app, seed_gaussian_data, seed_linear_data

pytestmark = pytest.mark.anyio

LINEAR = "/v1/fits/linear/binary"
GAUSSIAN = "/v1/fits/gaussian/binary"
JSON_LINEAR = "/v1/fits/linear"
JSON_GAUSSIAN = "/v1/fits/gaussian"
NPY = {"content-type": "application/x-npy"}
RAW = {"content-type": "application/octet-stream"}


def npy(array: npt.NDArray[Any]) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


async def test_npy_and_raw_bodies_fit_exactly_like_json(client: httpx.AsyncClient) -> None:
    x, y = seed_linear_data(1)
    options = {"learning_rate": 0.05, "epochs": 300, "seed": 5}
    as_json = (
        await client.post(JSON_LINEAR, json={"x": x.tolist(), "y": y.tolist(), **options})
    ).json()
    as_npy = await client.post(LINEAR, content=npy(np.stack([x, y])), headers=NPY, params=options)
    assert as_npy.status_code == 200, as_npy.text
    raw = np.concatenate([x, y]).astype("<f8").tobytes()
    as_raw = await client.post(LINEAR, content=raw, headers=RAW, params=options)
    assert as_raw.status_code == 200, as_raw.text
    assert as_npy.json() == as_json
    assert as_raw.json() == as_json
    # The JSON path still takes binary bodies, for clients written before the /binary twins.
    old = await client.post(JSON_LINEAR, content=raw, headers=RAW, params=options)
    assert old.json() == as_json


async def test_float32_bodies(client: httpx.AsyncClient) -> None:
    y32 = seed_gaussian_data(2).astype(np.float32)
    params: dict[str, str | float] = {"reduction": "sum", "learning_rate": 0.0005, "epochs": 50}
    as_json = (await client.post(JSON_GAUSSIAN, json={"y": y32.tolist(), **params})).json()
    raw = y32.astype("<f4").tobytes()
    as_raw = await client.post(
        GAUSSIAN, content=raw, headers=RAW, params={**params, "dtype": "float32"}
    )
    assert as_raw.json() == as_json
    as_npy = await client.post(GAUSSIAN, content=npy(y32), headers=NPY, params=params)
    assert as_npy.json() == as_json


async def test_options_in_the_query_string(client: httpx.AsyncClient) -> None:
    y = seed_gaussian_data(3)
    initial = json.dumps({"mean": 1.0, "std": 2.0})
    r = await client.post(
        GAUSSIAN, content=npy(y), headers=NPY, params={"initial": initial, "epochs": 1}
    )
    assert r.status_code == 200, r.text
    expected = (
        await client.post(
            JSON_GAUSSIAN,
            json={"y": y.tolist(), "epochs": 1, "initial": {"mean": 1.0, "std": 2.0}},
        )
    ).json()
    assert r.json() == expected


@pytest.mark.parametrize(
    ("path", "body", "headers", "params", "loc"),
    [
        (GAUSSIAN, npy(np.array([1.0, np.nan, 2.0])), NPY, {}, ["body", "y", 1]),
        (GAUSSIAN, npy(np.array([1.0, np.inf])), NPY, {}, ["body", "y", 1]),
        (GAUSSIAN, npy(np.array([2.0, 2.0, 2.0])), NPY, {}, ["body", "y"]),
        (GAUSSIAN, npy(np.array([2.0])), NPY, {}, ["body", "y"]),
        (GAUSSIAN, npy(np.ones((2, 3))), NPY, {}, ["body"]),
        (GAUSSIAN, npy(np.array(["a", "b"])), NPY, {}, ["body"]),
        (GAUSSIAN, b"not an npy file", NPY, {}, ["body"]),
        (LINEAR, npy(np.array([1.0, 2.0, 3.0])), NPY, {}, ["body"]),
        (LINEAR, npy(np.array([[1.0, 1.0], [1.0, 2.0]])), NPY, {}, ["body", "x"]),
        (LINEAR, b"\x00" * 24, RAW, {}, ["body"]),
        (GAUSSIAN, b"\x00" * 7, RAW, {}, ["body"]),
        (GAUSSIAN, np.array([1.0, 2.0]).tobytes(), RAW, {"dtype": "int8"}, ["query", "dtype"]),
        (
            GAUSSIAN,
            np.array([1.0, 2.0]).tobytes(),
            RAW,
            {"learning_rate": "abc"},
            ["query", "learning_rate"],
        ),
        (
            GAUSSIAN,
            np.array([1.0, 2.0]).tobytes(),
            RAW,
            {"learning_rate": "NaN"},
            ["query", "learning_rate"],
        ),
        (GAUSSIAN, np.array([1.0, 2.0]).tobytes(), RAW, {"epochs": "true"}, ["query", "epochs"]),
        (GAUSSIAN, np.array([1.0, 2.0]).tobytes(), RAW, {"surprise": "1"}, ["query", "surprise"]),
    ],
)
async def test_bad_binary_requests_are_422_with_location(
    client: httpx.AsyncClient,
    path: str,
    body: bytes,
    headers: dict[str, str],
    params: dict[str, str],
    loc: list[str | int],
) -> None:
    r = await client.post(path, content=body, headers=headers, params=params)
    assert r.status_code == 422, r.text
    errors = r.json()["detail"]
    assert errors[0]["loc"] == loc, errors
    assert "NaN" not in r.text


async def test_binary_limits_come_from_settings() -> None:
    async with running_app(app_settings(max_points=4, max_work=100)) as c:
        r = await c.post(GAUSSIAN, content=npy(np.arange(5.0)), headers=NPY)
        assert r.status_code == 422
        assert "TAPEFIT_MAX_POINTS" in r.json()["detail"][0]["msg"]
        r = await c.post(GAUSSIAN, content=npy(np.arange(4.0)), headers=NPY, params={"epochs": 26})
        assert r.status_code == 422
        assert "TAPEFIT_MAX_WORK" in r.json()["detail"][0]["msg"]


async def test_openapi_documents_binary_bodies_in_operations_of_their_own(
    client: httpx.AsyncClient,
) -> None:
    paths = (await client.get("/openapi.json")).json()["paths"]
    for kind in ("fits", "plots"):
        for model in ("linear", "gaussian"):
            as_json = paths[f"/v1/{kind}/{model}"]["post"]
            assert set(as_json["requestBody"]["content"]) == {"application/json"}
            assert "parameters" not in as_json  # no query option a JSON client can't use
            binary = paths[f"/v1/{kind}/{model}/binary"]["post"]
            assert set(binary["requestBody"]["content"]) == {
                "application/x-npy",
                "application/octet-stream",
            }
            names = {p["name"] for p in binary["parameters"]}
            assert {"learning_rate", "epochs", "seed", "timeout_s", "initial", "dtype"} <= names


async def test_binary_operations_refuse_json_naming_what_they_take(
    client: httpx.AsyncClient,
) -> None:
    r = await client.post(GAUSSIAN, json={"y": [1.0, 2.0, 3.0]})
    assert r.status_code == 415
    assert r.json()["detail"] == (
        "unsupported Content-Type 'application/json'; send application/octet-stream or "
        "application/x-npy"
    )


async def test_query_options_with_a_json_body_are_refused(client: httpx.AsyncClient) -> None:
    r = await client.post(JSON_GAUSSIAN, json={"y": [1.0, 2.0, 3.0]}, params={"epochs": "5"})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["query", "epochs"]
