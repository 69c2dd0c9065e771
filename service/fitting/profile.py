"""Profile-likelihood confidence intervals of a least-squares fit, every parameter and side at
once.

For parameter j fixed at v and the others re-optimized, the profile is rss_j(v). The interval
at ``confidence`` is where the profile crosses lmfit's F-test threshold (the criterion its
``conf_interval`` uses, with one parameter fixed):

    rss_j(v) = rss · (1 + F⁻¹(confidence; 1, dof) / dof)

For a model linear in its parameters this is exactly the t interval; for a nonlinear one it
follows the curvature the Wald interval ignores (asymmetric intervals, and a side the data do
not bound at all).

The 2k crossings (each parameter, each side) are found together: each round re-optimizes all
2k constrained problems as one batch (a batched Levenberg-Marquardt on the exact Jacobian from
the model's :data:`~service.fitting.bands.Curve`), then moves each crossing estimate by the
Illinois variant of regula falsi inside its bracket, interpolating in (v - estimate)², where
the profile is nearly linear. The search starts at the Wald interval's
ends (exact for a linear model) and, where the profile has not crossed there, doubles the
distance until it does or the profile is plainly flat (then that side is not found).

numpy and scipy only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import special

from service.fitting.bands import Curve

Array = npt.NDArray[np.float64]
#: Doublings of the distance from the estimate before a side counts as unbounded (2^12 Wald
#: half-widths).
MAX_DOUBLINGS = 12
#: Regula falsi rounds at most, and the relative width of a bracket that ends the search.
MAX_ROUNDS = 60
XTOL = 1e-10
#: Levenberg-Marquardt iterations per constrained re-optimization, at most, and when one has
#: converged: an accepted step that lowers the rss by at most RESOLVED relatively (the crossing
#: then moves by about RESOLVED·dof/F⁻¹ relatively: far below the 1e-10 of XTOL's search, and
#: below lmfit's 5e-5), or moves no parameter by more than STEP relatively.
MAX_LM = 60
RESOLVED = 1e-13
STEP = 1e-12


@dataclass(frozen=True, slots=True)
class Side:
    """One end of a parameter's profile interval: its value, or None where not found."""

    value: float | None
    found: bool


def threshold(rss: float, dof: int, confidence: float) -> float:
    """The profile's rss at the interval's ends (lmfit's F-test criterion)."""
    return rss * (1.0 + float(special.fdtri(1.0, dof, confidence)) / dof)


