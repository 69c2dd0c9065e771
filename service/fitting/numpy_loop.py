"""The Levenberg-Marquardt loop in numpy: a new expression's first fits, with nothing to trace.

Tracing and compiling a new expression's loop takes seconds (0.5 s + ~10 ms a unit of
complexity: :class:`~service.fitting.expression.CompileCost`). This loop needs none of it:
the model's residuals and their exact Jacobian come from one numpy evaluation of its tree
with forward-mode jets (:mod:`service.fitting.jets`), and each epoch is the compiled loop's
epoch, written again in numpy: the same Levenberg-Marquardt step (the QR of [J; √λ·D], the
same scaling, damping and stopping rules), the same bounds, status codes and history. It
takes and gives the compiled loop's vectors (:func:`~service.fitting.loop.input_layout`,
:func:`~service.fitting.loop.output_layout`), so a fit's driver, statistics and answer are
the compiled fit's own; only rounding differs (an answer equal to the compiled one to about
1e-12 relatively, tested to 1e-9).

Per epoch it costs a few numpy calls per node of the tree on the data's points: ~0.1-0.3 ms
for 1,000 points, so a fit of tens of epochs answers in milliseconds, where the compiled
loop (once compiled) is faster on large data.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from service.fitting.jets import Jet
from service.fitting.layout import Layout

Array = npt.NDArray[np.float64]
#: (parameters: k numbers or jets, summary [S]) -> the weighted residuals [n] (jets: with
#: their derivatives).
JetResiduals = Callable[[Sequence[Any], Array], Any]

#: The constants of the compiled loop (:mod:`service.fitting.loop`), repeated by value to
#: keep this module free of TensorFlow; tests/fitting/test_numpy_loop.py checks they agree.
RUNNING, NON_FINITE, LOSS_TOLERANCE, GRADIENT_TOLERANCE, STEP_TOLERANCE = 0, 1, 2, 3, 4
MIN_DAMPING, MAX_DAMPING, LM_XTOL = 1e-15, 1e16, 1e-15
EPSILON = float(np.finfo(np.float64).eps)
#: A step whose decrease of the sum of squares is at most this fraction of it ends the fit:
#: float64 residuals resolve no less (Misra1a's last decrease was 2.2e-14 of its sum).
RESOLVED = 8 * EPSILON


def jacobian(residuals: JetResiduals, params: Array, summary: Array) -> tuple[Array, Array]:
    """The residuals [n] and their exact Jacobian [n, k] at ``params``."""
    with np.errstate(all="ignore"):
        r = residuals(Jet.parameters(list(params)), summary)
    n = np.shape(r.value)[-1]
    return r.value, np.broadcast_to(r.gradient, (n, len(params)))


def jacobian_rows(residuals: JetResiduals, params: Array, summaries: Array) -> Array:
    """The exact Jacobians [B, n, k] of many sets' residuals at their parameters [B, k]."""
    rows, k = params.shape
    with np.errstate(all="ignore"):  # what overflows is inf, reported as such
        r = residuals(Jet.parameters([params[:, j : j + 1] for j in range(k)]), summaries)
    return np.array(np.broadcast_to(r.gradient, (rows, np.shape(r.value)[-1], k)))


def curvature(residuals: JetResiduals, params: Array, summary: Array, total: float) -> Array:
    """The loss Σr²/Σw, its gradient and its Hessian at ``params``, exact (second-order
    jets): :func:`~service.fitting.stats.curvature_layout`."""
    k = len(params)
    with np.errstate(all="ignore"):  # what overflows is inf, reported as such
        r = residuals(Jet.parameters(list(params), second=True), summary)
        n = np.shape(r.value)[-1]
        value = r.value
        gradient = np.broadcast_to(r.gradient, (n, k))
        hessian = np.broadcast_to(r.hessian, (n, k, k))
        loss = np.sum(value * value) / total
        g = 2.0 * (gradient.T @ value) / total
        h = 2.0 * (gradient.T @ gradient + np.einsum("n,nij->ij", value, hessian)) / total
    return np.concatenate([[loss], g, h.reshape(-1)])


