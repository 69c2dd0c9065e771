"""Dense linear algebra on a few numbers, in plain Python.

A fit's statistics and coordinate maps work on k x k matrices with k the number of
parameters (2 for the built-in models, at most 32). At that size numpy's per-call overhead
(a few µs per operation, more while TensorFlow's threads are spinning after a compiled
call) costs more than the arithmetic: a fit of 100 points took 450 µs with these in numpy
against 300 µs with them in floats, most of it here. Vectors are tuples of floats and
matrices tuples of rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

Vector = tuple[float, ...]
Matrix = tuple[Vector, ...]
#: Anything with float entries: a sequence, or a numpy vector.
Numbers = Sequence[float] | npt.NDArray[np.float64]


def vector(values: Numbers) -> Vector:
    if isinstance(values, tuple):
        return values  # already floats (every tuple here is made by this module)
    return tuple(map(float, values))


def matrix(rows: Sequence[Sequence[float]]) -> Matrix:
    return tuple(vector(row) for row in rows)


def matvec(a: Matrix, v: Vector) -> Vector:
    if len(v) == 2:  # the built-in models: unrolled (a third of the time)
        (a00, a01), (a10, a11) = a
        return (a00 * v[0] + a01 * v[1], a10 * v[0] + a11 * v[1])
    return tuple(dot(row, v) for row in a)


def dot(u: Sequence[float], v: Sequence[float]) -> float:
    total = 0.0
    for x, y in zip(u, v, strict=True):
        total += x * y
    return total


def transpose(a: Matrix) -> Matrix:
    return tuple(tuple(column) for column in zip(*a, strict=True))


def matmul(a: Matrix, b: Matrix) -> Matrix:
    if len(a) == 2 and len(b) == 2:
        (a00, a01), (a10, a11) = a
        (b00, b01), (b10, b11) = b
        return (
            (a00 * b00 + a01 * b10, a00 * b01 + a01 * b11),
            (a10 * b00 + a11 * b10, a10 * b01 + a11 * b11),
        )
    columns = transpose(b)
    return tuple(tuple(dot(row, column) for column in columns) for row in a)


def add(u: Vector, v: Vector) -> Vector:
    return tuple(x + y for x, y in zip(u, v, strict=True))


def subtract(u: Vector, v: Vector) -> Vector:
    return tuple(x - y for x, y in zip(u, v, strict=True))


def scale(c: float, v: Vector) -> Vector:
    return tuple(c * x for x in v)


def norm(v: Vector) -> float:
    return math.hypot(*v)


def symmetric(a: Matrix) -> Matrix:
    k = len(a)
    return tuple(tuple(0.5 * (a[i][j] + a[j][i]) for j in range(k)) for i in range(k))


def inverse_positive_definite(h: Matrix) -> Matrix | None:
    """H⁻¹ through the Cholesky factor H = LLᵀ (so H⁻¹ = L⁻ᵀL⁻¹), or None unless H is
    symmetric positive definite with finite entries."""
    k = len(h)
    if k == 2:
        (h00, h01), (_, h11) = h
        det = h00 * h11 - h01 * h01
        if not (math.isfinite(det) and h00 > 0.0 and det > 0.0):
            return None
        return ((h11 / det, -h01 / det), (-h01 / det, h00 / det))
    lower = [[0.0] * k for _ in range(k)]
    for i in range(k):
        for j in range(i + 1):
            total = h[i][j] - dot(lower[i][:j], lower[j][:j])
            if i == j:
                if not (math.isfinite(total) and total > 0.0):
                    return None
                lower[i][i] = math.sqrt(total)
            else:
                lower[i][j] = total / lower[j][j]
    # L⁻¹ by forward substitution, column by column of the identity.
    inv = [[0.0] * k for _ in range(k)]
    for c in range(k):
        for i in range(c, k):
            total = (1.0 if i == c else 0.0) - sum(lower[i][m] * inv[m][c] for m in range(c, i))
            inv[i][c] = total / lower[i][i]
    result = tuple(
        tuple(sum(inv[m][i] * inv[m][j] for m in range(max(i, j), k)) for j in range(k))
        for i in range(k)
    )
    if not all(math.isfinite(v) for row in result for v in row):
        return None
    return result


def inverse_positive_definite_rows(
    h: npt.NDArray[np.float64],
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    """:func:`inverse_positive_definite` of every [k, k] matrix of ``h`` ([B, k, k]) at
    once: the same operations in the same order on numpy vectors over B, so each row's
    inverse is bitwise the one the scalar function gives (and ``ok`` where it gives one).
    Many fits' statistics at once (:mod:`service.fitting.sets`) spent most of their time in
    the scalar function, one row after another."""
    rows, k = h.shape[0], h.shape[1]
    ok = np.ones(rows, dtype=bool)
    with np.errstate(all="ignore"):
        if k == 2:
            h00, h01, h11 = h[:, 0, 0], h[:, 0, 1], h[:, 1, 1]
            det = h00 * h11 - h01 * h01
            ok &= np.isfinite(det) & (h00 > 0.0) & (det > 0.0)
            result = np.stack(
                [np.stack([h11 / det, -h01 / det], 1), np.stack([-h01 / det, h00 / det], 1)], 1
            )
            return result, ok
        lower = np.zeros((rows, k, k))
        for i in range(k):
            for j in range(i + 1):
                acc = np.zeros(rows)
                for m in range(j):
                    acc = acc + lower[:, i, m] * lower[:, j, m]
                total = h[:, i, j] - acc
                if i == j:
                    ok &= np.isfinite(total) & (total > 0.0)
                    lower[:, i, i] = np.sqrt(np.where(ok, total, 1.0))
                else:
                    lower[:, i, j] = total / lower[:, j, j]
        inv = np.zeros((rows, k, k))
        for c in range(k):
            for i in range(c, k):
                acc = np.zeros(rows)  # Python's sum() starts from 0 too
                for m in range(c, i):
                    acc = acc + lower[:, i, m] * inv[:, m, c]
                total = (1.0 if i == c else 0.0) - acc
                inv[:, i, c] = total / lower[:, i, i]
        result = np.zeros((rows, k, k))
        for i in range(k):
            for j in range(k):
                acc = np.zeros(rows)
                for m in range(max(i, j), k):
                    acc = acc + inv[:, m, i] * inv[:, m, j]
                result[:, i, j] = acc
    ok &= np.all(np.isfinite(result), axis=(1, 2))
    return result, ok
