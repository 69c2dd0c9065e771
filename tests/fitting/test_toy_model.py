"""A third model, defined only here, fits end to end through the engine: single fits with
every optimizer, batches, large data through the graph summary, and the statistics, checked
against numpy's polyfit and statsmodels. Adding a model is one spec; the engine knows none
by name.

The toy: y = a·x² + b·x + c by mean squared error, three parameters (the built-in models
have two), from sufficient statistics about x̄: the loss is a quadratic form in centred
moments up to u⁴ (u = x - x̄), so the loop's cost does not depend on n.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import statsmodels.api as sm
import tensorflow as tf

from service.fitting import FitEngine
from service.fitting.batch import BatchEngine, Ragged
from service.fitting.layout import Layout
from service.fitting.models import BUILT_IN, ModelSpec, all_equal
from service.fitting.options import Optimizer, Scaling, Stopping
from service.fitting.results import FitStats
from service.fitting.scaling import IDENTITY, Coordinates
from service.fitting.stats import AtFit, WeightSummary, fit_stats
from service.fitting.summary import (
    VECTOR,
    centre,
    centre_numpy,
    centre_sets,
    mean_product,
    mean_products_of_sets,
    normalized,
)

Array = npt.NDArray[np.float64]

SUMMARY = Layout.of(
    n=None, x_mean=None, y_mean=None, uu=None, uuu=None, uuuu=None, uy=None, uuy=None, yy=None
)


def moments(x: Array, y: Array, weights: Array | None = None) -> Array:
    w = normalized(weights)
    x_mean, u = centre_numpy(x, w)
    y_mean, dy = centre_numpy(y, w)
    uu = u * u
    pairs = ((u, u), (uu, u), (uu, uu), (u, dy), (uu, dy), (dy, dy))
    return np.array([x.size, x_mean, y_mean, *(mean_product(a, b, w) for a, b in pairs)])


def _moments_in_graph(x: Any, y: Any) -> Any:
    x_mean, u = centre(x)
    y_mean, dy = centre(y)
    uu = u * u
    pairs = ((u, u), (uu, u), (uu, uu), (u, dy), (uu, dy), (dy, dy))
    n = tf.cast(tf.size(x), tf.float64)
    return tf.stack([n, x_mean, y_mean, *(tf.reduce_mean(a * b) for a, b in pairs)])


moments_graph = tf.function(_moments_in_graph, input_signature=[VECTOR, VECTOR])


def moments_of_sets(x: Ragged, y: Ragged) -> Array:
    x_mean, u = centre_sets(x)
    y_mean, dy = centre_sets(y)
    uu = u * u
    pairs = [(u, u), (uu, u), (uu, uu), (u, dy), (uu, dy), (dy, dy)]
    products = mean_products_of_sets(x, pairs)
    return np.stack([x.lengths.astype(np.float64), x_mean, y_mean, *products], axis=1)


def loss(p: Any, summary: Any) -> Any:
    """E[(dy - a·u² - β·u - g)²] with β = 2a·x̄ + b and g = a·x̄² + b·x̄ + c - ȳ."""
    s = SUMMARY.columns(summary)
    a, b, c = p[..., 0], p[..., 1], p[..., 2]
    beta = 2.0 * a * s["x_mean"] + b
    gamma = a * s["x_mean"] ** 2 + b * s["x_mean"] + c - s["y_mean"]
    return (
        s["yy"]
        + a * a * s["uuuu"]
        + beta * beta * s["uu"]
        + gamma * gamma
        - 2.0 * a * s["uuy"]
        - 2.0 * beta * s["uy"]
        + 2.0 * a * beta * s["uuu"]
        + 2.0 * a * gamma * s["uu"]
    )


def standardize(summary: Array) -> tuple[Array, Coordinates]:
    return summary, IDENTITY  # the toy fits in raw units: its tests use unit-scale data


def start(summaries: Array, scaling: Scaling, seeds: Sequence[int | None]) -> Array:
    return np.zeros((len(summaries), 3))


def stats(
    fit: AtFit, summary: Array, weights: WeightSummary, options: Mapping[str, Any]
) -> FitStats:
    s = SUMMARY.columns(summary)
    # The normal equations in (a, β, g) about the centre, then back to (a, b, c).
    gram = np.array([[s["uuuu"], s["uuu"], s["uu"]], [s["uuu"], s["uu"], 0.0], [s["uu"], 0.0, 1.0]])
    a, beta, gamma = np.linalg.solve(gram, [s["uuy"], s["uy"], 0.0])
    xm = float(s["x_mean"])
    b = beta - 2.0 * a * xm
    c = gamma + float(s["y_mean"]) - a * xm * xm - b * xm
    loss_ = fit.coords.loss(fit.point.loss)
    dof = weights.count - 3
    sigma2 = weights.total * loss_ / dof
    return fit_stats(
        ("a", "b", "c"),
        fit,
        weights,
        covariance_factor=sigma2 * 2.0 / weights.total,
        loglik=math.nan,
        closed=(a, b, c),
        closed_loss=float(s["yy"] - a * s["uuy"] - beta * s["uy"]),
    )


QUADRATIC = ModelSpec(
    name="quadratic",
    params=("a", "b", "c"),
    data=("x", "y"),
    summary=SUMMARY,
    moments=moments,
    moments_graph=moments_graph,
    moments_of_sets=moments_of_sets,
    complete=lambda m, total, options: m,
    loss=loss,
    spread="uu",
    constant=all_equal("x", "the curve is not determined"),
    standardize=standardize,
    start=start,
    random_start=False,
    stats=stats,
    dummy=(3.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0),
    dummy_start=(0.0, 0.0, 0.0),
)
MODELS: Mapping[str, ModelSpec] = {**BUILT_IN, "quadratic": QUADRATIC}
NEWTON = Optimizer("newton")


def _data(seed: int, n: int = 200) -> tuple[Array, Array]:
    rng = np.random.default_rng(seed)
    x = rng.uniform(-2.0, 3.0, n)
    y = 0.7 * x * x - 1.5 * x + 2.0 + rng.normal(0.0, 0.3, n)
    return x, y


@pytest.fixture(scope="module")
def toy_engine() -> FitEngine:
    return FitEngine(models=MODELS, epochs_per_call=64, graph_min_points=4096)


@pytest.mark.parametrize("seed", [0, 1])
def test_a_third_model_fits_like_polyfit_and_statsmodels(toy_engine: FitEngine, seed: int) -> None:
    x, y = _data(seed)
    fit = toy_engine.fit("quadratic", x, y, learning_rate=0.1, epochs=50, optimizer=NEWTON)
    a, b, c = np.polyfit(x, y, 2)
    assert fit.model == "quadratic" and fit.converged and fit.stop_reason == "step_tolerance"
    assert fit.epochs_run <= 5  # a quadratic loss: Newton is exact in one step
    assert list(fit.params) == ["a", "b", "c"]
    np.testing.assert_allclose(list(fit.params.values()), [a, b, c], rtol=1e-9)
    ols = sm.OLS(y, np.column_stack([x * x, x, np.ones_like(x)])).fit()
    s = fit.stats
    np.testing.assert_allclose(np.array(s.std_errors, dtype=float), ols.bse, rtol=1e-7)
    np.testing.assert_allclose(np.array(s.covariance, dtype=float), ols.cov_params(), rtol=1e-7)
    corr = ols.cov_params() / np.outer(ols.bse, ols.bse)
    np.testing.assert_allclose(np.array(s.correlation, dtype=float), corr, rtol=1e-7)
    assert s.dof == x.size - 3
    assert s.closed_form == pytest.approx((a, b, c), rel=1e-9)
    assert fit.final_loss == pytest.approx(np.mean((np.polyval([a, b, c], x) - y) ** 2), rel=1e-9)
    assert s.log_likelihood is None and s.aic is None  # the toy states no likelihood


def test_gradient_descent_on_the_third_model_stops_and_matches_its_history(
    toy_engine: FitEngine,
) -> None:
    x, y = _data(2)
    fit = toy_engine.fit(
        "quadratic",
        x,
        y,
        learning_rate=0.02,
        epochs=200_000,
        optimizer=Optimizer("adam"),
        stopping=Stopping(gradient_tolerance=1e-10),
    )
    assert fit.stop_reason == "gradient_tolerance" and fit.converged
    np.testing.assert_allclose(list(fit.params.values()), np.polyfit(x, y, 2), rtol=1e-6)
    # The loss history is the loss at each epoch's parameters: it starts at mean(y²).
    assert fit.loss_history[0] == pytest.approx(np.mean(y * y), rel=1e-12)
    assert fit.loss_history.size == fit.epochs_run


def test_the_third_model_on_large_data_goes_through_its_graph_summary(
    toy_engine: FitEngine,
) -> None:
    x, y = _data(3, n=20_000)
    large = toy_engine.fit("quadratic", x, y, learning_rate=0.1, epochs=10, optimizer=NEWTON)
    small = toy_engine.fit(
        "quadratic", x, y, learning_rate=0.1, epochs=10, optimizer=NEWTON, weights=np.ones(x.size)
    )  # weights: the numpy summary
    np.testing.assert_allclose(list(large.params.values()), list(small.params.values()), rtol=1e-10)
    assert toy_engine.trace_counts()["quadratic_summary"] == 1


def test_a_batch_of_the_third_model_matches_its_single_fits(toy_engine: FitEngine) -> None:
    sets = [_data(seed, n) for seed, n in ((4, 50), (5, 80), (6, 30))]
    sets.append((np.ones(5), np.arange(5.0)))  # constant x: that set alone fails
    batch = BatchEngine(models=MODELS)
    results = batch.fit(
        "quadratic",
        Ragged.of([s[0] for s in sets]),
        Ragged.of([s[1] for s in sets]),
        learning_rate=0.02,
        epochs=3000,
    )
    for (x, y), result in zip(sets[:3], results[:3], strict=True):
        single = toy_engine.fit("quadratic", x, y, learning_rate=0.02, epochs=3000)
        assert not isinstance(result, Exception)
        np.testing.assert_allclose(
            list(result.params.values()), list(single.params.values()), rtol=1e-9
        )
        np.testing.assert_allclose(result.loss_history, single.loss_history, rtol=1e-9)
        # The statistics too: a model written for single fits only is batched through its
        # scalar ``stats``, set by set.
        assert result.converged == single.converged
        assert result.stats.closed_form == pytest.approx(single.stats.closed_form, rel=1e-9)
        assert result.stats.std_errors == pytest.approx(single.stats.std_errors, rel=1e-6)
        assert result.stats.log_likelihood is single.stats.log_likelihood is None
    assert isinstance(results[3], ValueError) and "curve is not determined" in str(results[3])
    assert batch.compiled_buckets() == [("quadratic", 8)]


def test_the_engine_compiles_the_third_model_once_for_every_length(
    toy_engine: FitEngine,
) -> None:
    for n in (10, 11, 300):
        x, y = _data(n, n)
        toy_engine.fit("quadratic", x, y, learning_rate=0.05, epochs=3)
    assert toy_engine.trace_counts()["quadratic_loop_sgd"] == 1


def test_a_model_spec_states_a_consistent_layout() -> None:
    with pytest.raises(ValueError, match="dummy row or start of the wrong size"):
        ModelSpec(**{**_fields(QUADRATIC), "dummy_start": (0.0, 0.0)})
    with pytest.raises(ValueError, match="is not a summary field"):
        ModelSpec(**{**_fields(QUADRATIC), "spread": "vxx"})


def test_unknown_models_and_options_are_refused(toy_engine: FitEngine) -> None:
    x, y = _data(7)
    with pytest.raises(ValueError, match="unknown model 'cubic'"):
        toy_engine.fit("cubic", x, y, learning_rate=0.1, epochs=2)
    with pytest.raises(ValueError, match="takes no option reduction"):
        toy_engine.fit("quadratic", x, y, learning_rate=0.1, epochs=2, options={"reduction": "sum"})
    with pytest.raises(ValueError, match="initial needs 3 values"):
        toy_engine.fit("quadratic", x, y, learning_rate=0.1, epochs=2, initial=(1.0, 2.0))
    with pytest.raises(ValueError, match="takes 2 arrays"):
        toy_engine.fit("quadratic", y, learning_rate=0.1, epochs=2)


def _fields(spec: ModelSpec) -> dict[str, Any]:
    return {name: getattr(spec, name) for name in ModelSpec.__dataclass_fields__}
