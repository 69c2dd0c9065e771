"""Statistics of a fit at the parameters the loop reached, for any model of k parameters.

The loss, its gradient and its exact Hessian come from nested ``GradientTape``s on the same
loss the training loop minimized, evaluated inside the compiled loop where it stops. Each
model (:mod:`service.fitting.models`) turns them into its statistics with the shared parts
here: uncertainty from the inverse Hessian, taken in fit coordinates (well conditioned)
and mapped to the caller's units (:mod:`service.fitting.scaling`); the information
criteria; the gap to the model's closed form; convergence.

AIC = 2k - 2·loglik and BIC = k·ln(n) - 2·loglik (statsmodels' convention for least
squares: the noise variance is not counted). n counts the points with positive weight.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import tensorflow as tf

from service.fitting import small
from service.fitting.layout import Layout
from service.fitting.options import CONVERGED_RTOL
from service.fitting.results import FitStats, Optional
from service.fitting.results import Matrix as MatrixOrNone
from service.fitting.scaling import IDENTITY, Coordinates
from service.fitting.small import Matrix, Numbers, Vector

Array = npt.NDArray[np.float64]
#: Relative size of float64 rounding in the moment-form losses.
ROUNDING = 64 * float(np.finfo(np.float64).eps)


@functools.cache
def curvature_layout(k: int) -> Layout:
    """[loss, gradient (k), Hessian (k·k, row-major)]: what :func:`curvature` returns."""
    return Layout.of(loss=None, gradient=k, hessian=k * k)


@dataclass(frozen=True, slots=True)
class WeightSummary:
    """Σw, the count and Σlog of the positive weights, and all points (no weights: n, n, 0)."""

    total: float
    count: int
    log_sum: float
    points: int


def curvature(loss_fn: Callable[[Any, Any], Any], params: Any, summary: Any) -> Any:
    """:func:`curvature_layout` at ``params`` ([k]), by nested GradientTapes: exact second
    derivatives of the training loss. Traced into the compiled training loop, which returns
    it for the parameters it ends on (no extra call per fit)."""
    k = params.shape[0]
    with tf.GradientTape(persistent=True) as outer:
        outer.watch(params)
        with tf.GradientTape() as inner:
            inner.watch(params)
            loss = loss_fn(params, summary)
        gradient = inner.gradient(loss, params)
        components = [gradient[i] for i in range(k)]
    rows = [outer.gradient(component, params) for component in components]
    del outer
    return tf.concat([tf.reshape(loss, [1]), gradient, *rows], axis=0)


def residuals_and_jacobian(
    residuals_fn: Callable[[Any, Any], Any], p: Any, summary: Any
) -> tuple[Any, Any]:
    """The residuals at ``p`` ([n]; [B, n] for a batch [B, k]) and their exact Jacobian
    ([n, k]; [B, n, k]) by forward mode: one
    Jacobian-vector product per parameter (``tf.autodiff.ForwardAccumulator``), O(n·k). The
    reverse-mode Jacobian (``GradientTape.jacobian``) vectorizes one backward pass per
    residual, O(n²): 133 ms against ~10 ms for a cached ENSO fit (n = 168, k = 9), ~1 ms an
    iteration at n = 1,000. (Vectorizing the k products with ``tf.vectorized_map`` ran slower
    here, compiled slower, and held the GIL for a quarter second more while tracing.)"""
    k = p.shape[-1]
    columns = []
    for j in range(k):  # of one set ([k]) or of every set at once ([B, k] -> [B, n, k])
        tangent = tf.zeros_like(p) + tf.one_hot(j, k, dtype=p.dtype)
        with tf.autodiff.ForwardAccumulator(p, tangent) as accumulator:
            r = residuals_fn(p, summary)
        columns.append(accumulator.jvp(r, unconnected_gradients=tf.UnconnectedGradients.ZERO))
    return r, tf.stack(columns, axis=-1)


def curvature_rows(losses_fn: Callable[[Any, Any], Any], params: Any, summary: Any) -> Any:
    """:func:`curvature` for every row of a batch at once ([B, 1 + k + k·k]). The rows are
    independent, so the gradient of the summed loss is each row's gradient, and the gradient
    of the summed i-th gradient component is each row's i-th Hessian row: still exact second
    derivatives by nested GradientTapes."""
    k = params.shape[1]
    with tf.GradientTape(persistent=True) as outer:
        outer.watch(params)
        with tf.GradientTape() as inner:
            inner.watch(params)
            losses = losses_fn(params, summary)
            total = tf.reduce_sum(losses)
        gradient = inner.gradient(total, params)
        components = [tf.reduce_sum(gradient[:, i]) for i in range(k)]
    rows = [outer.gradient(component, params) for component in components]
    del outer
    return tf.concat([losses[:, None], gradient, *rows], axis=1)


@dataclass(frozen=True)
class Curvature:
    """Loss, gradient and (symmetrized) Hessian at the parameters, in fit coordinates, as
    floats (:mod:`service.fitting.small`). The inverse is computed once, on first use."""

    loss: float
    gradient: Vector
    hessian: Matrix

    @classmethod
    def of(cls, values: Array, k: int) -> Curvature:
        flat = values.tolist()
        h = [flat[1 + k + i * k : 1 + k + (i + 1) * k] for i in range(k)]
        return cls(float(flat[0]), tuple(flat[1 : 1 + k]), small.symmetric(small.matrix(h)))

    @classmethod
    def of_rows(cls, values: Array, k: int) -> list[Curvature]:
        """:meth:`of` of every row of ``values`` ([B, 1 + k + k²]), their inverses computed
        at once (:func:`small.inverse_positive_definite_rows`: bitwise the same numbers)."""
        h = values[:, 1 + k :].reshape(-1, k, k)
        h = 0.5 * (h + np.swapaxes(h, 1, 2))
        inverse, ok = small.inverse_positive_definite_rows(h)
        out = []
        rows = zip(values.tolist(), h.tolist(), inverse.tolist(), ok.tolist(), strict=True)
        for row, hessian, inv, good in rows:
            point = cls(float(row[0]), tuple(row[1 : 1 + k]), tuple(map(tuple, hessian)))
            point.__dict__["_inverse"] = tuple(map(tuple, inv)) if good else None  # the cache
            out.append(point)
        return out

    @property
    def gradient_norm(self) -> float:
        return small.norm(self.gradient)

    def flipped(self, index: int) -> Curvature:
        """The same for parameter ``index``'s sign reversed (e.g. std = |s|)."""
        sign = [-1.0 if i == index else 1.0 for i in range(len(self.gradient))]
        gradient = tuple(s * g for s, g in zip(sign, self.gradient, strict=True))
        hessian = tuple(
            tuple(si * sj * h for sj, h in zip(sign, row, strict=True))
            for si, row in zip(sign, self.hessian, strict=True)
        )
        return Curvature(self.loss, gradient, hessian)

    @functools.cached_property
    def _inverse(self) -> Matrix | None:
        return small.inverse_positive_definite(self.hessian)

    def inverse(self) -> Matrix | None:
        """H⁻¹, or None unless H is positive definite (at a minimum)."""
        return self._inverse

    @functools.cached_property
    def _newton(self) -> Vector | None:
        inverse = self._inverse
        return None if inverse is None else small.matvec(inverse, self.gradient)

    def newton_vector(self) -> Vector | None:
        """H⁻¹·g: how far the optimum is, by Newton's method (exact for a quadratic loss);
        None away from a minimum."""
        return self._newton

    def newton_step(self) -> float | None:
        """‖H⁻¹·g‖, or None away from a minimum."""
        vector = self._newton
        return None if vector is None else _finite(small.norm(vector))


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _undefined(k: int) -> MatrixOrNone:
    return tuple((None,) * k for _ in range(k))


