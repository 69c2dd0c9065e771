"""The reference post's Gaussian, N(mean, std²), fitted by (weighted) negative log-likelihood.

The NLL depends on the data only through the centred moments, so the loop evaluates it in
O(1) per epoch from the summary [n, ȳ, Vyy, scale]:

    NLL(m, s) = scale·(½·log(2π s²) + (Vyy + (ȳ - m)²) / (2 s²))

per unit weight times ``scale``: N (or Σw) for the reference post's summed NLL
(``reduction="sum"``), 1 for the mean, so one learning rate suits any N.

Standardized (y' = (y - ȳ)/sy): m' = (m - ȳ)/sy and s' = s/sy; the loss per unit weight is
NLL' + log(sy), and the summary becomes [n, 0, 1, scale].

Statistics: Cov = inverse observed information = inverse Hessian of the summed (weighted)
NLL, i.e. H⁻¹·scale/Σw for the loss as trained. The NLL depends on s only through s², so s
may end negative: the reported std is |s|, with the statistics taken there.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from service.fitting.layout import Layout
from service.fitting.losses import LOG_2PI
from service.fitting.models import ModelSpec, all_equal
from service.fitting.options import Scaling
from service.fitting.results import FitStats
from service.fitting.scaling import Coordinates, affine, quiet, stacked
from service.fitting.small import Vector
from service.fitting.stats import (
    AtFit,
    SetsAtFit,
    SetStats,
    WeightSummary,
    fit_stats,
    fit_stats_of_sets,
)
from service.fitting.summary import (
    VECTOR,
    Ragged,
    centre,
    centre_numpy,
    centre_sets,
    mean_product,
    mean_products_of_sets,
    normalized,
)

Array = np.ndarray[Any, np.dtype[np.float64]]

SUMMARY = Layout.of(n=None, y_mean=None, vyy=None, scale=None)
#: The reference post's deliberately-off start: 0.7·mean(y), 1.3·std(y) (raw loop).
INIT_FACTORS = (0.7, 1.3)
#: The same in standardized units: 0.3 standard deviations below the mean, 1.3 of them wide,
#: so the start is O(1) away at any scale.
STANDARDIZED_START = (-0.3, 1.3)


def moments(y: Array, weights: Array | None = None) -> Array:
    """[n, ȳ, Vyy] of samples (Vyy is the population variance); weighted with ``weights``."""
    w = normalized(weights)
    with np.errstate(over="ignore", invalid="ignore"):  # overflow shows as inf/nan
        y_mean, dy = centre_numpy(y, w)
        return np.array([y.size, y_mean, mean_product(dy, dy, w)])


@tf.function(input_signature=[VECTOR], autograph=False)
def moments_graph(y: Any) -> Any:
    """:func:`moments` of unweighted data in one graph call (large data)."""
    n = tf.cast(tf.size(y), tf.float64)
    y_mean, dy = centre(y)
    return tf.stack([n, y_mean, tf.reduce_mean(dy * dy)])


def moments_of_sets(y: Ragged) -> Array:
    """[B, 3]: :func:`moments` of every set at once."""
    with np.errstate(over="ignore", invalid="ignore"):
        y_mean, dy = centre_sets(y)
        (vyy,) = mean_products_of_sets(y, [(dy, dy)])
    return np.stack([y.lengths.astype(np.float64), y_mean, vyy], axis=1)


def complete(moments: Array, total: Array, options: Mapping[str, Any]) -> Array:
    """Append the loss's scale: Σw (n without weights) for the summed NLL, 1 for the mean."""
    scale = total if options["reduction"] == "sum" else 1.0
    if moments.ndim == 1:
        return np.append(moments, scale)
    column = np.broadcast_to(np.asarray(scale, dtype=np.float64), moments.shape[:-1])[..., None]
    return np.concatenate([moments, column], axis=-1)


def loss(p: Any, summary: Any) -> Any:
    s = SUMMARY.columns(summary)
    var = p[..., 1] * p[..., 1]
    dev = s["y_mean"] - p[..., 0]
    return s["scale"] * (0.5 * (LOG_2PI + tf.math.log(var)) + (s["vyy"] + dev * dev) / (2.0 * var))


