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

The summaries are transformed, not the data. Parameters are tuples of floats here (see
:mod:`service.fitting.small` for why).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from service.fitting import small
from service.fitting.options import Scaling
from service.fitting.small import Matrix, Numbers, Vector

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
    A: Matrix | None = None
    A_inv: Matrix | None = None
    origin: Vector | None = None

    @property
    def identity(self) -> bool:
        return self.A is None and self.a == 1.0 and self.shift == 0.0

    def to_fit(self, p: Numbers) -> Vector:
        p = small.vector(p)
        if self.A is None or self.origin is None:
            return p
        return small.matvec(self.A, small.subtract(p, self.origin))

    def from_fit(self, q: Numbers) -> Vector:
        q = small.vector(q)
        if self.A_inv is None or self.origin is None:
            return q
        return small.add(small.matvec(self.A_inv, q), self.origin)

    def loss(self, fit_loss: float) -> float:
        return self.a * fit_loss + self.shift

    def losses(self, fit_losses: Array) -> Array:
        if self.identity:
            return fit_losses
        with quiet():
            return self.a * fit_losses + self.shift

    def gradient(self, g: Vector) -> Vector:
        """The gradient in the caller's units from the one in fit coordinates."""
        mapped = g if self.A is None else small.matvec(small.transpose(self.A), g)
        return small.scale(self.a, mapped)

    def step(self, d: Vector) -> Vector:
        """A parameter displacement (e.g. a Newton step) in the caller's units."""
        return d if self.A_inv is None else small.matvec(self.A_inv, d)

    def covariance(self, cov: Matrix) -> Matrix:
        """A⁻¹·C·A⁻ᵀ: a covariance (or inverse Hessian) in the caller's units."""
        if self.A_inv is None:
            return cov
        return small.matmul(small.matmul(self.A_inv, cov), small.transpose(self.A_inv))


IDENTITY = Coordinates()


def stacked(
    a: Any = 1.0,
    shift: Any = 0.0,
    A: Sequence[Sequence[Any]] | None = None,
    A_inv: Sequence[Sequence[Any]] | None = None,
    origin: Sequence[Any] | None = None,
) -> Coordinates:
    """The maps of many sets (a batch) as one :class:`Coordinates` whose numbers are [B]
    arrays, entry i set i's: its methods then map every set at once, by the same arithmetic
    element by element as one set's floats (so the same numbers). Built by the models' own
    vectorized standardization; no arguments: the identity of every set."""
    return Coordinates(
        a=a,
        shift=shift,
        A=None if A is None else tuple(tuple(row) for row in A),
        A_inv=None if A_inv is None else tuple(tuple(row) for row in A_inv),
        origin=None if origin is None else tuple(origin),
    )


def stack(coords: Sequence[Coordinates], k: int) -> Coordinates:
    """Per-set maps as one :func:`stacked` map (an identity among affine maps becomes the
    affine identity)."""
    a = np.array([c.a for c in coords], dtype=np.float64)
    shift = np.array([c.shift for c in coords], dtype=np.float64)
    if all(c.A is None for c in coords):
        return stacked(a=a, shift=shift)
    eye = tuple(tuple(1.0 if i == j else 0.0 for j in range(k)) for i in range(k))
    zeros = (0.0,) * k

    def entries(pick: Callable[[Coordinates], Matrix]) -> list[list[Array]]:
        matrices = [pick(c) for c in coords]
        return [[np.array([m[i][j] for m in matrices]) for j in range(k)] for i in range(k)]

    return stacked(
        a=a,
        shift=shift,
        A=entries(lambda c: c.A or eye),
        A_inv=entries(lambda c: c.A_inv or eye),
        origin=[np.array([(c.origin or zeros)[i] for c in coords]) for i in range(k)],
    )


def one_of(coords: Coordinates, j: int) -> Coordinates:
    """Set ``j``'s map, in floats, out of a :func:`stacked` one."""
    return _each_number(coords, lambda v: float(v[j]) if isinstance(v, np.ndarray) else float(v))


def _each_number(coords: Coordinates, pick: Callable[[Any], Any]) -> Coordinates:
    """``coords`` with ``pick`` applied to every number of the map (entries may be arrays)."""
    return Coordinates(
        a=pick(coords.a),
        shift=pick(coords.shift),
        A=None if coords.A is None else tuple(tuple(map(pick, r)) for r in coords.A),
        A_inv=None if coords.A_inv is None else tuple(tuple(map(pick, r)) for r in coords.A_inv),
        origin=None if coords.origin is None else tuple(map(pick, coords.origin)),
    )


def losses_of_sets(coords: Coordinates, fit_losses: Array) -> Array:
    """:meth:`Coordinates.losses` of many sets at once: column j of ``fit_losses`` ([T, B])
    mapped by set j's map (``coords`` from :func:`stacked`), in one pass."""
    with quiet():
        mapped: Array = coords.a * fit_losses + coords.shift
    return mapped


def subset(coords: Coordinates, rows: Any) -> Coordinates:
    """The stacked maps of the sets ``rows`` selects (an index or mask array)."""
    return _each_number(coords, lambda v: v[rows] if isinstance(v, np.ndarray) else v)


#: A model's standardization: the summary in fit coordinates, and the map back.
Standardize = Callable[[Array], tuple[Array, Coordinates]]
#: The same for every row of [B, S] at once (the map from :func:`stacked`).
StandardizeSets = Callable[[Array], tuple[Array, Coordinates]]


def affine(
    A: Sequence[Sequence[float]],
    A_inv: Sequence[Sequence[float]],
    origin: Sequence[float],
    a: float = 1.0,
    shift: float = 0.0,
) -> Coordinates:
    """The map p' = A·(p - origin), l = a·l' + shift. The inverse is given in closed form
    by the model (a numerical inverse would cost the last digits)."""
    return Coordinates(
        a=a, shift=shift, A=small.matrix(A), A_inv=small.matrix(A_inv), origin=small.vector(origin)
    )


def fit_coordinates(
    scaling: Scaling, summary: Array, standardize: Standardize
) -> tuple[Array, Coordinates]:
    """The summary the loop fits and the map back: standardized by the model's
    ``standardize``, or as given with ``scaling="none"``."""
    if scaling == "none":
        return summary, IDENTITY
    return standardize(summary)
