"""The parameter table (``stats.inference``) of every kind of fit, over HTTP, against
references computed outside this codebase: statsmodels' OLS and WLS (``tvalues``,
``pvalues``, ``conf_int``), scipy's ``curve_fit`` covariance with Student's t from
``scipy.stats``, and the normal-theory intervals of the Gaussian MLE from its closed-form
standard errors. At the scales real callers have: x in the thousands, a mean of 1e7 with a
spread of 0.1, and parameters near 1e12.
"""

from __future__ import annotations

import math
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import pytest
import statsmodels.api as sm
from scipy import optimize, stats

from tests import nist
from tests.conftest import module_scoped
from tests.test_accuracy import norris

Array = npt.NDArray[np.float64]
pytestmark = pytest.mark.anyio
anyio_backend, client = module_scoped()
#: Relative tolerance of the table against statsmodels (the issue's contract).
RTOL = 1e-8


def _check_table(
    inference: dict[str, Any],
    names: list[str],
    params: Array,
    bse: Array,
    statistic: Array,
    p_values: Array,
    intervals: Array,
    rtol: float = RTOL,
) -> None:
    rows = inference["parameters"]
    assert list(rows) == names
    for i, name in enumerate(names):
        row = rows[name]
        assert row["estimate"] == pytest.approx(params[i], rel=rtol), name
        assert row["std_error"] == pytest.approx(bse[i], rel=rtol), name
        assert row["statistic"] == pytest.approx(statistic[i], rel=rtol), name
        # The p-value is the distribution's tail at the statistic (exact to rounding, however
        # far out); where it is not tiny it matches the reference's directly (far out, a
        # relative error ε in t moves p by about t²·ε relatively).
        dof = inference["dof"]
        z = abs(row["statistic"])
        tail = stats.norm.sf(z) if dof is None else stats.t.sf(z, dof)
        assert row["p_value"] == pytest.approx(2 * tail, rel=1e-9), name
        if p_values[i] > 1e-3:
            assert row["p_value"] == pytest.approx(p_values[i], rel=max(rtol, 1e-7)), name
        assert row["lower"] == pytest.approx(intervals[i][0], rel=rtol), name
        assert row["upper"] == pytest.approx(intervals[i][1], rel=rtol), name
        assert row["lower_found"] is None and row["upper_found"] is None


def _check_line(inference: dict[str, Any], result: Any, confidence: float = 0.95) -> None:
    """The line's table against a statsmodels OLS or WLS result (slope, then intercept)."""
    order = [1, 0]
    _check_table(
        inference,
        ["slope", "intercept"],
        result.params[order],
        result.bse[order],
        result.tvalues[order],
        result.pvalues[order],
        result.conf_int(alpha=1.0 - confidence)[order],
    )


def _linear_cases() -> list[tuple[str, Array, Array]]:
    rng = np.random.default_rng(11)
    x_norris, y_norris = norris()
    x_k = rng.uniform(1000.0, 5000.0, 60)  # x in the thousands
    y_k = 0.003 * x_k + 41.0 + rng.normal(0.0, 0.5, x_k.size)  # a weak slope: p not tiny
    x_12 = rng.uniform(0.0, 10.0, 40)
    y_12 = 1e12 + 3e9 * x_12 + rng.normal(0.0, 1e9, x_12.size)  # intercept near 1e12
    return [("norris", x_norris, y_norris), ("thousands", x_k, y_k), ("1e12", x_12, y_12)]


@pytest.mark.parametrize("case", [0, 1, 2], ids=["norris", "thousands", "1e12"])
@pytest.mark.parametrize("confidence", [0.95, 0.99])
async def test_linear_table_is_statsmodels_ols(
    client: httpx.AsyncClient, case: int, confidence: float
) -> None:
    _, x, y = _linear_cases()[case]
    r = await client.post(
        "/v1/fits/linear",
        json={"x": x.tolist(), "y": y.tolist(), "optimizer": "newton", "confidence": confidence},
    )
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["converged"]
    inference = answer["stats"]["inference"]
    assert inference["confidence"] == confidence
    assert inference["method"] == "t" and inference["dof"] == x.size - 2
    _check_line(inference, sm.OLS(y, sm.add_constant(x)).fit(), confidence)


