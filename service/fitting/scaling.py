"""Fitting in standardized coordinates, reporting in the caller's units.

Gradient descent is not scale-invariant: on x in the thousands or a mean of 1e7 with a spread
of 0.1, a step size that suits one parameter is billions of times wrong for the other, and
the raw loop diverges or crawls. So by default the loop runs on standardized data, and this
module maps everything back exactly:

- linear: x' = (x - x̄)/sx, y' = (y - ȳ)/sy, so m' = m·sx/sy and b' = (b + m·x̄ - ȳ)/sy;
  the MSE is sy²·MSE'.
- Gaussian: y' = (y - ȳ)/sy, so m' = (m - ȳ)/sy and s' = s/sy; the NLL per unit weight is
  NLL' + log(sy).

sx, sy are the (weighted) population standard deviations. Both maps are affine,
p' = A·(p - origin), with the loss l = a·l' + shift, so the gradient is a·Aᵀ·g', the Hessian
a·Aᵀ·H'·A, a covariance maps as A⁻¹·C'·A⁻ᵀ and a Newton step as A⁻¹·d'. Uncertainties are
computed in the well-conditioned coordinates and then mapped: inverting the raw Hessian of a
line with x̄ = 1e9 and sx = 1 would lose every digit.

The summaries are transformed, not the data: the standardized summary of a line is
[n, 0, 0, 1, r, 1] with r the correlation, of a Gaussian [n, 0, 1, scale].
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from service.fitting.options import Scaling

Array = npt.NDArray[np.float64]
Pair = tuple[float, float]
Matrix = tuple[Pair, Pair]

_IDENTITY: Matrix = ((1.0, 0.0), (0.0, 1.0))


@dataclass(frozen=True, slots=True)
class Coordinates:
    """An affine change of parameters p' = A·(p - origin) with loss l = a·l' + shift.

    ``origin`` is the caller's point at p' = 0, kept explicitly so mapping back adds it
    (m = ȳ + sy·m') instead of undoing a division by sy (which costs the last digits)."""

    a: float = 1.0
    shift: float = 0.0
    A: Matrix = _IDENTITY
    A_inv: Matrix = _IDENTITY
    origin: Pair = (0.0, 0.0)

    @property
    def identity(self) -> bool:
        return self == IDENTITY

    def to_fit(self, p: Pair) -> Pair:
        return _apply(self.A, (p[0] - self.origin[0], p[1] - self.origin[1]))

    def from_fit(self, q: Pair) -> Pair:
        return _add(_apply(self.A_inv, q), self.origin)

    def loss(self, fit_loss: float) -> float:
        return self.a * fit_loss + self.shift

    def losses(self, fit_losses: Array) -> Array:
        if self.identity:
            return fit_losses
        return self.a * fit_losses + self.shift

    def gradient(self, g: Pair) -> Pair:
        """The gradient in the caller's units from the one in fit coordinates."""
        (a00, a01), (a10, a11) = self.A
        return (self.a * (a00 * g[0] + a10 * g[1]), self.a * (a01 * g[0] + a11 * g[1]))

    def step(self, d: Pair) -> Pair:
        """A parameter displacement (e.g. a Newton step) in the caller's units."""
        return _apply(self.A_inv, d)

    def covariance(self, cov: Matrix) -> Matrix:
        """A⁻¹·C·A⁻ᵀ: a covariance (or inverse Hessian) in the caller's units."""
        left = _matmul(self.A_inv, cov)
        return _matmul(left, _transpose(self.A_inv))


IDENTITY = Coordinates()


Standardize = Callable[[Array], tuple[Array, Coordinates]]


def fit_coordinates(
    scaling: Scaling, summary: Array, standardize: Standardize
) -> tuple[Array, Coordinates]:
    """The summary the loop fits and the map back: standardized by ``standardize``
    (:func:`linear`, :func:`gaussian`), or as given with ``scaling="none"``."""
    if scaling == "none":
        return summary, IDENTITY
    return standardize(summary)


def linear(summary: Array) -> tuple[Array, Coordinates]:
    """The standardized summary of a line ([n, x̄, ȳ, Vxx, Vxy, Vyy]) and its coordinates.
    Vxx must be positive; constant y (Vyy = 0) keeps sy = 1."""
    n, x_mean, y_mean, vxx, vxy, vyy = (float(v) for v in summary[:6])
    sx = math.sqrt(vxx)
    sy = math.sqrt(vyy) if vyy > 0.0 else 1.0
    r = vxy / sx / sy
    coords = Coordinates(
        a=sy * sy,
        A=((sx / sy, 0.0), (x_mean / sy, 1.0 / sy)),
        A_inv=((sy / sx, 0.0), (-x_mean * sy / sx, sy)),
        origin=(0.0, y_mean),
    )
    return np.array([n, 0.0, 0.0, 1.0, r, vyy / (sy * sy)]), coords


def gaussian(summary: Array) -> tuple[Array, Coordinates]:
    """The standardized summary of a Gaussian ([n, ȳ, Vyy, scale]) and its coordinates;
    Vyy must be positive. ``scale`` (N or Σw for the summed NLL, 1 for the mean) multiplies
    the log(sy) shift of the loss."""
    n, y_mean, vyy, scale = (float(v) for v in summary[:4])
    sy = math.sqrt(vyy)
    coords = Coordinates(
        shift=scale * math.log(sy),
        A=((1.0 / sy, 0.0), (0.0, 1.0 / sy)),
        A_inv=((sy, 0.0), (0.0, sy)),
        origin=(y_mean, 0.0),
    )
    return np.array([n, 0.0, 1.0, scale]), coords


def _apply(m: Matrix, p: Pair) -> Pair:
    return (m[0][0] * p[0] + m[0][1] * p[1], m[1][0] * p[0] + m[1][1] * p[1])


def _add(p: Pair, q: Pair) -> Pair:
    return (p[0] + q[0], p[1] + q[1])


def _matmul(m: Matrix, n: Matrix) -> Matrix:
    return (
        (m[0][0] * n[0][0] + m[0][1] * n[1][0], m[0][0] * n[0][1] + m[0][1] * n[1][1]),
        (m[1][0] * n[0][0] + m[1][1] * n[1][0], m[1][0] * n[0][1] + m[1][1] * n[1][1]),
    )


def _transpose(m: Matrix) -> Matrix:
    return ((m[0][0], m[1][0]), (m[0][1], m[1][1]))