def standardize(summary: Array) -> tuple[Array, Coordinates]:
    """The standardized summary and its coordinates; Vyy must be positive. ``scale``
    multiplies the log(sy) shift of the loss."""
    n, y_mean, vyy, scale = (float(v) for v in summary)
    sy = math.sqrt(vyy)
    coords = affine(
        A=[[1.0 / sy, 0.0], [0.0, 1.0 / sy]],
        A_inv=[[sy, 0.0], [0.0, sy]],
        origin=[y_mean, 0.0],
        shift=scale * math.log(sy),
    )
    return np.array([n, 0.0, 1.0, scale]), coords


def standardize_sets(summaries: Array) -> tuple[Array, Coordinates]:
    """:func:`standardize` of every row of [B, 4] at once (the same arithmetic)."""
    n, y_mean, vyy, scale = summaries.T
    with quiet():
        sy = np.sqrt(vyy)
        coords = stacked(
            A=[[1.0 / sy, 0.0], [0.0, 1.0 / sy]],
            A_inv=[[sy, 0.0], [0.0, sy]],
            origin=[y_mean, 0.0],
            shift=scale * np.log(sy),
        )
        zero, one = np.zeros_like(n), np.ones_like(n)
        return np.stack([n, zero, one, scale], 1), coords


def start(summaries: Array, scaling: Scaling, seeds: Sequence[int | None]) -> Array:
    """The reference post's deliberately-off start (deterministic: no seed is used)."""
    if scaling != "none":
        starts = np.empty((len(summaries), 2))
        starts[:] = STANDARDIZED_START
        return starts
    s = SUMMARY.columns(summaries)
    with np.errstate(over="ignore", invalid="ignore"):
        return np.stack([INIT_FACTORS[0] * s["y_mean"], INIT_FACTORS[1] * np.sqrt(s["vyy"])], 1)


def stats(
    fit: AtFit, summary: Array, weights: WeightSummary, options: Mapping[str, Any]
) -> FitStats:
    """Statistics of the normal fit where it ended (``summary`` in the caller's units)."""
    if fit.params[1] < 0.0:  # report for |s|
        fit = fit.flipped(1)
    coords = fit.coords
    s = SUMMARY.columns(summary)
    y_mean, vyy, scale = float(s["y_mean"]), float(s["vyy"]), float(s["scale"])
    mean_nll = 0.5 * (LOG_2PI + math.log(vyy) + 1.0)  # per unit weight, at the optimum
    return fit_stats(
        ("mean", "std"),
        fit,
        weights,
        covariance_factor=scale / weights.total / coords.a,
        loglik=-coords.loss(fit.point.loss) * weights.total / scale,
        closed=(y_mean, math.sqrt(vyy)),
        closed_loss=mean_nll * scale,
    )


def stats_of_sets(fit: SetsAtFit, summaries: Array, options: Mapping[str, Any]) -> SetStats:
    """:func:`stats` of every unweighted set of a batch at once (NaN for its None)."""
    fit = fit.flipped(1, fit.params[1] < 0.0)  # report for |s|
    coords: Any = fit.coords  # stacked: numbers are arrays
    n, y_mean, vyy, scale = summaries.T
    with quiet():
        mean_nll = 0.5 * (LOG_2PI + np.log(vyy) + 1.0)
        return fit_stats_of_sets(
            ("mean", "std"),
            fit,
            n,
            covariance_factor=scale / n / coords.a,
            loglik=-coords.loss(fit.loss) * n / scale,
            closed=(y_mean, np.sqrt(vyy)),
            closed_loss=mean_nll * scale,
        )


def report(params: Vector) -> Vector:
    return (params[0], abs(params[1]))


GAUSSIAN = ModelSpec(
    name="gaussian",
    params=("mean", "std"),
    data=("y",),
    summary=SUMMARY,
    moments=moments,
    moments_graph=moments_graph,
    moments_of_sets=moments_of_sets,
    complete=complete,
    loss=loss,
    spread="vyy",
    constant=all_equal("y", "the standard deviation is zero"),
    standardize=standardize,
    standardize_sets=standardize_sets,
    start=start,
    random_start=False,
    stats=stats,
    stats_of_sets=stats_of_sets,
    dummy=(2.0, 0.0, 1.0, 1.0),
    dummy_start=(0.0, 1.0),
    report=report,
    options={"reduction": "mean"},
)
