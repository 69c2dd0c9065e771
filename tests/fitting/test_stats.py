"""Fit statistics against statsmodels and scipy (test-only dependencies)."""

from __future__ import annotations

import numpy as np
import pytest
import statsmodels.api as sm
from scipy import stats as sps
from statsmodels.base.model import GenericLikelihoodModel

from service.fitting import FitEngine, Reduction
from service.fitting.options import Stopping
from tests.conftest import seed_gaussian_data, seed_linear_data

CONVERGE = Stopping(gradient_tolerance=1e-11)


def _linear_sets() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(11)
    x3 = rng.normal(5.0, 2.0, 30)
    return [
        seed_linear_data(0),
        seed_linear_data(1, n=12),
        (x3, -0.7 * x3 + 4.0 + rng.standard_t(3, 30)),  # heavy-tailed noise, negative slope
    ]


@pytest.mark.parametrize("case", range(3))
@pytest.mark.parametrize("weighted", [False, True])
def test_linear_stats_match_statsmodels(engine: FitEngine, case: int, weighted: bool) -> None:
    x, y = _linear_sets()[case]
    w = np.random.default_rng(case).uniform(0.2, 3.0, x.size) if weighted else None
    result = engine.fit(
        "linear", x, y, learning_rate=0.01, epochs=100_000, seed=0, weights=w, stopping=CONVERGE
    )
    exog = sm.add_constant(x)
    ols = (sm.WLS(y, exog, weights=w) if weighted else sm.OLS(y, exog)).fit()
    s = result.stats
    assert s is not None and result.stop_reason == "gradient_tolerance" and result.converged

    intercept, slope = ols.params
    assert result.params["slope"] == pytest.approx(slope, rel=1e-8)
    assert result.params["intercept"] == pytest.approx(intercept, rel=1e-8, abs=1e-10)
    # statsmodels orders [const, x]; ours is [slope, intercept].
    order = [1, 0]
    np.testing.assert_allclose(_floats(s.std_errors), ols.bse[order], rtol=1e-7)
    np.testing.assert_allclose(
        np.array(s.covariance, dtype=float), ols.cov_params()[np.ix_(order, order)], rtol=1e-7
    )
    corr = ols.cov_params()[0, 1] / (ols.bse[0] * ols.bse[1])
    assert s.correlation[0][1] == pytest.approx(corr, rel=1e-7)
    assert s.correlation[1][0] == s.correlation[0][1]
    assert s.r_squared == pytest.approx(ols.rsquared, rel=1e-9)
    assert s.residual_std == pytest.approx(np.sqrt(ols.scale), rel=1e-9)
    assert s.log_likelihood == pytest.approx(ols.llf, rel=1e-9)
    assert s.aic == pytest.approx(ols.aic, rel=1e-9)
    assert s.bic == pytest.approx(ols.bic, rel=1e-9)
    assert s.dof == ols.df_resid
    assert s.closed_form == pytest.approx((slope, intercept), rel=1e-9)
    assert s.gap is not None
    assert abs(s.gap[0][0]) < 1e-8 and abs(s.gap[0][1]) < 1e-8
    assert result.converged


class _Normal(GenericLikelihoodModel):  # type: ignore[misc]
    """N(mean, std²) by maximum likelihood, for statsmodels' numerical Hessian."""

    def loglike(self, params: np.ndarray) -> float:
        return float(sps.norm.logpdf(self.endog, params[0], params[1]).sum())


def _floats(values: tuple[float | None, ...]) -> list[float]:
    assert all(v is not None for v in values)
    return [float(v) for v in values if v is not None]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case", range(3))
