"""Synthetic data as the reference post makes it, and samples from a fitted Gaussian.

The reference post draws with ``tf.random.uniform`` and ``tf.random.normal``; here the stateless
versions take an explicit seed, so the same seed gives the same data on every replica.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import tensorflow as tf

Array = npt.NDArray[np.float64]


def _seed(seed: int, stream: int) -> tf.Tensor:
    # Stateless ops take a pair of int64 seeds; the stream separates the draws of one call.
    return tf.constant([seed % 2**63, stream], dtype=tf.int64)


def linear_data(
    n: int, slope: float, intercept: float, noise_std: float, seed: int
) -> tuple[Array, Array]:
    """The post's ``generate_noisy_data``: x ~ U(0, 1), y = slope·x + intercept + N(0, σ²)."""
    x = tf.random.stateless_uniform([n], seed=_seed(seed, 0), dtype=tf.float64)
    noise = tf.random.stateless_normal([n], seed=_seed(seed, 1), stddev=noise_std, dtype=tf.float64)
    return x.numpy(), (slope * x + intercept + noise).numpy()


def gaussian_data(n: int, mean: float, std: float, seed: int) -> tuple[Array, Array]:
    """The post's ``generate_gaussian_data``: x ~ U(0, 1) (for plotting), y ~ N(mean, std²)."""
    x = tf.random.stateless_uniform([n], seed=_seed(seed, 0), dtype=tf.float64)
    return x.numpy(), gaussian_samples(n, mean, std, seed, stream=1)


def gaussian_samples(n: int, mean: float, std: float, seed: int, stream: int = 2) -> Array:
    """n draws from N(mean, std²), as the reference post's ``GaussianFitLayer`` call makes them (by
    default from a stream of their own, so samples never replay the data drawn with the same
    seed)."""
    y = tf.random.stateless_normal(
        [n], seed=_seed(seed, stream), mean=mean, stddev=std, dtype=tf.float64
    )
    result: Array = y.numpy()
    return result
