"""Fitting in standardized coordinates, reporting in the caller's units.

Gradient descent is not scale-invariant: on x in the thousands or a mean of 1e7 with a spread
of 0.1, a step size that suits one parameter is billions of times wrong for the other, and
the raw loop diverges or crawls. So by default the loop runs on standardized data, and each
model (:mod:`service.fitting.models`) states the affine map back, which this module applies
exactly.

Every map is p' = A·(p - origin), with the loss l = a·l' + shift, so the gradient is
a·Aᵀ·g', the Hessian a·Aᵀ·H'·A, a covariance maps as A⁻¹·C'·A⁻ᵀ and a Newton step as
A⁻¹·d'. Uncertainties are computed in the well-conditioned coordinates and then mapped:
inverting the raw Hessian of a line with x̄ = 1e9 and sx = 1 would lose every digit.

The summaries are transformed, not the data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from service.fitting.options import Scaling

Array = npt.NDArray[np.float64]


def quiet() -> Any:
    """Values that overflow float64 come out inf or nan, and the statistics report them as
    null: no warnings. (A fresh context each time: one errstate object is not re-entrant.)"""
    return np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore")


@dataclass(frozen=True, slots=True)
class Coordinates:
    """An affine change of parameters p' = A·(p - origin) with loss l = a·l' + shift; A None
    is the identity (the raw loop, ``scaling="none"``).

    ``origin`` is the caller's point at p' = 0, kept explicitly so mapping back adds it
    (m = ȳ + sy·m') instead of undoing a division by sy (which costs the last digits)."""

    a: float = 1.0
    shift: float = 0.0
    A: Array | None = None
    A_inv: Array | None = None
    origin: Array | None = None

    @property
    def identity(self) -> bool:
        return self.A is None and self.a == 1.0 and self.shift == 0.0

    def to_fit(self, p: npt.ArrayLike) -> Array:
        p = np.asarray(p, dtype=np.float64)
        if self.A is None:
            return p
        with quiet():
            fit: Array = self.A @ (p - self.origin)
        return fit

    def from_fit(self, q: npt.ArrayLike) -> Array:
        q = np.asarray(q, dtype=np.float64)
        if self.A_inv is None:
            return q
        with quiet():
            caller: Array = self.A_inv @ q + self.origin
        return caller

    def loss(self, fit_loss: float) -> float:
        return self.a * fit_loss + self.shift

    def losses(self, fit_losses: Array) -> Array:
        if self.identity:
            return fit_losses
        with quiet():
            return self.a * fit_losses + self.shift

    def gradient(self, g: Array) -> Array:
        """The gradient in the caller's units from the one in fit coordinates."""
        with quiet():
            return self.a * (g if self.A is None else self.A.T @ g)

    def step(self, d: Array) -> Array:
        """A parameter displacement (e.g. a Newton step) in the caller's units."""
        with quiet():
            return d if self.A_inv is None else self.A_inv @ d

    def covariance(self, cov: Array) -> Array:
        """A⁻¹·C·A⁻ᵀ: a covariance (or inverse Hessian) in the caller's units."""
        if self.A_inv is None:
            return cov
        with quiet():
            return self.A_inv @ cov @ self.A_inv.T


IDENTITY = Coordinates()

#: A model's standardization: the summary in fit coordinates, and the map back.
Standardize = Callable[[Array], tuple[Array, Coordinates]]


def affine(
    A: list[list[float]],
    A_inv: list[list[float]],
    origin: list[float],
    a: float = 1.0,
    shift: float = 0.0,
) -> Coordinates:
    """The map p' = A·(p - origin), l = a·l' + shift. The inverse is given in closed form
    by the model (a numerical inverse would cost the last digits)."""
    return Coordinates(
        a=a,
        shift=shift,
        A=np.array(A, dtype=np.float64),
        A_inv=np.array(A_inv, dtype=np.float64),
        origin=np.array(origin, dtype=np.float64),
    )


def fit_coordinates(
    scaling: Scaling, summary: Array, standardize: Standardize
) -> tuple[Array, Coordinates]:
    """The summary the loop fits and the map back: standardized by the model's
    ``standardize``, or as given with ``scaling="none"``."""
    if scaling == "none":
        return summary, IDENTITY
    return standardize(summary)