def _uncertainty(
    curvature: Curvature, factor: float, coords: Coordinates
) -> tuple[Optional, MatrixOrNone, MatrixOrNone]:
    """Standard errors, covariance and correlation in the caller's units: factor·H⁻¹ in fit
    coordinates (well conditioned), mapped by ``coords``; None where undefined."""
    k = len(curvature.gradient)
    inverse = curvature.inverse() if math.isfinite(factor) and factor > 0.0 else None
    if inverse is None:
        return (None,) * k, _undefined(k), _undefined(k)
    scaled = tuple(tuple(factor * v for v in row) for row in inverse)
    cov = small.symmetric(coords.covariance(scaled))  # exactly symmetric after the map
    if not all(cov[i][i] > 0.0 for i in range(k)):
        return (None,) * k, _undefined(k), _undefined(k)
    se = tuple(math.sqrt(cov[i][i]) for i in range(k))
    correlation = tuple(
        tuple(1.0 if i == j else _ratio(cov[i][j], se[i] * se[j]) for j in range(k))
        for i in range(k)
    )
    covariance = tuple(tuple(_finite(v) for v in row) for row in cov)
    return tuple(_finite(v) for v in se), covariance, correlation


def _ratio(a: float, b: float) -> float | None:
    try:
        return _finite(a / b)
    except ZeroDivisionError:
        return None


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

    point: Curvature
    params: Vector
    coords: Coordinates = IDENTITY

    @classmethod
    def of(cls, curvature: Array, params: Numbers, coords: Coordinates = IDENTITY) -> AtFit:
        p = small.vector(params)
        return cls(Curvature.of(curvature, len(p)), p, coords)

    def flipped(self, index: int) -> AtFit:
        """The same point with parameter ``index``'s sign reversed (a loss even in it)."""
        params = tuple(-v if i == index else v for i, v in enumerate(self.params))
        return AtFit(self.point.flipped(index), params, self.coords)


