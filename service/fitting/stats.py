"""Statistics of a fit at the parameters gradient descent reached.

The loss, its gradient and its exact Hessian come from nested ``GradientTape``s on the same
loss the training loop minimized, evaluated inside the compiled loop where it stops. The rest
is closed-form arithmetic on the data summary:

- linear (weighted least squares, weights as inverse variances like statsmodels' WLS):
  σ² = Σw·r² / (n - 2) and Cov = σ²·(XᵀWX)⁻¹ = σ²·(2/Σw)·H⁻¹, since the loss
  Σw·r²/Σw has Hessian H = (2/Σw)·XᵀWX. R² = 1 - loss / weighted variance of y; the
  log-likelihood is that of y ~ N(mx + b, σ²/w) at the maximum-likelihood σ².
- Gaussian: Cov = inverse observed information = inverse Hessian of the summed (weighted)
  NLL, i.e. H⁻¹·scale/Σw for the loss as trained (scale = Σw for "sum", 1 for "mean").

The curvature is that of the loss in fit coordinates (standardized by default, see
:mod:`service.fitting.scaling`); inverses are taken there and mapped to the caller's units.

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
from service.fitting.options import CONVERGED_RTOL
from service.fitting.results import FitStats
from service.fitting.scaling import IDENTITY, Coordinates

Array = npt.NDArray[np.float64]
#: Parameters of either model.
K = 2
#: Relative size of float64 rounding in the moment-form losses.
ROUNDING = 64 * float(np.finfo(np.float64).eps)


@dataclass(frozen=True, slots=True)
class WeightSummary:
    """Σw, the count and Σlog of the positive weights, and all points (no weights: n, n, 0)."""

    total: float
    count: int
    log_sum: float
    points: int


def curvature(loss_fn: Callable[[Any, Any], Any], params: Any, summary: Any) -> Any:
    """[loss, gradient (2), Hessian (2x2, row-major)] at ``params``, by nested GradientTapes:
    exact second derivatives of the training loss. Traced into the compiled training loop,
    which returns it for the parameters it ends on (no extra call per fit)."""
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


def curvature_rows(losses_fn: Callable[[Any, Any], Any], params: Any, summary: Any) -> Any:
    """:func:`curvature` for every row of a batch at once ([B, 7]). The rows are independent,
    so the gradient of the summed loss is each row's gradient, and the gradient of the summed
    first (second) gradient component is each row's first (second) Hessian row: still exact
    second derivatives by nested GradientTapes."""
    with tf.GradientTape(persistent=True) as outer:
        outer.watch(params)
        with tf.GradientTape() as inner:
            inner.watch(params)
            losses = losses_fn(params, summary)
            total = tf.reduce_sum(losses)
        gradient = inner.gradient(total, params)
        first, second = tf.reduce_sum(gradient[:, 0]), tf.reduce_sum(gradient[:, 1])
    rows = [outer.gradient(first, params), outer.gradient(second, params)]
    del outer
    return tf.concat([losses[:, None], gradient, *rows], axis=1)


#: Length of :func:`curvature`'s output.
CURVATURE_SIZE = 7


@dataclass(frozen=True, slots=True)
class _Curvature:
    """Loss, gradient and (symmetric) Hessian at the parameters, as Python floats: 2x2
    algebra by hand costs microseconds where numpy's linalg costs tens per call."""

    loss: float
    g0: float
    g1: float
    h00: float
    h01: float
    h11: float

    @classmethod
    def of(cls, values: Array) -> _Curvature:
        loss, g0, g1, h00, h01, h10, h11 = (float(x) for x in values)
        return cls(loss, g0, g1, h00, 0.5 * (h01 + h10), h11)

    @property
    def gradient_norm(self) -> float:
        return math.hypot(self.g0, self.g1)

    def flipped(self) -> _Curvature:
        """The same for the second parameter's sign reversed (std = |s|)."""
        return _Curvature(self.loss, self.g0, -self.g1, self.h00, -self.h01, self.h11)

    def inverse(self) -> tuple[float, float, float] | None:
        """H⁻¹ as (00, 01, 11), or None unless H is positive definite (at a minimum)."""
        det = self.h00 * self.h11 - self.h01 * self.h01
        if not (math.isfinite(det) and self.h00 > 0.0 and det > 0.0):
            return None
        return self.h11 / det, -self.h01 / det, self.h00 / det

    def newton_vector(self) -> tuple[float, float] | None:
        """H⁻¹·g: how far the optimum is, by Newton's method (exact for the quadratic MSE);
        None away from a minimum."""
        inverse = self.inverse()
        if inverse is None:
            return None
        i00, i01, i11 = inverse
        return (i00 * self.g0 + i01 * self.g1, i01 * self.g0 + i11 * self.g1)

    def newton_step(self) -> float | None:
        """‖H⁻¹·g‖, or None away from a minimum."""
        vector = self.newton_vector()
        return None if vector is None else _finite(math.hypot(*vector))


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