def make_loop(
    residuals: JetResiduals,
    summary_layout: Layout,
    state_layout: Layout,
    input_layout: Layout,
    controls: Sequence[str],
    k: int,
    stopping: bool,
) -> Callable[[Array], Array]:
    """A Levenberg-Marquardt loop taking and giving the compiled loop's vectors."""

    def loop(inputs: Array) -> Array:
        given = input_layout.unpack(np.asarray(inputs, dtype=np.float64))
        summary = given["summary"]
        state = dict(state_layout.unpack(given["state"]))
        c = dict(zip(controls, given["controls"].tolist(), strict=True))
        columns = summary_layout.columns(summary)
        total = float(columns["total"])
        lower, upper = columns["lower"], columns["upper"]
        steps = int(c["steps"])
        p = np.array(state["params"], dtype=np.float64)
        damping, growth = float(state["damping"]), float(state["growth"])
        scale = np.array(state["scale"], dtype=np.float64)
        best, stall = float(state["best"]), float(state["stall"])
        history = np.zeros(steps)
        status, done = RUNNING, 0
        exact = _ExactRss(residuals, summary, summary_layout)
        with np.errstate(all="ignore"):
            rss_exact = exact(p)
            while done < steps and status == RUNNING:
                r, jac = jacobian(residuals, p, summary)
                rss = float(np.sum(r * r))
                loss = rss / total
                stop = RUNNING
                new_best, new_stall = best, stall
                if stopping:
                    g = 2.0 * (jac.T @ r) / total
                    stop, new_best, new_stall = _stopping_rule(c, loss, g, best, stall)
                new_p, new_damping, new_growth, new_scale, final, new_rss = _step(
                    exact, p, r, jac, rss_exact, damping, growth, scale, lower, upper
                )
                if stop == RUNNING and final:
                    stop = STEP_TOLERANCE
                new_p = np.minimum(np.maximum(new_p, lower), upper)
                history[done] = loss
                finite = math.isfinite(loss) and bool(np.isfinite(new_p).all())
                steps_on = stop in (RUNNING, STEP_TOLERANCE)
                status = NON_FINITE if steps_on and not finite else stop
                if steps_on and finite:
                    p, damping, growth, scale = new_p, new_damping, new_growth, new_scale
                    rss_exact = new_rss
                    best, stall = new_best, new_stall
                if steps_on:
                    done += 1
        state |= {"params": p, "damping": damping, "growth": growth, "scale": scale}
        state |= {"best": best, "stall": stall}
        out_state = state_layout.pack(state)
        at = curvature(residuals, p, summary, total)
        return np.concatenate([out_state, [float(done), float(status)], at, history])

    return loop


def _stopping_rule(
    c: dict[str, float], loss: float, g: Array, best: float, stall: float
) -> tuple[int, float, float]:
    """:func:`~service.fitting.loop.stopping_rule` of one set."""
    magnitude = max(abs(loss), 1.0)
    stall = 0.0 if (best - loss) > c["tolerance"] * magnitude else stall + 1.0
    best = min(best, loss)
    loss_stop = c["tolerance"] >= 0.0 and stall >= c["patience"]
    gradient_stop = (
        c["gradient_tolerance"] >= 0.0 and float(np.linalg.norm(g)) <= c["gradient_tolerance"]
    )
    rule = GRADIENT_TOLERANCE if gradient_stop else LOSS_TOLERANCE if loss_stop else RUNNING
    return (rule if math.isfinite(loss) else RUNNING), best, stall


