"""Inference on fitted parameters: the parameter table (estimate, standard error, statistic,
two-sided p-value and confidence interval) every fit answers in ``stats.inference``.

Least squares use Student's t with the residual degrees of freedom n - p (statsmodels'
``OLS``/``WLS`` ``t_test``, ``pvalues`` and ``conf_int``); a covariance taken as known
(``absolute_sigma``) and the Gaussian maximum-likelihood fit use the normal distribution
(statsmodels' convention for a fixed scale). The distributions are scipy's ``special``
functions, which keep relative accuracy far into the tails: a p-value of 1e-300 is reported
as such, and one below the smallest float64 as 0, never NaN.

No TensorFlow: the parser processes draw the bands, and the client and schemas stay light.
Single fits call :func:`table`, batches :func:`tables` on [B, k] arrays (the same arithmetic,
element by element).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
from scipy import special

Array = npt.NDArray[np.float64]
Method = Literal["t", "normal", "profile"]

#: What an answer says when a parameter's interval does not exist.
UNDEFINED = (
    "the parameters' covariance is undefined (the Jacobian or Hessian is singular at the fit, "
    "or the fit is not at a minimum): their standard errors, statistics, p-values and "
    "confidence intervals are null"
)
NO_DOF = (
    "no residual degrees of freedom (as many parameters as points with positive weight): the "
    "noise variance, and with it every standard error and interval, is undefined"
)


@dataclass(frozen=True, slots=True)
class Reporting:
    """What a request asks of its answer's uncertainty: the intervals' confidence level, and
    whether its weights are 1/sigma² of the true sigma (curve_fit's ``absolute_sigma``)."""

    confidence: float
    absolute_sigma: bool = False

    def dof(self, dof: int, likelihood: bool = False) -> int | None:
        """The parameter table's degrees of freedom for a least-squares fit's ``dof``; None
        (the normal distribution) where the noise scale is known or the fit is a maximum
        likelihood."""
        return None if likelihood or self.absolute_sigma else dof


def critical(confidence: float, dof: Array | float | None) -> Array | float:
    """The two-sided critical value at ``confidence``: Student's t quantile at dof degrees of
    freedom (NaN where dof ≤ 0), or the normal one when ``dof`` is None."""
    q = 0.5 + 0.5 * confidence
    if dof is None:
        return float(special.ndtri(q))
    d = np.asarray(dof, dtype=np.float64)
    with np.errstate(all="ignore"):
        value = np.where(d > 0, special.stdtrit(np.maximum(d, 1.0), q), np.nan)
    return float(value) if value.ndim == 0 else value


def two_sided_p(statistic: Array, dof: Array | float | None) -> Array:
    """P(|T| ≥ |statistic|): Student's t at ``dof`` (NaN where dof ≤ 0), or the normal."""
    s = -np.abs(statistic)
    if dof is None:
        return np.asarray(2.0 * special.ndtr(s))
    d = np.asarray(dof, dtype=np.float64)
    with np.errstate(all="ignore"):
        return np.where(d > 0, 2.0 * special.stdtr(np.maximum(d, 1.0), s), np.nan)


@dataclass(frozen=True, slots=True)
class Tables:
    """The parameter tables of B fits at once: [B, k] arrays, NaN where undefined."""

    estimate: Array
    std_error: Array
    statistic: Array
    p_value: Array
    lower: Array
    upper: Array

    def row(self, i: int, names: Sequence[str]) -> dict[str, dict[str, float | None]]:
        """Fit ``i``'s table by parameter name, None where undefined."""
        columns = (self.estimate, self.std_error, self.statistic, self.p_value)
        values = [c[i].tolist() for c in (*columns, self.lower, self.upper)]
        return {
            name: dict(zip(FIELDS, (_finite(v[j]) for v in values), strict=True))
            | {"lower_found": None, "upper_found": None}  # profile intervals only
            for j, name in enumerate(names)
        }


FIELDS = ("estimate", "std_error", "statistic", "p_value", "lower", "upper")


def tables(estimates: Array, std_errors: Array, dof: Array | None, confidence: float) -> Tables:
    """The Wald table of B fits ([B, k] estimates and standard errors, NaN where undefined;
    ``dof`` [B], or None for the normal distribution)."""
    d = None if dof is None else np.asarray(dof, dtype=np.float64)[:, None]
    with np.errstate(all="ignore"):
        se = np.where(np.isfinite(std_errors) & (std_errors > 0.0), std_errors, np.nan)
        statistic = estimates / se
        p = two_sided_p(statistic, d)
        half = critical(confidence, d) * se
        return Tables(
            estimate=estimates,
            std_error=se,
            statistic=statistic,
            p_value=np.where(np.isnan(statistic), np.nan, p),
            lower=estimates - half,
            upper=estimates + half,
        )


def table(
    names: Sequence[str],
    estimates: Sequence[float],
    std_errors: Sequence[float | None],
    dof: int | None,
    confidence: float,
) -> dict[str, dict[str, float | None]]:
    """One fit's Wald table by parameter name (None where undefined)."""
    row = tables(
        np.array([estimates], dtype=np.float64),
        np.array([[math.nan if s is None else s for s in std_errors]], dtype=np.float64),
        None if dof is None else np.array([dof]),
        confidence,
    )
    return row.row(0, names)


def inference(
    names: Sequence[str],
    estimates: Sequence[float],
    std_errors: Sequence[float | None],
    dof: int | None,
    confidence: float,
    rows: dict[str, dict[str, float | None]] | None = None,
) -> dict[str, object]:
    """``stats.inference`` of one fit: the method, the degrees of freedom and the table
    (``rows``, if its batch's :func:`tables` gave it already)."""
    return {
        "confidence": confidence,
        "method": "normal" if dof is None else "t",
        "dof": dof,
        "parameters": table(names, estimates, std_errors, dof, confidence)
        if rows is None
        else rows,
    }


def chi_square(rss: float | None, dof: int) -> tuple[float | None, float | None]:
    """The chi-square of a fit whose weights are 1/sigma² of the true sigma (``absolute_sigma``):
    Σw·r², and its upper-tail p-value at ``dof`` degrees of freedom (small: the residuals
    are larger than sigma says; None without degrees of freedom)."""
    if rss is None or not math.isfinite(rss):
        return None, None
    p = float(special.chdtrc(dof, rss)) if dof > 0 else math.nan
    return rss, _finite(p)


def undefined_warnings(std_errors: Sequence[float | None], dof: int | None) -> list[str]:
    """Why a fit's intervals are null, if they are."""
    if dof is not None and dof <= 0:
        return [NO_DOF]
    if any(s is None or not math.isfinite(s) for s in std_errors):
        return [UNDEFINED]
    return []


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None
