"""Bands and prediction at new x (``predict`` in a fit, ``POST /v1/evaluate``), over HTTP,
against references computed outside this codebase: statsmodels' ``get_prediction()
.summary_frame()`` for lines (OLS and WLS), lmfit's ``eval_uncertainty`` for nonlinear models
(the band of the mean), and scipy's normal density. At real callers' scales: x in the
thousands, NIST's Norris and Misra1a."""

from __future__ import annotations

import math
from typing import Any

import httpx
import lmfit
import numpy as np
import numpy.typing as npt
import pytest
import statsmodels.api as sm
from scipy import stats

from tests import nist
from tests.conftest import module_scoped
from tests.test_accuracy import norris

Array = npt.NDArray[np.float64]
pytestmark = pytest.mark.anyio
anyio_backend, client = module_scoped()
RTOL = 1e-8


def _line_cases() -> dict[str, tuple[Array, Array, Array | None, Array]]:
    rng = np.random.default_rng(21)
    x_n, y_n = norris()
    x_k = rng.uniform(1000.0, 5000.0, 50)
    y_k = 0.02 * x_k + 41.0 + rng.normal(0.0, 3.0, x_k.size)
    sigma = rng.uniform(0.5, 4.0, x_k.size)
    y_w = 0.02 * x_k + 41.0 + rng.normal(0.0, sigma)
    new_k = np.array([0.0, 999.5, 2500.0, 7000.0])
    return {
        "norris": (x_n, y_n, None, np.array([0.0, 150.0, 500.0, 1000.0])),
        "thousands": (x_k, y_k, None, new_k),
        "weighted": (x_k, y_w, 1.0 / sigma**2, new_k),
    }


@pytest.mark.parametrize("case", ["norris", "thousands", "weighted"])
@pytest.mark.parametrize("confidence", [0.95, 0.9])
async def test_line_bands_are_statsmodels_summary_frame(
    client: httpx.AsyncClient, case: str, confidence: float
) -> None:
    x, y, w, new = _line_cases()[case]
    body: dict[str, Any] = {
        "x": x.tolist(),
        "y": y.tolist(),
        "optimizer": "newton",
        "confidence": confidence,
        "predict": {"x": new.tolist()},
    }
    if w is not None:
        body["weights"] = w.tolist()
    r = await client.post("/v1/fits/linear", json=body)
    assert r.status_code == 200, r.text[:300]
    got = r.json()["prediction"]
    assert got["x"] == new.tolist()
    model = (
        sm.WLS(y, sm.add_constant(x), weights=w) if w is not None else sm.OLS(y, sm.add_constant(x))
    )
    frame = model.fit().get_prediction(sm.add_constant(new)).summary_frame(alpha=1 - confidence)
    for ours, theirs in (
        ("y", "mean"),
        ("mean_lower", "mean_ci_lower"),
        ("mean_upper", "mean_ci_upper"),
        ("obs_lower", "obs_ci_lower"),
        ("obs_upper", "obs_ci_upper"),
    ):
        assert got[ours] == pytest.approx(frame[theirs].to_numpy(), rel=RTOL), ours


DECAY = "a*exp(-k*x) + c"


def _decay() -> tuple[Array, Array]:
    rng = np.random.default_rng(22)
    x = np.linspace(0.0, 6000.0, 70)
    return x, 1500.0 * np.exp(-5e-4 * x) + 80.0 + rng.normal(0.0, 10.0, x.size)


