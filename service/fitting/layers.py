"""The reference post's models as Keras ``Layer`` subclasses holding their weights."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import tensorflow as tf


class LinearRegressionLayer(tf.keras.layers.Layer):
    """Maps x to ``m * x + b``; m starts random-normal and b at zero, as in the reference post.

    ``units`` > 1 holds that many independent lines (one (m, b) per element of x), for fitting
    many data sets at once.
    """

    def __init__(
        self,
        m_initializer: Any = "random_normal",
        b_initializer: Any = "zeros",
        units: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.m = self.add_weight(shape=(units,), initializer=m_initializer, name="m")
        self.b = self.add_weight(shape=(units,), initializer=b_initializer, name="b")
        self.built = True  # weights exist from __init__, as in the reference post

    def call(self, inputs: Any) -> Any:
        return self.line(self.m, self.b, inputs)

    @staticmethod
    def line(m: Any, b: Any, x: Any) -> Any:
        """The layer's map on given weights: the engine evaluates it on loop-carried tensors
        (no variable is read or written, so concurrent fits share nothing)."""
        return m * x + b


class GaussianFitLayer(tf.keras.layers.Layer):
    """A normal distribution with mean m and standard deviation s.

    ``ivs`` are the initial values (m0, s0). Calling the layer draws one sample per input,
    as in the reference post; fitting uses the weights directly through the negative log-likelihood.
    """

    def __init__(self, ivs: Sequence[float], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        constant = tf.keras.initializers.Constant
        self.m = self.add_weight(shape=(1,), initializer=constant(float(ivs[0])), name="m")
        self.s = self.add_weight(shape=(1,), initializer=constant(float(ivs[1])), name="s")
        self.built = True

    def call(self, inputs: Any) -> Any:
        return tf.random.normal(
            shape=tf.shape(inputs), mean=self.m[0], stddev=self.s[0], dtype=self.compute_dtype
        )
