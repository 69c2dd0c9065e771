"""Automatic starting values of the named models (:mod:`service.fitting.catalog`), from
the data alone: linearizations, peaks, half-maxima and a periodogram, each a few numpy
passes. Good enough for Levenberg-Marquardt to converge from; not fits themselves (except
the polynomials', which are exact)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from service.fitting.results import FitError

Array = npt.NDArray[np.float64]


def _line(x: Array, y: Array) -> tuple[float, float]:
    slope, intercept = np.polyfit(x, y, 1)
    return float(slope), float(intercept)


def _span(x: Array) -> float:
    return float(np.ptp(x)) or 1.0


def exponential_decay(x: Array, y: Array) -> dict[str, float]:
    order = np.argsort(x)
    xs, ys = x[order], y[order]
    decaying = ys[0] > ys[-1]
    c = float(ys.min() if decaying else ys.max())
    # The baseline a little past the extreme, so that log(|y - c|) exists everywhere.
    c -= 0.05 * (ys.max() - ys.min()) * (1.0 if decaying else -1.0)
    shifted = np.abs(ys - c)
    slope, intercept = _line(xs, np.log(np.maximum(shifted, 1e-300)))
    a = math.copysign(math.exp(intercept), ys[0] - c)
    return {"a": a, "k": -slope, "c": c}


def logistic(x: Array, y: Array) -> dict[str, float]:
    order = np.argsort(x)
    xs, ys = x[order], y[order]
    top = float(np.max(np.abs(ys))) * 1.05 or 1.0
    plateau = top if ys.mean() >= 0 else -top
    half = np.argmin(np.abs(ys - plateau / 2.0))
    rising = (ys[-1] - ys[0]) * plateau > 0
    k = 4.0 / (_span(xs) / 2.0) * (1.0 if rising else -1.0)
    return {"L": plateau, "k": k, "x0": float(xs[half])}


def power_law(x: Array, y: Array) -> dict[str, float]:
    positive = (x > 0) & (y != 0)
    if positive.sum() < 2:
        return {"a": float(np.mean(y)) or 1.0, "b": 1.0}
    slope, intercept = _line(np.log(x[positive]), np.log(np.abs(y[positive])))
    return {"a": math.copysign(math.exp(intercept), float(np.mean(y[positive]))), "b": slope}


def michaelis_menten(x: Array, y: Array) -> dict[str, float]:
    vmax = float(np.max(y)) * 1.1 or 1.0
    half = np.argmin(np.abs(y - vmax / 2.0))
    km = float(abs(x[half])) or _span(x) / 2.0
    return {"vmax": vmax, "km": km}


def _peak(x: Array, y: Array) -> tuple[float, float, float]:
    """Height, centre and half width at half maximum of the highest peak."""
    top = int(np.argmax(y))
    height = float(y[top])
    above = x[y >= height / 2.0]
    half_width = float(above.max() - above.min()) / 2.0 if above.size > 1 else _span(x) / 10.0
    return height, float(x[top]), half_width or _span(x) / 10.0


def gaussian_peak(x: Array, y: Array) -> dict[str, float]:
    height, centre, hwhm = _peak(x, y)
    return {"a": height, "mu": centre, "sigma": hwhm / math.sqrt(2.0 * math.log(2.0))}


def lorentzian_peak(x: Array, y: Array) -> dict[str, float]:
    height, centre, hwhm = _peak(x, y)
    return {"a": height, "x0": centre, "gamma": hwhm}


def sinusoid(x: Array, y: Array) -> dict[str, float]:
    """The frequency of the strongest line of a least-squares periodogram on a grid up to
    the mean sampling rate's Nyquist frequency, then amplitude and phase by linear least
    squares at that frequency."""
    c = float(np.mean(y))
    d = y - c
    span = _span(x)
    nyquist = 0.5 * (x.size - 1) / span
    frequencies = np.linspace(0.5 / span, nyquist, min(4 * x.size, 2000))
    phases = 2.0 * np.pi * np.outer(frequencies, x)
    power = (np.cos(phases) @ d) ** 2 + (np.sin(phases) @ d) ** 2
    f = float(frequencies[int(np.argmax(power))])
    basis = np.column_stack([np.sin(2 * np.pi * f * x), np.cos(2 * np.pi * f * x)])
    (s, k), *_ = np.linalg.lstsq(basis, d, rcond=None)
    return {"a": float(math.hypot(s, k)), "f": f, "phi": float(math.atan2(k, s)), "c": c}


def polynomial(degree: int) -> Callable[[Array, Array], dict[str, float]]:
    def guess(x: Array, y: Array) -> dict[str, float]:
        coefficients = np.polyfit(x, y, degree)[::-1]
        return {f"c{i}": float(c) for i, c in enumerate(coefficients)}

    return guess


GUESSES: dict[str, Callable[[Array, Array], dict[str, float]]] = {
    "exponential_decay": exponential_decay,
    "logistic": logistic,
    "power_law": power_law,
    "michaelis_menten": michaelis_menten,
    "gaussian_peak": gaussian_peak,
    "lorentzian_peak": lorentzian_peak,
    "sinusoid": sinusoid,
    **{f"polynomial{d}": polynomial(d) for d in range(1, 7)},
}


class GuessFailed(FitError):
    """The data defeat a named model's guess (e.g. an SVD that does not converge on x of
    1e249): the caller must give the starting values."""

    def __init__(self, name: str) -> None:
        super().__init__(
            f"could not guess starting values of {name} from these data (their magnitudes "
            "defeat the guess): give them in parameters"
        )


def guess(name: str, x: Array, y: Array) -> dict[str, float]:
    """Starting values of named model ``name`` for these data (finite, or the fit's own
    checks refuse them); raises :class:`GuessFailed` where numpy cannot compute them."""
    try:
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # polyfit's RankWarning on degenerate data
            x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
            values = GUESSES[name](x, y)
    except (np.linalg.LinAlgError, ArithmeticError, ValueError) as error:
        # LinAlgError (polyfit's SVD), OverflowError (math.exp of a huge log), ValueError
        # (math domain errors, polyfit on non-finite values)
        raise GuessFailed(name) from error
    return {k: v if math.isfinite(v) else 1.0 for k, v in values.items()}
