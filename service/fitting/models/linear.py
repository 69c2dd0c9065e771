"""The reference post's line, y = slope·x + intercept, fitted by (weighted) mean squared error.

Full-batch MSE of a line depends on the data only through five centred moments, so the loop
evaluates it in O(1) per epoch from the summary [n, x̄, ȳ, Vxx, Vxy, Vyy]:

    MSE(m, b) = m²·Vxx - 2m·Vxy + Vyy + (m·x̄ + b - ȳ)²

Standardized (x' = (x - x̄)/sx, y' = (y - ȳ)/sy): m' = m·sx/sy, b' = (b + m·x̄ - ȳ)/sy, and
the MSE is sy²·MSE'; the summary becomes [n, 0, 0, 1, r, 1] with r the correlation.

Statistics (weighted least squares, weights as inverse variances like statsmodels' WLS):
σ² = Σw·r² / (n - 2) and Cov = σ²·(XᵀWX)⁻¹ = σ²·(2/Σw)·H⁻¹, since the loss Σw·r²/Σw has
Hessian H = (2/Σw)·XᵀWX. R² = 1 - loss / weighted variance of y; the log-likelihood is that
of y ~ N(mx + b, σ²/w) at the maximum-likelihood σ².
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import tensorflow as tf

from service.fitting.draws import standard_normals
from service.fitting.layers import LinearRegressionLayer
from service.fitting.layout import Layout
from service.fitting.losses import LOG_2PI
from service.fitting.models import ModelSpec, ResidualSum, all_equal
from service.fitting.options import Scaling
from service.fitting.results import FitStats
from service.fitting.scaling import Coordinates, affine, quiet, stacked
from service.fitting.stats import (
    ROUNDING,
    AtFit,
    SetsAtFit,
    SetStats,
    WeightSummary,
    fit_stats,
    fit_stats_of_sets,
)
from service.fitting.summary import (
    VECTOR,
    Ragged,
    centre,
    centre_numpy,
    centre_sets,
    mean_product,
    mean_products_of_sets,
    normalized,
)

Array = np.ndarray[Any, np.dtype[np.float64]]

SUMMARY = Layout.of(n=None, x_mean=None, y_mean=None, vxx=None, vxy=None, vyy=None)
#: The reference post's Keras ``random_normal`` initializer: mean 0, standard deviation 0.05.
SLOPE_INIT_STDDEV = 0.05


def moments(x: Array, y: Array, weights: Array | None = None) -> Array:
    """[n, x̄, ȳ, Vxx, Vxy, Vyy] of paired samples; with ``weights`` the means and moments
    are weighted (n stays the point count)."""
    w = normalized(weights)
    with np.errstate(over="ignore", invalid="ignore"):  # overflow shows as inf/nan
        x_mean, dx = centre_numpy(x, w)
        y_mean, dy = centre_numpy(y, w)
        wdx = dx / x.size if w is None else w * dx  # weighted once, for both products
        products = (float(np.dot(wdx, dx)), float(np.dot(wdx, dy)), mean_product(dy, dy, w))
    return np.array([x.size, x_mean, y_mean, *products])


@tf.function(input_signature=[VECTOR, VECTOR], autograph=False)
def moments_graph(x: Any, y: Any) -> Any:
    """:func:`moments` of unweighted data in one graph call (large data)."""
    n = tf.cast(tf.size(x), tf.float64)
    x_mean, dx = centre(x)
    y_mean, dy = centre(y)
    products = [tf.reduce_mean(a * b) for a, b in ((dx, dx), (dx, dy), (dy, dy))]
    return tf.stack([n, x_mean, y_mean, *products])


def moments_of_sets(x: Ragged, y: Ragged) -> Array:
    """[B, 6]: :func:`moments` of every set at once."""
    with np.errstate(over="ignore", invalid="ignore"):
        x_mean, dx = centre_sets(x)
        y_mean, dy = centre_sets(y)
        products = mean_products_of_sets(x, [(dx, dx), (dx, dy), (dy, dy)])
    return np.stack([x.lengths.astype(np.float64), x_mean, y_mean, *products], axis=1)


def complete(moments: Array, total: Array, options: Mapping[str, Any]) -> Array:
    return moments


def loss(p: Any, summary: Any) -> Any:
    """The MSE from the summary, with the line evaluated by the reference post's layer."""
    s = SUMMARY.columns(summary)
    slope, intercept = p[..., 0], p[..., 1]
    offset = LinearRegressionLayer.line(slope, intercept, s["x_mean"]) - s["y_mean"]
    return slope * slope * s["vxx"] - 2.0 * slope * s["vxy"] + s["vyy"] + offset * offset