class _ExactRss:
    """The sum of squared residuals evaluated in extended precision (x87 long double here),
    for the step's acceptance test: near the optimum of an ill-conditioned model the float64
    sum is noisy (Misra1a: ~1e-14 relatively, as large as the decrease left), and a loop
    comparing float64 sums stops wherever the noise first hides the decrease (5.8e-9 from the
    certified b1), while this one goes on to the minimum (2e-12)."""

    def __init__(self, residuals: JetResiduals, summary: Array, layout: Layout) -> None:
        self.residuals = residuals
        self.summary: Any = summary.astype(np.longdouble)
        columns = layout.columns(self.summary)
        #: The sum of squares of the data's own rounding (each y within float64's epsilon):
        #: a fit below it has nothing left to find.
        self.floor = np.sum(columns["w"] * (EPSILON * columns["y"]) ** 2)

    def __call__(self, p: Array) -> Any:
        r = self.residuals(list(p.astype(np.longdouble)), self.summary)
        return np.sum(r * r)


def _step(
    exact: _ExactRss,
    p: Array,
    r: Array,
    jac: Array,
    rss: Any,
    damping: float,
    growth: float,
    scale: Array,
    lower: Array,
    upper: Array,
) -> tuple[Array, float, float, Array, bool, Any]:
    """:func:`~service.fitting.loop.levenberg_marquardt` of one set, its step by a QR
    factorization of [J; √λ·D] (the compiled loop solves the normal equations, which XLA
    runs faster; NumPy's QR of one small set costs no more, and never forms JᵀJ), its sums
    of squares in extended precision (``rss`` at ``p``); also the new point's sum."""
    k = p.size
    scale = np.maximum(scale, np.sum(jac * jac, axis=0))
    floored = np.maximum(scale, 1e-30 * np.max(scale) + 1e-300)
    augmented = np.concatenate([jac, np.diag(np.sqrt(damping * floored))])
    rhs = np.concatenate([-r, np.zeros(k)])
    q, upper_r = np.linalg.qr(augmented)
    d = _solve_upper(upper_r, q.T @ rhs)
    trial = np.minimum(np.maximum(p + d, lower), upper)
    d = trial - p
    # numpy scalars: what overflows is inf (and compares as TensorFlow's does), not an error
    predicted = r + jac @ d
    predicted_decrease = np.sum(r * r) - np.sum(predicted * predicted)
    rss_trial = exact(trial)
    ratio = np.float64(rss - rss_trial) / np.maximum(predicted_decrease, 1e-300)
    better = bool(np.isfinite(rss_trial) and rss_trial < rss and np.isfinite(trial).all())
    if better:
        shrink = float(np.maximum(1.0 / 3.0, 1.0 - (2.0 * ratio - 1.0) ** 3))
        new_damping, new_growth = max(damping * shrink, MIN_DAMPING), 2.0
    else:
        new_damping, new_growth = float(np.float64(damping) * growth), 2.0 * growth
    small = float(np.linalg.norm(d)) <= LM_XTOL * (float(np.linalg.norm(p)) + LM_XTOL)
    # A decrease float64 cannot resolve (the step comes from float64 residuals): taken, and
    # the fit ends, as it does at the data's own rounding. Without this, a fit to exact data
    # went on taking steps of rounding noise that the extended-precision sum still ranked
    # (1,000 epochs where the compiled loop stops).
    unresolved = rss - rss_trial <= RESOLVED * rss or rss_trial <= exact.floor
    final = (better and (small or unresolved)) or new_damping > MAX_DAMPING
    return (
        (trial if better else p),
        new_damping,
        new_growth,
        scale,
        final,
        (rss_trial if better else rss),
    )


def _solve_upper(upper: Array, rhs: Array) -> Array:
    """Back substitution: ``upper`` · d = ``rhs`` (k is small)."""
    k = rhs.size
    d = np.zeros(k)
    for i in range(k - 1, -1, -1):
        d[i] = (rhs[i] - upper[i, i + 1 :] @ d[i + 1 :]) / upper[i, i]
    return d


__all__ = ["curvature", "jacobian", "jacobian_rows", "make_loop"]