def intervals(
    curve: Curve,
    xs: Sequence[Array],
    y: Array,
    weights: Array | None,
    params: Sequence[float],
    std_errors: Sequence[float | None],
    rss: float,
    dof: int,
    confidence: float,
    bounds: Sequence[tuple[float | None, float | None]] | None = None,
) -> list[tuple[Side, Side]]:
    """Each parameter's (lower, upper) profile-interval ends."""
    k = len(params)
    p_hat = np.asarray(params, dtype=np.float64)
    sw = np.ones_like(y) if weights is None else np.sqrt(weights)
    target = threshold(rss, dof, confidence)
    given = list(bounds or [(None, None)] * k)
    low = np.array([-np.inf if b[0] is None else b[0] for b in given])
    high = np.array([np.inf if b[1] is None else b[1] for b in given])
    rows = 2 * k
    fixed = np.repeat(np.arange(k), 2)  # row 2j: j downward, row 2j+1: j upward
    direction = np.tile([-1.0, 1.0], k)
    t = math.sqrt(float(special.fdtri(1.0, dof, confidence)))
    scale = np.array(
        [
            s if s is not None and math.isfinite(s) and s > 0.0 else max(abs(v) * 0.1, 1e-3)
            for s, v in zip(std_errors, params, strict=True)
        ]
    )
    problem = _Problem(curve, xs, y, sw, low, high)
    start = np.tile(p_hat, (rows, 1))
    centre = p_hat[fixed]
    slopes = _slopes(problem, p_hat, fixed)
    # The bracket of each row: (inside, g < 0) at the estimate, outside to be found.
    inside, g_inside = centre.copy(), np.full(rows, rss - target)
    step = t * scale[fixed]
    outside, g_outside = np.full(rows, np.nan), np.full(rows, np.nan)
    searching = np.ones(rows, dtype=bool)
    limit = np.where(direction > 0, high[fixed], low[fixed])
    for _ in range(MAX_DOUBLINGS):
        v = np.clip(centre + direction * step, low[fixed], high[fixed])
        g, start = _profile(problem, fixed, slopes, start, v, searching, target)
        crossed = searching & (g >= 0.0)
        outside[crossed], g_outside[crossed] = v[crossed], g[crossed]
        below = searching & ~crossed & np.isfinite(g)
        inside[below], g_inside[below] = v[below], g[below]
        at_limit = below & (v == limit)
        searching &= ~crossed & ~at_limit & np.isfinite(g)
        step = step * 2.0
        if not searching.any():
            break
    found = np.isfinite(outside)
    # Regula falsi (Illinois) inside each bracket [inside: g < 0, outside: g >= 0].
    active = found.copy()
    side = np.zeros(rows)  # which end moved last (-1 inside, +1 outside), for Illinois
    for _ in range(MAX_ROUNDS):
        width = np.abs(outside - inside)
        active &= width > XTOL * np.maximum(np.abs(outside), scale[fixed])
        if not active.any():
            break
        # The interpolation runs in u = (v - estimate)², where a profile is nearly linear
        # (exactly so for a model linear in its parameters): a round or two, where regula
        # falsi in v itself would take several.
        with np.errstate(all="ignore"):  # rows not active (NaN ends) are not used
            u_in, u_out = (inside - centre) ** 2, (outside - centre) ** 2
            u = (u_in * g_outside - u_out * g_inside) / (g_outside - g_inside)
            v = centre + direction * np.sqrt(np.clip(u, u_in, u_out))
        v = np.where(active, v, inside)
        g, start = _profile(problem, fixed, slopes, start, v, active, target)
        up = active & (g >= 0.0)
        down = active & (g < 0.0)
        # Illinois: halve the stale end's g when the same end moves twice in a row.
        g_inside = np.where(up & (side > 0), 0.5 * g_inside, g_inside)
        g_outside = np.where(down & (side < 0), 0.5 * g_outside, g_outside)
        outside, g_outside = np.where(up, v, outside), np.where(up, g, g_outside)
        inside, g_inside = np.where(down, v, inside), np.where(down, g, g_inside)
        side = np.where(up, 1.0, np.where(down, -1.0, side))
        active &= np.abs(g) > 1e-12 * target
    ends = np.where(np.abs(g_outside) < np.abs(g_inside), outside, inside)
    out = []
    for j in range(k):
        pair = []
        for row in (2 * j, 2 * j + 1):
            ok = bool(found[row]) and math.isfinite(ends[row])
            pair.append(Side(float(ends[row]) if ok else None, ok))
        out.append((pair[0], pair[1]))
    return out


@dataclass(frozen=True, slots=True)
class _Problem:
    """The least-squares problem of the fit: its model, data and bounds."""

    curve: Curve
    xs: Sequence[Array]
    y: Array
    sw: Array
    low: Array
    high: Array

    def residuals(self, p: Array) -> tuple[Array, Array]:
        """r = √w·(y - f) ([B, n]) and its Jacobian ([B, n, k]) at every row's parameters."""
        n, k = self.y.shape[0], p.shape[1]
        columns: list[Any] = [p[:, j : j + 1] for j in range(k)]
        f, jacobian = self.curve(columns, self.xs)
        f = np.broadcast_to(f, (p.shape[0], n))
        jacobian = np.broadcast_to(jacobian, (p.shape[0], n, k))
        return self.sw * (self.y - f), -self.sw[:, None] * jacobian


def _slopes(problem: _Problem, p_hat: Array, fixed: npt.NDArray[np.int64]) -> Array:
    """How the other parameters move, to first order, as row r's held parameter moves
    (-A_ff⁻¹·A_fj with A = JᵀJ at the estimate): the predictor of each re-optimization's
    start, exact for a model linear in its parameters."""
    rows, k = fixed.shape[0], p_hat.shape[0]
    slopes = np.zeros((rows, k))
    with np.errstate(all="ignore"):
        _, jacobian = problem.residuals(p_hat[None, :])
        a = jacobian[0].T @ jacobian[0]
        for r, j in enumerate(fixed.tolist()):
            free = [i for i in range(k) if i != j]
            if not free:
                continue
            try:
                solved = np.linalg.solve(a[np.ix_(free, free)], a[free, j])
            except np.linalg.LinAlgError:
                continue
            if np.all(np.isfinite(solved)):
                slopes[r, free] = -solved
    return slopes