def standardize(summary: Array) -> tuple[Array, Coordinates]:
    """The standardized summary and its coordinates. Vxx must be positive; constant y
    (Vyy = 0) keeps sy = 1."""
    n, x_mean, y_mean, vxx, vxy, vyy = (float(v) for v in summary)
    sx = math.sqrt(vxx)
    sy = math.sqrt(vyy) if vyy > 0.0 else 1.0
    coords = affine(
        A=[[sx / sy, 0.0], [x_mean / sy, 1.0 / sy]],
        A_inv=[[sy / sx, 0.0], [-x_mean * sy / sx, sy]],
        origin=[0.0, y_mean],
        a=sy * sy,
    )
    return np.array([n, 0.0, 0.0, 1.0, vxy / sx / sy, vyy / (sy * sy)]), coords


def standardize_sets(summaries: Array) -> tuple[Array, Coordinates]:
    """:func:`standardize` of every row of [B, 6] at once (the same arithmetic)."""
    n, x_mean, y_mean, vxx, vxy, vyy = summaries.T
    with quiet():
        sx = np.sqrt(vxx)
        sy = np.where(vyy > 0.0, np.sqrt(vyy), 1.0)
        coords = stacked(
            A=[[sx / sy, 0.0], [x_mean / sy, 1.0 / sy]],
            A_inv=[[sy / sx, 0.0], [-x_mean * sy / sx, sy]],
            origin=[0.0, y_mean],
            a=sy * sy,
        )
        zero, one = np.zeros_like(n), np.ones_like(n)
        return np.stack([n, zero, zero, one, vxy / sx / sy, vyy / (sy * sy)], 1), coords


def start(summaries: Array, scaling: Scaling, seeds: Sequence[int | None]) -> Array:
    """The reference post's layer's start: m from N(0, 0.05²) drawn with the row's seed,
    b = 0 (in the loop's coordinates, standardized or raw)."""
    starts = np.zeros((len(summaries), 2))
    drawn = [(i, seed) for i, seed in enumerate(seeds) if seed is not None]
    if drawn:
        rows, chosen = zip(*drawn, strict=True)
        starts[list(rows), 0] = SLOPE_INIT_STDDEV * standard_normals(chosen)
    return starts


#: Where 1 - R² is below this, the moment form of the residual sum of squares (Vyy - ...)
#: has cancelled ~3 or more of its digits: it is taken from the residuals instead (one
#: float64 pass over the data: ~8 ms for 1e6 points, on data a line fits that well only).
CANCELLING = 1e-3


def cancels(summaries: Array) -> Any:
    """Whether the moment form of the RSS has cancelled, for each summary row ([..., 6])."""
    _, _, _, vxx, vxy, vyy = (summaries[..., i] for i in range(6))
    with quiet():
        return (vxx > 0.0) & (vyy > 0.0) & (1.0 - vxy / vxx * (vxy / vyy) <= CANCELLING)


def rss_from_data(
    summary: Array, fitted: Sequence[float], data: Sequence[Array], weights: Array | None
) -> float:
    """Σw·r² from the residuals (where the moment form cancels). Each residual is taken from
    centred values, (y - ȳ) - m·(x - x̄) - (m·x̄ + b - ȳ): the centring subtractions are
    exact in float64 where y and ȳ agree in their leading digits, so a residual keeps its
    digits however large y is (x in the thousands, y ~ 1e14, residuals ~300: ~9 digits of the
    sum, where the moment form keeps ~1)."""
    x_mean, y_mean = float(summary[1]), float(summary[2])
    x, y = data
    slope, intercept = fitted
    with np.errstate(all="ignore"):
        r = (y - y_mean) - slope * (x - x_mean) - (slope * x_mean + intercept - y_mean)
        return float(np.dot(r, r) if weights is None else np.dot(weights * r, r))


