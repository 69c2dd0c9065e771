"""Training options, weights and statistics over HTTP, and progress as server-sent events."""

from __future__ import annotations

import json
from typing import Any

import httpx
import numpy as np
import pytest
import statsmodels.api as sm

from service.api.schemas import LINEAR_ADAM_EXAMPLE
from tests.conftest import seed_gaussian_data, seed_linear_data
from tests.reference import gaussian_closed_form, linear_closed_form

pytestmark = pytest.mark.anyio

LINEAR = "/v1/fits/linear"
GAUSSIAN = "/v1/fits/gaussian"
STREAM = {"accept": "text/event-stream"}


def _data(seed: int = 0, n: int = 100) -> dict[str, Any]:
    x, y = seed_linear_data(seed, n)
    return {"x": x.tolist(), "y": y.tolist()}


async def test_every_fit_reports_stats(client: httpx.AsyncClient) -> None:
    body = {**_data(), "learning_rate": 0.5, "epochs": 3000, "seed": 1}
    r = await client.post(LINEAR, json=body)
    assert r.status_code == 200, r.text
    fit = r.json()
    stats = fit["stats"]
    assert stats["parameters"] == ["slope", "intercept"]
    slope, intercept = linear_closed_form(body["x"], body["y"])
    assert stats["closed_form"]["params"] == pytest.approx(
        {"slope": slope, "intercept": intercept}, rel=1e-12
    )
    assert abs(stats["gap"]["params"]["slope"]) < 1e-9
    assert stats["gap"]["loss"] == pytest.approx(0.0, abs=1e-12)
    # Against statsmodels' OLS (an independent implementation), columns (slope, intercept).
    ols = sm.OLS(np.array(body["y"]), sm.add_constant(np.array(body["x"]))).fit()
    reference_cov = ols.cov_params()[[1, 0]][:, [1, 0]]
    np.testing.assert_allclose(np.array(stats["covariance"]), reference_cov, rtol=1e-7)
    se = [stats["std_errors"]["slope"], stats["std_errors"]["intercept"]]
    np.testing.assert_allclose(se, ols.bse[[1, 0]], rtol=1e-7)
    corr = np.array(stats["correlation"])
    np.testing.assert_allclose(np.diag(corr), [1.0, 1.0])
    reference_corr = reference_cov[0, 1] / np.sqrt(reference_cov[0, 0] * reference_cov[1, 1])
    assert corr[0, 1] == pytest.approx(reference_corr, rel=1e-7)
    assert stats["r_squared"] == pytest.approx(ols.rsquared, rel=1e-9)
    assert stats["residual_std"] == pytest.approx(0.15, rel=0.2)  # the seed's noise
    assert stats["n_used"] == 100 and stats["dof"] == 98
    assert fit["converged"] is True

    g = await client.post(GAUSSIAN, json={"y": seed_gaussian_data(0).tolist()})
    gstats = g.json()["stats"]
    assert gstats["parameters"] == ["mean", "std"]
    assert "r_squared" not in gstats and "residual_std" not in gstats  # least squares only
    _, std = gaussian_closed_form(seed_gaussian_data(0))
    assert gstats["std_errors"]["mean"] == pytest.approx(std / np.sqrt(1000), rel=1e-6)


