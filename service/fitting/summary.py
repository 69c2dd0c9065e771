"""Data as the compiled loop sees it: sufficient statistics, computed once per fit in float64.

Means first, then second moments about them (two passes), so large offsets in the data do
not cancel away the spread. These are the shared helpers; each model
(:mod:`service.fitting.models`) states its own statistics with them, for one data set in
numpy (small or weighted data), in a graph (large data), and for many ragged sets at once
(batches).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import tensorflow as tf

Array = npt.NDArray[np.float64]

#: The input signature of a graph summary's data: one float64 vector of any length.
VECTOR = tf.TensorSpec([None], tf.float64)


@dataclass(frozen=True, slots=True)
class Ragged:
    """Data sets laid end to end: ``values[offsets[i]:offsets[i] + lengths[i]]`` is set i."""

    values: Array
    lengths: npt.NDArray[np.int64]

    @classmethod
    def of(cls, arrays: Sequence[npt.ArrayLike]) -> Ragged:
        parts = [np.asarray(a, dtype=np.float64).reshape(-1) for a in arrays]
        lengths = np.array([p.size for p in parts], dtype=np.int64)
        return cls(np.concatenate(parts) if parts else np.empty(0), lengths)

    @property
    def offsets(self) -> npt.NDArray[np.int64]:
        return np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)


def centre(v: Any) -> tuple[Any, Any]:
    """Mean and deviations of a tensor; the second pass corrects the first pass's rounding."""
    mean = tf.reduce_mean(v)
    dev = v - mean
    correction = tf.reduce_mean(dev)
    return mean + correction, dev - correction


def centre_numpy(v: Array, w: Array | None = None) -> tuple[float, Array]:
    """:func:`centre` in numpy, weighted by ``w`` (normalized to sum 1) if given."""
    mean = float(v.sum()) / v.size if w is None else float(np.dot(w, v))  # = v.mean(), faster
    dev = v - mean
    correction = float(dev.sum()) / v.size if w is None else float(np.dot(w, dev))
    return mean + correction, dev - correction


def mean_product(a: Array, b: Array, w: Array | None) -> float:
    """The (weighted) mean of a·b."""
    return float(np.dot(a, b) / a.size if w is None else np.dot(w * a, b))


def normalized(weights: Array | None) -> Array | None:
    return None if weights is None else weights / weights.sum()


def centre_sets(data: Ragged) -> tuple[Array, Array]:
    """Per-set means and the deviations from them (two passes, vectorized over sets)."""
    n = data.lengths.astype(np.float64)
    offsets = data.offsets
    means = np.add.reduceat(data.values, offsets) / n
    dev = data.values - np.repeat(means, data.lengths)
    correction = np.add.reduceat(dev, offsets) / n
    return means + correction, dev - np.repeat(correction, data.lengths)


def mean_products_of_sets(data: Ragged, pairs: Sequence[tuple[Array, Array]]) -> list[Array]:
    """Per-set means of a·b for each pair of point-wise arrays laid out as ``data``."""
    n = data.lengths.astype(np.float64)
    return [np.add.reduceat(a * b, data.offsets) / n for a, b in pairs]
