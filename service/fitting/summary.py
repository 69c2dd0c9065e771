"""Sufficient statistics of a data set, computed once per fit in float64.

Means first, then second moments about them (two passes), so large offsets in the data do
not cancel away the spread.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import tensorflow as tf

_VECTOR = tf.TensorSpec([None], tf.float64)


def linear_moments(x: Any, y: Any) -> Any:
    """[n, x̄, ȳ, Vxx, Vxy, Vyy] of paired samples."""
    n = tf.cast(tf.size(x), tf.float64)
    x_mean, dx = _centre(x)
    y_mean, dy = _centre(y)
    return tf.stack(
        [
            n,
            x_mean,
            y_mean,
            tf.reduce_mean(dx * dx),
            tf.reduce_mean(dx * dy),
            tf.reduce_mean(dy * dy),
        ]
    )


def gaussian_moments(y: Any) -> Any:
    """[n, ȳ, Vyy] of samples (Vyy is the population variance)."""
    n = tf.cast(tf.size(y), tf.float64)
    y_mean, dy = _centre(y)
    return tf.stack([n, y_mean, tf.reduce_mean(dy * dy)])


#: Standalone compiled versions (the engine inlines the ops into its own compiled function).
linear_summary = tf.function(linear_moments, input_signature=[_VECTOR, _VECTOR])
gaussian_summary = tf.function(gaussian_moments, input_signature=[_VECTOR])


def _centre(v: Any) -> tuple[Any, Any]:
    """Mean and deviations of ``v``; the second pass corrects the first pass's rounding."""
    mean = tf.reduce_mean(v)
    dev = v - mean
    correction = tf.reduce_mean(dev)
    return mean + correction, dev - correction


def linear_moments_numpy(
    x: npt.NDArray[np.float64],
    y: npt.NDArray[np.float64],
    weights: npt.NDArray[np.float64] | None = None,
) -> npt.NDArray[np.float64]:
    """:func:`linear_moments` in numpy, for small data (no graph call). With ``weights`` the
    means and moments are weighted (weights normalized to sum 1); n stays the point count."""
    w = None if weights is None else weights / weights.sum()
    with np.errstate(over="ignore", invalid="ignore"):  # overflow shows as inf/nan
        x_mean, dx = _centre_numpy(x, w)
        y_mean, dy = _centre_numpy(y, w)
        wdx = dx / x.size if w is None else w * dx
        moments = (np.dot(wdx, dx), np.dot(wdx, dy), _mean_square(dy, w))
    return np.array([x.size, x_mean, y_mean, *moments])


def gaussian_moments_numpy(
    y: npt.NDArray[np.float64], weights: npt.NDArray[np.float64] | None = None
) -> npt.NDArray[np.float64]:
    """:func:`gaussian_moments` in numpy, for small data (no graph call); weighted as in
    :func:`linear_moments_numpy`."""
    w = None if weights is None else weights / weights.sum()
    with np.errstate(over="ignore", invalid="ignore"):  # overflow shows as inf/nan
        y_mean, dy = _centre_numpy(y, w)
        return np.array([y.size, y_mean, _mean_square(dy, w)])


def _mean_square(d: npt.NDArray[np.float64], w: npt.NDArray[np.float64] | None) -> float:
    return float(np.dot(d, d) / d.size if w is None else np.dot(w * d, d))


def _centre_numpy(
    v: npt.NDArray[np.float64], w: npt.NDArray[np.float64] | None = None
) -> tuple[float, npt.NDArray[np.float64]]:
    mean = float(v.mean() if w is None else np.dot(w, v))
    dev = v - mean
    correction = float(dev.mean() if w is None else np.dot(w, dev))
    return mean + correction, dev - correction
