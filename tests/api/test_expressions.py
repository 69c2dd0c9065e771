"""POST /v1/fits/expression and GET /v1/models: any model, certified on NIST StRD.

The NIST test sends NIST's own model text (brackets as parentheses, arctan as atan) from
both of NIST's starting points with every option at its default, and scores every
parameter and standard error in correct significant digits (LRE) against the certified
values."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import httpx
import numpy as np
import pytest
from scipy.optimize import curve_fit

from service.fitting.expression import parse
from tests import nist
from tests.optimum import assert_same_optimum, resolution_se

pytestmark = pytest.mark.anyio
FIT = "/v1/fits/expression"


def _body(problem: nist.Problem, start: dict[str, float]) -> dict[str, Any]:
    x = nist.json_x(problem)
    return {"expression": problem.expression, "parameters": start, "x": x, "y": problem.y.tolist()}


@pytest.mark.parametrize("start", [1, 2])
@pytest.mark.parametrize("name", nist.names())
async def test_nist_strd_nonlinear_certified_digits(
    client: httpx.AsyncClient, name: str, start: int
) -> None:
    problem = nist.load(name)
    r = await client.post(FIT, json=_body(problem, problem.starts[start - 1]))
    assert r.status_code == 200, r.text
    nist.check_certified(r.json(), problem)


def _scipy(f: Any, x: np.ndarray, y: np.ndarray, p0: list[float]) -> tuple[np.ndarray, np.ndarray]:
    popt, pcov = curve_fit(f, x, y, p0=p0, ftol=1e-15, xtol=1e-15, gtol=1e-15, maxfev=100_000)
    return popt, pcov


CASES: list[tuple[str, Any, list[float], float, float]] = [
    # named model, the same function for scipy, true parameters, x range (start, stop)
    ("exponential_decay", lambda x, a, k, c: a * np.exp(-k * x) + c, [5e3, 2e-3, 1e2], 0, 3e3),
    ("logistic", lambda x, L, k, x0: L / (1 + np.exp(-k * (x - x0))), [1e7, 0.8, 12.0], 0, 25),
    ("power_law", lambda x, a, b: a * x**b, [3e-4, 1.7], 10, 1e4),
    ("michaelis_menten", lambda x, vmax, km: vmax * x / (km + x), [2e-6, 3e3], 100, 2e4),
    (
        "gaussian_peak",
        lambda x, a, mu, sigma: a * np.exp(-((x - mu) ** 2) / (2 * sigma**2)),
        [40.0, 1.0e4, 12.0],
        9.9e3,
        1.01e4,
    ),
    (
        "lorentzian_peak",
        lambda x, a, x0, g: a * g**2 / ((x - x0) ** 2 + g**2),
        [0.02, -3.0, 0.4],
        -6,
        0,
    ),
    (
        "sinusoid",
        lambda x, a, f, phi, c: a * np.sin(2 * np.pi * f * x + phi) + c,
        [2.5, 0.13, 0.7, 1e3],
        0,
        60,
    ),
    (
        "polynomial3",
        lambda x, c0, c1, c2, c3: c0 + c1 * x + c2 * x**2 + c3 * x**3,
        [1.0, -2e-2, 3e-4, -1e-6],
        0,
        200,
    ),
]


@pytest.mark.parametrize(("model", "f", "truth", "low", "high"), CASES, ids=[c[0] for c in CASES])
async def test_named_models_guess_their_start_and_match_curve_fit(
    client: httpx.AsyncClient, model: str, f: Any, truth: list[float], low: float, high: float
) -> None:
    rng = np.random.default_rng(len(model))
    x = np.sort(rng.uniform(low, high, 80))
    clean = f(x, *truth)
    y = clean + rng.normal(0.0, 0.02 * float(np.std(clean)) + 1e-300, x.size)
    r = await client.post(FIT, json={"model": model, "x": x.tolist(), "y": y.tolist()})
    assert r.status_code == 200, r.text
    fit = r.json()
    assert fit["converged"], fit["warnings"]
    names = list(fit["params"])
    popt, pcov = _scipy(f, x, y, truth)  # scipy from the truth; ours from its own guess
    np.testing.assert_allclose([fit["params"][n] for n in names], popt, rtol=1e-6)
    ours = np.array(fit["stats"]["covariance"], dtype=float)
    np.testing.assert_allclose(np.sqrt(np.diag(ours)), np.sqrt(np.diag(pcov)), rtol=1e-5)
    scale = np.sqrt(np.outer(np.diag(pcov), np.diag(pcov)))
    # Correlations: scipy differentiates numerically (~1e-8), so its pcov is good to ~1e-5.
    np.testing.assert_allclose(ours / scale, pcov / scale, atol=2e-5)
    assert fit["named_model"] == model and fit["model"] == "expression"


async def test_an_expression_of_two_variables_matches_curve_fit(client: httpx.AsyncClient) -> None:
    rng = np.random.default_rng(3)
    x1, x2 = rng.uniform(1e3, 5e3, 60), rng.uniform(-1.0, 1.0, 60)

    def f(xs: Any, a: float, b: float, c: float) -> Any:
        return a * np.log(xs[0]) + b * np.tanh(c * xs[1])

    y = f((x1, x2), 2.0, 3.0, 1.5) + rng.normal(0.0, 0.05, 60)
    body = {
        "expression": "a*log(t) + b*tanh(c*u)",
        "parameters": {"a": 1.0, "b": 1.0, "c": 1.0},
        "x": {"t": x1.tolist(), "u": x2.tolist()},
        "y": y.tolist(),
    }
    r = await client.post(FIT, json=body)
    assert r.status_code == 200, r.text
    fit = r.json()
    popt, pcov = _scipy(f, np.vstack([x1, x2]), y, [1.0, 1.0, 1.0])
    np.testing.assert_allclose([fit["params"][n] for n in "abc"], popt, rtol=1e-7)
    np.testing.assert_allclose(np.array(fit["stats"]["covariance"], dtype=float), pcov, rtol=1e-5)
    residuals = y - f((x1, x2), *popt)
    assert fit["stats"]["rss"] == pytest.approx(float(residuals @ residuals), rel=1e-9)
    assert fit["final_loss"] == pytest.approx(float(residuals @ residuals) / 60, rel=1e-9)


@pytest.mark.parametrize(
    ("change", "loc", "kind"),
    [
        ({"expression": "b1*x.real"}, ["body", "expression"], "expression_not_allowed"),
        ({"expression": "b1*x[0]"}, ["body", "expression"], "expression_not_allowed"),
        (
            {"expression": "__import__('os').system('true')"},
            ["body", "expression"],
            "expression_not_allowed",
        ),
        ({"expression": "b1*y2"}, ["body", "expression"], "expression_unknown_name"),
        ({"expression": "b1 + " * 500 + "x"}, ["body", "expression"], "expression_too_long"),
        (
            {"expression": "exp(" * 70 + "b1*x" + ")" * 70},
            ["body", "expression"],
            "expression_too_deep",
        ),
        (
            {"parameters": {"b1": 1.0, "b2": 2.0}},
            ["body", "expression"],
            "expression_unused_parameter",
        ),
        (
            {
                "parameters": {f"p{i}": 1.0 for i in range(33)},
                "expression": "+".join(f"p{i}" for i in range(33)) + "*x",
            },
            ["body", "parameters"],
            "expression_too_many_parameters",
        ),
        ({"parameters": None}, ["body", "parameters"], "missing"),
        ({"model": "logistic"}, ["body", "expression"], "expression_or_model"),
        ({"y": [1.0, 2.0]}, ["body", "y"], "length_mismatch"),
        ({"bounds": {"b9": [0, 1]}}, ["body", "bounds", "b9"], "bounds"),
        ({"bounds": {"b1": [2, 1]}}, ["body", "bounds", "b1"], "bounds"),
        (
            {"x": {"exp": [1.0, 2.0, 3.0]}, "expression": "b1*exp"},
            ["body", "x", "exp"],
            "variable_name",
        ),
    ],
)
async def test_refusals_name_the_field(
    client: httpx.AsyncClient, change: dict[str, Any], loc: list[str], kind: str
) -> None:
    body = {
        "expression": "b1*x",
        "parameters": {"b1": 1.0},
        "x": [1.0, 2.0, 3.0],
        "y": [2.0, 4.1, 5.9],
    }
    body.update(change)
    body = {k: v for k, v in body.items() if v is not None}
    r = await client.post(FIT, json=body)
    assert r.status_code == 422, r.text
    errors = r.json()["detail"]
    assert any(e["loc"] == loc and e["type"] == kind for e in errors), errors


async def test_overflow_is_a_clear_divergence_never_a_nan(client: httpx.AsyncClient) -> None:
    body = {
        "expression": "b1*exp(exp(x))",
        "parameters": {"b1": 1.0},
        "x": [1.0, 5.0, 900.0],
        "y": [1.0, 2.0, 3.0],
    }
    r = await client.post(FIT, json=body)
    assert r.status_code == 422, r.text
    assert r.json()["stop_reason"] == "diverged"
    assert "NaN" not in r.text and "Infinity" not in r.text
    huge = {**body, "expression": "b1*9**9**9**9*x"}
    r = await client.post(FIT, json=huge)
    assert r.status_code == 422 and "NaN" not in r.text, r.text


async def test_bounds_are_enforced_by_projection(client: httpx.AsyncClient) -> None:
    problem = nist.load("Misra1a")
    start = {"b1": 150.0, "b2": 5e-4}
    body = _body(problem, start) | {"bounds": {"b1": [None, 200.0]}}
    r = await client.post(FIT, json=body)
    assert r.status_code == 200, r.text
    fit = r.json()
    assert fit["params"]["b1"] == 200.0  # the optimum (238.9) is beyond the bound
    assert any("b1 ended on its bound" in w for w in fit["warnings"])
    free = await client.post(
        FIT, json=_body(problem, problem.starts[1]) | {"bounds": {"b1": [0.0, None]}}
    )
    assert free.json()["params"]["b1"] == pytest.approx(problem.certified["b1"], rel=1e-8)


async def test_the_named_models_are_listed(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/models")
    assert r.status_code == 200
    models = {m["name"]: m for m in r.json()["models"]}
    required = {
        "exponential_decay",
        "logistic",
        "power_law",
        "michaelis_menten",
        "gaussian_peak",
        "lorentzian_peak",
        "sinusoid",
    }
    assert required | {f"polynomial{d}" for d in range(1, 7)} <= set(models)
    assert models["michaelis_menten"]["expression"] == "vmax*x/(km + x)"
    assert set(models["michaelis_menten"]["parameters"]) == {"vmax", "km"}


async def test_new_lengths_in_a_bucket_reuse_the_compiled_fit(client: httpx.AsyncClient) -> None:
    from service.settings import Settings
    from service.worker import settings_engine

    settings = Settings()
    engine = settings_engine(settings)
    for n in (33, 40, 64):  # one size bucket: 64
        x = np.linspace(0.1, 3.0, n)
        body = {
            "expression": "q1*exp(-q2*x) + q3",
            "parameters": {"q1": 1.0, "q2": 1.0, "q3": 0.0},
            "x": x.tolist(),
            "y": (2.0 * np.exp(-0.7 * x) + 0.3 + 0.01 * np.sin(7 * x)).tolist(),
        }
        r = await client.post(FIT, json=body)
        assert r.status_code == 200, r.text
        assert r.json()["params"]["q2"] == pytest.approx(0.7, rel=0.05)
    # The first fits may answer from the numpy loop while the loop compiles behind them.
    worker = client._transport.app.state.worker  # type: ignore[attr-defined]
    for _ in range(2400):
        if not worker._pending:
            break
        await asyncio.sleep(0.05)
    key = "expression[1,64]:((p0*exp(((-p1)*x0)))+p2)_loop_levenberg_marquardt"
    assert engine.trace_counts()[key] == 1  # three lengths, one trace


async def test_the_typed_client_fits_plots_and_lists_models() -> None:
    from asgi_lifespan import LifespanManager

    from service.app import create_app
    from service.client import AsyncClient, FitFailed, ValidationFailed
    from tests.conftest import app_settings

    app = create_app(app_settings())
    async with LifespanManager(app, startup_timeout=120):
        await app.state.worker_started
        transport = httpx.ASGITransport(app=app)
        client = AsyncClient("http://tapefit", transport=transport, max_retries=0)
        problem = nist.load("Misra1a")
        fit = await client.fit_expression(
            problem.x["x"], problem.y, problem.expression, problem.starts[1]
        )
        assert fit.params["b1"] == pytest.approx(problem.certified["b1"], rel=1e-9)
        assert fit.stats.std_errors["b2"] == pytest.approx(problem.certified_se["b2"], rel=1e-6)
        named = await client.fit_expression(problem.x["x"], problem.y, model="michaelis_menten")
        assert named.converged and set(named.params) == {"vmax", "km"}
        png = await client.plot_expression(problem.x["x"], problem.y, model="exponential_decay")
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
        several = await client.plot_expression(
            {"x1": [1.0, 2.0, 3.0, 4.0], "x2": [0.0, 1.0, 0.0, 1.0]},
            [1.1, 2.9, 3.2, 5.1],
            "a*x1 + b*x2",
            {"a": 1.0, "b": 1.0},
        )
        assert several.startswith(b"\x89PNG")
        assert {m.name for m in (await client.models()).models} >= {"logistic", "sinusoid"}
        with pytest.raises(ValidationFailed) as refused:
            await client.fit_expression([1.0, 2.0], [1.0, 2.0], "a*os.system", {"a": 1.0})
        assert refused.value.detail[0]["loc"] == ["body", "expression"]
        with pytest.raises(FitFailed):
            await client.fit_expression(
                [1.0, 5.0, 900.0], [1.0, 2.0, 3.0], "a*exp(exp(x))", {"a": 1.0}
            )


async def test_points_times_parameters_over_the_limit_is_a_422_naming_it() -> None:
    from tests.conftest import app_settings, running_app

    async with running_app(app_settings(max_expression_work=100)) as small:
        x = np.linspace(1e3, 5e3, 60)
        body = {
            "expression": "a*x + b",
            "parameters": {"a": 1.0, "b": 0.0},
            "x": x.tolist(),
            "y": (2.0 * x + 1e7).tolist(),
        }
        r = await small.post(FIT, json=body)
        assert r.status_code == 422, r.text
        assert r.json()["detail"][0]["type"] == "too_much_expression_work"
        r = await small.post(FIT, json=body | {"x": x[:50].tolist(), "y": body["y"][:50]})
        assert r.status_code == 200, r.text  # 50 x 2 = the limit
        assert r.json()["params"]["b"] == pytest.approx(1e7, rel=1e-12)


def test_the_expression_cache_evicts_the_least_recent_and_its_loops() -> None:
    from service.fitting import FitEngine
    from service.fitting.expression import parse
    from service.fitting.options import Optimizer

    engine = FitEngine(expression_cache_size=1)
    x = np.linspace(1e3, 4e3, 40)
    y = 3e-3 * x + 1e7
    for text in ("a*x + b", "b + a*x"):
        fit = engine.fit(
            "expression",
            x,
            y,
            learning_rate=0.1,
            epochs=100,
            initial=(0.0, 1e7),
            optimizer=Optimizer("levenberg_marquardt"),
            options={"expression": parse(text, ("x",), ("a", "b"))},
        )
        assert fit.params["b"] == pytest.approx(1e7, rel=1e-12)
    loops = [name for name in engine.trace_counts() if name.startswith("expression[")]
    assert loops and all(name.startswith("expression[1,64]:(p1+(p0*x0))") for name in loops)


async def test_a_new_expression_answers_at_once_and_compiles_behind(
    client: httpx.AsyncClient,
) -> None:
    """A new expression's first fit answers from the numpy loop (nothing to trace), and so
    does its second, written under other names (the same model: answered in its names),
    while its loop compiles in the background (one trace: a model fitted once never
    compiles); the next fit runs compiled and gives the same answer: parameters
    to 1e-9 relatively or the float64 resolution of the sum of squares in standard errors
    (:mod:`tests.optimum`), the standard errors to 1e-6. Data in
    callers' units (t to 5e3 s, y ~1e7, weights), checked against curve_fit too."""
    worker = client._transport.app.state.worker  # type: ignore[attr-defined]
    engine = worker.engine
    rng = np.random.default_rng(21)
    t = np.sort(rng.uniform(0.0, 5e3, 120))
    y = 1e7 + 40.0 * np.exp(-t / 1.3e3) + rng.normal(0, 0.1, t.size)
    w = rng.uniform(0.5, 2.0, t.size)
    for salt in range(1, 1000):  # a model this process has not compiled
        text = f"c + a*exp(-t/k) + {salt}.5"
        if engine.expressions.peek(parse(text, ("t",), ("c", "a", "k")), t.size) is None:
            break
    offset = float(text.rsplit("+", 1)[1])
    body = {
        "expression": text,
        "parameters": {"c": 9.9e6, "a": 10.0, "k": 500.0},
        "x": {"t": t.tolist()},
        "y": y.tolist(),
        "weights": w.tolist(),
    }

    def uncompiled_count(metrics: str) -> float:
        return float(metrics.split("\ntapefit_uncompiled_fits_total ")[1].split()[0])

    before = uncompiled_count((await client.get("/metrics")).text)
    first = await client.post(FIT, json=body)
    assert first.status_code == 200, first.text
    assert uncompiled_count((await client.get("/metrics")).text) == before + 1
    assert not worker._pending  # fitted once: nothing compiles
    # The same model under other names (one spec, positional): answered in its own names.
    renamed = body | {
        "expression": f"base + amp*exp(-s/tau) + {offset}",
        "parameters": {"base": 9.9e6, "amp": 10.0, "tau": 500.0},
        "x": {"s": t.tolist()},
    }
    again = (await client.post(FIT, json=renamed)).json()
    assert list(again["params"]) == ["base", "amp", "tau"]
    for ours, theirs in zip(("base", "amp", "tau"), ("c", "a", "k"), strict=True):
        assert again["params"][ours] == pytest.approx(first.json()["params"][theirs], rel=1e-12)
        assert again["stats"]["std_errors"][ours] == pytest.approx(
            first.json()["stats"]["std_errors"][theirs], rel=1e-12
        )
    assert uncompiled_count((await client.get("/metrics")).text) == before + 2
    for _ in range(2400):  # the compile behind the second fit
        if not worker._pending:
            break
        await asyncio.sleep(0.05)
    spec = engine.expressions.peek(parse(text, ("t",), ("c", "a", "k")), t.size)
    assert spec is not None and engine.compiled(spec, "levenberg_marquardt", False)
    second = await client.post(FIT, json=body)
    assert second.status_code == 200, second.text
    assert uncompiled_count((await client.get("/metrics")).text) == before + 2
    a, b = first.json(), second.json()
    # the numpy loop's extended-precision acceptance against the compiled loop's float64
    tolerance = resolution_se(y, b["stats"]["rss"], b["stats"]["dof"], w)
    assert_same_optimum(a["params"], b["params"], b["stats"]["std_errors"], tolerance)
    for name in ("c", "a", "k"):
        se = b["stats"]["std_errors"][name]
        assert a["stats"]["std_errors"][name] == pytest.approx(se, rel=1e-6)
    assert (a["stop_reason"], a["converged"], a["warnings"]) == (
        b["stop_reason"],
        b["converged"],
        b["warnings"],
    )
    popt, pcov = curve_fit(
        lambda t, c, a, k: c + a * np.exp(-t / k) + offset,
        t,
        y,
        p0=[9.9e6, 10.0, 500.0],
        sigma=1 / np.sqrt(w),
        ftol=1e-15,
        xtol=1e-15,
        gtol=1e-15,
        maxfev=100_000,
    )

    def weighted_rss(p: Any) -> Any:  # in extended precision
        c, amplitude, k = (np.longdouble(v) for v in p)
        model = c + amplitude * np.exp(-t.astype(np.longdouble) / k) + np.longdouble(offset)
        return np.sum(w.astype(np.longdouble) * (y.astype(np.longdouble) - model) ** 2)

    # curve_fit's finite differences stop it short at y ~1e7 (7e-3 of an SE away, here),
    # and its covariance has their error (1.4e-4): ours is at least as low a minimum,
    # within 1e-2 of an SE of it, its standard errors within 1e-3.
    assert weighted_rss([a["params"][name] for name in ("c", "a", "k")]) <= weighted_rss(popt)
    for i, name in enumerate(("c", "a", "k")):
        se = math.sqrt(pcov[i, i])
        assert abs(a["params"][name] - popt[i]) <= 1e-2 * se, name
        assert a["stats"]["std_errors"][name] == pytest.approx(se, rel=1e-3)
