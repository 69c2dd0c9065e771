"""Exact first derivatives of an expression in TensorFlow, in one pass: forward-mode duals.

A :class:`Dual` carries a value and its tangents, one per parameter (``None`` where the value
does not depend on that parameter). :data:`DUALS` is the namespace
:func:`~service.fitting.expression.evaluate` walks a tree with, so one evaluation gives the
residuals and every column of their Jacobian: each function's value is computed once and
reused by its derivative (``exp``'s slope is its value). ``tf.autodiff.ForwardAccumulator``
gives the same columns, but one accumulator per parameter, each with its own evaluation of
the model (measured in the batched Levenberg-Marquardt step: see
:func:`~service.fitting.stats.residuals_and_jacobian`).

The derivatives are TensorFlow's gradients' (and :mod:`service.fitting.jets`'): ``abs`` has
slope 0 at 0, and ``x**y`` has no slope in ``y`` where ``x <= 0``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import tensorflow as tf

from service.fitting.expression import Operations

Tangents = tuple[Any, ...]


class Dual:
    """A value and its tangent in each of k parameters (None: zero)."""

    __slots__ = ("tangents", "value")

    def __init__(self, value: Any, tangents: Tangents) -> None:
        self.value, self.tangents = value, tangents

    @staticmethod
    def parameters(values: Sequence[Any]) -> list[Dual]:
        """The k parameters as duals (each a tensor: a scalar, or a column [B, 1])."""
        k = len(values)
        one = tf.constant(1.0, tf.float64)
        return [
            Dual(value, tuple(one if i == j else None for i in range(k)))
            for j, value in enumerate(values)
        ]

    def jacobian(self) -> Any:
        """The tangents as the columns of one tensor ``[..., n, k]`` (zeros where None)."""
        zeros = tf.zeros_like(self.value)
        return tf.stack([zeros if t is None else t + zeros for t in self.tangents], axis=-1)

    def scaled(self, slope: Any) -> Tangents:
        return tuple(None if t is None else slope * t for t in self.tangents)

    def apply(self, value: Any, slope: Any) -> Dual:
        """``f(self)`` given f and f' at ``self.value``."""
        return Dual(value, self.scaled(slope))

    def __neg__(self) -> Dual:
        return Dual(-self.value, tuple(None if t is None else -t for t in self.tangents))

    def __pos__(self) -> Dual:
        return self

    def __add__(self, other: Any) -> Dual:
        if isinstance(other, Dual):
            return Dual(self.value + other.value, _combine(self.tangents, other.tangents))
        return Dual(self.value + other, self.tangents)

    __radd__ = __add__

    def __sub__(self, other: Any) -> Dual:
        return self.__add__(-other)

    def __rsub__(self, other: Any) -> Dual:
        return self.__neg__().__add__(other)

    def __mul__(self, other: Any) -> Dual:
        if not isinstance(other, Dual):
            return Dual(self.value * other, self.scaled(other))
        return Dual(
            self.value * other.value,
            _combine(self.scaled(other.value), other.scaled(self.value)),
        )

    __rmul__ = __mul__

    def __truediv__(self, other: Any) -> Dual:
        if not isinstance(other, Dual):
            return self.__mul__(1.0 / other)
        return self.__mul__(other.reciprocal())

    def __rtruediv__(self, other: Any) -> Dual:
        return self.reciprocal().__mul__(other)

    def reciprocal(self) -> Dual:
        inverse = 1.0 / self.value
        return self.apply(inverse, -inverse * inverse)


def _combine(a: Tangents, b: Tangents) -> Tangents:
    return tuple(y if x is None else x if y is None else x + y for x, y in zip(a, b, strict=True))


def _unary(f: Callable[[Any], Any], df: Callable[[Any, Any], Any]) -> Callable[[Any], Any]:
    """A function of duals and of plain tensors alike, from f and f'(x, f(x))."""

    def function(x: Any) -> Any:
        if not isinstance(x, Dual):
            return f(x)
        value = f(x.value)
        return x.apply(value, df(x.value, value))

    return function


def _power(base: Any, exponent: Any) -> Any:
    """``base ** exponent``: d/db = y·b^(y-1), d/dy = b^y·log b, with log b taken as 0
    where b <= 0 (no slope in the exponent there, as in TensorFlow)."""
    if not isinstance(exponent, Dual):
        if not isinstance(base, Dual):
            return tf.pow(base, exponent)
        x = base.value
        return base.apply(tf.pow(x, exponent), exponent * tf.pow(x, exponent - 1.0))
    b = base.value if isinstance(base, Dual) else base
    value = tf.pow(b, exponent.value)
    positive = b > 0
    log_b = tf.where(positive, tf.math.log(tf.where(positive, b, tf.ones_like(b))), 0.0)
    by_exponent = exponent.scaled(value * log_b)
    if not isinstance(base, Dual):
        return Dual(value, by_exponent)
    by_base = base.scaled(exponent.value * tf.pow(b, exponent.value - 1.0))
    return Dual(value, _combine(by_base, by_exponent))


DUALS = Operations(
    number=lambda text: tf.constant(float(text), tf.float64),
    functions={
        "exp": _unary(tf.exp, lambda x, v: v),
        "log": _unary(tf.math.log, lambda x, v: 1.0 / x),
        "sqrt": _unary(tf.sqrt, lambda x, v: 0.5 / v),
        "sin": _unary(tf.sin, lambda x, v: tf.cos(x)),
        "cos": _unary(tf.cos, lambda x, v: -tf.sin(x)),
        "tan": _unary(tf.tan, lambda x, v: 1.0 + v * v),
        "atan": _unary(tf.atan, lambda x, v: 1.0 / (1.0 + x * x)),
        "tanh": _unary(tf.tanh, lambda x, v: 1.0 - v * v),
        "abs": _unary(tf.abs, lambda x, v: tf.sign(x)),
    },
    pow=_power,
)

__all__ = ["DUALS", "Dual"]