def stats(
    fit: AtFit, summary: Array, weights: WeightSummary, options: Mapping[str, Any]
) -> FitStats:
    """Statistics of the line where the fit ended (``summary`` in the caller's units)."""
    at, coords = fit.point, fit.coords
    s = SUMMARY.columns(summary)
    x_mean, y_mean, vxx, vxy, vyy = (float(s[name]) for name in SUMMARY.names[1:])
    slope = vxy / vxx
    dof = weights.count - 2
    loss_ = coords.loss(at.loss)
    # Σw·r²: from the residuals where the moment form cancels (RESIDUAL_SUM). The moment form
    # is exact only to rounding of Vyy: a residual below that (a perfect fit, e.g. two
    # points) is zero, not a log-likelihood of rounding noise.
    rss = options.get("rss")
    if rss is not None:
        ssr, loss_ = rss, rss / weights.total
    else:
        ssr = 0.0 if loss_ <= ROUNDING * vyy else weights.total * loss_
    sigma2 = ssr / dof if dof > 0 else math.nan
    # The noise scale: estimated (s² = rss/dof), or known (absolute_sigma: the weights are
    # 1/sigma² of the true sigma, so s² = 1).
    scale = 1.0 if options.get("absolute_sigma") else sigma2
    n_used = weights.count
    loglik = (
        -0.5 * n_used * (LOG_2PI + math.log(ssr / n_used) + 1.0) + 0.5 * weights.log_sum
        if ssr > 0.0
        else math.inf
    )
    r_squared = 1.0 - loss_ / vyy if vyy > 0.0 else math.nan
    # Cov = σ²·(2/Σw)·H⁻¹ with H = a·AᵀH'A, so in fit coordinates the factor is divided by a.
    computed = fit_stats(
        ("slope", "intercept"),
        fit,
        weights,
        covariance_factor=scale * 2.0 / weights.total / coords.a,
        loglik=loglik,
        closed=(slope, y_mean - slope * x_mean),
        closed_loss=max(vyy - vxy * slope, 0.0),
        r_squared=r_squared if math.isfinite(r_squared) else None,
        residual_std=math.sqrt(sigma2) if dof > 0 and math.isfinite(sigma2) else None,
    )
    return replace(computed, rss=ssr if math.isfinite(ssr) else None)


def stats_of_sets(fit: SetsAtFit, summaries: Array, options: Mapping[str, Any]) -> SetStats:
    """:func:`stats` of every unweighted set of a batch at once (NaN for its None)."""
    coords: Any = fit.coords  # stacked: numbers are arrays
    nan = np.nan
    n, x_mean, y_mean, vxx, vxy, vyy = summaries.T
    rss = options.get("rss")  # [B], NaN where the moment form keeps its digits
    with quiet():
        slope = vxy / vxx
        dof = n - 2
        loss_ = coords.loss(fit.loss)
        ssr = np.where(loss_ <= ROUNDING * vyy, 0.0, n * loss_)
        if rss is not None:
            ssr = np.where(np.isnan(rss), ssr, rss)
            loss_ = np.where(np.isnan(rss), loss_, ssr / n)
        sigma2 = np.where(dof > 0, ssr / dof, nan)
        loglik = np.where(ssr > 0.0, -0.5 * n * (LOG_2PI + np.log(ssr / n) + 1.0), np.inf)
        r_squared = np.where(vyy > 0.0, 1.0 - loss_ / vyy, nan)
        residual_std = np.where((dof > 0) & np.isfinite(sigma2), np.sqrt(sigma2), nan)
        return fit_stats_of_sets(
            ("slope", "intercept"),
            fit,
            n,
            covariance_factor=sigma2 * 2.0 / n / coords.a,
            loglik=loglik,
            closed=(slope, y_mean - slope * x_mean),
            closed_loss=np.maximum(vyy - vxy * slope, 0.0),
            r_squared=r_squared,
            residual_std=residual_std,
        )


LINEAR = ModelSpec(
    name="linear",
    params=("slope", "intercept"),
    data=("x", "y"),
    summary=SUMMARY,
    moments=moments,
    moments_graph=moments_graph,
    moments_of_sets=moments_of_sets,
    complete=complete,
    loss=loss,
    spread="vxx",
    constant=all_equal("x", "the slope is not determined"),
    standardize=standardize,
    standardize_sets=standardize_sets,
    start=start,
    random_start=True,
    stats=stats,
    stats_of_sets=stats_of_sets,
    residual_sum=ResidualSum(cancels, rss_from_data),
    dummy=(2.0, 0.0, 0.0, 1.0, 0.0, 1.0),
    dummy_start=(0.0, 0.0),
    options={"absolute_sigma": False},
)
