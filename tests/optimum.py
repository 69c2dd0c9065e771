"""How close two least-squares fits of the same data must agree: the float64 resolution of
the sum of squares, in standard errors.

Each residual √w·(y - f) is computed in float64 with an error of a few units in the last
place of the model's value, about ``ULPS``·eps·|y|, so the sum of squares is known only to

    rho = 2·ULPS·eps·Σ √w·|y|·|r| <= 2·ULPS·eps·‖√w·y‖·√rss    (Cauchy-Schwarz),

and a fit stops wherever a smaller sum can no longer be told apart. Moving a parameter by g
standard errors (SE = sigma·√C_ii, sigma² = rss/dof) raises the sum by at least g²·sigma²,
so a fit that ends within rho of the minimum is within √(rho)/sigma standard errors of it,
and two such fits within twice that of each other. At unit scale this is ~1e-7 standard
errors; on a background of 1e7 with a noise of 0.1 it is ~5e-3 (the sets' fits here end
~3e-4 apart there: a compiled float64 loop against the single fit's extended-precision
acceptance test). Parameters equal to 1e-9 relatively always agree.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

#: The rounding of one model value, in units in the last place (a few operations).
ULPS = 4.0
#: The floor of the tolerance in standard errors (well-scaled data resolve far better).
FLOOR_SE = 1e-6


def resolution_se(
    y: npt.ArrayLike, rss: float, dof: int, weights: npt.ArrayLike | None = None
) -> float:
    """Twice √(rho)/sigma: how many standard errors two fits at float64's optimum of this
    data may differ (at least ``FLOOR_SE``)."""
    values = np.asarray(y, dtype=np.float64)
    w = np.ones_like(values) if weights is None else np.asarray(weights, dtype=np.float64)
    if rss <= 0.0 or dof <= 0:
        return FLOOR_SE
    rho = 2.0 * ULPS * np.finfo(np.float64).eps * np.linalg.norm(np.sqrt(w) * values)
    rho *= np.sqrt(rss)
    return max(FLOOR_SE, 2.0 * float(np.sqrt(rho * dof / rss)))


def assert_same_optimum(
    got: Mapping[str, float],
    want: Mapping[str, float],
    std_errors: Mapping[str, float | None] | Sequence[float | None],
    tolerance_se: float,
) -> None:
    """Each parameter equal to 1e-9 relatively, or within ``tolerance_se`` standard errors
    (:func:`resolution_se`)."""
    if isinstance(std_errors, Mapping):
        errors = std_errors
    else:
        errors = dict(zip(want, std_errors, strict=True))
    for name, value in want.items():
        a, se = got[name], errors[name]
        gap = abs(a - value)
        relative = gap <= 1e-9 * max(abs(a), abs(value), 1e-300)
        assert relative or (se is not None and gap <= tolerance_se * se), (
            name,
            a,
            value,
            None if se is None else gap / se,
            tolerance_se,
        )