async def test_weighted_linear_table_is_statsmodels_wls(client: httpx.AsyncClient) -> None:
    rng = np.random.default_rng(12)
    x = rng.uniform(2000.0, 3000.0, 50)
    sigma = rng.uniform(0.5, 3.0, x.size)
    y = -0.02 * x + 700.0 + rng.normal(0.0, sigma)
    w = 1.0 / sigma**2
    r = await client.post(
        "/v1/fits/linear",
        json={"x": x.tolist(), "y": y.tolist(), "weights": w.tolist(), "optimizer": "newton"},
    )
    assert r.status_code == 200, r.text
    _check_line(r.json()["stats"]["inference"], sm.WLS(y, sm.add_constant(x), weights=w).fit())


async def test_gaussian_table_is_normal_theory(client: httpx.AsyncClient) -> None:
    """The MLE's intervals are Wald intervals with the normal distribution: se(mean) = s/√n
    and se(std) = s/√(2n), s the population standard deviation (the inverse observed
    information, in closed form)."""
    y = np.random.default_rng(13).normal(1e7, 0.1, 400)
    r = await client.post(
        "/v1/fits/gaussian", json={"y": y.tolist(), "optimizer": "newton", "confidence": 0.9}
    )
    assert r.status_code == 200, r.text
    inference = r.json()["stats"]["inference"]
    assert inference["method"] == "normal" and inference["dof"] is None
    mean, std, n = float(np.mean(y)), float(np.std(y)), y.size
    params = np.array([mean, std])
    bse = np.array([std / math.sqrt(n), std / math.sqrt(2 * n)])
    z = params / bse
    q = stats.norm.ppf(0.95)
    intervals = np.stack([params - q * bse, params + q * bse], axis=1)
    # The fitted mean of 1e7 agrees to ~1e-15 relatively; its z to what that leaves.
    _check_table(
        inference, ["mean", "std"], params, bse, z, 2 * stats.norm.sf(np.abs(z)), intervals, 1e-7
    )


#: The models of the expression cases, written out for scipy.
FUNCTIONS: dict[str, Any] = {
    "Misra1a": lambda x, b1, b2: b1 * (1 - np.exp(-b2 * x)),
    "Kirby2": lambda x, b1, b2, b3, b4, b5: (b1 + b2 * x + b3 * x**2) / (1 + b4 * x + b5 * x**2),
    "exponential decay": lambda x, a, k, c: a * np.exp(-k * x) + c,
}


@pytest.mark.parametrize("name", list(FUNCTIONS))
async def test_expression_table_is_curve_fit_with_students_t(
    client: httpx.AsyncClient, name: str
) -> None:
    if name == "exponential decay":
        rng = np.random.default_rng(14)
        x = np.linspace(0.0, 5000.0, 80)
        y = 1200.0 * np.exp(-6e-4 * x) + 35.0 + rng.normal(0.0, 4.0, x.size)
        expression, start = "a*exp(-k*x) + c", {"a": 1000.0, "k": 1e-3, "c": 0.0}
    else:
        problem = nist.load(name)
        x, y = problem.x["x"], problem.y
        expression, start = problem.expression, dict(problem.starts[1])
    r = await client.post(
        "/v1/fits/expression",
        json={"expression": expression, "parameters": start, "x": x.tolist(), "y": y.tolist()},
    )
    assert r.status_code == 200, r.text
    answer = r.json()
    names = list(start)
    inference = answer["stats"]["inference"]
    dof = x.size - len(names)
    assert inference["method"] == "t" and inference["dof"] == dof
    fitted = np.array([answer["params"][n] for n in names])
    f = FUNCTIONS[name]
    popt, pcov = optimize.curve_fit(f, x, y, p0=fitted, xtol=1e-15, ftol=1e-15, gtol=1e-15)
    bse = np.sqrt(np.diag(pcov))
    t = popt / bse
    q = stats.t.ppf(0.975, dof)
    intervals = np.stack([popt - q * bse, popt + q * bse], axis=1)
    p = 2 * stats.t.sf(np.abs(t), dof)
    # curve_fit's covariance is finite-difference-free here (its Jacobian is by differences:
    # ~1e-7 relative), so the table agrees to what curve_fit's own pcov carries.
    _check_table(inference, names, popt, bse, t, p, intervals, rtol=1e-6)