Pair = tuple[float | None, float | None]


def _uncertainty(
    curvature: _Curvature, factor: float, coords: Coordinates
) -> tuple[Pair, tuple[Pair, Pair], float | None]:
    """Standard errors, covariance and correlation in the caller's units: factor·H⁻¹ in fit
    coordinates (well conditioned), mapped by ``coords``; None where undefined."""
    inverse = curvature.inverse() if math.isfinite(factor) and factor > 0.0 else None
    if inverse is None:
        return (None, None), ((None, None), (None, None)), None
    i00, i01, i11 = (factor * v for v in inverse)
    (c00, c01), (_, c11) = coords.covariance(((i00, i01), (i01, i11)))
    if not (c00 > 0.0 and c11 > 0.0):
        return (None, None), ((None, None), (None, None)), None
    se0, se1 = math.sqrt(c00), math.sqrt(c11)
    covariance = ((_finite(c00), _finite(c01)), (_finite(c01), _finite(c11)))
    return (_finite(se0), _finite(se1)), covariance, _finite(c01 / se0 / se1)


def _criteria(loglik: float, n_used: int) -> tuple[float | None, float | None, float | None]:
    if not math.isfinite(loglik):
        return None, None, None
    return loglik, 2.0 * K - 2.0 * loglik, K * math.log(n_used) - 2.0 * loglik


def weight_summary(weights: Array | None, n: int) -> WeightSummary:
    """What the statistics need of the weights (of ``n`` points; None: all weights 1)."""
    if weights is None:
        return WeightSummary(total=float(n), count=n, log_sum=0.0, points=n)
    positive = weights[weights > 0.0]
    return WeightSummary(
        total=float(weights.sum()),
        count=int(positive.size),
        log_sum=float(np.log(positive).sum()),
        points=n,
    )


@dataclass(frozen=True, slots=True)
class AtFit:
    """Where a fit ended, in fit coordinates: the loss, gradient and Hessian there (read
    once from the :func:`curvature` vector), the parameters, and the map to the caller's
    units."""

    point: _Curvature
    params: tuple[float, float]
    coords: Coordinates = IDENTITY

    @classmethod
    def of(
        cls, curvature: Array, params: tuple[float, float], coords: Coordinates = IDENTITY
    ) -> AtFit:
        return cls(_Curvature.of(curvature), params, coords)


def is_converged(at: AtFit, gradient_tolerance: float | None = None) -> bool:
    """At the optimum, judged in fit coordinates (scale-free when standardized): the Newton
    step is within CONVERGED_RTOL of max(1, |parameters|), or the gradient norm within the
    caller's ``gradient_tolerance``. (A loss-tolerance stop alone is not enough: an
    oscillating optimizer can stall far from the optimum.)"""
    if gradient_tolerance is not None and at.point.gradient_norm <= gradient_tolerance:
        return True
    step = at.point.newton_step()
    return step is not None and step <= CONVERGED_RTOL * max(1.0, math.hypot(*at.params))


def _stats(
    names: tuple[str, str],
    at: _Curvature,
    coords: Coordinates,
    weights: WeightSummary,
    covariance_factor: float,
    loglik: float,
    fitted: tuple[float, float],
    closed: tuple[float, float],
    closed_loss: float,
    r_squared: float | None = None,
    residual_std: float | None = None,
) -> FitStats:
    """The parts both models share: uncertainty from the Hessian in fit coordinates, the
    information criteria, and the closed-form check (None where float64 overflows)."""
    std_errors, covariance, correlation = _uncertainty(at, covariance_factor, coords)
    loglik_, aic, bic = _criteria(loglik, weights.count)
    loss = coords.loss(at.loss)
    gap = (fitted[0] - closed[0], fitted[1] - closed[1], loss - closed_loss)
    closed_ok = all(math.isfinite(v) for v in (*closed, closed_loss))
    fit_step = at.newton_vector()
    return FitStats(
        names=names,
        n=weights.points,
        n_used=weights.count,
        dof=weights.count - K,
        loss=loss,
        gradient_norm=_finite(math.hypot(*coords.gradient((at.g0, at.g1)))),
        newton_step=None if fit_step is None else _finite(math.hypot(*coords.step(fit_step))),
        std_errors=std_errors,
        covariance=covariance,
        correlation=correlation,
        log_likelihood=loglik_,
        aic=aic,
        bic=bic,
        closed_form=closed if closed_ok else None,
        closed_form_loss=closed_loss if closed_ok else None,
        gap=gap if closed_ok and all(math.isfinite(v) for v in gap) else None,
        r_squared=r_squared,
        residual_std=residual_std,
    )


