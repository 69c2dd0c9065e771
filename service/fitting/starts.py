"""Multi-start: the starts of a fit beyond its first, and what the runs from them found.

The first start is the caller's (given, or guessed for a named model). The others are drawn
from the request's seed:

- a parameter with both bounds given: a Latin hypercube over its interval (scipy's
  ``qmc.LatinHypercube``: each of the K - 1 strata of every such parameter sampled once);
- any other: log-uniform over a decade either way around the first start's magnitude (1
  where it is 0), with its sign, flipped for a quarter of the draws; clipped into a one-sided
  bound.

All runs are fitted together (one batched call); :func:`best` picks the lowest-rss converged
run (the lowest-rss run if none converged) and summarizes the others.

numpy and scipy only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy.stats import qmc

from service.fitting.options import SAME_MINIMUM_RTOL
from service.fitting.results import FitError, FitResult

Array = npt.NDArray[np.float64]
#: Iterations each run of a multi-start gets at most: Levenberg-Marquardt converges well
#: within them from a start in the right basin, and a run still crawling across a plateau
#: (a rate so large its exponential is 0 everywhere) would hold every other run's loop for
#: all its epochs. The lowest-rss run, if it stopped there unconverged, is continued alone.
EXPLORE_EPOCHS = 100
#: Decades either way of the log-uniform draws, and the share of them with the sign flipped.
DECADES = 1.0
FLIPPED = 0.25


def draw(
    first: Sequence[float],
    bounds: Sequence[tuple[float | None, float | None]],
    count: int,
    seed: int,
) -> Array:
    """``count`` starts ([count, k]), the first one ``first``."""
    k = len(first)
    out = np.tile(np.asarray(first, dtype=np.float64), (count, 1))
    if count == 1:
        return out
    rng = np.random.default_rng(seed)
    boxed = [j for j, (low, high) in enumerate(bounds) if low is not None and high is not None]
    if boxed:
        cube = qmc.LatinHypercube(d=len(boxed), seed=rng).random(count - 1)
        lows = np.array([bounds[j][0] for j in boxed], dtype=np.float64)
        highs = np.array([bounds[j][1] for j in boxed], dtype=np.float64)
        out[1:, boxed] = lows + cube * (highs - lows)
    for j in range(k):
        if j in boxed:
            continue
        magnitude = abs(first[j]) if first[j] != 0.0 else 1.0
        sign = math.copysign(1.0, first[j]) if first[j] != 0.0 else 1.0
        spread = magnitude * 10.0 ** rng.uniform(-DECADES, DECADES, count - 1)
        flips = np.where(rng.random(count - 1) < FLIPPED, -1.0, 1.0)
        values = sign * flips * spread
        low, high = bounds[j]
        out[1:, j] = np.clip(
            values, -np.inf if low is None else low, np.inf if high is None else high
        )
    return out


@dataclass(frozen=True, slots=True)
class Summary:
    """``stats.starts``: the runs, how many reached the best minimum, and the rss of the best
    other minimum a run converged to (None if none)."""

    runs: int
    at_best: int
    next_rss: float | None


def best(results: Sequence[FitResult | FitError]) -> tuple[int, Summary]:
    """The run to answer (the lowest-rss converged one, else the lowest-rss one), and the
    summary; a FitError if every run failed (the first run's)."""
    if not any(isinstance(r, FitResult) for r in results):
        error = results[0]
        assert isinstance(error, FitError)
        raise error
    return summarize(
        [(_rss(r.stats.rss), r.converged) if isinstance(r, FitResult) else None for r in results]
    )


def lowest(results: Sequence[FitResult | FitError]) -> int | None:
    """The run with the lowest rss, converged or not (None: every run failed)."""
    fitted = [(_rss(r.stats.rss), i) for i, r in enumerate(results) if isinstance(r, FitResult)]
    return min(fitted)[1] if fitted else None


def summarize(runs: Sequence[tuple[float, bool] | None]) -> tuple[int, Summary]:
    """:func:`best` of runs given as (rss, converged), None for a run that failed (at least
    one must not have)."""
    fitted = [(i, run) for i, run in enumerate(runs) if run is not None]
    converged = [(i, rss) for i, (rss, ok) in fitted if ok]
    pool = converged or [(i, rss) for i, (rss, _) in fitted]
    chosen, low = min(pool, key=lambda item: (item[1], item[0]))
    same = [i for i, rss in converged if _same(rss, low)]
    others = [rss for _, rss in converged if not _same(rss, low) and rss > low]
    return chosen, Summary(
        runs=len(runs), at_best=len(same), next_rss=min(others) if others else None
    )


def _rss(value: float | None) -> float:
    return math.inf if value is None or not math.isfinite(value) else value


def _same(value: float, best: float) -> bool:
    return math.isfinite(value) and abs(value - best) <= SAME_MINIMUM_RTOL * max(abs(best), 1e-300)
