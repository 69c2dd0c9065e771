"""POST /v1/fits/compare against statsmodels: nested polynomials fitted by OLS (and WLS),
their AIC turned into AICc and Akaike weights by hand, and statsmodels' compare_f_test."""

from __future__ import annotations

import math
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import pytest
import statsmodels.api as sm

from tests.conftest import module_scoped

Array = npt.NDArray[np.float64]
pytestmark = pytest.mark.anyio
anyio_backend, client = module_scoped()
PATH = "/v1/fits/compare"

QUADRATIC = {"expression": "a + b*x + c*x**2", "parameters": {"a": 0.0, "b": 0.0, "c": 0.0}}
CUBIC = {
    "expression": "a + b*x + c*x**2 + d*x**3",
    "parameters": {"a": 0.0, "b": 0.0, "c": 0.0, "d": 0.0},
}


def _aicc(result: Any) -> float:
    k, n = len(result.params), result.nobs
    return float(result.aic + 2.0 * k * (k + 1) / (n - k - 1))


@pytest.mark.parametrize("weighted", [False, True])
async def test_nested_polynomials_match_statsmodels(
    client: httpx.AsyncClient, weighted: bool
) -> None:
    rng = np.random.default_rng(31)
    x = np.linspace(-5.0, 15.0, 40)
    sigma = rng.uniform(0.5, 2.0, x.size) if weighted else np.ones(x.size)
    y = 3.0 - 0.7 * x + 0.05 * x**2 + rng.normal(0.0, sigma)
    body: dict[str, Any] = {
        "x": x.tolist(),
        "y": y.tolist(),
        "models": [QUADRATIC, {"model": "linear"}, CUBIC],
        "nested": [[1, 0], [0, 2], [1, 2]],
    }
    if weighted:
        body["sigma"] = sigma.tolist()
    r = await client.post(PATH, json=body)
    assert r.status_code == 200, r.text[:400]
    answer = r.json()
    w = 1.0 / sigma**2
    design = [np.vander(x, k, increasing=True) for k in (3, 2, 4)]
    ols = [sm.WLS(y, d, weights=w).fit() for d in design]
    # Each fit is the model's own answer, at the least-squares optimum.
    for fit, reference in zip(answer["fits"], ols, strict=True):
        assert list(fit["params"].values())[:: -1 if fit["model"] == "linear" else 1] == (
            pytest.approx(reference.params, rel=1e-7, abs=1e-9)
        )
    aicc = [_aicc(o) for o in ols]
    best = min(aicc)
    raw = [math.exp(-0.5 * (a - best)) for a in aicc]
    weights = [v / sum(raw) for v in raw]
    ranking = answer["ranking"]
    assert [entry["index"] for entry in ranking] == sorted(range(3), key=lambda i: aicc[i])
    for entry in ranking:
        i = entry["index"]
        assert entry["aicc"] == pytest.approx(aicc[i], rel=1e-8)
        assert entry["bic"] == pytest.approx(ols[i].bic, rel=1e-8)
        assert entry["delta_aicc"] == pytest.approx(aicc[i] - best, rel=1e-6, abs=1e-8)
        assert entry["akaike_weight"] == pytest.approx(weights[i], rel=1e-6)
    assert sum(e["akaike_weight"] for e in ranking) == pytest.approx(1.0, rel=1e-12)
    for test, (restricted, full) in zip(answer["f_tests"], body["nested"], strict=True):
        f, p, _ = ols[full].compare_f_test(ols[restricted])
        assert (test["restricted"], test["full"]) == (restricted, full)
        assert test["f"] == pytest.approx(f, rel=1e-6)
        assert test["p_value"] == pytest.approx(p, rel=1e-6, abs=1e-300)
    # The true model is the quadratic: the line is rejected, the cubic's extra term is not.
    assert answer["f_tests"][0]["p_value"] < 1e-6 and answer["f_tests"][1]["p_value"] > 0.01


@pytest.mark.parametrize(
    ("change", "loc"),
    [
        ({"models": []}, ["body", "models"]),
        ({"nested": [[0, 5]]}, ["body", "nested", 0]),
        ({"nested": [[0, 1]]}, ["body", "nested", 0]),  # the cubic is not inside the line
        ({"models": [{"model": "linear", "parameters": {"a": 1.0}}]}, ["body", "models", 0]),
        ({"models": [{"expression": "a*x", "parameters": {"b": 1.0}}]}, ["body", "models", 0]),
        ({"models": [{"model": "nope"}]}, ["body", "models", 0]),
        ({"sigma": [1.0], "weights": [1.0]}, ["body", "sigma"]),
    ],
)
async def test_compare_errors_name_the_field(
    client: httpx.AsyncClient, change: dict[str, Any], loc: list[Any]
) -> None:
    body = {
        "x": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
        "y": [1.0, 4.2, 8.9, 16.1, 25.2, 35.8],
        "models": [CUBIC, {"model": "linear"}],
    }
    r = await client.post(PATH, json=body | change)
    assert r.status_code == 422, r.text[:400]
    assert r.json()["detail"][0]["loc"][: len(loc)] == loc, r.json()


async def test_a_model_that_cannot_be_fitted_is_named(client: httpx.AsyncClient) -> None:
    body = {
        "x": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
        "y": [1.0, 4.2, 8.9, 16.1, 25.2, 35.8],
        "models": [{"model": "linear"}, {"expression": "exp(a*x)", "parameters": {"a": 900.0}}],
    }
    r = await client.post(PATH, json=body)
    assert r.status_code == 422, r.text[:400]
    assert r.json()["detail"][0]["loc"] == ["body", "models", 1]
