"""The reference post's per-point losses (``mse``, ``nll``).

The engine fits their exact sufficient-statistic forms, stated with each model in
:mod:`service.fitting.models`; these per-point forms are the definitions they reproduce.
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