@pytest.mark.parametrize("name", ["decay", "Misra1a"])
async def test_nonlinear_band_is_lmfit_eval_uncertainty(
    client: httpx.AsyncClient, name: str
) -> None:
    """lmfit's band of the mean (its Jacobian by central differences, hence 1e-6), and the
    prediction band from the same quantile with the residual variance added."""
    if name == "decay":
        x, y = _decay()
        expression, start = DECAY, {"a": 1000.0, "k": 1e-3, "c": 0.0}
        model = lmfit.Model(lambda x, a, k, c: a * np.exp(-k * x) + c)
    else:
        problem = nist.load("Misra1a")
        x, y = problem.x["x"], problem.y
        expression, start = problem.expression, dict(problem.starts[1])
        model = lmfit.Model(lambda x, b1, b2: b1 * (1 - np.exp(-b2 * x)))
    new = np.linspace(x.min(), 1.5 * x.max(), 9)
    sigma = 2.0  # lmfit's band is ±sigma standard errors, as a t-quantile at that probability
    confidence = math.erf(sigma / math.sqrt(2.0))
    r = await client.post(
        "/v1/fits/expression",
        json={
            "expression": expression,
            "parameters": start,
            "x": x.tolist(),
            "y": y.tolist(),
            "confidence": confidence,
            "predict": {"x": new.tolist()},
        },
    )
    assert r.status_code == 200, r.text[:300]
    answer = r.json()
    fitted = model.fit(y, x=x, **answer["params"], fit_kws={"xtol": 1e-15, "ftol": 1e-15})
    # lmfit's own covariance comes from leastsq's Jacobian by differences (~5e-5 off the exact
    # one here; our covariance is curve_fit's to 1e-7, tests/test_inference.py): the band's
    # reference is lmfit's Jacobian and quantile on our covariance.
    fitted.covar = np.array(answer["stats"]["covariance"])
    band = fitted.eval_uncertainty(x=new, sigma=sigma, dscale=1e-4)
    got = answer["prediction"]
    values = np.array(got["y"])
    assert values == pytest.approx(fitted.eval(x=new), rel=1e-9)
    assert np.array(got["mean_upper"]) - values == pytest.approx(band, rel=1e-6)
    assert values - np.array(got["mean_lower"]) == pytest.approx(band, rel=1e-6)
    dof = x.size - len(start)
    q = stats.t.ppf(0.5 + confidence / 2, dof)
    s2 = answer["stats"]["residual_std"] ** 2
    expected = np.sqrt((band / q) ** 2 + s2) * q
    assert np.array(got["obs_upper"]) - values == pytest.approx(expected, rel=1e-6)


async def test_gaussian_predicts_its_density(client: httpx.AsyncClient) -> None:
    y = np.random.default_rng(23).normal(1e7, 0.1, 300)
    new = np.array([1e7 - 0.2, 1e7, 1e7 + 0.05])
    r = await client.post(
        "/v1/fits/gaussian",
        json={"y": y.tolist(), "optimizer": "newton", "predict": {"x": new.tolist()}},
    )
    assert r.status_code == 200, r.text[:300]
    answer = r.json()
    got = answer["prediction"]
    mean, std = answer["params"]["mean"], answer["params"]["std"]
    assert got["y"] == pytest.approx(stats.norm.pdf(new, mean, std), rel=1e-9)
    # The band of the density by the delta method, its gradient by central differences
    # (1e-6), taken on the offsets from 1e7 (exact), where a step of 1e-4 standard errors
    # is not lost to rounding.
    cov = np.array(answer["stats"]["covariance"])
    h = np.sqrt(np.diag(cov)) * 1e-4
    offset = (new - 1e7) - (mean - 1e7)

    def density(shift: float, s: float) -> Array:
        return np.asarray(stats.norm.pdf((offset - shift) / s) / s)

    grad = np.stack(
        [
            (density(h[0], std) - density(-h[0], std)) / (2 * h[0]),
            (density(0.0, std + h[1]) - density(0.0, std - h[1])) / (2 * h[1]),
        ],
        axis=-1,
    )
    half = stats.norm.ppf(0.975) * np.sqrt(np.einsum("mi,ij,mj->m", grad, cov, grad))
    assert np.array(got["mean_upper"]) - np.array(got["y"]) == pytest.approx(half, rel=1e-6)
    assert got["obs_lower"] == got["obs_upper"] == [None] * 3


