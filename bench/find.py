"""Fits that find the answer: what multi-start costs next to one start (in process, as the
service runs them), and a global fit of 100 sets against the same stacked problem in
scipy's ``least_squares`` (in process), side by side in one run."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import optimize

from bench.engine import fmt_time, timed
from service.fitting import FitEngine, bands, global_fit, starts
from service.fitting.expression import parse
from service.fitting.options import Optimizer
from service.fitting.results import FitError, FitResult
from service.fitting.sets import SetData, fit_sets


def run() -> str:
    return "\n".join([_starts(), "", _global()])


def _starts() -> str:
    """One start against 16 as the service runs them: a single compiled fit, and the 16
    starts as rows of the compiled sets loop (each at most EXPLORE_EPOCHS iterations)."""
    rng = np.random.default_rng(7)
    x = np.sort(rng.uniform(0.0, 10.0, 1000))
    y = 3.0 * np.exp(-0.7 * x) + 0.5 + rng.normal(0.0, 0.02, x.size)
    expression = parse("a*exp(-k*x) + c", ("x",), ("a", "k", "c"))
    engine, first = FitEngine(), [1.0, 1.0, 0.0]
    lm = Optimizer("levenberg_marquardt")
    options = {"expression": expression}

    def one() -> FitResult:
        return engine.fit(
            "expression", x, y, learning_rate=0.01, epochs=1000, initial=first, optimizer=lm,
            options=options,
        )  # fmt: skip

    rows = tuple(SetData((x, y), tuple(r)) for r in starts.draw(first, [(None, None)] * 3, 16, 0))

    def many() -> list[FitResult | FitError]:
        return fit_sets(
            engine, "expression", rows, options=options, learning_rate=0.01,
            epochs=starts.EXPLORE_EPOCHS, optimizer=lm,
        )  # fmt: skip

    single, runs = one(), many()
    chosen, summary = starts.best(runs)
    best = runs[chosen]
    assert isinstance(best, FitResult)
    agree = max(abs(best.params[n] - single.params[n]) / abs(single.params[n]) for n in "akc")
    t_one, t_many = timed(one, min_time=1.0), timed(many, min_time=1.0)
    return "\n".join(
        [
            "| multi-start, n = 1,000, 3 parameters, in process (compiled) | median |",
            "|---|---|",
            f"| one start | {fmt_time(t_one)} |",
            f"| 16 starts (rows of one batched loop) | {fmt_time(t_many)} |",
            "",
            f"- 16 starts cost {t_many / t_one:.2f}x one start; {summary.at_best} of 16 runs "
            f"reached the answer, which equals the single start's to {agree:.1e}",
        ]
    )


def _global(sets: int = 100, points: int = 50) -> str:
    rng = np.random.default_rng(1)
    x = np.linspace(0.0, 3000.0, points)
    amplitudes, offsets = rng.uniform(500.0, 1500.0, sets), rng.uniform(10.0, 50.0, sets)
    ys = [a * np.exp(-8e-4 * x) + c + rng.normal(0.0, 5.0, points)
          for a, c in zip(amplitudes, offsets, strict=True)]  # fmt: skip
    expression = parse("a*exp(-k*x) + c", ("x",), ("a", "k", "c"))
    problem = global_fit.Problem.of(
        bands.expression_curve(expression.tree), [([x], y, None) for y in ys], [1], [0, 2]
    )
    local = np.tile([1000.0, 0.0], (sets, 1))

    def ours() -> global_fit.GlobalFit:
        return global_fit.fit(problem, [1e-3], local, [(None, None)] * 3, 1000)

    def residuals(theta: np.ndarray) -> np.ndarray:
        k, pairs = theta[0], theta[1:].reshape(sets, 2)
        together = zip(pairs, ys, strict=True)
        return np.concatenate([a * np.exp(-k * x) + c - y for (a, c), y in together])

    def jacobian(theta: np.ndarray) -> np.ndarray:
        k, pairs = theta[0], theta[1:].reshape(sets, 2)
        out = np.zeros((sets * points, theta.size))
        e = np.exp(-k * x)
        for i, (a, _) in enumerate(pairs):
            rows = slice(i * points, (i + 1) * points)
            out[rows, 0], out[rows, 1 + 2 * i], out[rows, 2 + 2 * i] = -a * x * e, e, 1.0
        return out

    start = np.concatenate([[1e-3], local.ravel()])

    def theirs() -> Any:
        return optimize.least_squares(
            residuals, start, jac=jacobian, method="trf", xtol=1e-15, ftol=1e-15, gtol=1e-15
        )

    mine, reference = ours(), theirs()
    agree = np.max(
        np.abs(np.concatenate([mine.shared, mine.local.ravel()]) - reference.x)
        / np.abs(reference.x)
    )
    t_ours, t_theirs = timed(ours, min_time=1.0), timed(theirs, min_time=1.0)
    return "\n".join(
        [
            f"| global fit, {sets} sets x {points} points, 1 shared + 2 local parameters | time |",
            "|---|---|",
            f"| tapefit (Schur-complement Levenberg-Marquardt, covariance included) | "
            f"{fmt_time(t_ours)} |",
            f"| scipy least_squares on the stacked problem (trf, exact Jacobian) | "
            f"{fmt_time(t_theirs)} |",
            "",
            f"- {t_theirs / t_ours:.0f}x faster; estimates agree to {agree:.1e} (relative)",
        ]
    )
