"""Profile-likelihood intervals (``intervals: "profile"``) against lmfit's ``conf_interval``
(the same F-test criterion; its root finder stops at 5e-5 relative, hence 1e-4) and against a
brute-force profile written here (scipy ``least_squares`` re-optimizing at each held value,
``brentq`` for the crossing: 1e-6), on NIST's Misra1a, an exponential decay in the
thousands and Michaelis-Menten kinetics."""

from __future__ import annotations

from typing import Any

import httpx
import lmfit
import numpy as np
import numpy.typing as npt
import pytest
import statsmodels.api as sm
from scipy import optimize, stats

from tests import nist
from tests.conftest import module_scoped

Array = npt.NDArray[np.float64]
pytestmark = pytest.mark.anyio
anyio_backend, client = module_scoped()
FIT = "/v1/fits/expression"


def _misra1a(x: Array, b1: float, b2: float) -> Array:
    return b1 * (1 - np.exp(-b2 * x))


def _decay(x: Array, a: float, k: float, c: float) -> Array:
    return a * np.exp(-k * x) + c


def _michaelis_menten(x: Array, vmax: float, km: float) -> Array:
    return vmax * x / (km + x)


def _case(name: str) -> tuple[str, dict[str, float], Array, Array, Any]:
    rng = np.random.default_rng(41)
    if name == "Misra1a":
        problem = nist.load("Misra1a")
        return problem.expression, dict(problem.starts[1]), problem.x["x"], problem.y, _misra1a
    if name == "decay":
        x = np.linspace(0.0, 4000.0, 25)
        y = _decay(x, 900.0, 8e-4, 50.0) + rng.normal(0.0, 20.0, x.size)
        return "a*exp(-k*x) + c", {"a": 500.0, "k": 1e-3, "c": 0.0}, x, y, _decay
    x = np.array([0.02, 0.06, 0.11, 0.22, 0.56, 1.1, 0.02, 0.06, 0.11, 0.22, 0.56, 1.1])
    y = _michaelis_menten(x, 210.0, 0.065) + rng.normal(0.0, 10.0, x.size)
    return "vmax*x/(km + x)", {"vmax": 200.0, "km": 0.1}, x, y, _michaelis_menten


async def _profiled(
    client: httpx.AsyncClient, expression: str, start: dict[str, float], x: Array, y: Array
) -> dict[str, Any]:
    body = {
        "expression": expression,
        "parameters": start,
        "x": x.tolist(),
        "y": y.tolist(),
        "intervals": "profile",
    }
    r = await client.post(FIT, json=body)
    assert r.status_code == 200, r.text[:400]
    answer: dict[str, Any] = r.json()
    assert answer["stats"]["inference"]["method"] == "profile"
    return answer


@pytest.mark.parametrize("name", ["Misra1a", "decay", "michaelis_menten"])
async def test_profile_intervals_are_lmfit_conf_interval(
    client: httpx.AsyncClient, name: str
) -> None:
    expression, start, x, y, f = _case(name)
    answer = await _profiled(client, expression, start, x, y)
    fitted = lmfit.Model(f).fit(y, x=x, **answer["params"])
    ci = lmfit.conf_interval(fitted, fitted, sigmas=[0.95])
    rows = answer["stats"]["inference"]["parameters"]
    for parameter, ((_, lower), _, (_, upper)) in ci.items():
        row = rows[parameter]
        assert row["lower_found"] and row["upper_found"]
        assert row["lower"] == pytest.approx(lower, rel=1e-4), parameter
        assert row["upper"] == pytest.approx(upper, rel=1e-4), parameter
        # Nonlinear: the profile interval is not the Wald one.
        assert row["lower"] < row["estimate"] < row["upper"]


def _brute_force(f: Any, x: Array, y: Array, p_hat: Array, j: int, confidence: float) -> Any:
    """The profile of parameter j by scipy, and its two crossings by brentq."""
    rss_hat = float(np.sum((y - f(x, *p_hat)) ** 2))
    dof = x.size - p_hat.size
    target = rss_hat * (1.0 + stats.f.ppf(confidence, 1, dof) / dof)
    free = [i for i in range(p_hat.size) if i != j]

    def rss(v: float) -> float:
        def residuals(q: Array) -> Array:
            p = p_hat.copy()
            p[free], p[j] = q, v
            return np.asarray(y - f(x, *p))

        solved = optimize.least_squares(
            residuals, p_hat[free], xtol=1e-15, ftol=1e-15, gtol=1e-15, method="lm"
        )
        return float(2.0 * solved.cost - target)

    ends = []
    for direction in (-1.0, 1.0):
        step = abs(p_hat[j]) * 0.01
        far = p_hat[j] + direction * step
        while rss(far) < 0.0:
            step *= 2.0
            far = p_hat[j] + direction * step
        ends.append(float(optimize.brentq(rss, *sorted((p_hat[j], far)), xtol=1e-14, rtol=1e-13)))
    return ends


