"""What a new user tripped on (issue #30): each a clear 4xx naming the field, never a 500.

Models with no parameters or fewer points than parameters, guesses on extreme data,
hostile .npy headers, 100,000 wrong entries, the epoch limit the document states, Python
jargon in messages, and a client that disconnects mid-fit. Extreme magnitudes (±1e300,
1e-300, denormals, mixed) go to every named model on the fit and plot routes.
"""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

import httpx
import numpy as np
import pytest

from service.api.errors import ClientDisconnected
from service.api.requests import unless_disconnected
from service.api.schemas import EXPRESSION_ANSWER_EXAMPLE, EXPRESSION_EXAMPLE
from service.fitting import catalog
from service.settings import Settings
from tests.conftest import app_settings, running_app

pytestmark = pytest.mark.anyio
FIT, PLOT = "/v1/fits/expression", "/v1/plots/expression"
NPY = {"content-type": "application/x-npy"}


async def test_a_model_needs_a_parameter(client: httpx.AsyncClient) -> None:
    r = await client.post(
        FIT, json={"expression": "2*x", "parameters": {}, "x": [1, 2, 3], "y": [2, 4.1, 5.9]}
    )
    assert r.status_code == 422, r.text
    (error,) = r.json()["detail"]
    assert error["loc"] == ["body", "parameters"]
    assert "at least one parameter" in error["msg"]


async def test_fewer_points_than_parameters_is_refused_naming_both(
    client: httpx.AsyncClient,
) -> None:
    body = {"expression": "a + b*x + c*x**2", "parameters": {"a": 0, "b": 1, "c": 0}}
    r = await client.post(FIT, json={**body, "x": [1.0, 2.0], "y": [2.0, 3.0]})
    assert r.status_code == 422, r.text
    (error,) = r.json()["detail"]
    assert error["loc"] == ["body", "y"]
    assert "2 points" in error["msg"] and "3 parameters" in error["msg"]
    weighted = {**body, "x": [1.0, 2.0, 3.0], "y": [2.0, 3.0, 5.0], "weights": [1, 1, 0]}
    assert (await client.post(FIT, json=weighted)).status_code == 422
    exact = await client.post(FIT, json={**body, "x": [1.0, 2.0, 3.0], "y": [2.0, 3.0, 5.0]})
    assert exact.status_code == 200, exact.text  # n = p: an exact fit, dof 0
    assert exact.json()["stats"]["dof"] == 0
    assert exact.json()["params"]["c"] == pytest.approx(0.5, rel=1e-9)


@pytest.mark.parametrize(
    ("expression", "says"),
    [
        ("a*x^2", "use ** for powers"),
        ("a*x + b2", "add b2 to parameters (with a starting value)"),
        ("a*x // 2", "the operator //"),
    ],
)
async def test_messages_speak_the_users_language(
    client: httpx.AsyncClient, expression: str, says: str
) -> None:
    r = await client.post(
        FIT, json={"expression": expression, "parameters": {"a": 1}, "x": [1, 2], "y": [1, 2]}
    )
    assert r.status_code == 422, r.text
    (error,) = r.json()["detail"]
    assert error["loc"] == ["body", "expression"]
    assert says in error["msg"], error["msg"]


@pytest.mark.parametrize(
    ("model", "x"),
    [
        ("polynomial4", np.linspace(1e247, 1.7e249, 8)),
        ("polynomial1", np.array([1e-300, 2e-300, 3e-300, 4e-300])),
        ("polynomial3", np.array([-1e300, -5e299, 5e299, 1e300, 1.5e300])),
    ],
)
@pytest.mark.parametrize("path", [FIT, PLOT])
async def test_a_guess_the_data_defeat_is_a_422_asking_for_parameters(
    client: httpx.AsyncClient, model: str, x: np.ndarray, path: str
) -> None:
    y = np.arange(1.0, x.size + 1.0)
    r = await client.post(path, json={"model": model, "x": x.tolist(), "y": y.tolist()})
    assert r.status_code == 422, r.text
    assert "give them in parameters" in r.json()["detail"]