async def test_predict_with_several_variables_and_its_errors(client: httpx.AsyncClient) -> None:
    rng = np.random.default_rng(24)
    x1, x2 = rng.uniform(0, 10, 30), rng.uniform(100, 200, 30)
    y = 3.0 * x1 + 0.5 * x2 + rng.normal(0, 0.1, 30)
    body = {
        "expression": "a*x1 + b*x2",
        "parameters": {"a": 1.0, "b": 1.0},
        "x": {"x1": x1.tolist(), "x2": x2.tolist()},
        "y": y.tolist(),
    }
    new = {"x1": [1.0, 2.0], "x2": [150.0, 160.0]}
    r = await client.post("/v1/fits/expression", json=body | {"predict": {"x": new}})
    assert r.status_code == 200, r.text[:300]
    got = r.json()
    assert got["prediction"]["x"] == new
    p = got["params"]
    assert got["prediction"]["y"] == pytest.approx(
        [p["a"] * 1.0 + p["b"] * 150.0, p["a"] * 2.0 + p["b"] * 160.0], rel=1e-12
    )
    ols = sm.OLS(y, np.stack([x1, x2], axis=1)).fit()
    frame = ols.get_prediction(np.array([[1.0, 150.0], [2.0, 160.0]])).summary_frame()
    assert got["prediction"]["obs_upper"] == pytest.approx(frame["obs_ci_upper"], rel=1e-8)
    for bad, loc in (
        ({"x": [1.0, 2.0]}, ["body", "predict", "x"]),
        ({"x": {"x2": [1.0], "x1": [1.0]}}, ["body", "predict", "x"]),
        ({"x": {"x1": [1.0], "x2": [1.0, 2.0]}}, ["body", "predict", "x"]),
        ({"x": []}, ["body", "predict", "x", "list[constrained-float]"]),
    ):
        r = await client.post("/v1/fits/expression", json=body | {"predict": bad})
        assert r.status_code == 422, r.text[:300]
        assert r.json()["detail"][0]["loc"][:3] == loc[:3], r.json()
    r = await client.post("/v1/fits/expression", json=body)
    assert r.json()["prediction"] is None


