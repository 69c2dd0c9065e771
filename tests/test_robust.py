"""Robust losses (``loss``, ``f_scale``) against scipy's ``least_squares`` with the same loss,
scale and start (parameters to 1e-6), and curve_fit's covariance for robust losses, on an
exponential decay with 10% gross outliers: the robust fits recover the truth, least squares
does not."""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import pytest
from scipy import optimize

from tests.conftest import module_scoped

Array = npt.NDArray[np.float64]
pytestmark = pytest.mark.anyio
anyio_backend, client = module_scoped()
FIT = "/v1/fits/expression"
TRUTH = {"a": 1000.0, "k": 7e-4, "c": 40.0}
START = {"a": 500.0, "k": 1e-3, "c": 0.0}
#: arctan's loss is bounded (non-convex): scipy's trust region wanders off from START (to a
#: negative rate); both start nearer for it.
NEAR = {"a": 900.0, "k": 8e-4, "c": 30.0}


def _decay(x: Array, a: float, k: float, c: float) -> Array:
    return a * np.exp(-k * x) + c


def _jacobian(x: Array, a: float, k: float, c: float) -> Array:
    e = np.exp(-k * x)
    return np.stack([e, -a * x * e, np.ones_like(x)], axis=1)


def _data() -> tuple[Array, Array, npt.NDArray[np.int64]]:
    rng = np.random.default_rng(61)
    x = np.linspace(0.0, 5000.0, 100)
    y = _decay(x, **TRUTH) + rng.normal(0.0, 5.0, x.size)
    outliers = rng.choice(x.size, 10, replace=False)
    y[outliers] += rng.uniform(150.0, 400.0, outliers.size) * rng.choice([-1, 1], outliers.size)
    return x, y, outliers


def _body(x: Array, y: Array, start: dict[str, float] = START, **options: Any) -> dict[str, Any]:
    return {"expression": "a*exp(-k*x) + c", "parameters": start, "x": x.tolist(),
            "y": y.tolist(), **options}  # fmt: skip


@pytest.mark.parametrize("loss", ["soft_l1", "huber", "cauchy", "arctan"])
async def test_robust_losses_are_scipy_least_squares(client: httpx.AsyncClient, loss: str) -> None:
    x, y, outliers = _data()
    start = NEAR if loss == "arctan" else START
    r = await client.post(FIT, json=_body(x, y, start, loss=loss, f_scale=10.0))
    assert r.status_code == 200, r.text[:400]
    answer = r.json()
    fitted = np.array([answer["params"][n] for n in "akc"])
    with np.errstate(all="ignore"):  # scipy's trust region tries steps that overflow exp
        solved = optimize.least_squares(
            lambda p: _decay(x, *p) - y,
            list(start.values()),
            jac=lambda p: _jacobian(x, *p),
            loss=loss,
            f_scale=10.0,
            xtol=1e-15,
            ftol=1e-15,
            gtol=1e-15,
            max_nfev=10_000,
        )
    assert fitted == pytest.approx(solved.x, rel=1e-6)
    assert answer["stats"]["robust_cost"] == pytest.approx(solved.cost, rel=1e-8)
    # curve_fit's covariance for robust losses, from the same Jacobian.
    _, pcov = optimize.curve_fit(
        _decay, x, y, p0=solved.x, jac=_jacobian, loss=loss, f_scale=10.0, method="trf",
        xtol=1e-15, ftol=1e-15, gtol=1e-15,
    )  # fmt: skip
    assert np.array(answer["stats"]["covariance"]) == pytest.approx(pcov, rel=1e-5)
    # The outliers are the points it discounted; the truth is recovered.
    assert answer["stats"]["downweighted"] >= len(outliers) - 2
    for name, value in TRUTH.items():
        assert answer["params"][name] == pytest.approx(value, rel=0.05), name
    assert any("covariance is approximate" in w for w in answer["warnings"])
    assert answer["stats"]["inference"]["parameters"]["a"]["std_error"] == pytest.approx(
        np.sqrt(pcov[0, 0]), rel=1e-5
    )


async def test_least_squares_is_pulled_away_by_the_outliers(client: httpx.AsyncClient) -> None:
    x, y, _ = _data()
    plain = (await client.post(FIT, json=_body(x, y))).json()
    robust = (await client.post(FIT, json=_body(x, y, loss="soft_l1", f_scale=10.0))).json()
    gap = abs(plain["params"]["c"] - TRUTH["c"])
    assert gap > 5.0 * abs(robust["params"]["c"] - TRUTH["c"])
    assert plain["stats"]["downweighted"] is None and plain["stats"]["robust_cost"] is None


async def test_robust_options_are_validated(client: httpx.AsyncClient) -> None:
    x, y, _ = _data()
    for change, field in (
        ({"loss": "l2"}, "loss"),
        ({"f_scale": 0.0}, "f_scale"),
        ({"loss": "huber", "starts": 4}, "loss"),
    ):
        r = await client.post(FIT, json=_body(x, y, **change))
        assert r.status_code == 422, r.text[:300]
        assert r.json()["detail"][0]["loc"] == ["body", field]


async def test_a_robust_fits_bands_come_from_its_covariance(client: httpx.AsyncClient) -> None:
    x, y, _ = _data()
    new = [100.0, 2500.0]
    body = _body(x, y, loss="cauchy", f_scale=10.0, predict={"x": new}, confidence=0.9)
    answer = (await client.post(FIT, json=body)).json()
    evaluated = await client.post(
        "/v1/evaluate",
        json={
            "expression": "a*exp(-k*x) + c",
            "params": answer["params"],
            "covariance": answer["stats"]["covariance"],
            "residual_variance": answer["stats"]["residual_std"] ** 2,
            "dof": answer["stats"]["dof"],
            "x": new,
            "confidence": 0.9,
        },
    )
    want = evaluated.json()["prediction"]
    for field in ("mean_lower", "mean_upper", "obs_lower", "obs_upper"):
        assert answer["prediction"][field] == pytest.approx(want[field], rel=1e-12), field
