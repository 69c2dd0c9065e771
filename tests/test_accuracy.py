"""Right answers at any scale: certified NIST values and exact rational references.

Every fit here runs with the service's defaults (over HTTP for the headline cases), and is
checked against a value nobody in this codebase computed: NIST's certified results (Norris,
computed in 128-bit precision), NIST's univariate NumAcc sets built from their definitions,
and exact rational arithmetic on the float64 data (``fractions``) for a sweep of offsets and
spreads. The score is NIST's LRE: the number of correct significant digits.
"""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import pytest

from service.fitting import FitEngine
from service.fitting.batch import BatchEngine, Ragged
from service.fitting.options import Optimizer
from service.fitting.results import FitError, FitResult

Array = npt.NDArray[np.float64]
DATA = Path(__file__).parent / "data" / "nist"

# NIST StRD Norris, certified values (tests/data/nist/Norris.txt).
NORRIS_INTERCEPT, NORRIS_INTERCEPT_SE = -0.262323073774029, 0.232818234301152
NORRIS_SLOPE, NORRIS_SLOPE_SE = 1.00211681802045, 4.29796848199937e-4


def lre(value: float, certified: float) -> float:
    """Log relative error: correct significant digits, capped at 15."""
    if value == certified:
        return 15.0
    if certified == 0.0:
        return -math.log10(abs(value))
    return min(15.0, -math.log10(abs(value - certified) / abs(certified)))


def norris() -> tuple[Array, Array]:
    data = np.loadtxt(DATA / "Norris.txt")
    return data[:, 1], data[:, 0]  # x, y


def numacc() -> dict[str, Array]:
    """NIST's univariate NumAcc1-4, from their definitions."""
    sets = {"NumAcc1": np.array([10000001.0, 10000003.0, 10000002.0])}
    for name, c in (("NumAcc2", 1.0), ("NumAcc3", 1e6), ("NumAcc4", 1e7)):
        sets[name] = np.array([c + 0.2, *[c + 0.1, c + 0.3] * 500])
    return sets


def exact_line(x: Array, y: Array) -> tuple[float, float]:
    """Least squares in exact rational arithmetic on the float64 data."""
    fx, fy = [Fraction(v) for v in x], [Fraction(v) for v in y]
    n = len(fx)
    mx, my = sum(fx) / n, sum(fy) / n
    sxx = sum((a - mx) ** 2 for a in fx)
    sxy = sum((a - mx) * (b - my) for a, b in zip(fx, fy, strict=True))
    slope = sxy / sxx
    return float(slope), float(my - slope * mx)


def exact_normal(y: Array) -> tuple[float, float]:
    """The normal MLE (mean, population std) in exact rational arithmetic."""
    fy = [Fraction(v) for v in y]
    mean = sum(fy) / len(fy)
    var = sum((v - mean) ** 2 for v in fy) / len(fy)
    return float(mean), math.sqrt(float(var))


# -- the headline cases, over HTTP with every option left at its default ---------------------


@pytest.mark.anyio
async def test_norris_with_defaults_is_certified_to_9_digits(client: httpx.AsyncClient) -> None:
    x, y = norris()
    r = await client.post("/v1/fits/linear", json={"x": x.tolist(), "y": y.tolist()})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["converged"] is True and body["warnings"] == []
    assert lre(body["params"]["slope"], NORRIS_SLOPE) >= 9
    assert lre(body["params"]["intercept"], NORRIS_INTERCEPT) >= 9
    errors = body["stats"]["std_errors"]
    assert lre(errors["slope"], NORRIS_SLOPE_SE) >= 6
    assert lre(errors["intercept"], NORRIS_INTERCEPT_SE) >= 6
    # NIST's certified residual sum of squares, from the loss in the caller's units.
    assert lre(body["final_loss"] * x.size, 26.6173985294224) >= 9
    assert body["loss_history"][0] > 1e4  # the history is in y's units, not standardized


@pytest.mark.anyio
@pytest.mark.parametrize("name", ["NumAcc1", "NumAcc2", "NumAcc3", "NumAcc4"])
async def test_numacc_with_defaults(client: httpx.AsyncClient, name: str) -> None:
    y = numacc()[name]
    r = await client.post("/v1/fits/gaussian", json={"y": y.tolist()})
    assert r.status_code == 200, r.text
    body = r.json()
    mean, std = exact_normal(y)
    assert body["converged"] is True and body["warnings"] == []
    assert lre(body["params"]["mean"], mean) >= 9
    assert lre(body["params"]["std"], std) >= 7