async def test_adam_with_early_stopping_converges_early(client: httpx.AsyncClient) -> None:
    r = await client.post(LINEAR, json=LINEAR_ADAM_EXAMPLE)
    assert r.status_code == 200, r.text
    fit = r.json()
    assert fit["stop_reason"] == "gradient_tolerance"
    assert fit["converged"] is True
    assert fit["warnings"] == []
    assert fit["epochs_run"] < LINEAR_ADAM_EXAMPLE["epochs"]
    assert len(fit["loss_history"]) == -(-fit["epochs_run"] // fit["history_every"])
    w = np.array(LINEAR_ADAM_EXAMPLE["weights"])
    x, y = np.array(LINEAR_ADAM_EXAMPLE["x"]), np.array(LINEAR_ADAM_EXAMPLE["y"])
    slope, intercept = np.polyfit(x, y, 1, w=np.sqrt(w))  # polyfit weights multiply residuals
    assert fit["params"]["slope"] == pytest.approx(slope, abs=1e-3)
    assert fit["stats"]["closed_form"]["params"]["slope"] == pytest.approx(slope, rel=1e-9)
    assert fit["stats"]["closed_form"]["params"]["intercept"] == pytest.approx(intercept, rel=1e-9)


async def test_weights_over_http_match_dropping_points(client: httpx.AsyncClient) -> None:
    data = _data(2, n=30)
    weights = [0.0 if i % 3 == 0 else 1.0 for i in range(30)]
    kept = {
        axis: [v for v, w in zip(data[axis], weights, strict=True) if w > 0] for axis in ("x", "y")
    }
    options = {"learning_rate": 0.5, "epochs": 2000, "seed": 4}
    weighted = (await client.post(LINEAR, json={**data, **options, "weights": weights})).json()
    dropped = (await client.post(LINEAR, json={**kept, **options})).json()
    assert weighted["params"] == pytest.approx(dropped["params"], rel=1e-10)
    assert weighted["n"] == 30 and weighted["stats"]["n_used"] == 20

    # The Gaussian too: integer weights repeat points, against numpy's weighted moments.
    y = np.array(data["y"])
    counts = np.arange(30) % 3
    body = {"y": y.tolist(), "weights": counts.astype(float).tolist(), "optimizer": "newton"}
    gaussian = (await client.post(GAUSSIAN, json=body)).json()
    repeated = np.repeat(y, counts)
    assert gaussian["params"]["mean"] == pytest.approx(repeated.mean(), rel=1e-12)
    assert gaussian["params"]["std"] == pytest.approx(repeated.std(), rel=1e-10)
    assert gaussian["stats"]["n_used"] == 20


async def test_history_is_thinned_by_default_for_long_fits(client: httpx.AsyncClient) -> None:
    y = seed_gaussian_data(0).tolist()
    long = (await client.post(GAUSSIAN, json={"y": y, "epochs": 5000})).json()
    assert long["history_every"] == 5
    assert len(long["loss_history"]) == 1000
    full = (await client.post(GAUSSIAN, json={"y": y, "epochs": 5000, "history_every": 1})).json()
    assert len(full["loss_history"]) == 5000
    assert long["loss_history"] == full["loss_history"][::5]
    assert long["final_loss"] == full["final_loss"]


async def test_options_work_with_binary_bodies(client: httpx.AsyncClient) -> None:
    x, y = seed_linear_data(1)
    options: dict[str, Any] = {
        "optimizer": "momentum",
        "momentum": 0.5,
        "learning_rate": 0.1,
        "epochs": 400,
    }
    raw = np.concatenate([x, y]).astype("<f8").tobytes()
    as_raw = await client.post(
        LINEAR + "/binary",
        content=raw,
        headers={"content-type": "application/octet-stream"},
        params={**options, "seed": 2},
    )
    as_json = await client.post(
        LINEAR, json={"x": x.tolist(), "y": y.tolist(), **options, "seed": 2}
    )
    assert as_raw.status_code == 200, as_raw.text
    assert as_raw.json() == as_json.json()


def _events(text: str) -> list[tuple[str, Any]]:
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((lines["event"], json.loads(lines["data"])))
    return events


async def test_stream_reports_progress_then_the_same_result(client: httpx.AsyncClient) -> None:
    body = {**_data(), "learning_rate": 0.1, "epochs": 1000, "seed": 3, "progress_every": 100}
    r = await client.post(LINEAR, json=body, headers=STREAM)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = _events(r.text)
    progress = [data for name, data in events if name == "progress"]
    assert [p["epoch"] for p in progress] == list(range(100, 1001, 100))
    losses = [p["loss"] for p in progress]
    assert losses == sorted(losses, reverse=True)  # gradient descent on a convex loss
    name, result = events[-1]
    assert name == "result"
    plain = (await client.post(LINEAR, json=body)).json()
    assert result == plain
    # Progress at epoch k is the loss after k updates: entry k of the history.
    np.testing.assert_allclose(losses[:-1], plain["loss_history"][100::100], rtol=1e-12)
    assert plain["final_loss"] == losses[-1]


async def test_stream_ends_with_an_error_event_when_the_fit_diverges(
    client: httpx.AsyncClient,
) -> None:
    body = {**_data(), "learning_rate": 100, "epochs": 50, "seed": 1, "progress_every": 10}
    r = await client.post(LINEAR, json=body, headers=STREAM)
    assert r.status_code == 200
    events = _events(r.text)
    name, error = events[-1]
    assert name == "error"
    assert error["stop_reason"] == "diverged"
    assert "diverged at epoch" in error["detail"]
    assert "NaN" not in r.text and "Infinity" not in r.text


async def test_stream_requests_are_validated_first(client: httpx.AsyncClient) -> None:
    r = await client.post(LINEAR, json={"x": [1.0, 1.0], "y": [1.0, 2.0]}, headers=STREAM)
    assert r.status_code == 422
    assert r.headers["content-type"] == "application/json"


async def test_statistics_that_overflow_are_null(client: httpx.AsyncClient) -> None:
    """x spread 1e-160 and y spread 1e150: the data's moments are finite, but the least-squares
    slope (~1e310) is not. The fit answers, with null where float64 gives out."""
    body = {"x": [0.0, 1e-160, 2e-160], "y": [0.0, 1e150, 3e150], "epochs": 3, "seed": 0}
    r = await client.post(LINEAR, json={**body, "learning_rate": 1e-300})
    assert r.status_code == 200, r.text
    assert "NaN" not in r.text and "Infinity" not in r.text
    stats = r.json()["stats"]
    assert stats["closed_form"] is None and stats["gap"] is None
    assert stats["std_errors"] == {"slope": None, "intercept": None}
