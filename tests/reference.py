"""The post's eager training loops, line by line, in float32. Used by tests and the benchmark.

Deliberately slow (one Python iteration and several eager ops per epoch): it is the yardstick
the compiled loop is checked and measured against.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import tensorflow as tf

from service.fitting.layers import GaussianFitLayer, LinearRegressionLayer
from service.fitting.losses import mse, nll


def reference_linear(
    x: npt.ArrayLike,
    y: npt.ArrayLike,
    learning_rate: float = 0.05,
    epochs: int = 30,
    initial: tuple[float, float] = (0.0, 0.0),
    optimizer: tf.keras.optimizers.Optimizer | None = None,
    dtype: str = "float32",
) -> tuple[float, float, list[float]]:
    """The reference post's linear-regression loop; returns (m, b, mse_loss). With a Keras
    ``optimizer`` its ``apply_gradients`` replaces the reference post's ``assign_sub`` update;
    ``dtype`` is the reference post's float32 unless asked otherwise."""
    x_train = tf.constant(np.asarray(x), dtype)
    y_train = tf.constant(np.asarray(y), dtype)
    linear_regression_layer = LinearRegressionLayer(dtype=dtype)
    linear_regression_layer.m.assign([initial[0]])
    linear_regression_layer.b.assign([initial[1]])

    mse_loss = []
    for _ in range(epochs):
        with tf.GradientTape() as tape:
            predictions = linear_regression_layer(x_train)
            current_mse_loss = mse(predictions, y_train)

        gradients = tape.gradient(current_mse_loss, linear_regression_layer.trainable_variables)
        if optimizer is not None:
            variables = linear_regression_layer.trainable_variables
            optimizer.apply_gradients(zip(gradients, variables, strict=True))
            mse_loss.append(float(current_mse_loss))
            continue
        linear_regression_layer.m.assign_sub(learning_rate * gradients[0])
        linear_regression_layer.b.assign_sub(learning_rate * gradients[1])
        mse_loss.append(float(current_mse_loss))
    m = float(linear_regression_layer.m.numpy()[0])
    b = float(linear_regression_layer.b.numpy()[0])
    return m, b, mse_loss


def reference_gaussian(
    y: npt.ArrayLike,
    learning_rate: float = 0.0005,
    epochs: int = 50,
    initial: tuple[float, float] | None = None,
    optimizer: tf.keras.optimizers.Optimizer | None = None,
    dtype: str = "float32",
) -> tuple[float, float, list[float]]:
    """The post's maximum-likelihood loop (summed NLL); returns (m, s, nll_loss). With a Keras
    ``optimizer`` its ``apply_gradients`` replaces the reference post's ``assign_sub`` update;
    ``dtype`` is the reference post's float32 unless asked otherwise."""
    y_train = tf.constant(np.asarray(y), dtype)
    if initial is None:
        m0 = 0.7 * tf.reduce_mean(y_train)
        s0 = 1.3 * tf.math.reduce_std(y_train)
        initial = (float(m0), float(s0))
    gaussian_fit_layer = GaussianFitLayer(initial, dtype=dtype)

    nll_loss = []
    for _ in range(epochs):
        with tf.GradientTape() as tape:
            current_nll_loss = nll(y_train, gaussian_fit_layer.m, gaussian_fit_layer.s)
        gradients = tape.gradient(current_nll_loss, gaussian_fit_layer.trainable_variables)
        if optimizer is not None:
            variables = gaussian_fit_layer.trainable_variables
            optimizer.apply_gradients(zip(gradients, variables, strict=True))
            nll_loss.append(float(np.squeeze(current_nll_loss.numpy())))
            continue
        gaussian_fit_layer.m.assign_sub(learning_rate * gradients[0])
        gaussian_fit_layer.s.assign_sub(learning_rate * gradients[1])
        nll_loss.append(float(np.squeeze(current_nll_loss.numpy())))
    m = float(gaussian_fit_layer.m.numpy()[0])
    s = float(gaussian_fit_layer.s.numpy()[0])
    return m, s, nll_loss


def linear_closed_form(x: npt.ArrayLike, y: npt.ArrayLike) -> tuple[float, float]:
    """Least-squares slope and intercept (float64)."""
    xa = np.asarray(x, dtype=np.float64)
    ya = np.asarray(y, dtype=np.float64)
    dx = xa - xa.mean()
    slope = float(np.dot(dx, ya - ya.mean()) / np.dot(dx, dx))
    return slope, float(ya.mean() - slope * xa.mean())


def gaussian_closed_form(y: npt.ArrayLike) -> tuple[float, float]:
    """Maximum-likelihood mean and (population) standard deviation."""
    ya = np.asarray(y, dtype=np.float64)
    return float(ya.mean()), float(ya.std())