@pytest.mark.anyio
@pytest.mark.parametrize(("loc", "scale"), [(3.0, 0.01), (1e9, 1.0)])
async def test_gaussians_far_from_unit_scale(
    client: httpx.AsyncClient, loc: float, scale: float
) -> None:
    y = np.random.default_rng(5).normal(loc, scale, 2000)
    r = await client.post("/v1/fits/gaussian", json={"y": y.tolist()})
    assert r.status_code == 200, r.text
    body = r.json()
    mean, std = exact_normal(y)
    assert body["converged"] is True
    assert lre(body["params"]["mean"], mean) >= 9
    assert lre(body["params"]["std"], std) >= 7


@pytest.mark.anyio
async def test_line_with_x_in_the_thousands(client: httpx.AsyncClient) -> None:
    rng = np.random.default_rng(6)
    x = rng.uniform(1000.0, 1010.0, 200)
    y = 2.99 * x - 40.0 + rng.normal(0.0, 0.5, x.size)
    for options in ({}, {"optimizer": "adam", "learning_rate": 0.5, "epochs": 2000}):
        r = await client.post("/v1/fits/linear", json={"x": x.tolist(), "y": y.tolist(), **options})
        assert r.status_code == 200, r.text
        body = r.json()
        slope, intercept = exact_line(x, y)
        assert body["converged"] is True, options
        assert lre(body["params"]["slope"], slope) >= 8, options
        assert lre(body["params"]["intercept"], intercept) >= 6, options


