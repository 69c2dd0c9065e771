"""Exact derivatives of an expression in numpy: forward-mode jets (value, gradient, Hessian).

A :class:`Jet` carries a value ``[..., n]``, its gradient in the k parameters ``[..., n, k]``
and, when asked for, its Hessian ``[..., n, k, k]``. :data:`JETS` is the namespace
:func:`~service.fitting.expression.evaluate` walks a tree with, so one evaluation of the
model gives its residuals and their exact Jacobian (and, for the curvature at a fit, their
second derivatives), with no graph to trace: what a new expression's first fits need
(:mod:`service.fitting.numpy_loop`), and what the statistics of every fit need.

Each function is given with its first and second derivatives; products, quotients and powers
follow the chain and product rules. The derivatives are the ones TensorFlow's gradients use
(``abs`` has slope 0 at 0; ``x**y`` has no slope in ``y`` where ``x <= 0``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from service.fitting.expression import Operations

Array = npt.NDArray[np.float64]


class Jet:
    """A value and its exact derivatives in k parameters (``hessian`` None: first order)."""

    __slots__ = ("gradient", "hessian", "value")
    #: numpy's operators defer to the jet's (an array times a jet is a jet, not an array of
    #: objects).
    __array_ufunc__ = None

    def __init__(self, value: Any, gradient: Any, hessian: Any = None) -> None:
        self.value, self.gradient, self.hessian = value, gradient, hessian

    @staticmethod
    def parameters(values: Sequence[Any], second: bool = False) -> list[Jet]:
        """The k parameters as jets (each value a scalar, or a column [B, 1] of a batch)."""
        k = len(values)
        out = []
        for j, value in enumerate(values):
            value = np.asarray(value, dtype=np.float64)
            unit = np.zeros((*value.shape, k))
            unit[..., j] = 1.0
            out.append(Jet(value, unit, np.zeros((*value.shape, k, k)) if second else None))
        return out

    # -- the chain rule ----------------------------------------------------------------------

    def apply(self, f: Any, df: Any, d2f: Callable[[], Any] | None) -> Jet:
        """``f(self)`` given f, f' and (a thunk of) f'' at ``self.value``."""
        gradient = df[..., None] * self.gradient
        hessian = None
        if self.hessian is not None:
            assert d2f is not None
            outer = self.gradient[..., :, None] * self.gradient[..., None, :]
            hessian = df[..., None, None] * self.hessian + d2f()[..., None, None] * outer
        return Jet(f, gradient, hessian)

    def __neg__(self) -> Jet:
        return Jet(-self.value, -self.gradient, None if self.hessian is None else -self.hessian)

    def __pos__(self) -> Jet:
        return self

    def __add__(self, other: Any) -> Jet:
        if isinstance(other, Jet):
            return Jet(
                self.value + other.value,
                self.gradient + other.gradient,
                _sum(self.hessian, other.hessian),
            )
        # A constant's sum keeps the derivatives (they broadcast against the value later).
        return Jet(self.value + other, self.gradient, self.hessian)

    __radd__ = __add__

    def __sub__(self, other: Any) -> Jet:
        return self.__add__(-other)

    def __rsub__(self, other: Any) -> Jet:
        return self.__neg__().__add__(other)

    def __mul__(self, other: Any) -> Jet:
        if not isinstance(other, Jet):
            c = np.asarray(other)
            return Jet(
                self.value * c,
                self.gradient * c[..., None],
                None if self.hessian is None else self.hessian * c[..., None, None],
            )
        a, b = self, other
        hessian = None
        if a.hessian is not None and b.hessian is not None:
            cross = a.gradient[..., :, None] * b.gradient[..., None, :]
            hessian = (
                a.hessian * b.value[..., None, None]
                + b.hessian * a.value[..., None, None]
                + cross
                + np.swapaxes(cross, -1, -2)
            )
        gradient = a.gradient * b.value[..., None] + b.gradient * a.value[..., None]
        return Jet(a.value * b.value, gradient, hessian)

    __rmul__ = __mul__

    def __truediv__(self, other: Any) -> Jet:
        if not isinstance(other, Jet):
            return self * (1.0 / np.asarray(other))
        return self * other.reciprocal()

    def __rtruediv__(self, other: Any) -> Jet:
        return self.reciprocal().__mul__(other)

    def reciprocal(self) -> Jet:
        v = self.value
        inverse = 1.0 / v
        return self.apply(inverse, -inverse * inverse, lambda: 2.0 * inverse**3)