async def test_tiny_p_values_are_exact_and_huge_estimates_finite(
    client: httpx.AsyncClient,
) -> None:
    """A line fitted to nearly exact data has t near 1e9: its p-value underflows toward 0
    and is written as a number (Student's t tail, not NaN), equal to scipy's to its
    precision; an intercept of 1e12 keeps a finite interval."""
    rng = np.random.default_rng(15)
    x = np.linspace(0.0, 1.0, 6)
    y = 1e12 + 2.0 * x + rng.normal(0.0, 1e-3, x.size)
    r = await client.post(
        "/v1/fits/linear", json={"x": x.tolist(), "y": y.tolist(), "optimizer": "newton"}
    )
    assert r.status_code == 200, r.text
    assert b"NaN" not in r.content and b"Infinity" not in r.content
    rows = r.json()["stats"]["inference"]["parameters"]
    ols = sm.OLS(y, sm.add_constant(x)).fit()
    for name, i in (("slope", 1), ("intercept", 0)):
        row = rows[name]
        expected = 2 * stats.t.sf(abs(row["statistic"]), 4)
        assert row["p_value"] == pytest.approx(expected, rel=1e-6, abs=0.0), name
        assert row["lower"] < ols.params[i] < row["upper"]
    assert 0.0 <= rows["intercept"]["p_value"] < 1e-40
    assert rows["intercept"]["lower"] == pytest.approx(ols.conf_int()[0][0], rel=1e-12)


async def test_degenerate_fits_have_null_intervals_and_say_why(
    client: httpx.AsyncClient,
) -> None:
    # Two points, two parameters: no residual degrees of freedom.
    r = await client.post(
        "/v1/fits/linear", json={"x": [1.0, 2.0], "y": [3.0, 5.0], "optimizer": "newton"}
    )
    assert r.status_code == 200, r.text
    answer = r.json()
    assert any("no residual degrees of freedom" in w for w in answer["warnings"])
    for row in answer["stats"]["inference"]["parameters"].values():
        assert row["std_error"] is row["lower"] is row["upper"] is row["p_value"] is None
        assert row["estimate"] is not None
    # A parameter the data cannot determine (a·b only): a singular Jacobian.
    x = np.linspace(1.0, 10.0, 12)
    r = await client.post(
        "/v1/fits/expression",
        json={
            "expression": "a*b*x",
            "parameters": {"a": 1.0, "b": 1.0},
            "x": x.tolist(),
            "y": (3.0 * x + np.sin(x)).tolist(),
        },
    )
    assert r.status_code == 200, r.text
    answer = r.json()
    assert any("covariance is undefined" in w for w in answer["warnings"])
    for row in answer["stats"]["inference"]["parameters"].values():
        assert row["lower"] is None and row["upper"] is None


async def test_confidence_is_validated(client: httpx.AsyncClient) -> None:
    for bad in (0.0, 1.0, 1.5, -0.1, "0.9"):
        r = await client.post(
            "/v1/fits/linear", json={"x": [1.0, 2.0, 3.0], "y": [1.0, 2.0, 4.0], "confidence": bad}
        )
        assert r.status_code == 422, r.text[:300]
        assert r.json()["detail"][0]["loc"][-1] == "confidence"


# -- sigma and absolute_sigma -------------------------------------------------------------------


def _noisy_line() -> tuple[Array, Array, Array]:
    rng = np.random.default_rng(16)
    x = rng.uniform(1000.0, 4000.0, 40)
    sigma = rng.uniform(0.2, 2.0, x.size)
    return x, 0.01 * x - 3.0 + rng.normal(0.0, 1.3 * sigma), sigma


@pytest.mark.parametrize("absolute", [False, True])
async def test_linear_sigma_is_statsmodels_wls(client: httpx.AsyncClient, absolute: bool) -> None:
    """sigma is weights = 1/sigma²; with absolute_sigma the covariance is not rescaled and the
    table uses the normal distribution: statsmodels' WLS with a fixed scale of 1."""
    x, y, sigma = _noisy_line()
    body = {"x": x.tolist(), "y": y.tolist(), "sigma": sigma.tolist(), "optimizer": "newton"}
    r = await client.post("/v1/fits/linear", json=body | {"absolute_sigma": absolute})
    assert r.status_code == 200, r.text
    stats_ = r.json()["stats"]
    model = sm.WLS(y, sm.add_constant(x), weights=1.0 / sigma**2)
    wls = model.fit(cov_type="fixed scale") if absolute else model.fit()
    inference = stats_["inference"]
    assert inference["method"] == ("normal" if absolute else "t")
    assert inference["dof"] == (None if absolute else x.size - 2)
    _check_line(inference, wls)
    chi2 = float(np.sum(((y - wls.fittedvalues) / sigma) ** 2))
    if absolute:
        assert stats_["chi2"] == pytest.approx(chi2, rel=1e-8)
        assert stats_["chi2_p_value"] == pytest.approx(stats.chi2.sf(chi2, x.size - 2), rel=1e-8)
    else:
        assert stats_["chi2"] is None and stats_["chi2_p_value"] is None


