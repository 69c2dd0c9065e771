"""Global fits: one expression over several data sets, some parameters shared by every set
and the others each set's own, as one least-squares problem.

The parameter vector is θ = [shared (S); set 0's locals (L); ...; set M-1's locals]. Its
Jacobian is block-structured: each set's residuals depend on the shared parameters and on
its own locals only. Each Levenberg-Marquardt step solves the normal equations

    [A  B₀ … ] [δs ]     [g_s ]
    [B₀ᵀ D₀  ] [δl₀] = - [g_l₀]
    [ ⋮    ⋱ ] [ ⋮ ]     [ ⋮  ]

by eliminating the locals (the Schur complement on the shared block): A - Σ Bₘ Dₘ⁻¹ Bₘᵀ is
S x S and each Dₘ is L x L, so a step costs O(M·(n·k² + L³) + S³), not O((S + M·L)³). The
sets are padded to one length with weight-0 points and evaluated together, their exact
Jacobians by forward-mode jets (the model's :data:`~service.fitting.bands.Curve`). The
covariance, shared-local blocks included, is s²·N⁻¹ of the full normal matrix N at the
optimum (s² = rss/dof, dof = points with positive weight - S - M·L): the stacked problem's,
exactly as ``scipy.optimize.least_squares`` on the stacked residuals would give it.

numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from service.fitting.bands import Curve

Array = npt.NDArray[np.float64]
#: Converged: an accepted step moves no parameter by more than this, relatively.
STEP = 1e-12


@dataclass(frozen=True, slots=True)
class GlobalFit:
    """The shared values [S], each set's locals [M, L], the rss history, iterations, whether
    it converged, and the statistics: rss, dof, and the covariance of θ (None: singular)."""

    shared: Array
    local: Array
    history: Array
    iterations: int
    converged: bool
    rss: float
    dof: int
    covariance: Array | None


@dataclass(frozen=True, slots=True)
class Problem:
    """The sets, padded ([M, n] arrays, weight 0 on padding), and the parameters' roles:
    ``shared`` and ``local`` index the expression's parameters."""

    curve: Curve
    xs: Sequence[Array]
    y: Array
    sw: Array
    shared: Sequence[int]
    local: Sequence[int]

    @classmethod
    def of(
        cls,
        curve: Curve,
        sets: Sequence[tuple[Sequence[Array], Array, Array | None]],
        shared: Sequence[int],
        local: Sequence[int],
    ) -> Problem:
        """From each set's (variables, y, weights or None)."""
        m, n = len(sets), max(y.size for _, y, _ in sets)
        variables = len(sets[0][0])
        xs = [np.zeros((m, n)) for _ in range(variables)]
        y_all, sw = np.zeros((m, n)), np.zeros((m, n))
        for i, (x, y, w) in enumerate(sets):
            for j in range(variables):
                xs[j][i, : y.size] = x[j]
                xs[j][i, y.size :] = x[j][-1]  # a value the model takes (never used)
            y_all[i, : y.size] = y
            sw[i, : y.size] = 1.0 if w is None else np.sqrt(w)
        return cls(curve, xs, y_all, sw, list(shared), list(local))

    @property
    def k(self) -> int:
        return len(self.shared) + len(self.local)

    def params(self, shared: Array, local: Array) -> Array:
        """Each set's parameters in the expression's order ([M, k])."""
        m = self.y.shape[0]
        p = np.zeros((m, self.k))
        p[:, list(self.shared)] = shared
        p[:, list(self.local)] = local
        return p

    def residuals(self, shared: Array, local: Array) -> tuple[Array, Array]:
        """r = √w·(y - f) [M, n] and its Jacobian [M, n, k] in the expression's order."""
        p = self.params(shared, local)
        columns: list[Any] = [p[:, j : j + 1] for j in range(self.k)]
        f, jacobian = self.curve(columns, self.xs)
        return self.sw * (self.y - f), -self.sw[:, :, None] * jacobian


def fit(
    problem: Problem,
    shared: Sequence[float],
    local: Array,
    bounds: Sequence[tuple[float | None, float | None]],
    iterations: int,
    should_stop: Callable[[], bool] = lambda: False,
) -> GlobalFit:
    """Levenberg-Marquardt on the stacked problem from ``shared`` [S] and ``local`` [M, L]."""
    s_idx, l_idx = list(problem.shared), list(problem.local)
    low = np.array([-np.inf if b[0] is None else b[0] for b in bounds])
    high = np.array([np.inf if b[1] is None else b[1] for b in bounds])
    ps = np.clip(np.asarray(shared, dtype=np.float64), low[s_idx], high[s_idx])
    pl = np.clip(np.asarray(local, dtype=np.float64), low[l_idx], high[l_idx])
    with np.errstate(all="ignore"):
        r, jacobian = problem.residuals(ps, pl)
        rss = float(np.sum(r * r))
        history, damping, converged, done = [rss], 1e-3, False, 0
        for done in range(1, iterations + 1):  # noqa: B007 (read after the loop)
            if not math.isfinite(rss) or should_stop():
                break
            blocks = _normal(jacobian, r, s_idx, l_idx)
            accepted, gain, step_s, step_l = False, 0.0, np.zeros_like(ps), np.zeros_like(pl)
            while damping < 1e16 and not accepted:
                solved = _step(blocks, damping)
                if solved is None:
                    damping *= 4.0
                    continue
                step_s, step_l = solved
                trial_s = np.clip(ps + step_s, low[s_idx], high[s_idx])
                trial_l = np.clip(pl + step_l, low[l_idx], high[l_idx])
                r_new, j_new = problem.residuals(trial_s, trial_l)
                rss_new = float(np.sum(r_new * r_new))
                if math.isfinite(rss_new) and rss_new <= rss:
                    gain, accepted = rss - rss_new, True
                    ps, pl, r, jacobian, rss = trial_s, trial_l, r_new, j_new, rss_new
                    damping = max(damping / 3.0, 1e-12)
                else:
                    damping *= 4.0
            history.append(rss)
            # Converged: the step is within rounding of the parameters, or no step lowers
            # the rss at all (a gain alone can be tiny along a flat, correlated direction
            # while the parameters still move in their 7th digit).
            tiny = accepted and _small(step_s, ps) and _small(step_l, pl)
            if not accepted or tiny or gain == 0.0:
                converged = math.isfinite(rss)
                break
        used = int(np.count_nonzero(problem.sw > 0.0))
        dof = used - len(s_idx) - pl.size
        covariance = _covariance(jacobian, s_idx, l_idx, rss / dof if dof > 0 else math.nan)
    return GlobalFit(ps, pl, np.asarray(history), done, converged, rss, dof, covariance)