def _profile(
    problem: _Problem,
    fixed: npt.NDArray[np.int64],
    slopes: Array,
    start: Array,
    v: Array,
    rows: npt.NDArray[np.bool_],
    target: float,
) -> tuple[Array, Array]:
    """rss_j(v) - target for the ``rows`` asked (NaN elsewhere), row r re-optimized with
    parameter ``fixed[r]`` held at v, from ``start`` moved along its ``slopes``; and the
    parameters reached (the next start)."""
    b = np.arange(start.shape[0])
    moved = np.where(rows, v - start[b, fixed], 0.0)
    p = start + slopes * moved[:, None]
    p = np.clip(p, problem.low, problem.high)
    p[b, fixed] = np.where(rows, v, start[b, fixed])
    g = np.full(p.shape[0], np.nan)
    if not rows.any():
        return g, p
    sub = p[rows]
    solved = _minimize(problem, sub, fixed[rows])
    p[rows] = solved[0]
    g[rows] = solved[1] - target
    return g, p


def _minimize(problem: _Problem, p: Array, fixed: npt.NDArray[np.int64]) -> tuple[Array, Array]:
    """Batched Levenberg-Marquardt (Marquardt's scaling) over the free parameters of each row
    (row r's parameter ``fixed[r]`` held); the parameters and rss reached."""
    rows, k = p.shape
    free = np.ones((rows, k))
    free[np.arange(rows), fixed] = 0.0
    with np.errstate(all="ignore"):
        r, jacobian = problem.residuals(p)
        rss = np.einsum("bn,bn->b", r, r)
        damping = np.full(rows, 1e-3)
        running = np.isfinite(rss)
        eye = np.eye(k)
        for _ in range(MAX_LM):
            if not running.any():
                break
            jf = jacobian * free[:, None, :]
            jt = np.swapaxes(jf, 1, 2)
            a = jt @ jf  # batched BLAS: 3x einsum's speed here
            g = (jt @ r[:, :, None])[:, :, 0]
            diag = np.einsum("bii->bi", a)
            scale = np.where(diag > 0.0, diag, 1.0)
            system = (
                a + (damping[:, None] * scale)[:, :, None] * eye + (1.0 - free)[:, :, None] * eye
            )
            ok = running & np.all(np.isfinite(system), axis=(1, 2)) & np.all(np.isfinite(g), axis=1)
            safe = np.where(ok[:, None, None], system, eye)
            step = -np.linalg.solve(safe, np.where(ok[:, None], g, 0.0)[:, :, None])[:, :, 0]
            step *= free
            # The Gauss-Newton model's decrease, |r|² - |r + J·step|²: where even that is
            # within RESOLVED, the row is at its optimum, and needs no trial evaluated.
            predicted = -(
                2.0 * np.einsum("bi,bi->b", g, step) + np.einsum("bi,bij,bj->b", step, a, step)
            )
            done = ok & (predicted <= RESOLVED * rss)
            running &= ~done
            if not running.any():
                break
            trial = np.clip(p + step, problem.low, problem.high)
            r_new, j_new = problem.residuals(trial)
            rss_new = np.einsum("bn,bn->b", r_new, r_new)
            better = running & ok & np.isfinite(rss_new) & (rss_new <= rss)
            gain = np.where(better, rss - rss_new, 0.0)
            small_step = np.all(np.abs(step) <= STEP * np.maximum(np.abs(p), 1e-300), axis=1)
            p = np.where(better[:, None], trial, p)
            r = np.where(better[:, None], r_new, r)
            jacobian = np.where(better[:, None, None], j_new, jacobian)
            rss = np.where(better, rss_new, rss)
            damping = np.where(better, np.maximum(damping / 3.0, 1e-12), damping * 4.0)
            resolved = better & (gain <= RESOLVED * rss)
            running &= ok & ~resolved & ~small_step & (damping < 1e16)
    return p, rss