# -- POST /v1/evaluate ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["expression", "named", "linear", "gaussian"])
async def test_evaluate_answers_what_predict_answered(client: httpx.AsyncClient, kind: str) -> None:
    """A stored fit's numbers, sent to /v1/evaluate (with the parameters in another order),
    give back the fit's own prediction, without refitting."""
    x, y = _decay()
    new = [0.0, 1234.5, 9000.0]
    if kind == "linear":
        path, body = "/v1/fits/linear", {"x": x.tolist(), "y": y.tolist(), "optimizer": "newton"}
        model: dict[str, Any] = {"model": "linear"}
    elif kind == "gaussian":
        path, body = "/v1/fits/gaussian", {"y": y.tolist(), "optimizer": "newton"}
        model = {"model": "gaussian"}
        new = [100.0, 400.0]
    elif kind == "named":
        path = "/v1/fits/expression"
        body = {"model": "exponential_decay", "x": x.tolist(), "y": y.tolist()}
        model = {"model": "exponential_decay"}
    else:
        path = "/v1/fits/expression"
        start = {"a": 1000.0, "k": 1e-3, "c": 0.0}
        body = {"expression": DECAY, "parameters": start, "x": x.tolist(), "y": y.tolist()}
        model = {"expression": DECAY}
    fit = await client.post(path, json=body | {"predict": {"x": new}, "confidence": 0.9})
    assert fit.status_code == 200, fit.text[:300]
    answer = fit.json()
    order = list(answer["stats"]["parameters"])[::-1]  # the covariance reordered to match
    at = [answer["stats"]["parameters"].index(name) for name in order]
    covariance = np.array(answer["stats"]["covariance"])[np.ix_(at, at)].tolist()
    residual_std = answer["stats"].get("residual_std")
    request = model | {
        "params": {name: answer["params"][name] for name in order},
        "parameters": order,
        "covariance": covariance,
        "residual_variance": None if residual_std is None else residual_std**2,
        "dof": None if kind == "gaussian" else answer["stats"]["dof"],
        "x": new,
        "confidence": 0.9,
    }
    r = await client.post("/v1/evaluate", json=request)
    assert r.status_code == 200, r.text[:300]
    got = r.json()
    assert got["parameters"] == order
    want = answer["prediction"]
    for field in ("y", "mean_lower", "mean_upper", "obs_lower", "obs_upper"):
        if want[field][0] is None:
            assert got["prediction"][field] == want[field]
        else:
            assert got["prediction"][field] == pytest.approx(want[field], rel=1e-12), field
    # Without a covariance, only the values.
    bare = {k: v for k, v in request.items() if k not in ("covariance", "parameters")}
    r = await client.post("/v1/evaluate", json=bare)
    assert r.status_code == 200, r.text[:300]
    assert r.json()["prediction"]["y"] == pytest.approx(want["y"], rel=1e-12)
    assert r.json()["prediction"]["mean_lower"] == [None] * len(new)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"model": "linear"}, "expression"),  # both
        ({"expression": None}, "expression"),  # neither
        ({"params": {"a": 1.0}}, "params"),
        ({"params": {"a": 1.0, "k": 1.0, "c": 1.0, "z": 1.0}}, "params"),
        ({"parameters": ["a", "k"]}, "parameters"),
        ({"covariance": [[1.0, 0.0], [0.0, 1.0]]}, "covariance"),
        ({"covariance": [[1.0, 0.0], [0.0]]}, "covariance"),
        ({"expression": "a*exp(-k*x) + c + x.real"}, "expression"),
        ({"expression": "a*exp(-k*x) + c + __import__"}, "params"),  # an unknown name
        ({"x": []}, "x"),
        ({"x": {"t": [1.0]}}, "params"),  # x is then an unknown name
        ({"dof": 0}, "dof"),
        ({"residual_variance": -1.0}, "residual_variance"),
        ({"confidence": 1.0}, "confidence"),
        ({"expression": None, "model": "{nope}"}, "model"),
    ],
)
async def test_evaluate_errors_name_the_field(
    client: httpx.AsyncClient, change: dict[str, Any], field: str
) -> None:
    body = {"expression": DECAY, "params": {"a": 1.0, "k": 1e-3, "c": 0.0}, "x": [1.0, 2.0]}
    body = {k: v for k, v in (body | change).items() if v is not None}
    r = await client.post("/v1/evaluate", json=body)
    assert r.status_code == 422, r.text[:300]
    assert field in r.json()["detail"][0]["loc"], r.json()


async def test_predict_names_a_variable(client: httpx.AsyncClient) -> None:
    """An x naming no variable, or a built-in model's x given as other variables, is a 422
    naming predict (found by schemathesis: an empty object of predictors was a 500)."""
    line = {"x": [1.0, 2.0, 3.0], "y": [1.0, 2.0, 4.0]}
    for path, body in (("/v1/fits/linear", line), ("/v1/fits/gaussian", {"y": line["y"]})):
        bads: tuple[dict[str, Any], ...] = ({"x": {}}, {"x": {"t": [1.0]}})
        for bad in bads:
            r = await client.post(path, json=body | {"predict": bad})
            assert r.status_code == 422, r.text[:300]
            assert r.json()["detail"][0]["loc"][:2] == ["body", "predict"]
    expression = {"expression": "a*x", "parameters": {"a": 1.0}} | line
    r = await client.post("/v1/fits/expression", json=expression | {"predict": {"x": {}}})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][:2] == ["body", "predict"]
    r = await client.post("/v1/evaluate", json={"model": "linear", "params": {}, "x": {}})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][:2] == ["body", "x"]
