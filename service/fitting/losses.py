"""Loss functions: the reference post's per-point forms and their exact sufficient-statistic forms.

The per-point forms (``mse``, ``nll``) are the reference post's. Full-batch MSE of a line and the
Gaussian NLL depend on the data only through a few centred moments, so the compiled loop
evaluates the same losses from a :mod:`service.fitting.summary` vector in O(1) per epoch:

    MSE(m, b)  = m²·Vxx - 2m·Vxy + Vyy + (m·x̄ + b - ȳ)²
    NLL(m, s)  = (N/2)·log(2π s²) + N·(Vyy + (ȳ - m)²) / (2 s²)

with x̄, ȳ the means and Vxx, Vxy, Vyy the centred second moments (divided by N).
"""

from __future__ import annotations

import math
from typing import Any

import tensorflow as tf

LOG_2PI = math.log(2.0 * math.pi)


def mse(y_pred: Any, y_true: Any) -> Any:
    """Mean squared error between predictions and targets (the reference post's ``MSE``)."""
    return tf.reduce_mean(tf.square(y_pred - y_true))


def nll(y_true: Any, m: Any, s: Any) -> Any:
    """Negative log-likelihood of ``y_true`` under N(m, s²), summed (the post's ``NLL``)."""
    n = tf.cast(tf.size(y_true), y_true.dtype)
    return (n / 2.0) * tf.math.log(2.0 * math.pi * s**2) + (1.0 / (2.0 * s**2)) * tf.reduce_sum(
        (y_true - m) ** 2
    )


def mse_from_moments(pred_at_mean: Any, slope: Any, summary: Any) -> Any:
    """MSE of a line from a linear summary; ``pred_at_mean`` is the line's value at x̄."""
    y_mean, vxx, vxy, vyy = summary[2], summary[3], summary[4], summary[5]
    offset = pred_at_mean - y_mean
    return slope * slope * vxx - 2.0 * slope * vxy + vyy + offset * offset


def nll_from_moments(m: Any, s: Any, summary: Any, scale: Any) -> Any:
    """NLL of a Gaussian summary, per point, times ``scale`` (N for the post's sum, 1 for mean)."""
    y_mean, vyy = summary[1], summary[2]
    var = s * s
    dev = y_mean - m
    return scale * (0.5 * (LOG_2PI + tf.math.log(var)) + (vyy + dev * dev) / (2.0 * var))