def test_gaussian_stats_match_scipy_and_statsmodels(
    engine: FitEngine, case: int, reduction: Reduction
) -> None:
    rng = np.random.default_rng(case)
    y = [seed_gaussian_data(case), rng.normal(-3.0, 0.2, 40), rng.exponential(2.0, 300)][case]
    # Standardized, the mean NLL's curvature at the optimum is 1 (mean) and 2 (std).
    lr = 0.5 / (1 if reduction == "mean" else y.size)
    result = engine.fit(
        "gaussian",
        y,
        learning_rate=lr,
        epochs=100_000,
        options={"reduction": reduction},
        stopping=CONVERGE,
    )
    s = result.stats
    assert s is not None and result.stop_reason == "gradient_tolerance" and result.converged

    mean, std = sps.norm.fit(y)
    assert result.params["mean"] == pytest.approx(mean, rel=1e-9)
    assert result.params["std"] == pytest.approx(std, rel=1e-9)
    assert s.log_likelihood == pytest.approx(sps.norm.logpdf(y, mean, std).sum(), rel=1e-10)
    hessian = _Normal(y).hessian(np.array([mean, std]))  # statsmodels' numerical Hessian
    np.testing.assert_allclose(
        _floats(s.std_errors), np.sqrt(np.diag(np.linalg.inv(-hessian))), rtol=1e-4
    )
    # The exact values: se(mean) = std/√n, se(std) = std/√(2n), uncorrelated.
    n = y.size
    np.testing.assert_allclose(
        _floats(s.std_errors), [std / np.sqrt(n), std / np.sqrt(2 * n)], rtol=1e-8
    )
    assert s.correlation[0][1] is not None and abs(s.correlation[0][1]) < 1e-6
    loglik = s.log_likelihood
    assert loglik is not None
    assert s.aic == pytest.approx(4.0 - 2.0 * loglik, rel=1e-12)
    assert s.bic == pytest.approx(2.0 * np.log(n) - 2.0 * loglik, rel=1e-12)
    assert s.closed_form == pytest.approx((mean, std), rel=1e-12)
    assert s.closed_form_loss is not None and s.gap is not None
    # The loss at the exact MLE, from scipy's log-density (as trained: mean or summed NLL).
    mle_nll = -float(np.sum(sps.norm.logpdf(y, loc=mean, scale=std)))
    expected_loss = mle_nll / (1 if reduction == "sum" else n)
    assert s.closed_form_loss == pytest.approx(expected_loss, rel=1e-12)
    assert s.gap[1] == pytest.approx(result.final_loss - expected_loss, abs=1e-12)
    assert abs(s.gap[1]) < 1e-9


def test_gap_shows_an_unconverged_fit(engine: FitEngine) -> None:
    x, y = seed_linear_data(0)
    short = engine.fit("linear", x, y, learning_rate=0.05, epochs=30, seed=3)
    s = short.stats
    assert s is not None and s.gap is not None and s.closed_form_loss is not None
    assert s.gradient_norm is not None
    assert not short.converged
    assert abs(s.gap[0][0]) > 0.01  # the seed's 30 epochs stop well short of least squares
    assert short.final_loss > s.closed_form_loss
    assert s.gradient_norm > 1e-3


def test_stats_away_from_a_minimum_are_null_not_nan(engine: FitEngine) -> None:
    """Far from the optimum the NLL's Hessian is not positive definite: no standard errors."""
    y = seed_gaussian_data(0)
    result = engine.fit("gaussian", y, learning_rate=1e-6, epochs=1, initial=(40.0, 0.5))
    s = result.stats
    assert s is not None
    assert s.std_errors == (None, None)
    assert s.correlation == ((None, None), (None, None))
    assert s.log_likelihood is not None and np.isfinite(s.log_likelihood)


def test_residuals_and_jacobian_are_exact_in_graph_and_xla() -> None:
    """The Levenberg-Marquardt Jacobian (forward mode, one tangent per parameter) against
    the analytic one of y - (a·exp(-k·x) + c) on x in the thousands, eagerly, in a graph
    and XLA-compiled (how the loop runs it)."""
    import tensorflow as tf

    from service.fitting.stats import residuals_and_jacobian

    x = np.linspace(1000.0, 1100.0, 57)
    a, k, c = 3.0e6, 0.01, -2.5
    y = a * np.exp(-k * x) + c + np.random.default_rng(3).normal(0.0, 1e-3, x.size)

    def residuals(p: tf.Tensor, data: tf.Tensor) -> tf.Tensor:
        return data[1] - (p[0] * tf.exp(-p[1] * data[0]) + p[2])

    e = np.exp(-k * x)
    expected = np.stack([-e, a * x * e, -np.ones_like(x)], axis=1)
    p, data = tf.constant([a, k, c], tf.float64), tf.constant(np.stack([x, y]))
    eager = residuals_and_jacobian(residuals, p, data)
    graph = tf.function(lambda p, d: residuals_and_jacobian(residuals, p, d))(p, data)
    xla = tf.function(lambda p, d: residuals_and_jacobian(residuals, p, d), jit_compile=True)(
        p, data
    )
    for r, jacobian in (eager, graph, xla):
        assert jacobian.shape == (x.size, 3)
        np.testing.assert_allclose(r.numpy(), y - (a * e + c), rtol=0, atol=1e-9)
        np.testing.assert_allclose(jacobian.numpy(), expected, rtol=1e-13, atol=0)