@pytest.mark.parametrize("absolute", [False, True])
@pytest.mark.parametrize("name", list(FUNCTIONS))
async def test_expression_sigma_is_curve_fit(
    client: httpx.AsyncClient, name: str, absolute: bool
) -> None:
    """The covariance with sigma, with and without absolute_sigma, is curve_fit's pcov with
    the same sigma and absolute_sigma (1e-6: curve_fit's Jacobian is by differences)."""
    rng = np.random.default_rng(17)
    if name == "exponential decay":
        x = np.linspace(0.0, 5000.0, 60)
        truth = 1200.0 * np.exp(-6e-4 * x) + 35.0
        expression, start = "a*exp(-k*x) + c", {"a": 1000.0, "k": 1e-3, "c": 0.0}
    else:
        problem = nist.load(name)
        x, truth = problem.x["x"], problem.y
        expression, start = problem.expression, dict(problem.starts[1])
    sigma = np.abs(truth) * 0.01 + 0.05 * rng.random(x.size) + 1e-3
    y = truth + rng.normal(0.0, 0.5 * sigma)
    body = {
        "expression": expression,
        "parameters": start,
        "x": x.tolist(),
        "y": y.tolist(),
        "sigma": sigma.tolist(),
        "absolute_sigma": absolute,
    }
    r = await client.post("/v1/fits/expression", json=body)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["converged"], answer["warnings"]
    names = list(start)
    fitted = [answer["params"][n] for n in names]
    popt, pcov = optimize.curve_fit(
        FUNCTIONS[name], x, y, p0=fitted, sigma=sigma, absolute_sigma=absolute,
        xtol=1e-15, ftol=1e-15, gtol=1e-15,
    )  # fmt: skip
    assert fitted == pytest.approx(popt, rel=1e-7)
    assert np.array(answer["stats"]["covariance"]) == pytest.approx(pcov, rel=1e-6)
    inference = answer["stats"]["inference"]
    assert inference["method"] == ("normal" if absolute else "t")
    chi2 = float(np.sum(((y - FUNCTIONS[name](x, *popt)) / sigma) ** 2))
    if absolute:
        assert answer["stats"]["chi2"] == pytest.approx(chi2, rel=1e-8)
        p = stats.chi2.sf(chi2, x.size - len(names))
        assert answer["stats"]["chi2_p_value"] == pytest.approx(p, rel=1e-6)
    # The same fit as weights = 1/sigma².
    weighted = body | {"weights": (1.0 / sigma**2).tolist()}
    del weighted["sigma"]
    again = await client.post("/v1/fits/expression", json=weighted)
    assert again.json()["params"] == answer["params"]
    assert again.json()["stats"]["covariance"] == answer["stats"]["covariance"]


async def test_expression_batch_entries_take_sigma(client: httpx.AsyncClient) -> None:
    rng = np.random.default_rng(18)
    x = np.linspace(0.0, 3000.0, 30)
    sets = []
    for a in (800.0, 1500.0):
        sigma = 2.0 + rng.random(x.size)
        y = a * np.exp(-1e-3 * x) + 20.0 + rng.normal(0.0, sigma)
        sets.append({"x": x.tolist(), "y": y.tolist(), "sigma": sigma.tolist()})
    shared = {"expression": "a*exp(-k*x) + c", "parameters": {"a": 1000.0, "k": 2e-3, "c": 0.0}}
    r = await client.post(
        "/v1/fits/expression/batch", json=shared | {"datasets": sets, "absolute_sigma": True}
    )
    assert r.status_code == 200, r.text
    for entry, one in zip(r.json()["results"], sets, strict=True):
        single = await client.post(
            "/v1/fits/expression", json=shared | one | {"absolute_sigma": True}
        )
        want, got = single.json()["stats"], entry["result"]["stats"]
        assert got["inference"]["method"] == "normal"
        assert np.array(got["covariance"]) == pytest.approx(np.array(want["covariance"]), rel=1e-6)
        assert got["chi2"] == pytest.approx(want["chi2"], rel=1e-9)