def linear_stats(fit: AtFit, summary: Array, weights: WeightSummary) -> FitStats:
    """Statistics of a line (``summary`` = [n, x̄, ȳ, Vxx, Vxy, Vyy] in the caller's units,
    weighted) where the fit ended."""
    at = fit.point
    coords = fit.coords
    x_mean, y_mean, vxx, vxy, vyy = (float(v) for v in summary[1:6])
    slope = vxy / vxx
    n_used = weights.count
    dof = n_used - K
    loss = coords.loss(at.loss)
    # Σw·r². The moment form of the loss is exact only to rounding of Vyy: a residual below
    # that (a perfect fit, e.g. two points) is zero, not a log-likelihood of rounding noise.
    exact = loss <= ROUNDING * vyy
    ssr = 0.0 if exact else weights.total * loss
    sigma2 = ssr / dof if dof > 0 else math.nan
    loglik = (
        -0.5 * n_used * (LOG_2PI + math.log(ssr / n_used) + 1.0) + 0.5 * weights.log_sum
        if ssr > 0.0
        else math.inf
    )
    # Cov = σ²·(2/Σw)·H⁻¹ with H = a·AᵀH'A, so in fit coordinates the factor is divided by a.
    return _stats(
        ("slope", "intercept"),
        at,
        coords,
        weights,
        covariance_factor=sigma2 * 2.0 / weights.total / coords.a,
        loglik=loglik,
        fitted=coords.from_fit(fit.params),
        closed=(slope, y_mean - slope * x_mean),
        closed_loss=max(vyy - vxy * slope, 0.0),
        r_squared=_finite(1.0 - loss / vyy) if vyy > 0.0 else None,
        residual_std=_finite(math.sqrt(sigma2)) if dof > 0 else None,
    )


def gaussian_stats(fit: AtFit, summary: Array, weights: WeightSummary) -> FitStats:
    """Statistics of a normal fit (``summary`` = [n, ȳ, Vyy, scale] in the caller's units,
    weighted) where the fit ended; s may be negative there (the NLL depends on s², and the
    reported std is |s|)."""
    at = fit.point
    m, s = fit.params
    if s < 0.0:  # report for |s|
        at, s = at.flipped(), -s
    coords = fit.coords
    y_mean, vyy, scale = float(summary[1]), float(summary[2]), float(summary[3])
    mean_nll = 0.5 * (LOG_2PI + math.log(vyy) + 1.0)  # per unit weight, at the optimum
    return _stats(
        ("mean", "std"),
        at,
        coords,
        weights,
        covariance_factor=scale / weights.total / coords.a,
        loglik=-coords.loss(at.loss) * weights.total / scale,
        fitted=coords.from_fit((m, s)),
        closed=(y_mean, math.sqrt(vyy)),
        closed_loss=mean_nll * scale,
    )


def not_converged(stats: FitStats, stop: str, scaling: str) -> tuple[str, ...]:
    """Plain-words reasons why a fit that did not converge should not be trusted as is."""
    names = stats.names
    where = "stopped by the deadline" if stop == "timeout" else f"stopped on {stop}"
    lines = [
        f"not converged ({where}): the parameters are not at the optimum; the gradient norm "
        f"is {_show(stats.gradient_norm)} and the Newton step to the optimum "
        f"{_show(stats.newton_step)}"
    ]
    if stats.gap is not None and stats.closed_form is not None:
        lines.append(
            f"the exact optimum is {names[0]} = {stats.closed_form[0]:.15g}, "
            f"{names[1]} = {stats.closed_form[1]:.15g}; the returned parameters differ by "
            f"{stats.gap[0]:.3g} and {stats.gap[1]:.3g}"
        )
    advice = 'use optimizer "newton", or run more epochs or a larger learning_rate'
    if scaling == "none":
        advice += '; scaling "none" fits in raw units, where gradient descent crawls or '
        advice += 'diverges on data far from unit scale: use scaling "standardize"'
    lines.append(f"to converge: {advice}")
    return tuple(lines)


def _show(value: float | None) -> str:
    return "undefined (not at a minimum)" if value is None else f"{value:.3g}"