async def test_profile_intervals_are_a_brute_force_profile(client: httpx.AsyncClient) -> None:
    expression, start, x, y, f = _case("decay")
    answer = await _profiled(client, expression, start, x, y)
    p_hat = np.array(list(answer["params"].values()))
    for j, name in enumerate(answer["params"]):
        lower, upper = _brute_force(f, x, y, p_hat, j, 0.95)
        row = answer["stats"]["inference"]["parameters"][name]
        assert row["lower"] == pytest.approx(lower, rel=1e-6), name
        assert row["upper"] == pytest.approx(upper, rel=1e-6), name


async def test_a_model_linear_in_its_parameters_has_the_t_interval(
    client: httpx.AsyncClient,
) -> None:
    rng = np.random.default_rng(42)
    x = rng.uniform(1000.0, 3000.0, 30)
    y = 0.5 * x + 20.0 + rng.normal(0.0, 5.0, x.size)
    answer = await _profiled(client, "a*x + b", {"a": 1.0, "b": 0.0}, x, y)
    ols = sm.OLS(y, np.stack([x, np.ones_like(x)], axis=1)).fit()
    rows = answer["stats"]["inference"]["parameters"]
    for i, name in enumerate(("a", "b")):
        lower, upper = ols.conf_int(alpha=0.05)[i]
        assert rows[name]["lower"] == pytest.approx(lower, rel=1e-8)
        assert rows[name]["upper"] == pytest.approx(upper, rel=1e-8)


async def test_a_flat_profile_is_not_bounded_and_says_so(client: httpx.AsyncClient) -> None:
    """A saturating curve sampled only where it has saturated: large rates fit as well as
    the best one, so the rate's profile never crosses above."""
    rng = np.random.default_rng(43)
    x = np.linspace(5.0, 10.0, 20)
    y = 100.0 * (1 - np.exp(-3.0 * x)) + rng.normal(0.0, 1.0, x.size)
    answer = await _profiled(client, "a*(1 - exp(-k*x))", {"a": 90.0, "k": 1.0}, x, y)
    row = answer["stats"]["inference"]["parameters"]["k"]
    assert row["upper_found"] is False and row["upper"] is None
    assert any("too flat to bound it above" in w for w in answer["warnings"])
    a = answer["stats"]["inference"]["parameters"]["a"]
    assert a["lower_found"] and a["upper_found"]


async def test_batch_entries_carry_their_own_profile_intervals(client: httpx.AsyncClient) -> None:
    """Each entry of an expression batch profiles its own set: the same intervals as the
    set's single fit."""
    rng = np.random.default_rng(44)
    x = np.linspace(0.0, 4000.0, 20)
    sets = [
        {"x": x.tolist(), "y": (_decay(x, a, 8e-4, 50.0) + rng.normal(0, 20, x.size)).tolist()}
        for a in (600.0, 900.0, 1500.0)
    ]
    shared = {"expression": "a*exp(-k*x) + c", "parameters": {"a": 500.0, "k": 1e-3, "c": 0.0}}
    r = await client.post(
        "/v1/fits/expression/batch", json=shared | {"datasets": sets, "intervals": "profile"}
    )
    assert r.status_code == 200, r.text[:400]
    for entry, one in zip(r.json()["results"], sets, strict=True):
        single = await client.post(FIT, json=shared | one | {"intervals": "profile"})
        want = single.json()["stats"]["inference"]
        got = entry["result"]["stats"]["inference"]
        assert got["method"] == want["method"] == "profile"
        for name, row in want["parameters"].items():
            for end in ("lower", "upper"):
                assert got["parameters"][name][end] == pytest.approx(row[end], rel=1e-8)
                assert got["parameters"][name][f"{end}_found"] is True
