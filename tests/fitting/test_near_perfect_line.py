"""Standard errors of a line that fits almost exactly (calibration lines, NIST's Wampler
territory), scored in correct digits (LRE) against exact rational arithmetic on the same
float64 data, beside statsmodels' OLS on the same data.

x in 1000..1100, y = 3e12 + slope·x + noise: R² is 1 - 1e-13 to 1 - 1e-17, where the
residual sum of squares from the moments (Vyy - ...) cancels to nothing. Each path must
reach at least statsmodels' digits: single fits by SGD and Newton, the large-data path
(moments in one graph call) and a batch.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import statsmodels.api as sm

from service.fitting import FitEngine
from service.fitting.batch import BatchEngine
from service.fitting.options import Optimizer
from service.fitting.summary import Ragged

CASES = [  # slope, noise sd, points
    (1e9, 3e4, 1000),
    (1e6, 3e4, 1000),
    (1e9, 300.0, 1000),
    (1e9, 300.0, 40_000),  # past graph_min_points: the large-data path
]


def _data(slope: float, sd: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    x = np.linspace(1000.0, 1100.0, n)
    return x, 3e12 + slope * x + rng.normal(0.0, sd, n)


def _exact_std_errors(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """OLS standard errors of slope and intercept, in exact rational arithmetic."""
    xs, ys = [Fraction(v) for v in x.tolist()], [Fraction(v) for v in y.tolist()]
    n = len(xs)
    x_mean, y_mean = sum(xs) / n, sum(ys) / n
    sxx = sum((a - x_mean) ** 2 for a in xs)
    slope = sum((a - x_mean) * (b - y_mean) for a, b in zip(xs, ys, strict=True)) / sxx
    intercept = y_mean - slope * x_mean
    rss = sum((b - slope * a - intercept) ** 2 for a, b in zip(xs, ys, strict=True))
    s2 = rss / (n - 2)
    return math.sqrt(s2 / sxx), math.sqrt(s2 * (Fraction(1, n) + x_mean**2 / sxx))


def _lre(value: float | None, exact: float) -> float:
    if value is None:
        return 0.0
    return 15.0 if value == exact else min(15.0, -math.log10(abs(value - exact) / abs(exact)))


@pytest.mark.parametrize(("slope", "sd", "n"), CASES)
def test_std_errors_keep_at_least_statsmodels_digits(
    engine: FitEngine, slope: float, sd: float, n: int
) -> None:
    x, y = _data(slope, sd, n)
    exact = _exact_std_errors(x, y)
    ols = sm.OLS(y, sm.add_constant(x)).fit()
    floor = min(_lre(float(ols.bse[1]), exact[0]), _lre(float(ols.bse[0]), exact[1]))
    assert floor >= 7.5  # statsmodels' own digits here (7.9-10.4)
    digits: dict[str, float] = {}
    for optimizer, epochs in ((Optimizer("sgd"), 2000), (Optimizer("newton"), 20)):
        fit = engine.fit(
            "linear", x, y, learning_rate=0.1, epochs=epochs, seed=0, optimizer=optimizer
        )
        se = fit.stats.std_errors
        digits[optimizer.name] = min(_lre(se[0], exact[0]), _lre(se[1], exact[1]))
    if n <= 1000:
        sets = BatchEngine().fit(
            "linear",
            Ragged.of([x, x[:500]]),
            Ragged.of([y, y[:500]]),
            learning_rate=0.1,
            epochs=2000,
            seed=0,
        )
        first, second = sets[0], sets[1]
        assert not isinstance(first, Exception) and not isinstance(second, Exception)
        se = first.stats.std_errors
        digits["batch"] = min(_lre(se[0], exact[0]), _lre(se[1], exact[1]))
        part = _exact_std_errors(x[:500], y[:500])
        se = second.stats.std_errors
        digits["batch, second set"] = min(_lre(se[0], part[0]), _lre(se[1], part[1]))
    assert min(digits.values()) >= floor, (digits, floor)