#: Extreme magnitudes: (x, y) patterns (8 points each).
EXTREMES = {
    "huge": (np.linspace(1e299, 1e300, 8), np.linspace(-1e300, 1e300, 8)),
    "tiny": (np.linspace(1e-300, 8e-300, 8), np.linspace(1e-300, 3e-300, 8)),
    "denormal": (np.linspace(1e-320, 8e-320, 8), np.arange(8.0)),
    "mixed": (
        np.array([-1e300, -1.0, -1e-300, 0.0, 1e-300, 1.0, 1e150, 1e300]),
        np.array([1e300, -1e-300, 3.0, 0.0, -1e300, 1e-300, 2.0, 1e200]),
    ),
}


@pytest.mark.slow
async def test_extreme_magnitudes_never_get_a_500() -> None:
    """Every named model, fit and plot, on every pattern: a 200 with finite JSON or a 422."""
    async with running_app(app_settings()) as client:
        for model in catalog.NAMED_MODELS:
            for pattern, (x, y) in EXTREMES.items():
                body = {"model": model.name, "x": x.tolist(), "y": y.tolist(), "epochs": 50}
                for path in (FIT, PLOT):
                    r = await client.post(path, json=body)
                    assert r.status_code in (200, 422), (model.name, pattern, path, r.text)
                    if path == FIT:
                        assert "NaN" not in r.text and "Infinity" not in r.text


def _npy_with_header(header: str, payload: bytes) -> bytes:
    """A version 1.0 .npy file with this header text (padded as numpy pads it)."""
    text = header.encode("latin1")
    pad = 64 - (10 + len(text) + 1) % 64
    text += b" " * pad + b"\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text + payload


HOSTILE = {
    "negative shape": _npy_with_header(
        "{'descr': '<f8', 'fortran_order': False, 'shape': (-2, -4), }", b"\x00" * 64
    ),
    "boolean shape": _npy_with_header(
        "{'descr': '<f8', 'fortran_order': False, 'shape': (True, 4), }", b"\x00" * 32
    ),
    "nested minuses": _npy_with_header(
        "{'descr': '<f8', 'fortran_order': False, 'shape': (" + "-" * 8900 + "2,), }", b""
    ),
}


@pytest.mark.parametrize("body", HOSTILE.values(), ids=HOSTILE.keys())
@pytest.mark.parametrize(
    "path",
    [
        "/v1/fits/gaussian/binary",
        "/v1/fits/linear/binary",
        "/v1/plots/linear/binary",
        "/v1/fits/linear/batch/binary",
        "/v1/fits/linear",
    ],
)
async def test_hostile_npy_headers_are_422(
    client: httpx.AsyncClient, body: bytes, path: str
) -> None:
    r = await client.post(path, content=body, headers=NPY)
    assert r.status_code in (415, 422), r.text
    if r.status_code == 422:
        assert r.json()["detail"][0]["loc"] == ["body"]


async def test_npy_headers_numpy_writes_still_parse(client: httpx.AsyncClient) -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.array([1.0, 2.0, 4.0]), allow_pickle=False)
    r = await client.post("/v1/fits/gaussian/binary", content=buffer.getvalue(), headers=NPY)
    assert r.status_code == 200, r.text


