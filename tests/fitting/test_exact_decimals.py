"""A batch's statistics from its decimal text where float64's rounding of the data matters,
and only there: each set's rss against the same sum computed here from its decimals in
extended precision, and which sets' decimals were read."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from service.fitting import FitEngine
from service.fitting.expression import parse
from service.fitting.models.expression import EXACT_RTOL
from service.fitting.options import Optimizer
from service.fitting.results import FitResult
from service.fitting.sets import SetData, fit_sets

DECAY = parse("a*exp(-k*t) + c", ("t",), ("a", "k", "c"))
ENGINE = FitEngine()


class Reader:
    """A set's decimals, read on demand (counted)."""

    def __init__(self, t: list[str], y: list[str]) -> None:
        self.text, self.reads = (t, y), 0

    def __call__(self) -> tuple[Any, ...]:
        self.reads += 1
        return tuple(np.array(column, dtype=np.longdouble) for column in self.text)


def _set(t: Any, y: Any) -> tuple[SetData, Reader]:
    """The set as float64 read from its text: ``repr`` of float64 values, 21 significant
    digits of extended-precision ones."""

    def write(v: Any) -> str:
        if isinstance(v, np.longdouble):
            return np.format_float_scientific(v, precision=20, unique=False)
        return repr(float(v))

    text = ([write(v) for v in t], [write(v) for v in y])
    reader = Reader(*text)
    floats = tuple(np.array([float(s) for s in column]) for column in text)
    return SetData(floats, (0.5 * float(y.max() - y.min()), 1e-3, float(y.min())), None,
                   {"exact": reader}), reader  # fmt: skip


def _exact_rss(result: FitResult, reader: Reader) -> Any:
    t, y = (np.array(column, dtype=np.longdouble) for column in reader.text)
    return np.sum((y - _model(result, t)) ** 2)


def test_decimals_are_read_where_rounding_moves_the_sums_and_only_there() -> None:
    rng = np.random.default_rng(5)
    t = np.sort(rng.uniform(0.0, 5e3, 80))
    shape = np.exp(-8e-4 * t)
    cases = {
        # noisy data at its own scale: float64's rounding moves the rss by ~1e-14 of it
        "noisy": (_set(t, 3.0 * shape + 0.5 + rng.normal(0.0, 0.02, t.size)), False),
        # a background of 1e7 and a noise of 0.1: ~1e-8 of it
        "offset": (_set(t, 4e3 * shape + 1e7 + rng.normal(0.0, 0.1, t.size)), True),
        # an exact curve written to 21 digits: a fit as close as float64's data allow
        "exact": (_set(t, 2.5 * np.exp(-8e-4 * t.astype(np.longdouble)) + 0.25), True),
    }
    sets = [one for (one, _), _ in cases.values()]
    results = fit_sets(
        ENGINE, "expression", sets, learning_rate=1.0, epochs=500,
        options={"expression": DECAY}, optimizer=Optimizer("levenberg_marquardt"),
    )  # fmt: skip
    for (name, ((_, reader), read)), result in zip(cases.items(), results, strict=True):
        assert isinstance(result, FitResult) and result.converged, (name, result)
        assert reader.reads == int(read), name
        rss = result.stats.rss
        assert rss is not None
        want = _exact_rss(result, reader)
        # read: extended precision's own rounding; not read: within the bound that skipped it
        tolerance = 1e-14 if read else EXACT_RTOL
        assert float(abs(rss - want)) <= tolerance * float(want) + 1e-300, name
        if read:  # and float64's data would have moved it by more than the bound
            one = sets[list(cases).index(name)]
            model = _model(result, np.asarray(one.data[0], np.longdouble))
            floats = np.sum((np.asarray(one.data[1], np.longdouble) - model) ** 2)
            assert float(abs(floats - want)) > EXACT_RTOL * float(want), name


def _model(result: FitResult, t: Any) -> Any:
    a, k, c = (np.longdouble(result.params[name]) for name in ("a", "k", "c"))
    return a * np.exp(-k * t) + c


@pytest.mark.parametrize("read", [False, True])
def test_decimals_given_are_used_and_a_reader_only_where_they_matter(read: bool) -> None:
    """Decimals given as arrays (a single fit's, read with its body) are always used; a
    reader's (a batch's) where they move the sums, and then to the same numbers."""
    rng = np.random.default_rng(6)
    t = np.sort(rng.uniform(0.0, 5e3, 60))
    shape = np.exp(-8e-4 * t)
    y = (4e3 * shape + 1e7) if read else (3.0 * shape + 0.5)
    y = y + rng.normal(0.0, 0.1, t.size)
    (lazy, reader) = _set(t, y)
    given = SetData(lazy.data, lazy.initial, None, {"exact": reader()})
    a, b = fit_sets(
        ENGINE, "expression", [lazy, given], learning_rate=1.0, epochs=500,
        options={"expression": DECAY}, optimizer=Optimizer("levenberg_marquardt"),
    )  # fmt: skip
    assert isinstance(a, FitResult) and isinstance(b, FitResult)
    assert reader.reads == 1 + int(read)
    assert a.params == b.params and a.stats.rss is not None and b.stats.rss is not None
    # the decimals' own sum (to extended precision's rounding, then float64's)
    assert b.stats.rss == pytest.approx(float(_exact_rss(b, reader)), rel=1e-15)
    if read:
        assert a.stats.rss == b.stats.rss
    else:
        assert a.stats.rss != b.stats.rss  # float64's data: another sum, within the bound
        assert abs(a.stats.rss - b.stats.rss) <= EXACT_RTOL * b.stats.rss
