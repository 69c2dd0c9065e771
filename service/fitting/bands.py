"""A fitted model at new x, with its confidence band (of the mean) and prediction band (of a
new observation): what ``predict`` in a fit and ``POST /v1/evaluate`` answer.

The model's value f(x) and its exact Jacobian J = ∂f/∂p at each x come from the model's
:data:`Curve` (closed forms for the built-in models; forward-mode jets for expressions,
:mod:`service.fitting.jets`). With C the parameters' covariance, the variance of the fitted
mean at x is J·C·Jᵀ (the delta method; exact for models linear in their parameters), and a new
observation of unit weight adds the residual variance s²:

    mean:        f ± q·sqrt(J·C·Jᵀ)
    observation: f ± q·sqrt(J·C·Jᵀ + s²)

q is Student's t quantile at the fit's residual degrees of freedom, or the normal one where
they are not given (a known noise scale, or maximum likelihood). statsmodels'
``get_prediction().summary_frame()`` computes the same for linear models, and lmfit's
``eval_uncertainty`` the band of the mean for nonlinear ones.

numpy and scipy only (no TensorFlow): the parser processes draw these bands.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from service.fitting.expression import Node, evaluate
from service.fitting.inference import critical
from service.fitting.jets import JETS, Jet

Array = npt.NDArray[np.float64]
#: (parameters in the model's order, the variables at m points) -> (f [m], J [m, k]); with
#: each parameter a column [B, 1], B parameter sets at once: f [B, m], J [B, m, k].
Curve = Callable[[Sequence[float], Sequence[Array]], tuple[Array, Array]]
FIELDS = ("y", "mean_lower", "mean_upper", "obs_lower", "obs_upper")


def line(params: Sequence[float], xs: Sequence[Array]) -> tuple[Array, Array]:
    """y = slope·x + intercept; J = [x, 1]."""
    slope, intercept = params
    x = np.asarray(xs[0], dtype=np.float64)
    return slope * x + intercept, np.stack([x, np.ones_like(x)], axis=-1)


def normal_density(params: Sequence[float], xs: Sequence[Array]) -> tuple[Array, Array]:
    """The fitted normal's density at x: φ((x - mean)/std)/std, with its derivatives in mean
    and std."""
    mean, std = params
    x = np.asarray(xs[0], dtype=np.float64)
    with np.errstate(all="ignore"):
        z = (x - mean) / std
        density = np.exp(-0.5 * z * z) / (std * math.sqrt(2.0 * math.pi))
        return density, np.stack([density * z / std, density * (z * z - 1.0) / std], axis=-1)


def expression_curve(tree: Node) -> Curve:
    """An expression's curve: its value and exact Jacobian by forward-mode jets."""

    def curve(params: Sequence[Any], xs: Sequence[Array]) -> tuple[Array, Array]:
        """``params``: numbers (one fit), or columns [B, 1] (B fits: [B, m] and [B, m, k]),
        at the variables ``xs`` ([m], or each fit's own [B, m])."""
        columns = [np.asarray(x, dtype=np.float64) for x in xs]
        k = len(params)
        with np.errstate(all="ignore"):
            value = evaluate(tree, Jet.parameters(list(params)), columns, JETS)
        # [m]; [B, m] for parameter columns [B, 1]; the variables may be [B, m] themselves
        shape = np.broadcast_shapes(*(np.shape(p) for p in params), columns[0].shape)
        if not isinstance(value, Jet):  # no parameter in it: a constant or a function of x
            f = np.broadcast_to(np.asarray(value, dtype=np.float64), shape)
            return f.astype(np.float64), np.zeros((*shape, k))
        f = np.broadcast_to(value.value, shape).astype(np.float64)
        return f, np.broadcast_to(value.gradient, (*shape, k)).astype(np.float64)

    return curve


def predict(
    curve: Curve,
    params: Sequence[float],
    xs: Sequence[Array],
    covariance: Array | None,
    residual_variance: float | None,
    dof: int | None,
    confidence: float,
) -> dict[str, list[float | None]]:
    """The value and both bands at ``xs`` (lists; None where undefined: no covariance, no
    residual variance for the observation band, no degrees of freedom, or overflow)."""
    f, jacobian = curve(params, xs)
    m = f.shape[0]
    nan = np.full(m, np.nan)
    mean_lower = mean_upper = obs_lower = obs_upper = nan
    q = critical(confidence, None if dof is None else float(dof))
    if covariance is not None and np.all(np.isfinite(covariance)) and math.isfinite(q):
        with np.errstate(all="ignore"):
            variance = np.einsum("mi,ij,mj->m", jacobian, covariance, jacobian)
            half = q * np.sqrt(np.maximum(variance, 0.0))
            mean_lower, mean_upper = f - half, f + half
            if residual_variance is not None and math.isfinite(residual_variance):
                spread = q * np.sqrt(np.maximum(variance, 0.0) + residual_variance)
                obs_lower, obs_upper = f - spread, f + spread
    return {
        name: _listed(values)
        for name, values in zip(
            FIELDS, (f, mean_lower, mean_upper, obs_lower, obs_upper), strict=True
        )
    }


def at_fit(
    curve: Curve,
    params: Sequence[float],
    xs: Sequence[Array],
    covariance: Sequence[Sequence[float | None]] | None,
    residual_std: float | None,
    dof: int | None,
    confidence: float,
    absolute_sigma: bool = False,
) -> dict[str, list[float | None]]:
    """:func:`predict` from a fit's answer: its covariance rows, its residual standard
    deviation (None: no observation band, e.g. a maximum-likelihood fit) and the table's
    degrees of freedom (None: normal); with ``absolute_sigma`` the residual variance is 1."""
    variance = None if residual_std is None else residual_std**2
    if absolute_sigma and residual_std is not None:
        variance = 1.0
    return predict(curve, params, xs, matrix(covariance), variance, dof, confidence)


def _listed(values: Array) -> list[float | None]:
    return [v if math.isfinite(v) else None for v in np.asarray(values, dtype=np.float64).tolist()]


def matrix(rows: Sequence[Sequence[float | None]] | None) -> Array | None:
    """A covariance from an answer's rows (None where it, or any entry, is undefined)."""
    if rows is None or any(v is None for row in rows for v in row):
        return None
    return np.array(rows, dtype=np.float64)