@pytest.mark.anyio
async def test_raw_scaling_keeps_the_old_failure_and_warns(client: httpx.AsyncClient) -> None:
    """`scaling: none` is the reference post's raw loop: NumAcc2 diverges (422), and on
    NumAcc3 it answers far from the optimum, but says so: converged is false and the
    warnings give the gradient, the exact optimum and what to change."""
    sets = numacc()
    r = await client.post(
        "/v1/fits/gaussian", json={"y": sets["NumAcc2"].tolist(), "scaling": "none"}
    )
    assert r.status_code == 422
    assert r.json()["stop_reason"] == "diverged"
    r = await client.post(
        "/v1/fits/gaussian", json={"y": sets["NumAcc3"].tolist(), "scaling": "none"}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["converged"] is False
    assert abs(body["params"]["mean"] - 1000000.2) > 1.0  # wrong, and flagged as such
    text = " ".join(body["warnings"])
    assert "not converged" in text and "gradient norm" in text
    assert "mean = 1000000.2," in text
    assert 'scaling "standardize"' in text and '"newton"' in text


# -- the engine: Newton, sweeps, batches -----------------------------------------------------


def _stop_agrees(result: FitResult) -> None:
    """A stop reason never contradicts `converged`, and a non-converged fit says why."""
    if result.stop_reason == "step_tolerance":
        assert result.converged
    assert (result.warnings == ()) == result.converged


@pytest.mark.parametrize("start", ["default", "far"])
def test_newton_reaches_the_certified_answers_within_50_epochs(
    engine: FitEngine, start: str
) -> None:
    x, y = norris()
    sd_x, sd_y = x.std(), y.std()
    far: dict[str, Any] = {}
    if start == "far":  # 100 standard deviations away in both parameters
        far = {"initial": (NORRIS_SLOPE + 100 * sd_y / sd_x, NORRIS_INTERCEPT - 100 * sd_y)}
    line = engine.fit(
        "linear", x, y, learning_rate=0.1, epochs=50, optimizer=Optimizer("newton"), **far
    )
    assert line.converged and line.stop_reason == "step_tolerance" and line.epochs_run <= 50
    assert lre(line.params["slope"], NORRIS_SLOPE) >= 9
    assert lre(line.params["intercept"], NORRIS_INTERCEPT) >= 9
    _stop_agrees(line)
    for name, data in numacc().items():
        mean, std = exact_normal(data)
        far = {"initial": (mean + 100 * std, std)} if start == "far" else {}
        fit = engine.fit(
            "gaussian", data, learning_rate=0.1, epochs=50, optimizer=Optimizer("newton"), **far
        )
        assert fit.converged and fit.epochs_run <= 50, name
        assert lre(fit.params["mean"], mean) >= 9, name
        assert lre(fit.params["std"], std) >= 7, name
        _stop_agrees(fit)


def test_newton_recovers_from_a_start_with_an_indefinite_hessian(engine: FitEngine) -> None:
    """Far from the optimum the NLL's Hessian in (mean, std) is indefinite: plain Newton
    would step uphill. The shifted, backtracked step still converges."""
    y = np.random.default_rng(8).normal(-4.0, 2.0, 500)
    mean, std = exact_normal(y)
    for initial in [(mean + 100 * std, std), (mean, 100 * std), (mean, 0.01 * std)]:
        fit = engine.fit(
            "gaussian",
            y,
            learning_rate=0.1,
            epochs=50,
            initial=initial,
            optimizer=Optimizer("newton"),
        )
        assert fit.converged, initial
        assert fit.params["mean"] == pytest.approx(mean, rel=1e-12)
        assert fit.params["std"] == pytest.approx(std, rel=1e-10)


OFFSETS = [0.0, 1e-8, 1e-3, 1.0, 1e3, 1e6, 1e9]
SPREADS = [1e-7, 1e-3, 1.0, 1e3, 1e6]


def _sweep() -> list[tuple[float, float]]:
    """Offsets x spreads where the spread is representable against the offset (float64
    resolves about 16 digits: a spread of 1e-7 on 1e9 is below its rounding)."""
    return [(o, s) for o in OFFSETS for s in SPREADS if s >= abs(o) * 1e-9]


def _sweep_data(offset: float, spread: float, n: int = 40) -> tuple[Array, Array, Array]:
    rng = np.random.default_rng(int(abs(math.log10(spread))) * 10 + OFFSETS.index(offset))
    x = offset + spread * rng.standard_normal(n)
    y = -offset + 0.5 * (x - offset) + spread * 0.1 * rng.standard_normal(n)
    g = offset + spread * rng.standard_normal(n)
    return x, y, g


def _check_line(result: FitResult | FitError, x: Array, y: Array) -> None:
    assert isinstance(result, FitResult), result
    slope, intercept = exact_line(x, y)
    assert result.converged
    assert lre(result.params["slope"], slope) >= 9
    # The intercept sits at x = 0, up to 1e9 spreads away from the data: its precision is
    # bounded by the cancellation ȳ - m·x̄ itself, so it is compared on that scale.
    scale = abs(float(np.mean(y))) + abs(slope * float(np.mean(x))) + abs(intercept)
    assert abs(result.params["intercept"] - intercept) <= 1e-9 * scale
    _stop_agrees(result)


def _check_normal(result: FitResult | FitError, g: Array) -> None:
    assert isinstance(result, FitResult), result
    mean, std = exact_normal(g)
    assert result.converged
    assert abs(result.params["mean"] - mean) <= 1e-9 * max(abs(mean), std)
    assert lre(result.params["std"], std) >= 7
    _stop_agrees(result)


@pytest.mark.parametrize(("offset", "spread"), _sweep())
def test_sweep_of_offsets_and_spreads_single(
    engine: FitEngine, offset: float, spread: float
) -> None:
    x, y, g = _sweep_data(offset, spread)
    _check_line(engine.fit("linear", x, y, learning_rate=0.1, epochs=1000, seed=0), x, y)
    _check_normal(engine.fit("gaussian", g, learning_rate=0.1, epochs=1000), g)


def test_sweep_of_offsets_and_spreads_batch() -> None:
    """Every set of one batch is standardized on its own: all scales at once."""
    cases = [_sweep_data(o, s) for o, s in _sweep()]
    batch = BatchEngine()
    lines = batch.fit(
        "linear",
        Ragged.of([c[0] for c in cases]),
        Ragged.of([c[1] for c in cases]),
        learning_rate=0.1,
        epochs=1000,
        seed=0,
    )
    normals = batch.fit(
        "gaussian", Ragged.of([c[2] for c in cases]), learning_rate=0.1, epochs=1000
    )
    for (x, y, g), line, normal in zip(cases, lines, normals, strict=True):
        _check_line(line, x, y)
        _check_normal(normal, g)


def test_initial_values_are_in_the_callers_units(engine: FitEngine) -> None:
    """A start at the exact optimum stays there: loss history flat at the optimum's loss."""
    x, y = norris()
    slope, intercept = exact_line(x, y)
    fit = engine.fit("linear", x, y, learning_rate=0.1, epochs=5, initial=(slope, intercept))
    assert fit.params["slope"] == pytest.approx(slope, rel=1e-12)
    np.testing.assert_allclose(fit.loss_history, 26.6173985294224 / x.size, rtol=1e-9)
    g = numacc()["NumAcc4"]
    mean, std = exact_normal(g)
    normal = engine.fit("gaussian", g, learning_rate=0.1, epochs=5, initial=(mean, std))
    assert normal.params["mean"] == pytest.approx(mean, rel=1e-15)
    assert normal.params["std"] == pytest.approx(std, rel=1e-9)