def is_converged(at: AtFit, gradient_tolerance: float | None = None) -> bool:
    """At the optimum, judged in fit coordinates (scale-free when standardized): the Newton
    step is within CONVERGED_RTOL of max(1, |parameters|), or the gradient norm within the
    caller's ``gradient_tolerance``. (A loss-tolerance stop alone is not enough: an
    oscillating optimizer can stall far from the optimum.)"""
    if gradient_tolerance is not None and at.point.gradient_norm <= gradient_tolerance:
        return True
    step = at.point.newton_step()
    return step is not None and step <= CONVERGED_RTOL * max(1.0, small.norm(at.params))


def fit_stats(
    names: Sequence[str],
    fit: AtFit,
    weights: WeightSummary,
    covariance_factor: float,
    loglik: float,
    closed: Sequence[float] | None,
    closed_loss: float,
    r_squared: float | None = None,
    residual_std: float | None = None,
) -> FitStats:
    """The statistics every model shares: uncertainty from ``covariance_factor``·H⁻¹ in fit
    coordinates, the information criteria, and the gap to the model's closed form (``closed``
    in the caller's units; None where a model has none, or where float64 overflows)."""
    at, coords = fit.point, fit.coords
    k = len(names)
    std_errors, covariance, correlation = _uncertainty(at, covariance_factor, coords)
    criteria: tuple[float | None, float | None, float | None] = (None, None, None)
    if math.isfinite(loglik):
        criteria = (loglik, 2.0 * k - 2.0 * loglik, k * math.log(weights.count) - 2.0 * loglik)
    loss = coords.loss(at.loss)
    fitted = coords.from_fit(fit.params)
    closed_ok = closed is not None and all(math.isfinite(v) for v in (*closed, closed_loss))
    gap: tuple[tuple[float, ...], float] | None = None
    if closed is not None and closed_ok:
        params_gap = tuple(f - c for f, c in zip(fitted, closed, strict=True))
        if all(math.isfinite(v) for v in (*params_gap, loss - closed_loss)):
            gap = (params_gap, loss - closed_loss)
    fit_step = at.newton_vector()
    return FitStats(
        names=tuple(names),
        n=weights.points,
        n_used=weights.count,
        dof=weights.count - k,
        loss=loss,
        gradient_norm=_finite(small.norm(coords.gradient(at.gradient))),
        newton_step=None if fit_step is None else _finite(small.norm(coords.step(fit_step))),
        std_errors=std_errors,
        covariance=covariance,
        correlation=correlation,
        log_likelihood=criteria[0],
        aic=criteria[1],
        bic=criteria[2],
        closed_form=tuple(float(v) for v in closed) if closed is not None and closed_ok else None,
        closed_form_loss=closed_loss if closed_ok else None,
        gap=gap,
        r_squared=r_squared,
        residual_std=residual_std,
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
        pairs = zip(names, stats.closed_form, strict=True)
        optimum = ", ".join(f"{name} = {value:.15g}" for name, value in pairs)
        gaps = " and ".join(f"{v:.3g}" for v in stats.gap[0])
        lines.append(f"the exact optimum is {optimum}; the returned parameters differ by {gaps}")
    advice = 'use optimizer "newton", or run more epochs or a larger learning_rate'
    if scaling == "none":
        advice += '; scaling "none" fits in raw units, where gradient descent crawls or '
        advice += 'diverges on data far from unit scale: use scaling "standardize"'
    lines.append(f"to converge: {advice}")
    return tuple(lines)


def _show(value: float | None) -> str:
    return "undefined (not at a minimum)" if value is None else f"{value:.3g}"


# -- every set of a batch at once ------------------------------------------------------------
#
# The same statistics for B fits at once, for batches: each number of the scalar code above
# becomes a [B] array, vectors tuples of k such arrays and matrices tuples of their rows, so
# the arithmetic (and :mod:`service.fitting.small`'s and :class:`Coordinates`' own, which
# take arrays as they are) is the same, element by element. What the scalar code does with a
# branch is a mask here; undefined values are NaN (None once read per set, by
# :meth:`SetStats.row`). Per-set Python cost ~100 µs a set; this, ~1 µs.

ArrayVector = tuple[Array, ...]
ArrayMatrix = tuple[ArrayVector, ...]
#: :mod:`small` and :class:`Coordinates`, typed for floats, taking arrays (duck-typed).
_small: Any = small


@dataclass(frozen=True, slots=True)
class SetsAtFit:
    """:class:`AtFit` of every set of a batch: loss [B], gradient, Hessian and parameters as
    tuples of [B] arrays, and the sets' maps (:func:`~service.fitting.scaling.stacked`)."""

    loss: Array
    gradient: ArrayVector
    hessian: ArrayMatrix
    params: ArrayVector
    coords: Coordinates = IDENTITY

    @classmethod
    def of(cls, curvature: Array, params: Array, coords: Coordinates = IDENTITY) -> SetsAtFit:
        """From the compiled loop's [B, 1 + k + k·k] curvature rows and [B, k] parameters."""
        k = params.shape[1]
        columns = tuple(np.ascontiguousarray(c) for c in curvature.T)
        h = tuple(columns[1 + k + i * k : 1 + k + (i + 1) * k] for i in range(k))
        vector = tuple(np.ascontiguousarray(c) for c in params.T)
        return cls(columns[0], columns[1 : 1 + k], _small.symmetric(h), vector, coords)

    def flipped(self, index: int, rows: npt.NDArray[np.bool_]) -> SetsAtFit:
        """:meth:`AtFit.flipped` for the ``rows`` selected, the others as they are."""
        sign = tuple(
            np.where(rows, -1.0, 1.0) if i == index else 1.0 for i in range(len(self.params))
        )
        return SetsAtFit(
            self.loss,
            tuple(s * g for s, g in zip(sign, self.gradient, strict=True)),
            tuple(
                tuple(si * sj * h for sj, h in zip(sign, row, strict=True))
                for si, row in zip(sign, self.hessian, strict=True)
            ),
            tuple(s * p for s, p in zip(sign, self.params, strict=True)),
            self.coords,
        )


def norm_of_sets(v: ArrayVector) -> Array:
    """:func:`small.norm` of every set's vector."""
    return functools.reduce(np.hypot, v[1:], np.abs(v[0]))


def inverse_of_sets(h: ArrayMatrix) -> tuple[ArrayMatrix, npt.NDArray[np.bool_]]:
    """:func:`small.inverse_positive_definite` of every set's matrix, by the same steps, and
    where it is defined (elsewhere the entries are meaningless)."""
    k = len(h)
    with np.errstate(all="ignore"):
        if k == 2:
            (h00, h01), (_, h11) = h
            det = h00 * h11 - h01 * h01
            ok = np.isfinite(det) & (h00 > 0.0) & (det > 0.0)
            return ((h11 / det, -h01 / det), (-h01 / det, h00 / det)), ok
        ok = np.ones(h[0][0].shape, dtype=bool)
        lower = [[np.zeros_like(h[0][0]) for _ in range(k)] for _ in range(k)]
        for i in range(k):
            for j in range(i + 1):
                total = h[i][j] - _small.dot(lower[i][:j], lower[j][:j])
                if i == j:
                    ok &= np.isfinite(total) & (total > 0.0)
                    lower[i][i] = np.sqrt(total)
                else:
                    lower[i][j] = total / lower[j][j]
        inv = [[np.zeros_like(h[0][0]) for _ in range(k)] for _ in range(k)]
        for c in range(k):
            for i in range(c, k):
                total = (1.0 if i == c else 0.0) - sum(
                    (lower[i][m] * inv[m][c] for m in range(c, i)), np.zeros_like(ok, float)
                )
                inv[i][c] = total / lower[i][i]
        result = tuple(
            tuple(
                sum((inv[m][i] * inv[m][j] for m in range(max(i, j), k)), np.zeros_like(ok, float))
                for j in range(k)
            )
            for i in range(k)
        )
        for row in result:
            for v in row:
                ok &= np.isfinite(v)
        return result, ok


@dataclass(frozen=True, slots=True)
class SetStats:
    """:class:`FitStats` of every set of a batch: [B] arrays, per-parameter ones [B, k] and
    matrices [B, k, k], NaN where undefined; ``closed_ok`` and ``gap_ok`` say where the closed
    form and the gap are reported at all, and ``converged`` where the fit is at its optimum.
    :meth:`row` reads one set's, exactly as its single fit reports them."""

    names: tuple[str, ...]
    n: npt.NDArray[np.int64]
    loss: Array
    gradient_norm: Array
    newton_step: Array
    std_errors: Array
    covariance: Array
    correlation: Array
    log_likelihood: Array
    aic: Array
    bic: Array
    closed_form: Array
    closed_form_loss: Array
    closed_ok: npt.NDArray[np.bool_]
    gap_params: Array
    gap_loss: Array
    gap_ok: npt.NDArray[np.bool_]
    converged: npt.NDArray[np.bool_]
    r_squared: Array | None = None
    residual_std: Array | None = None

    @classmethod
    def of_rows(
        cls, names: tuple[str, ...], rows: Sequence[FitStats], converged: Sequence[bool]
    ) -> SetStats:
        """One set's statistics after another (a model written only for single fits),
        stacked: None becomes NaN."""
        k = len(names)

        def grid(values: Iterable[Any], shape: tuple[int, ...]) -> Array:
            flat = [math.nan if v is None else v for v in _flatten(values)]
            return np.array(flat, dtype=np.float64).reshape(len(rows), *shape)

        nan_k = (math.nan,) * k
        return cls(
            names=names,
            n=np.array([r.n for r in rows], dtype=np.int64),
            loss=grid((r.loss for r in rows), ()),
            gradient_norm=grid((r.gradient_norm for r in rows), ()),
            newton_step=grid((r.newton_step for r in rows), ()),
            std_errors=grid((r.std_errors for r in rows), (k,)),
            covariance=grid((r.covariance for r in rows), (k, k)),
            correlation=grid((r.correlation for r in rows), (k, k)),
            log_likelihood=grid((r.log_likelihood for r in rows), ()),
            aic=grid((r.aic for r in rows), ()),
            bic=grid((r.bic for r in rows), ()),
            closed_form=grid((r.closed_form or nan_k for r in rows), (k,)),
            closed_form_loss=grid((r.closed_form_loss for r in rows), ()),
            closed_ok=np.array([r.closed_form is not None for r in rows], dtype=bool),
            gap_params=grid((r.gap[0] if r.gap else nan_k for r in rows), (k,)),
            gap_loss=grid((r.gap[1] if r.gap else None for r in rows), ()),
            gap_ok=np.array([r.gap is not None for r in rows], dtype=bool),
            converged=np.array(converged, dtype=bool),
            r_squared=grid((r.r_squared for r in rows), ())
            if any(r.r_squared is not None for r in rows)
            else None,
            residual_std=grid((r.residual_std for r in rows), ())
            if any(r.residual_std is not None for r in rows)
            else None,
        )

    def row(self, i: int) -> FitStats:
        k = len(self.names)
        n = int(self.n[i])
        closed_ok, gap_ok = bool(self.closed_ok[i]), bool(self.gap_ok[i])
        return FitStats(
            names=self.names,
            n=n,
            n_used=n,
            dof=n - k,
            loss=float(self.loss[i]),
            gradient_norm=_finite(float(self.gradient_norm[i])),
            newton_step=_finite(float(self.newton_step[i])),
            std_errors=_optional(self.std_errors[i]),
            covariance=tuple(_optional(r) for r in self.covariance[i]),
            correlation=tuple(_optional(r) for r in self.correlation[i]),
            log_likelihood=_finite(float(self.log_likelihood[i])),
            aic=_finite(float(self.aic[i])),
            bic=_finite(float(self.bic[i])),
            closed_form=tuple(self.closed_form[i].tolist()) if closed_ok else None,
            closed_form_loss=float(self.closed_form_loss[i]) if closed_ok else None,
            gap=(tuple(self.gap_params[i].tolist()), float(self.gap_loss[i])) if gap_ok else None,
            r_squared=None if self.r_squared is None else _finite(float(self.r_squared[i])),
            residual_std=None
            if self.residual_std is None
            else _finite(float(self.residual_std[i])),
        )


def _flatten(values: Iterable[Any]) -> Iterator[Any]:
    for v in values:
        if isinstance(v, tuple):
            yield from _flatten(v)
        else:
            yield v


def _optional(values: Array) -> Optional:
    return tuple(_finite(v) for v in values.tolist())


def fit_stats_of_sets(
    names: Sequence[str],
    fit: SetsAtFit,
    n: Array,
    covariance_factor: Array,
    loglik: Array,
    closed: ArrayVector,
    closed_loss: Array,
    r_squared: Array | None = None,
    residual_std: Array | None = None,
) -> SetStats:
    """:func:`fit_stats` and :func:`is_converged` of every set of a batch (unweighted sets of
    ``n`` points each; NaN for the scalar code's None)."""
    k, coords = len(names), cast(Any, fit.coords)
    nan = np.nan
    with np.errstate(all="ignore"):
        inverse, invertible = inverse_of_sets(fit.hessian)
        # The uncertainty: factor·H⁻¹ in fit coordinates, mapped (_uncertainty).
        defined = invertible & np.isfinite(covariance_factor) & (covariance_factor > 0.0)
        scaled = tuple(tuple(covariance_factor * v for v in row) for row in inverse)
        cov = _small.symmetric(coords.covariance(scaled))
        for i in range(k):
            defined &= cov[i][i] > 0.0
        se = tuple(np.sqrt(cov[i][i]) for i in range(k))
        correlation = np.stack(
            [
                np.stack(
                    [
                        np.ones_like(se[i]) if i == j else cov[i][j] / (se[i] * se[j])
                        for j in range(k)
                    ],
                    -1,
                )
                for i in range(k)
            ],
            -2,
        )
        undefined = ~defined
        std_errors = np.stack(se, -1)
        std_errors[undefined] = nan
        covariance = np.stack([np.stack(row, -1) for row in cov], -2)
        covariance[undefined] = nan
        correlation[undefined] = nan
        # The information criteria.
        finite = np.isfinite(loglik)
        log_likelihood = np.where(finite, loglik, nan)
        aic = np.where(finite, 2.0 * k - 2.0 * loglik, nan)
        bic = np.where(finite, k * np.log(n) - 2.0 * loglik, nan)
        # The gap to the closed form.
        loss = coords.loss(fit.loss)
        fitted = coords.from_fit(fit.params)
        closed_form = np.stack(closed, -1)
        closed_ok = np.isfinite(closed_form).all(-1) & np.isfinite(closed_loss)
        gap_params = np.stack([f - c for f, c in zip(fitted, closed, strict=True)], -1)
        gap_loss = loss - closed_loss
        gap_ok = closed_ok & np.isfinite(gap_params).all(-1) & np.isfinite(gap_loss)
        # The Newton step (fit coordinates for convergence, the caller's units reported).
        step = _small.matvec(inverse, fit.gradient)
        fit_step = np.where(invertible, norm_of_sets(step), nan)
        converged = np.isfinite(fit_step) & (
            fit_step <= CONVERGED_RTOL * np.maximum(1.0, norm_of_sets(fit.params))
        )
        return SetStats(
            names=tuple(names),
            n=n.astype(np.int64),
            loss=np.asarray(loss, dtype=np.float64),
            gradient_norm=norm_of_sets(coords.gradient(fit.gradient)),
            newton_step=np.where(invertible, norm_of_sets(coords.step(step)), nan),
            std_errors=std_errors,
            covariance=covariance,
            correlation=correlation,
            log_likelihood=log_likelihood,
            aic=aic,
            bic=bic,
            closed_form=closed_form,
            closed_form_loss=np.asarray(closed_loss, dtype=np.float64),
            closed_ok=closed_ok,
            gap_params=gap_params,
            gap_loss=gap_loss,
            gap_ok=gap_ok,
            converged=converged,
            r_squared=r_squared,
            residual_std=residual_std,
        )
