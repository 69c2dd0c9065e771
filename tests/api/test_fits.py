"""In-process HTTP tests of the fit routes (AsyncClient + ASGITransport, lifespan run)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
import pytest

from service.admission import fit_cost
from service.api.schemas import GAUSSIAN_EXAMPLE, LINEAR_EXAMPLE
from tests.conftest import app_settings, running_app, seed_gaussian_data, seed_linear_data
from tests.reference import (
    gaussian_closed_form,
    linear_closed_form,
    reference_gaussian,
    reference_linear,
)

pytestmark = pytest.mark.anyio

LINEAR = "/v1/fits/linear"
GAUSSIAN = "/v1/fits/gaussian"
EVENTS = {"accept": "text/event-stream"}


def _no_nan(response: httpx.Response) -> None:
    text = response.text
    assert "NaN" not in text and "Infinity" not in text


async def test_linear_example_fits(client: httpx.AsyncClient) -> None:
    r = await client.post(LINEAR, json=LINEAR_EXAMPLE)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "linear"
    assert set(body["params"]) == {"slope", "intercept"}
    assert body["n"] == len(LINEAR_EXAMPLE["x"])
    assert body["epochs_run"] == LINEAR_EXAMPLE["epochs"] == len(body["loss_history"])
    assert body["stop_reason"] == "max_epochs"
    assert body["seed"] == 42
    slope, intercept = linear_closed_form(LINEAR_EXAMPLE["x"], LINEAR_EXAMPLE["y"])
    assert body["params"]["slope"] == pytest.approx(slope, abs=1e-3)
    assert body["params"]["intercept"] == pytest.approx(intercept, abs=1e-3)
    assert body["final_loss"] <= body["loss_history"][-1]


async def test_gaussian_example_fits(client: httpx.AsyncClient) -> None:
    r = await client.post(GAUSSIAN, json=GAUSSIAN_EXAMPLE)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "gaussian"
    mean, std = gaussian_closed_form(GAUSSIAN_EXAMPLE["y"])
    assert body["params"]["mean"] == pytest.approx(mean, abs=1e-4)
    assert body["params"]["std"] == pytest.approx(std, abs=1e-4)
    assert body["params"]["std"] > 0
    assert len(body["loss_history"]) == body["epochs_run"] == 1000


@pytest.mark.parametrize("data_seed", [0, 1])
async def test_defaults_converge_on_seed_data(client: httpx.AsyncClient, data_seed: int) -> None:
    x, y = seed_linear_data(data_seed)
    r = await client.post(LINEAR, json={"x": x.tolist(), "y": y.tolist()})
    assert r.status_code == 200, r.text
    slope, intercept = linear_closed_form(x, y)
    assert abs(r.json()["params"]["slope"] - slope) < 1e-2
    assert abs(r.json()["params"]["intercept"] - intercept) < 1e-2

    yg = seed_gaussian_data(data_seed)
    r = await client.post(GAUSSIAN, json={"y": yg.tolist()})
    assert r.status_code == 200, r.text
    mean, std = gaussian_closed_form(yg)
    assert abs(r.json()["params"]["mean"] - mean) < 1e-2
    assert abs(r.json()["params"]["std"] - std) < 1e-2


async def test_seed_hyperparameters_give_the_seed_loop_numbers(client: httpx.AsyncClient) -> None:
    x, y = seed_linear_data(2)
    m, b, history = reference_linear(x, y, learning_rate=0.05, epochs=30, initial=(0.02, 0.0))
    r = await client.post(
        LINEAR,
        json={
            "x": x.tolist(),
            "y": y.tolist(),
            "learning_rate": 0.05,
            "epochs": 30,
            "initial": {"slope": 0.02, "intercept": 0.0},
            "scaling": "none",
        },
    )
    body = r.json()
    np.testing.assert_allclose(body["loss_history"], history, rtol=2e-5)
    assert body["params"]["slope"] == pytest.approx(m, rel=2e-5)
    assert body["params"]["intercept"] == pytest.approx(b, rel=2e-5)
    assert body["seed"] is None

    yg = seed_gaussian_data(2)
    mg, sg, hg = reference_gaussian(yg, learning_rate=0.0005, epochs=50)
    r = await client.post(
        GAUSSIAN,
        json={
            "y": yg.tolist(),
            "learning_rate": 0.0005,
            "epochs": 50,
            "reduction": "sum",
            "scaling": "none",
        },
    )
    body = r.json()
    np.testing.assert_allclose(body["loss_history"], hg, rtol=2e-5)
    assert body["params"]["mean"] == pytest.approx(mg, rel=2e-5)
    assert body["params"]["std"] == pytest.approx(sg, rel=2e-5)


async def test_thinned_history_in_raw_units_is_every_nth_loss(client: httpx.AsyncClient) -> None:
    """With scaling "none" the history is the loop's own, thinned every ``history_every``
    epochs (a strided view of it, which the answer must write as its values)."""
    x, y = seed_linear_data(2)
    _, _, history = reference_linear(x, y, learning_rate=0.05, epochs=30, initial=(0.02, 0.0))
    body = {"x": x.tolist(), "y": y.tolist(), "learning_rate": 0.05, "epochs": 30}
    body |= {"initial": {"slope": 0.02, "intercept": 0.0}, "scaling": "none", "history_every": 7}
    r = await client.post(LINEAR, json=body)
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["loss_history"], history[::7], rtol=2e-5)
    assert len(r.json()["loss_history"]) == 5  # epochs 1, 8, 15, 22, 29
    # x in the thousands, raw units (a step small enough for them): every 7th of the full
    # history, exactly.
    rng = np.random.default_rng(7)
    x = 1000.0 + 100.0 * rng.random(100)
    raw = {"x": x.tolist(), "y": (3.0 * x - 50.0 + rng.normal(0.0, 1.0, 100)).tolist()}
    raw |= {"learning_rate": 1e-7, "epochs": 30, "scaling": "none", "seed": 1}
    full = await client.post(LINEAR, json=raw)
    thinned = await client.post(LINEAR, json={**raw, "history_every": 7})
    assert full.status_code == thinned.status_code == 200, thinned.text
    assert thinned.json()["loss_history"] == full.json()["loss_history"][::7]


async def test_same_seed_same_response(client: httpx.AsyncClient) -> None:
    x, y = seed_linear_data(3)
    payload = {"x": x.tolist(), "y": y.tolist(), "epochs": 20, "seed": 7}
    first = (await client.post(LINEAR, json=payload)).json()
    second = (await client.post(LINEAR, json=payload)).json()
    assert first == second
    unseeded = (await client.post(LINEAR, json={**payload, "seed": None})).json()
    replay = (await client.post(LINEAR, json={**payload, "seed": unseeded["seed"]})).json()
    assert replay == unseeded


async def test_divergence_is_a_clear_422(client: httpx.AsyncClient) -> None:
    x, y = seed_linear_data(0)
    r = await client.post(
        LINEAR, json={"x": x.tolist(), "y": y.tolist(), "learning_rate": 100, "seed": 1}
    )
    assert r.status_code == 422
    body = r.json()
    detail = body["detail"]
    assert isinstance(detail, str)
    assert "diverged at epoch" in detail and "lower learning_rate" in detail
    assert body["stop_reason"] == "diverged"
    assert f"diverged at epoch {body['epoch']}:" in detail
    _no_nan(r)

    r = await client.post(GAUSSIAN, json={"y": seed_gaussian_data(0).tolist(), "learning_rate": 50})
    assert r.status_code == 422
    assert "diverged" in r.json()["detail"]
    _no_nan(r)


GOOD_LINEAR: dict[str, Any] = {"x": [0.0, 1.0, 2.0], "y": [1.0, 3.0, 5.0]}
GOOD_GAUSSIAN: dict[str, Any] = {"y": [1.0, 2.0, 4.0]}


def _replace(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {**base, **changes}


INVALID_LINEAR: list[tuple[str, Any, str]] = [
    ("unknown field", _replace(GOOD_LINEAR, slope=1), "slope"),
    ("string number", _replace(GOOD_LINEAR, x=["0", 1.0, 2.0]), "x"),
    ("boolean number", _replace(GOOD_LINEAR, y=[1.0, True, 5.0]), "y"),
    ("null point", _replace(GOOD_LINEAR, y=[1.0, None, 5.0]), "y"),
    ("mismatched lengths", _replace(GOOD_LINEAR, y=[1.0, 2.0]), "y"),
    ("empty", _replace(GOOD_LINEAR, x=[], y=[]), "x"),
    ("one point", _replace(GOOD_LINEAR, x=[1.0], y=[2.0]), "x"),
    ("x all equal", _replace(GOOD_LINEAR, x=[1.0, 1.0, 1.0]), "x"),
    ("zero learning rate", _replace(GOOD_LINEAR, learning_rate=0), "learning_rate"),
    ("negative learning rate", _replace(GOOD_LINEAR, learning_rate=-0.1), "learning_rate"),
    ("string learning rate", _replace(GOOD_LINEAR, learning_rate="0.1"), "learning_rate"),
    ("zero epochs", _replace(GOOD_LINEAR, epochs=0), "epochs"),
    ("fractional epochs", _replace(GOOD_LINEAR, epochs=2.5), "epochs"),
    ("too many epochs", _replace(GOOD_LINEAR, epochs=100_001), "epochs"),
    ("negative seed", _replace(GOOD_LINEAR, seed=-1), "seed"),
    ("bad initial", _replace(GOOD_LINEAR, initial={"slope": 1.0}), "initial"),
    ("x not a list", _replace(GOOD_LINEAR, x=3.0), "x"),
    ("missing y", {"x": [0.0, 1.0]}, "y"),
    ("unknown optimizer", _replace(GOOD_LINEAR, optimizer="lbfgs"), "optimizer"),
    ("momentum of 1", _replace(GOOD_LINEAR, optimizer="momentum", momentum=1.0), "momentum"),
    ("negative beta_2", _replace(GOOD_LINEAR, beta_2=-0.1), "beta_2"),
    ("zero epsilon", _replace(GOOD_LINEAR, epsilon=0), "epsilon"),
    ("negative tolerance", _replace(GOOD_LINEAR, tolerance=-1e-9), "tolerance"),
    ("zero patience", _replace(GOOD_LINEAR, patience=0), "patience"),
    (
        "NaN-ish gradient tolerance",
        _replace(GOOD_LINEAR, gradient_tolerance="1e-9"),
        "gradient_tolerance",
    ),
    ("zero history_every", _replace(GOOD_LINEAR, history_every=0), "history_every"),
    ("zero progress_every", _replace(GOOD_LINEAR, progress_every=0), "progress_every"),
    ("weights too short", _replace(GOOD_LINEAR, weights=[1.0, 1.0]), "weights"),
    ("negative weight", _replace(GOOD_LINEAR, weights=[1.0, -1.0, 1.0]), "weights"),
    ("one positive weight", _replace(GOOD_LINEAR, weights=[0.0, 0.0, 1.0]), "weights"),
    ("string weight", _replace(GOOD_LINEAR, weights=[1.0, "1", 1.0]), "weights"),
]
INVALID_GAUSSIAN: list[tuple[str, Any, str]] = [
    ("y all equal", _replace(GOOD_GAUSSIAN, y=[2.0, 2.0, 2.0]), "y"),
    ("zero initial std", _replace(GOOD_GAUSSIAN, initial={"mean": 0, "std": 0}), "initial"),
    ("unknown reduction", _replace(GOOD_GAUSSIAN, reduction="max"), "reduction"),
    ("x is not a gaussian field", _replace(GOOD_GAUSSIAN, x=[1.0, 2.0, 3.0]), "x"),
    ("gaussian weights too long", _replace(GOOD_GAUSSIAN, weights=[1.0] * 4), "weights"),
    ("adam beta_1 of 1", _replace(GOOD_GAUSSIAN, optimizer="adam", beta_1=1), "beta_1"),
]


def _assert_422_naming(r: httpx.Response, field: str) -> None:
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, list) and detail
    assert any(field in error["loc"] for error in detail), detail
    for error in detail:
        assert error["loc"][0] == "body"
        assert "input" not in error
        assert error["msg"]
    _no_nan(r)


INVALID = [(LINEAR, *case) for case in INVALID_LINEAR] + [
    (GAUSSIAN, *case) for case in INVALID_GAUSSIAN
]


@pytest.mark.parametrize(
    ("path", "case", "payload", "field"), INVALID, ids=[f"{c[0]}: {c[1]}" for c in INVALID]
)
async def test_invalid_requests_name_the_field(
    client: httpx.AsyncClient, path: str, case: str, payload: Any, field: str
) -> None:
    _assert_422_naming(await client.post(path, json=payload), field)


@pytest.mark.parametrize(
    ("literal", "field"),
    [
        ('{"x": [0, 1, NaN], "y": [1, 2, 3]}', "x"),
        ('{"x": [0, 1, 2], "y": [1, Infinity, 3]}', "y"),
        ('{"x": [0, -Infinity, 2], "y": [1, 2, 3]}', "x"),
        ('{"x": [0, 1, 2], "y": [1, 1e999, 3]}', "y"),
        ('{"x": [0, 1, 2], "y": [1, 2, 3], "learning_rate": NaN}', "learning_rate"),
        (
            '{"x": [0, 1, 2], "y": [1, 2, 3], "initial": {"slope": Infinity, "intercept": 0}}',
            "slope",
        ),
        ('{"x": [0, 1, 2], "y": [1, 2, ' + "9" * 400 + "]}", "y"),
    ],
)
async def test_non_finite_numbers_are_refused_without_echo(
    client: httpx.AsyncClient, literal: str, field: str
) -> None:
    r = await client.post(LINEAR, content=literal, headers={"content-type": "application/json"})
    _assert_422_naming(r, field)


@pytest.mark.parametrize(
    "raw", [b"", b"{", b"[1, 2]", b"null", b'{"x": [1, 2]', b"\xff\xfe", b"[" * 10_000]
)
async def test_malformed_bodies_are_4xx(client: httpx.AsyncClient, raw: bytes) -> None:
    r = await client.post(LINEAR, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"][0] == "body"


async def test_wrong_content_type_is_415(client: httpx.AsyncClient) -> None:
    r = await client.post(
        LINEAR, content=json.dumps(GOOD_LINEAR), headers={"content-type": "text/plain"}
    )
    assert r.status_code == 415
    assert "application/json" in r.json()["detail"]


async def test_limits_come_from_settings() -> None:
    settings = app_settings(max_points=5, max_epochs=50, max_body_bytes=4096)
    async with running_app(settings) as c:
        r = await c.post(LINEAR, json={"x": list(range(6)), "y": list(range(6))})
        _assert_422_naming(r, "x")
        assert "TAPEFIT_MAX_POINTS" in r.json()["detail"][0]["msg"]
        r = await c.post(GAUSSIAN, json={"y": [1.0, 2.0], "epochs": 51})
        _assert_422_naming(r, "epochs")
        assert "TAPEFIT_MAX_EPOCHS" in r.json()["detail"][0]["msg"]
        big = {"y": [1.5] * 2000 + [2.0]}
        r = await c.post(GAUSSIAN, json=big, headers={"X-Request-ID": "big-1"})
        _assert_413(r, "big-1")

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it comes
            yield json.dumps(big).encode()

        r = await c.post(
            GAUSSIAN,
            content=chunks(),
            headers={"content-type": "application/json", "X-Request-ID": "big-2"},
        )
        _assert_413(r, "big-2")
        r = await c.post(GAUSSIAN, json={"y": [1.0, 2.0], "epochs": 50})
        assert r.status_code == 200


def _assert_413(r: httpx.Response, request_id: str) -> None:
    """The documented 413: JSON naming the limit, with the request id, however sent."""
    assert r.status_code == 413
    assert r.headers["content-type"] == "application/json"
    assert r.headers["x-request-id"] == request_id
    assert r.json() == {"detail": "request body larger than 4096 bytes (TAPEFIT_MAX_BODY_BYTES)"}


async def test_large_body_is_parsed_in_the_parser_process() -> None:
    settings = app_settings(parse_processes=1, parse_inline_max_bytes=0)
    x, y = seed_linear_data(4, n=50_000)
    async with running_app(settings) as c:
        r = await c.post(LINEAR, json={"x": x.tolist(), "y": y.tolist(), "epochs": 2000})
        assert r.status_code == 200, r.text
        slope, _ = linear_closed_form(x, y)
        assert r.json()["params"]["slope"] == pytest.approx(slope, abs=1e-3)
        assert r.json()["n"] == 50_000
        metrics = (await c.get("/metrics")).text
        assert 'tapefit_parse_duration_seconds_count{where="process"} 1.0' in metrics
        bad = '{"x": [1.0, NaN], "y": [1.0, 2.0], "padding": "' + "p" * 100 + '"}'
        r = await c.post(LINEAR, content=bad, headers={"content-type": "application/json"})
        _assert_422_naming(r, "x")


async def test_timeout_returns_what_was_reached() -> None:
    settings = app_settings(epochs_per_call=1, fit_timeout_s=0.3)
    async with running_app(settings) as c:
        yg = seed_gaussian_data(0)
        r = await c.post(GAUSSIAN, json={"y": yg.tolist(), "epochs": 100_000})
        assert r.status_code == 200
        body = r.json()
        assert body["stop_reason"] == "timeout"
        assert 0 < body["epochs_run"] < 100_000
        # 100,000 epochs asked: the history is thinned to at most 1000 values.
        assert body["history_every"] == 100
        assert len(body["loss_history"]) == -(-body["epochs_run"] // 100)


async def test_overload_is_429_with_retry_after() -> None:
    settings = app_settings(
        epochs_per_call=1, fit_timeout_s=5.0, max_concurrent_fits=1, max_queued_fits=0
    )
    async with running_app(settings) as c:
        yg = seed_gaussian_data(0).tolist()
        slow = asyncio.create_task(c.post(GAUSSIAN, json={"y": yg, "epochs": 100_000}))
        app_worker = None
        for _ in range(500):
            await asyncio.sleep(0.01)
            health = await c.get("/readyz")
            assert health.status_code == 200
            if slow.done():
                break
            r = await c.post(GAUSSIAN, json={"y": yg, "epochs": 10})
            if r.status_code == 429:
                app_worker = r
                break
        assert app_worker is not None, "the second fit was never refused"
        # The slow fit (100,000 compiled calls, ~5 s by the cost model) is charged at most
        # its 5 s deadline: that is the wait ahead of the refused one.
        assert app_worker.headers["Retry-After"] == "5"
        assert "retry" in app_worker.json()["detail"]
        first = await slow
        assert first.status_code == 200
        r = await c.post(GAUSSIAN, json={"y": yg, "epochs": 10})
        assert r.status_code == 200


async def test_request_timeout_is_capped_by_the_setting() -> None:
    settings = app_settings(epochs_per_call=1, fit_timeout_s=0.3)
    async with running_app(settings) as c:
        y = seed_gaussian_data(0).tolist()
        r = await c.post(GAUSSIAN, json={"y": y, "epochs": 100_000, "timeout_s": 3600})
        assert r.json()["stop_reason"] == "timeout"
        r = await c.post(GAUSSIAN, json={"y": y, "epochs": 100_000, "timeout_s": 0.05})
        assert r.json()["stop_reason"] == "timeout"
        r = await c.post(GAUSSIAN, json={"y": y, "epochs": 20, "timeout_s": 30})
        assert r.json()["stop_reason"] == "max_epochs"
        _assert_422_naming(await c.post(GAUSSIAN, json={"y": y, "timeout_s": 0}), "timeout_s")


async def test_work_cap_refuses_before_fitting() -> None:
    async with running_app(app_settings(max_work=1000)) as c:
        r = await c.post(GAUSSIAN, json={"y": [1.0, 2.0, 3.0, 4.0], "epochs": 251})
        _assert_422_naming(r, "y")
        assert "TAPEFIT_MAX_WORK" in r.json()["detail"][0]["msg"]
        r = await c.post(GAUSSIAN, json={"y": [1.0, 2.0, 3.0, 4.0], "epochs": 250})
        assert r.status_code == 200
        metrics = (await c.get("/metrics")).text
        assert 'tapefit_fits_total{model="gaussian",outcome="max_epochs"} 1.0' in metrics


async def test_metrics_count_requests_by_route_and_status(client: httpx.AsyncClient) -> None:
    await client.post(GAUSSIAN, json={"y": [1.0, 2.0, 4.0], "epochs": 5})
    await client.post(GAUSSIAN, json={"y": [1.0, 2.0, 4.0], "learning_rate": 1e9})
    await client.post(GAUSSIAN, json={"y": [1.0]})
    text = (await client.get("/metrics")).text
    assert 'http_requests_total{handler="/v1/fits/gaussian",method="POST",status="200"} 1.0' in text
    assert 'http_requests_total{handler="/v1/fits/gaussian",method="POST",status="422"} 2.0' in text
    assert 'tapefit_fits_total{model="gaussian",outcome="diverged"} 1.0' in text
    assert 'tapefit_fit_epochs_total{model="gaussian"} 5.0' in text
    assert "http_request_duration_seconds_bucket" in text


async def test_the_seed_is_reported_only_when_it_drew_the_start(client: httpx.AsyncClient) -> None:
    x, y = seed_linear_data(4)
    line = {"x": x.tolist(), "y": y.tolist(), "epochs": 5}
    drawn = (await client.post(LINEAR, json=line)).json()["seed"]
    assert isinstance(drawn, int)
    assert (await client.post(LINEAR, json={**line, "seed": 9})).json()["seed"] == 9
    given = {**line, "seed": 9, "initial": {"slope": 1.0, "intercept": 0.0}}
    assert (await client.post(LINEAR, json=given)).json()["seed"] is None
    samples = {"y": seed_gaussian_data(4).tolist(), "epochs": 5}
    for body in (samples, {**samples, "seed": 9}):
        assert (await client.post(GAUSSIAN, json=body)).json()["seed"] is None


async def test_constant_data_is_a_422_saying_what_is_constant(client: httpx.AsyncClient) -> None:
    for path, body, what in (
        (LINEAR, {"x": [2.0, 2.0, 2.0], "y": [1.0, 2.0, 3.0]}, "x"),
        (GAUSSIAN, {"y": [5.0, 5.0]}, "y"),
    ):
        (error,) = (await client.post(path, json=body)).json()["detail"]
        assert (error["loc"], error["type"]) == (["body", what], "constant_data")
        assert (
            error["msg"] == f"all {what} values are equal; at least two distinct values are needed"
        )


async def test_mismatched_x_and_y_are_named_in_the_422(client: httpx.AsyncClient) -> None:
    r = await client.post(LINEAR, json={"x": [0.0, 1.0, 2.0], "y": [1.0, 2.0]})
    assert r.json()["detail"] == [
        {
            "loc": ["body", "y"],
            "msg": "y has 2 values but x has 3; they must pair up",
            "type": "length_mismatch",
            "ctx": {"nx": 3, "ny": 2, "first": "x", "second": "y"},
        }
    ]


async def test_weights_need_two_positive_values_and_one_per_point(
    client: httpx.AsyncClient,
) -> None:
    y = [1.0, 2.0, 4.0]
    two = await client.post(GAUSSIAN, json={"y": y, "weights": [1.0, 0.0, 3.0], "epochs": 5})
    assert two.status_code == 200, two.text
    huge = await client.post(GAUSSIAN, json={"y": y, "weights": [1e308, 1e308, 1.0]})
    assert huge.json()["detail"] == [
        {
            "loc": ["body", "weights"],
            "msg": "the sum of the weights overflows float64; rescale them (only their ratios "
            "and their sum matter)",
            "type": "weights_overflow",
        }
    ]
    one = await client.post(GAUSSIAN, json={"y": y, "weights": [0.0, 0.0, 3.0]})
    assert one.status_code == 422
    assert one.json()["detail"] == [
        {
            "loc": ["body", "weights"],
            "msg": "at least 2 points need a positive weight",
            "type": "too_few_weights",
        }
    ]
    for path, body in ((GAUSSIAN, {"y": y}), (LINEAR, {"x": [0.0, 1.0, 2.0], "y": y})):
        short = await client.post(path, json={**body, "weights": [1.0, 1.0]})
        assert short.status_code == 422
        (error,) = short.json()["detail"]
        assert error["loc"] == ["body", "weights"]
        assert error["type"] == "length_mismatch"
        assert error["msg"] == "weights has 2 values but y has 3; they must pair up"


async def test_inline_and_pooled_fits_answer_the_same_bytes_valid_against_the_schema() -> None:
    """A fit expected under TAPEFIT_INLINE_FIT_MAX_S runs on the event loop; with the setting
    at 0 the same fit runs in the pool. Both answers, serialized straight from the engine's
    data, are the same bytes and valid against the response models, on data in real units
    (x in the thousands, a mean of 1e7 with a spread of 0.1), and match the closed forms."""
    from service.api.models import BUILT_IN

    rng = np.random.default_rng(14)
    x = 1000.0 + 100.0 * rng.random(100)
    y = 3.0 * x - 50.0 + rng.normal(0.0, 1.0, 100)
    g = rng.normal(1e7, 0.1, 100)
    bodies = {
        LINEAR: {"x": x.tolist(), "y": y.tolist(), "seed": 3},
        GAUSSIAN: {"y": g.tolist()},
    }
    answers: dict[float, dict[str, bytes]] = {}
    streamed: dict[str, bytes] = {}
    for inline_max in (0.002, 0.0):
        settings = app_settings(inline_fit_max_s=inline_max)
        async with running_app(settings) as c:
            answers[inline_max] = {
                path: (await c.post(path, json=b)).content for path, b in bodies.items()
            }
            for path, b in bodies.items():  # a progress stream's result: the same bytes too
                r = await c.post(path, json={**b, "progress_every": 500}, headers=EVENTS)
                result = r.text.strip().split("\n\n")[-1].splitlines()
                assert result[0] == "event: result"
                streamed[path] = result[1].removeprefix("data: ").encode()
    assert answers[0.002] == answers[0.0] == streamed
    for path, name in ((LINEAR, "linear"), (GAUSSIAN, "gaussian")):
        validated = BUILT_IN[name].response.model_validate_json(answers[0.0][path])
        assert json.loads(validated.model_dump_json()) == json.loads(answers[0.0][path])
    linear = json.loads(answers[0.0][LINEAR])["params"]
    gaussian = json.loads(answers[0.0][GAUSSIAN])["params"]
    slope, intercept = np.polyfit(x, y, 1)
    assert linear["slope"] == pytest.approx(slope, rel=1e-9)
    assert linear["intercept"] == pytest.approx(intercept, rel=1e-9, abs=1e-9)
    assert gaussian["mean"] == pytest.approx(g.mean(), rel=1e-14)
    assert gaussian["std"] == pytest.approx(g.std(), rel=1e-6)


def test_only_fits_expected_under_the_inline_bound_run_inline() -> None:
    """The choice is the cost model's alone: a default 1000-epoch fit of 100 points is inline;
    one of 100,000 epochs, one over 1e6 points, or one with no ticket is not."""
    from service.worker import FitWorker

    worker = FitWorker(app_settings())

    def inline(cost: Any) -> bool:
        ticket = worker.admission.open()
        ticket.take_place(cost)
        try:
            return worker.inline(ticket)
        finally:
            ticket.close()

    assert inline(fit_cost(points=100, arrays=2, epochs=1000, history=1125))
    assert not inline(fit_cost(points=100, arrays=2, epochs=100_000, history=112_501))
    assert not inline(fit_cost(points=1_000_000, arrays=2, epochs=1000, history=1125))
    assert not worker.inline(None)