async def test_a_long_list_of_errors_is_capped_with_a_count(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/fits/gaussian", json={"y": ["a"] * 100_000})
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert len(r.content) < 10_000
    listed = [e for e in detail if e["type"] != "more_errors"]
    assert len(listed) == 20 and [e["loc"][-1] for e in listed] == list(range(20))
    (more,) = [e for e in detail if e["type"] == "more_errors"]
    assert more["loc"] == ["body", "y"] and more["ctx"]["count"] == 100_000 - 20


async def test_the_document_states_the_epoch_limit_the_server_enforces() -> None:
    settings = app_settings(max_epochs=12_345)
    async with running_app(settings) as client:
        document = (await client.get("/openapi.json")).json()
        maxima = {
            schema["properties"]["epochs"].get("maximum")
            for schema in document["components"]["schemas"].values()
            if "epochs" in schema.get("properties", {})
        }
        assert maxima == {12_345}
        body = {"expression": "a*x", "parameters": {"a": 1}, "x": [1, 2], "y": [1, 2]}
        messages = set()
        for epochs in (12_346, 2 * 10**9, 10**30):
            r = await client.post(FIT, json={**body, "epochs": epochs})
            assert r.status_code == 422
            (error,) = r.json()["detail"]
            messages.add((error["type"], error["msg"].split(", got")[0]))
        assert messages == {
            ("too_many_epochs", "at most 12345 epochs are allowed (TAPEFIT_MAX_EPOCHS)")
        }
    assert Settings().max_epochs < 10**9


class _Gone:
    """A request whose client has gone: ``receive`` says so at once."""

    async def receive(self) -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def is_disconnected(self) -> bool:
        return True


async def test_a_disconnect_mid_fit_is_a_disconnect_not_a_500() -> None:
    finished = asyncio.Event()

    async def work() -> int:
        try:
            await asyncio.sleep(10)
        finally:
            finished.set()
        return 1

    with pytest.raises(ClientDisconnected):
        await unless_disconnected(_Gone(), work())  # type: ignore[arg-type]
    await asyncio.wait_for(finished.wait(), 1)


async def test_expression_fits_stream_progress_as_the_docs_say(client: httpx.AsyncClient) -> None:
    """docs/expressions.md and /docs agree: with Accept: text/event-stream an expression fit
    sends progress events, then its answer (the one a plain request gets) as the result."""
    x = np.linspace(0.0, 1.0, 40)
    body = {
        "expression": "A*x + C + K*x**2",
        "parameters": {"A": 0.0, "K": 0.0, "C": 0.0},
        "x": x.tolist(),
        "y": (2.0 * x + 1.0 + 0.5 * x**2).tolist(),
        "optimizer": "sgd",
        "learning_rate": 0.5,
        "epochs": 40,
        "progress_every": 10,
    }
    plain = await client.post(FIT, json=body)
    streamed = await client.post(FIT, json=body, headers={"accept": "text/event-stream"})
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = [block.splitlines() for block in streamed.text.strip().split("\n\n")]
    kinds = [lines[0] for lines in events]
    assert kinds == ["event: progress"] * 4 + ["event: result"], streamed.text[-500:]
    result = json.loads(events[-1][1].removeprefix("data: "))
    assert result == plain.json()
    assert sorted(result["params"]) == ["A", "C", "K"]


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    return value


async def test_the_documented_expression_answer_is_a_real_one(client: httpx.AsyncClient) -> None:
    """/docs shows a real answer for expressions (no additionalProp1 placeholders): the one
    the server gives its own request example, to 1e-9 (the last digits vary by CPU)."""
    document = (await client.get("/openapi.json")).json()
    (shown,) = document["components"]["schemas"]["ExpressionFitResponse"]["examples"]
    # (FastAPI's document leaves out the example's nulls, named_model and the like)
    assert shown == _without_nulls(EXPRESSION_ANSWER_EXAMPLE)
    fit = (await client.post(FIT, json=EXPRESSION_EXAMPLE)).json()
    assert set(fit) == set(EXPRESSION_ANSWER_EXAMPLE)
    assert fit["loss_history"][: len(shown["loss_history"])] == pytest.approx(
        shown["loss_history"], rel=1e-9
    )
    for part in ("params", "start"):
        assert fit[part] == pytest.approx(shown[part], rel=1e-9)
    for name in ("std_errors", "rss", "r_squared", "aic"):
        assert fit["stats"][name] == pytest.approx(shown["stats"][name], rel=1e-9)
    for name, row in shown["stats"]["inference"]["parameters"].items():
        ours = fit["stats"]["inference"]["parameters"][name]
        for key in ("estimate", "std_error", "statistic", "p_value", "lower", "upper"):
            # the p-values are ~1e-17: t's tail magnifies a 1e-9 difference in t ~80 times
            assert ours[key] == pytest.approx(row[key], rel=1e-7), (name, key)
    assert fit["stop_reason"] == shown["stop_reason"] and fit["converged"]


async def test_dtype_with_an_npy_body_is_refused_not_ignored(client: httpx.AsyncClient) -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.array([1.0, 2.0, 4.0]), allow_pickle=False)
    r = await client.post(
        "/v1/fits/gaussian/binary",
        content=buffer.getvalue(),
        headers=NPY,
        params={"dtype": "float32"},
    )
    assert r.status_code == 422, r.text
    (error,) = r.json()["detail"]
    assert error["loc"] == ["query", "dtype"] and "octet-stream" in error["msg"]