def _sum(a: Any, b: Any) -> Any:
    return None if a is None or b is None else a + b


def _unary(
    f: Callable[[Any], Any],
    df: Callable[[Any, Any], Any],
    d2f: Callable[[Any, Any, Any], Any],
) -> Callable[[Any], Any]:
    """A function of jets and of plain arrays alike, from f, f'(x, f(x)) and
    f''(x, f(x), f'(x))."""

    def function(x: Any) -> Any:
        if not isinstance(x, Jet):
            return f(x)
        value = f(x.value)
        slope = df(x.value, value)
        return x.apply(value, slope, lambda: d2f(x.value, value, slope))

    return function


def _power(base: Any, exponent: Any) -> Any:
    """``base ** exponent``: d/db = y·b^(y-1), d/dy = b^y·log b, with log b taken as 0
    where b <= 0 (no slope in the exponent there, as in TensorFlow)."""
    if not isinstance(exponent, Jet):
        if not isinstance(base, Jet):
            return np.power(base, exponent)
        c = np.asarray(exponent, dtype=np.float64)
        x = base.value
        return base.apply(
            np.power(x, c), c * np.power(x, c - 1.0), lambda: c * (c - 1.0) * np.power(x, c - 2.0)
        )
    k = exponent.gradient.shape[-1]
    b = base if isinstance(base, Jet) else Jet(np.asarray(base, dtype=np.float64), np.zeros(k))
    y = exponent
    value = np.power(b.value, y.value)
    positive = b.value > 0
    log_b = np.where(positive, np.log(np.where(positive, b.value, 1.0)), 0.0)
    by_base = y.value * np.power(b.value, y.value - 1.0)
    by_exponent = value * log_b
    gradient = by_base[..., None] * b.gradient + by_exponent[..., None] * y.gradient
    hessian = None
    if y.hessian is not None and (b.hessian is not None or not isinstance(base, Jet)):
        b_hessian = 0.0 if b.hessian is None else b.hessian
        gb, gy = b.gradient, y.gradient
        mixed = np.power(b.value, y.value - 1.0) * (1.0 + y.value * log_b)
        cross = gb[..., :, None] * gy[..., None, :]
        hessian = (
            by_base[..., None, None] * b_hessian
            + by_exponent[..., None, None] * y.hessian
            + (y.value * (y.value - 1.0) * np.power(b.value, y.value - 2.0))[..., None, None]
            * (gb[..., :, None] * gb[..., None, :])
            + mixed[..., None, None] * (cross + np.swapaxes(cross, -1, -2))
            + (value * log_b * log_b)[..., None, None] * (gy[..., :, None] * gy[..., None, :])
        )
    return Jet(value, gradient, hessian)


def _sech2(x: Any, t: Any) -> Any:
    return 1.0 - t * t


JETS = Operations(
    number=float,
    functions={
        "exp": _unary(np.exp, lambda x, v: v, lambda x, v, d: v),
        "log": _unary(np.log, lambda x, v: 1.0 / x, lambda x, v, d: -d * d),
        "sqrt": _unary(np.sqrt, lambda x, v: 0.5 / v, lambda x, v, d: -0.5 * d / x),
        "sin": _unary(np.sin, lambda x, v: np.cos(x), lambda x, v, d: -v),
        "cos": _unary(np.cos, lambda x, v: -np.sin(x), lambda x, v, d: -v),
        "tan": _unary(np.tan, lambda x, v: 1.0 + v * v, lambda x, v, d: 2.0 * v * d),
        "atan": _unary(
            np.arctan, lambda x, v: 1.0 / (1.0 + x * x), lambda x, v, d: -2.0 * x * d * d
        ),
        "tanh": _unary(np.tanh, _sech2, lambda x, v, d: -2.0 * v * d),
        "abs": _unary(np.abs, lambda x, v: np.sign(x), lambda x, v, d: np.zeros_like(x)),
    },
    pow=_power,
)

__all__ = ["JETS", "Jet"]
