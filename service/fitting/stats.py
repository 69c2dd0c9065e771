"""Statistics of a fit at the parameters gradient descent reached.

The loss, its gradient and its exact Hessian come from one XLA-compiled call with nested
``GradientTape``s on the same loss the training loop minimized. The rest is closed-form
arithmetic on the data summary:

- linear (weighted least squares, weights as inverse variances like statsmodels' WLS):
  σ² = Σw·r² / (n - 2) and Cov = σ²·(XᵀWX)⁻¹ = σ²·(2/Σw)·H⁻¹, since the loss
  Σw·r²/Σw has Hessian H = (2/Σw)·XᵀWX. R² = 1 - loss / weighted variance of y; the
  log-likelihood is that of y ~ N(mx + b, σ²/w) at the maximum-likelihood σ².
- Gaussian: Cov = inverse observed information = inverse Hessian of the summed (weighted)
  NLL, i.e. H⁻¹·scale/Σw for the loss as trained (scale = Σw for "sum", 1 for "mean").

AIC = 2k - 2·loglik and BIC = k·ln(n) - 2·loglik with k = 2 (statsmodels' convention for
least squares: the noise variance is not counted). n counts the points with positive weight.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import tensorflow as tf

from service.fitting.losses import LOG_2PI
from service.fitting.results import FitStats

Array = npt.NDArray[np.float64]
#: Parameters of either model.
K = 2


@dataclass(frozen=True, slots=True)
class WeightSummary:
    """Σw, the count and Σlog of the positive weights, and all points (no weights: n, n, 0)."""

    total: float
    count: int
    log_sum: float
    points: int


def compile_curvature(loss_fn: Callable[[Any, Any], Any], summary_size: int) -> Any:
    """XLA-compiled [loss, gradient (2), Hessian (2x2, row-major)] at ``params``, by nested
    GradientTapes: exact second derivatives of the training loss."""

    @tf.function(
        jit_compile=True,
        input_signature=[
            tf.TensorSpec([summary_size], tf.float64),
            tf.TensorSpec([K], tf.float64),
        ],
    )
    def curvature(summary: Any, params: Any) -> Any:
        with tf.GradientTape(persistent=True) as outer:
            outer.watch(params)
            with tf.GradientTape() as inner:
                inner.watch(params)
                loss = loss_fn(params, summary)
            gradient = inner.gradient(loss, params)
            first, second = gradient[0], gradient[1]
        rows = [outer.gradient(first, params), outer.gradient(second, params)]
        del outer
        return tf.concat([tf.reshape(loss, [1]), gradient, *rows], axis=0)

    return curvature


def _evaluate(curvature: Callable[..., Any], summary: Array, params: list[float]) -> Array:
    values: Array = curvature(
        tf.constant(summary, tf.float64), tf.constant(params, tf.float64)
    ).numpy()
    return values


def _newton_step(hessian: Array, gradient: Array) -> float | None:
    """‖H⁻¹·g‖: how far the optimum is, by Newton's method (exact for the quadratic MSE);
    None where H is not positive definite (not near a minimum)."""
    try:
        np.linalg.cholesky(hessian)
    except np.linalg.LinAlgError:
        return None
    return _finite(float(np.linalg.norm(np.linalg.solve(hessian, gradient))))


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _covariance(hessian: Array, factor: float) -> Array | None:
    """factor·H⁻¹, or None when H is singular or not positive definite (not at a minimum)."""
    if not np.all(np.isfinite(hessian)):
        return None
    try:
        np.linalg.cholesky(hessian)
    except np.linalg.LinAlgError:
        return None
    inverse: Array = np.asarray(np.linalg.inv(hessian) * factor, dtype=np.float64)
    return inverse if np.all(np.isfinite(inverse)) else None


def _uncertainty(
    covariance: Array | None,
) -> tuple[
    tuple[float | None, float | None],
    tuple[tuple[float | None, float | None], tuple[float | None, float | None]],
    float | None,
]:
    if covariance is None:
        return (None, None), ((None, None), (None, None)), None
    se = np.sqrt(np.diag(covariance))
    correlation = float(covariance[0, 1] / (se[0] * se[1]))
    rows = tuple(tuple(_finite(float(v)) for v in row) for row in covariance)
    return (
        (_finite(float(se[0])), _finite(float(se[1]))),
        (rows[0][:2], rows[1][:2]),  # type: ignore[return-value]
        _finite(correlation),
    )


def _criteria(loglik: float, n_used: int) -> tuple[float | None, float | None, float | None]:
    if not math.isfinite(loglik):
        return None, None, None
    return loglik, 2.0 * K - 2.0 * loglik, K * math.log(n_used) - 2.0 * loglik


def linear_stats(
    curvature: Callable[..., Any], summary: Array, weights: WeightSummary, params: list[float]
) -> FitStats:
    """Statistics of a line (``summary`` = [n, x̄, ȳ, Vxx, Vxy, Vyy], weighted)."""
    values = _evaluate(curvature, summary, params)
    loss, gradient, hessian = float(values[0]), values[1:3], values[3:7].reshape(2, 2)
    x_mean, y_mean, vxx, vxy, vyy = (float(v) for v in summary[1:6])
    slope = vxy / vxx
    closed = (slope, y_mean - slope * x_mean)
    closed_loss = max(vyy - vxy * slope, 0.0)

    n_used = weights.count
    dof = n_used - K
    ssr = weights.total * loss  # Σw·r²
    sigma2 = ssr / dof if dof > 0 else math.nan
    covariance = _covariance(hessian, sigma2 * 2.0 / weights.total) if dof > 0 else None
    std_errors, cov, correlation = _uncertainty(covariance)
    with np.errstate(divide="ignore"):
        loglik = (
            -0.5 * n_used * (LOG_2PI + math.log(ssr / n_used) + 1.0) + 0.5 * weights.log_sum
            if ssr > 0.0
            else math.inf
        )
    loglik_, aic, bic = _criteria(loglik, n_used)
    return FitStats(
        names=("slope", "intercept"),
        n=weights.points,
        n_used=n_used,
        dof=dof,
        loss=loss,
        gradient_norm=float(np.linalg.norm(gradient)),
        newton_step=_newton_step(hessian, gradient) if np.all(np.isfinite(hessian)) else None,
        std_errors=std_errors,
        covariance=cov,
        correlation=correlation,
        log_likelihood=loglik_,
        aic=aic,
        bic=bic,
        closed_form=closed,
        closed_form_loss=closed_loss,
        gap=(params[0] - closed[0], params[1] - closed[1]),
        r_squared=_finite(1.0 - loss / vyy) if vyy > 0.0 else None,
        residual_std=_finite(math.sqrt(sigma2)) if dof > 0 else None,
    )


def gaussian_stats(
    curvature: Callable[..., Any], summary: Array, weights: WeightSummary, params: list[float]
) -> FitStats:
    """Statistics of a normal fit (``summary`` = [n, ȳ, Vyy, scale], weighted); ``params`` as
    trained (s may be negative: the NLL depends on s², and the reported std is |s|)."""
    values = _evaluate(curvature, summary, params)
    loss, gradient, hessian = float(values[0]), values[1:3], values[3:7].reshape(2, 2)
    y_mean, vyy, scale = float(summary[1]), float(summary[2]), float(summary[3])
    closed = (y_mean, math.sqrt(vyy))
    mean, std = params[0], abs(params[1])
    per_weight = 0.5 * (LOG_2PI + math.log(vyy) + 1.0)  # mean NLL at the optimum

    newton = _newton_step(hessian, gradient) if np.all(np.isfinite(hessian)) else None
    if params[1] < 0.0:  # report for |s|: flip the sign of the cross terms
        hessian = hessian * np.array([[1.0, -1.0], [-1.0, 1.0]])
    covariance = _covariance(hessian, scale / weights.total)
    std_errors, cov, correlation = _uncertainty(covariance)
    loglik = -loss * weights.total / scale
    loglik_, aic, bic = _criteria(loglik, weights.count)
    return FitStats(
        names=("mean", "std"),
        n=weights.points,
        n_used=weights.count,
        dof=weights.count - K,
        loss=loss,
        gradient_norm=float(np.linalg.norm(gradient)),
        newton_step=newton,
        std_errors=std_errors,
        covariance=cov,
        correlation=correlation,
        log_likelihood=loglik_,
        aic=aic,
        bic=bic,
        closed_form=closed,
        closed_form_loss=per_weight * scale,
        gap=(mean - closed[0], std - closed[1]),
    )