@pytest.mark.parametrize(
    ("change", "field", "kind"),
    [
        ({"weights": [1.0] * 5}, "sigma", "sigma_and_weights"),
        ({"sigma": [1.0] * 4}, "sigma", "length_mismatch"),
        ({"sigma": [1.0, 1.0, 0.0, 1.0, 1.0]}, 2, "greater_than"),
        ({"sigma": [1.0, 1.0, 1e-200, 1.0, 1.0]}, "sigma", "sigma_range"),
        ({"sigma": [1.0, 1.0, "1", 1.0, 1.0]}, 2, "float_type"),
        ({"absolute_sigma": "yes"}, "absolute_sigma", "bool_type"),
    ],
)
@pytest.mark.parametrize("path", ["/v1/fits/linear", "/v1/fits/expression"])
async def test_bad_sigma_is_a_422_naming_it(
    client: httpx.AsyncClient, path: str, change: dict[str, Any], field: str | int, kind: str
) -> None:
    body: dict[str, Any] = {"x": [1.0, 2.0, 3.0, 4.0, 5.0], "y": [1.0, 2.1, 2.9, 4.2, 5.0]}
    if path.endswith("expression"):
        body |= {"expression": "a*x + b", "parameters": {"a": 1.0, "b": 0.0}}
    if "weights" in change:
        change = change | {"sigma": [1.0] * 5}
    r = await client.post(path, json=body | change)
    assert r.status_code == 422, r.text[:300]
    error = r.json()["detail"][0]
    assert error["loc"][-1] == field and error["type"] == kind, error


# -- the fit report -----------------------------------------------------------------------------


def _reported_numbers(text: str) -> dict[str, str]:
    """The report's 'name: value' lines, by name (a parameter's rows as 'parameter.column')."""
    out, parameter = {}, None
    for line in text.splitlines():
        if line.endswith(":") and not line.startswith(" "):
            parameter = line[:-1]
        elif ":" in line and not line.startswith(("=", "-", "[")):
            name, _, value = line.strip().partition(":")
            key = f"{parameter}.{name}" if line.startswith("    ") and parameter else name
            out[key] = value.strip().split("  ")[0]
    return out


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/fits/linear", {"x": [1000.0, 2000.0, 3000.0, 4000.0], "y": [2.1, 3.9, 6.2, 7.8]}),
        ("/v1/fits/gaussian", {"y": [1e7 + 0.1, 1e7 - 0.05, 1e7 + 0.02, 1e7 - 0.11]}),
        (
            "/v1/fits/expression",
            {
                "expression": "a*exp(-k*x)",
                "parameters": {"a": 10.0, "k": 0.1},
                "x": [0.0, 1.0, 2.0, 4.0, 8.0],
                "y": [10.2, 8.9, 8.1, 6.6, 4.6],
                "intervals": "profile",
            },
        ),
    ],
)
async def test_the_report_prints_the_json_numbers_exactly(
    client: httpx.AsyncClient, path: str, body: dict[str, Any]
) -> None:
    body = body | ({"optimizer": "newton"} if "expression" not in body else {})
    as_json = await client.post(path, json=body)
    as_text = await client.post(path, json=body, headers={"accept": "text/plain"})
    assert as_text.status_code == 200 and as_text.headers["content-type"].startswith("text/plain")
    answer, numbers = as_json.json(), _reported_numbers(as_text.text)
    inference = answer["stats"]["inference"]
    for name, row in inference["parameters"].items():
        for column in ("estimate", "std_error", "statistic", "p_value", "lower", "upper"):
            value = row[column]
            text = numbers[f"{name}.{column}"]
            assert text == ("null" if value is None else repr(value)), (name, column)
            if value is not None:
                assert float(text) == value  # the same float64, digit for digit
    assert numbers["AIC"] == repr(answer["stats"]["aic"])
    assert numbers["residual dof"] == str(answer["stats"]["dof"])


async def test_a_p_value_near_1e_300_is_printed_exactly(client: httpx.AsyncClient) -> None:
    """2,000 points and a slope ~44 standard errors from 0: Student's t tail at 1,998 degrees
    of freedom is ~1e-300, written as a number (not 0, not NaN), equal to scipy's tail at
    the answer's own statistic, and to statsmodels' within what t's digits carry."""
    rng = np.random.default_rng(19)
    x = rng.random(2000)
    y = 1.0 + 3.4 * x + rng.normal(0.0, 1.0, x.size)
    r = await client.post(
        "/v1/fits/linear", json={"x": x.tolist(), "y": y.tolist(), "optimizer": "newton"}
    )
    assert r.status_code == 200, r.text[:300]
    row = r.json()["stats"]["inference"]["parameters"]["slope"]
    assert 1e-320 < row["p_value"] < 1e-270
    assert row["p_value"] == pytest.approx(2 * stats.t.sf(row["statistic"], 1998), rel=1e-9)
    ols = sm.OLS(y, sm.add_constant(x)).fit()
    assert row["statistic"] == pytest.approx(ols.tvalues[1], rel=1e-9)
    # d(log p)/d(log t) ~ t² here: a 1e-9 relative difference in t moves p by ~2e-6.
    assert row["p_value"] == pytest.approx(ols.pvalues[1], rel=1e-5)