def _small(step: Array, p: Array) -> bool:
    return bool(np.all(np.abs(step) <= STEP * np.maximum(np.abs(p), 1e-300)))


@dataclass(frozen=True, slots=True)
class _Blocks:
    a: Array  # [S, S]
    b: Array  # [M, S, L]
    d: Array  # [M, L, L]
    g_s: Array  # [S]
    g_l: Array  # [M, L]


def _normal(jacobian: Array, r: Array, s_idx: list[int], l_idx: list[int]) -> _Blocks:
    js, jl = jacobian[:, :, s_idx], jacobian[:, :, l_idx]
    jst, jlt = np.swapaxes(js, 1, 2), np.swapaxes(jl, 1, 2)
    return _Blocks(
        a=(jst @ js).sum(axis=0),
        b=jst @ jl,
        d=jlt @ jl,
        g_s=(jst @ r[:, :, None])[:, :, 0].sum(axis=0),
        g_l=(jlt @ r[:, :, None])[:, :, 0],
    )


def _step(blocks: _Blocks, damping: float) -> tuple[Array, Array] | None:
    """The damped step (Marquardt's scaling) by the Schur complement on the shared block."""
    a, b, d = blocks.a, blocks.b, blocks.d
    s, l_count = a.shape[0], d.shape[1]
    d = d + damping * _scaled_eye(np.einsum("mii->mi", d))
    a = a + damping * np.diag(np.where(np.diag(a) > 0.0, np.diag(a), 1.0))
    try:
        if l_count:
            x = np.linalg.solve(d, np.swapaxes(b, 1, 2))  # D⁻¹Bᵀ [M, L, S]
            y = np.linalg.solve(d, blocks.g_l[:, :, None])[:, :, 0]  # D⁻¹g_l [M, L]
        else:
            x, y = np.zeros((d.shape[0], 0, s)), np.zeros((d.shape[0], 0))
        if s:
            schur = a - (b @ x).sum(axis=0)
            rhs = blocks.g_s - (b @ y[:, :, None])[:, :, 0].sum(axis=0)
            step_s = -np.linalg.solve(schur, rhs)
        else:
            step_s = np.zeros(0)
    except np.linalg.LinAlgError:
        return None
    step_l = -(y + (x @ step_s[None, :, None])[:, :, 0]) if l_count else np.zeros_like(y)
    if not (np.all(np.isfinite(step_s)) and np.all(np.isfinite(step_l))):
        return None
    return step_s, step_l


def _scaled_eye(diagonals: Array) -> Array:
    """diag(max(dᵢ, ·)) of each set's block, 1 where a diagonal is 0."""
    safe = np.where(diagonals > 0.0, diagonals, 1.0)
    return safe[:, :, None] * np.eye(diagonals.shape[1])


def _covariance(jacobian: Array, s_idx: list[int], l_idx: list[int], sigma2: float) -> Array | None:
    """s²·N⁻¹ of the full normal matrix N = JᵀJ (assembled from its blocks: P x P, never the
    stacked Jacobian), θ ordered [shared; set 0's locals; ...]; None where N is not positive
    definite."""
    if not math.isfinite(sigma2):
        return None
    blocks = _normal(jacobian, np.zeros(jacobian.shape[:2]), s_idx, l_idx)
    m, s, l_count = jacobian.shape[0], len(s_idx), len(l_idx)
    size = s + m * l_count
    full = np.zeros((size, size))
    full[:s, :s] = blocks.a
    for i in range(m):
        at = slice(s + i * l_count, s + (i + 1) * l_count)
        full[:s, at] = blocks.b[i]
        full[at, :s] = blocks.b[i].T
        full[at, at] = blocks.d[i]
    scale = np.sqrt(np.where(np.diag(full) > 0.0, np.diag(full), 1.0))
    scaled = full / np.outer(scale, scale)  # unit diagonal: well conditioned to invert
    try:
        lower = np.linalg.cholesky(scaled)
    except np.linalg.LinAlgError:
        return None
    if np.diag(lower).min() <= 1e-7:  # condition number of the scaled N beyond ~1e14
        return None
    inverse = np.linalg.inv(lower)
    return np.asarray(sigma2 * (inverse.T @ inverse) / np.outer(scale, scale), dtype=np.float64)
