"""Robust least squares: scipy ``least_squares``' losses, by iteratively reweighted
Levenberg-Marquardt.

With r the (weighted) residuals and C = ``f_scale``, the fit minimizes

    cost = ½·C²·Σ rho((r/C)²)

for scipy's rho (``linear``: z, ``soft_l1``: 2(√(1+z) - 1), ``huber``: z or 2√z - 1,
``cauchy``: ln(1 + z), ``arctan``: arctan z). Each iteration solves the Levenberg-Marquardt
step of the least-squares problem weighted by rho'(z) at the current residuals (whose gradient
is the robust cost's), and takes it if the robust cost decreases. At the optimum those
weights are fixed: the robust fit is the weighted least-squares fit with them, which is how
the service reports it (its statistics come from that fit), with the covariance in scipy's
convention for robust losses (``curve_fit(loss=...)``): (2·cost/(n - p))·(J_sᵀJ_s)⁻¹, with
J scaled by √(rho' + 2zrho'').

numpy only; the model's value and exact Jacobian come from its
:data:`~service.fitting.bands.Curve`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from service.fitting.bands import Curve
from service.fitting.options import LossName

Array = npt.NDArray[np.float64]
Loss = LossName
#: A point whose weight rho'(z) the loss brings below this is counted as down-weighted.
DOWNWEIGHTED = 0.5
#: Converged: an accepted step lowers the cost by at most this, relatively.
RESOLVED = 1e-15
EPS = float(np.finfo(np.float64).eps)


def rho(loss: Loss, z: Array) -> tuple[Array, Array, Array]:
    """rho(z), rho'(z) and rho''(z), as scipy's ``least_squares`` defines them."""
    with np.errstate(all="ignore"):
        if loss == "linear":
            return z, np.ones_like(z), np.zeros_like(z)
        if loss == "soft_l1":
            t = 1.0 + z
            return 2.0 * (np.sqrt(t) - 1.0), t**-0.5, -0.5 * t**-1.5
        if loss == "huber":
            inside = z <= 1.0
            root = np.sqrt(np.where(inside, 1.0, z))
            return (
                np.where(inside, z, 2.0 * root - 1.0),
                np.where(inside, 1.0, 1.0 / root),
                np.where(inside, 0.0, -0.5 / root**3),
            )
        if loss == "cauchy":
            t = 1.0 + z
            return np.log1p(z), 1.0 / t, -1.0 / t**2
        t = 1.0 + z * z
        return np.arctan(z), 1.0 / t, -2.0 * z / t**2


@dataclass(frozen=True, slots=True)
class RobustFit:
    """Where the robust fit ended: its parameters, cost history, iterations, whether it
    converged, and each point's final weight rho'(z) (to multiply its own weight by)."""

    params: Array
    costs: Array
    iterations: int
    converged: bool
    weights: Array
    cost: float


def fit(
    curve: Curve,
    xs: Sequence[Array],
    y: Array,
    weights: Array | None,
    start: Sequence[float],
    loss: Loss,
    f_scale: float,
    bounds: Sequence[tuple[float | None, float | None]],
    iterations: int,
    should_stop: Callable[[], bool] = lambda: False,
) -> RobustFit:
    """The robust fit from ``start`` (at most ``iterations`` Levenberg-Marquardt steps)."""
    sw = np.ones_like(y) if weights is None else np.sqrt(weights)
    low = np.array([-np.inf if b[0] is None else b[0] for b in bounds])
    high = np.array([np.inf if b[1] is None else b[1] for b in bounds])
    c2 = f_scale * f_scale

    def evaluate(p: Array) -> tuple[Array, Array, float, Array]:
        f, jacobian = curve(list(p), xs)
        r = sw * (y - f)
        z = r * r / c2
        values, slope, _ = rho(loss, z)
        return r, -sw[:, None] * jacobian, float(0.5 * c2 * np.sum(values)), slope

    p = np.clip(np.asarray(start, dtype=np.float64), low, high)
    r, jacobian, cost, omega = evaluate(p)
    costs, damping, converged, done = [cost], 1e-3, False, 0
    for done in range(1, iterations + 1):  # noqa: B007 (done is read after the loop)
        if not math.isfinite(cost) or should_stop():
            break
        jw = jacobian * omega[:, None]
        a = jacobian.T @ jw
        g = jw.T @ r
        diagonal = np.where(np.diag(a) > 0.0, np.diag(a), 1.0)
        accepted = False
        while damping < 1e16:
            system = a + damping * np.diag(diagonal)
            try:
                step = -np.linalg.solve(system, g)
            except np.linalg.LinAlgError:
                damping *= 4.0
                continue
            trial = np.clip(p + step, low, high)
            r_new, j_new, cost_new, omega_new = evaluate(trial)
            if math.isfinite(cost_new) and cost_new <= cost:
                gain = cost - cost_new
                p, r, jacobian, omega = trial, r_new, j_new, omega_new
                cost, accepted = cost_new, True
                damping = max(damping / 3.0, 1e-12)
                break
            damping *= 4.0
        costs.append(cost)
        tiny_step = accepted and bool(np.all(np.abs(step) <= 1e-13 * np.maximum(np.abs(p), 1e-300)))
        if not accepted or gain <= RESOLVED * max(cost, 1e-300) or tiny_step:
            converged = accepted or damping >= 1e16  # no step lowers the cost: a minimum
            break
    return RobustFit(
        params=p,
        costs=np.asarray(costs),
        iterations=done,
        converged=converged and math.isfinite(cost),
        weights=omega,
        cost=cost,
    )


def covariance(
    curve: Curve,
    xs: Sequence[Array],
    y: Array,
    weights: Array | None,
    params: Sequence[float],
    loss: Loss,
    f_scale: float,
    absolute_sigma: bool,
) -> Array | None:
    """scipy's covariance of a robust fit (``curve_fit`` with ``loss``): (JᵀJ)⁻¹ of the
    Jacobian scaled by √max(rho' + 2zrho'', ε), times 2·cost/(n - p) unless ``absolute_sigma``;
    None where it is singular or there are no degrees of freedom."""
    sw = np.ones_like(y) if weights is None else np.sqrt(weights)
    f, jacobian = curve(list(params), xs)
    r = sw * (y - f)
    c2 = f_scale * f_scale
    z = r * r / c2
    values, slope, curvature = rho(loss, z)
    scale = np.sqrt(np.maximum(slope + 2.0 * z * curvature, EPS))
    scaled = scale[:, None] * sw[:, None] * jacobian
    try:
        _, singular, vt = np.linalg.svd(scaled, full_matrices=False)
    except np.linalg.LinAlgError:  # non-finite entries: no covariance
        return None
    if singular.size == 0 or singular.min() <= EPS * max(scaled.shape) * singular.max():
        return None
    pcov = (vt.T / singular**2) @ vt
    if absolute_sigma:
        return np.asarray(pcov, dtype=np.float64)
    dof = int(np.count_nonzero(sw > 0.0)) - len(params)
    if dof <= 0:
        return None
    return np.asarray(pcov * (c2 * float(np.sum(values)) / dof), dtype=np.float64)
