"""Many data sets of one model in one compiled loop (service.fitting.sets): each set's answer
is its single fit's, each set fails alone, and NIST's certified values hold for both starts
fitted together. References: the single fit (itself checked against NIST and scipy), scipy
``curve_fit``, and NIST StRD."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from scipy.optimize import curve_fit

from service.fitting import FitEngine, small
from service.fitting.expression import Expression, parse
from service.fitting.options import Optimizer, OptimizerName, Stopping
from service.fitting.results import DegenerateData, FitDiverged, FitError, FitResult
from service.fitting.sets import LM, SetData, expression_sets_compiled, fit_sets, rows_bucket
from tests import nist
from tests.optimum import assert_same_optimum, resolution_se

ENGINE = FitEngine()
#: As the expression routes fit by default: no loss tolerance (Levenberg-Marquardt's
#: rejected steps leave the loss unchanged, which that rule would take for a plateau), so
#: each fit runs until its own step tolerance, at its optimum to rounding.
TIGHT = Stopping()
DECAY = parse("a*exp(-b*x) + c", ("x",), ("a", "b", "c"))


def _decay_sets(count: int, seed: int) -> list[SetData]:
    """Exponential decays at the units callers have: x in the thousands (seconds), y around
    1e7 (counts) with a noise of 0.1 to 10, lengths from 20 to 120 (ragged)."""
    rng = np.random.default_rng(seed)
    sets = []
    for _ in range(count):
        n = int(rng.integers(20, 121))
        x = np.sort(rng.uniform(0.0, 5e3, n))
        a, b, c = rng.uniform(1e3, 1e5), rng.uniform(2e-4, 2e-3), 1e7
        y = a * np.exp(-b * x) + c + rng.normal(0.0, rng.choice([0.1, 1.0, 10.0]), n)
        sets.append(SetData((x, y), (0.5 * a, 1.5 * b, c + 50.0)))
    return sets


def _fit(
    sets: list[SetData],
    expression: Expression = DECAY,
    engine: FitEngine = ENGINE,
    **options: Any,
) -> list[FitResult | FitError]:
    kwargs: dict[str, Any] = {"learning_rate": 1.0, "epochs": 1000, "optimizer": LM}
    kwargs |= {"stopping": TIGHT} | options
    return fit_sets(engine, "expression", sets, options={"expression": expression}, **kwargs)


def _single(one: SetData, **options: Any) -> FitResult:
    kwargs: dict[str, Any] = {"learning_rate": 1.0, "epochs": 1000, "optimizer": LM}
    kwargs |= {"stopping": TIGHT} | options
    return ENGINE.fit(
        "expression",
        *one.data,
        initial=one.initial,
        weights=one.weights,
        options={"expression": DECAY},
        scaling="none",  # as the expression routes fit
        **kwargs,
    )


def _close(a: float | None, b: float | None, rtol: float) -> bool:
    if a is None or b is None:
        return a is b
    return abs(a - b) <= rtol * max(abs(a), abs(b), 1e-300)


def _same_optimum(got: FitResult, want: FitResult, one: SetData) -> None:
    """The same optimum of set ``one``, to the float64 resolution of its sum of squares."""
    assert want.stats.rss is not None
    tolerance = resolution_se(one.data[-1], want.stats.rss, want.stats.dof, one.weights)
    assert_same_optimum(got.params, want.params, want.stats.std_errors, tolerance)


def test_each_set_answers_what_its_single_fit_answers() -> None:
    """37 ragged sets (a bucket of 64 rows, sets of several length buckets sharing the
    longest's spec): parameters, standard errors, RSS and R² equal the single fit's to
    1e-9, and the stop reason, convergence and epochs too."""
    sets = _decay_sets(37, seed=1)
    batch = _fit(sets)
    assert rows_bucket(len(sets)) == 64
    for one, got in zip(sets, batch, strict=True):
        assert isinstance(got, FitResult), got
        want = _single(one)
        _same_optimum(got, want, one)
        for g, w in zip(got.stats.std_errors, want.stats.std_errors, strict=True):
            assert _close(g, w, 1e-7)
        assert _close(got.stats.rss, want.stats.rss, 1e-7)
        assert got.stats.n == want.stats.n == one.data[0].size
        assert (got.converged, got.stop_reason) == (want.converged, want.stop_reason)
        assert got.warnings == want.warnings
        assert got.stats.dof == one.data[0].size - 3


def test_the_sets_match_curve_fit() -> None:
    """The independent reference: scipy's MINPACK, tolerances at float64's."""
    sets = _decay_sets(12, seed=2)
    for one, got in zip(sets, _fit(sets), strict=True):
        assert isinstance(got, FitResult)
        popt, pcov = curve_fit(
            lambda x, a, b, c: a * np.exp(-b * x) + c,
            *one.data,
            p0=one.initial,
            ftol=1e-15,
            xtol=1e-15,
            gtol=1e-15,
            maxfev=100_000,
        )
        se = np.sqrt(np.diag(pcov))
        # MINPACK stops by its own tolerances: the two agree far within the uncertainty.
        assert np.all(np.abs([got.params[n] for n in "abc"] - popt) <= 1e-3 * se)
        assert np.allclose(np.array(got.stats.std_errors, dtype=float), se, rtol=1e-4, atol=0)


def test_weights_are_each_sets_own() -> None:
    rng = np.random.default_rng(3)
    sets = [
        SetData(one.data, one.initial, weights=rng.uniform(0.1, 4.0, one.data[0].size))
        for one in _decay_sets(5, seed=3)
    ]
    for one, got in zip(sets, _fit(sets), strict=True):
        assert isinstance(got, FitResult)
        _same_optimum(got, _single(one), one)


def test_a_failing_set_fails_alone() -> None:
    """A set whose model overflows, a constant set, one with fewer points than parameters,
    and sets of other lengths: each gets its own answer or error, the others theirs."""
    good = _decay_sets(3, seed=4)
    x = np.linspace(0.0, 5e3, 40)
    overflow = SetData((x, np.full(40, 1e7)), (1.0, -1.0, 0.0))  # exp(5e3) overflows
    constant = SetData((x, np.full(40, 1e7)), (1.0, 1e-3, 1e7))
    few = SetData((x[:2], np.array([1e7 + 1.0, 1e7])), (1.0, 1e-3, 1e7))
    sets = [good[0], overflow, good[1], constant, few, good[2]]
    results = _fit(sets)
    assert isinstance(results[1], FitDiverged)
    assert "overflow" in str(results[1])
    for i in (0, 2, 5):
        got = results[i]
        assert isinstance(got, FitResult)
        _same_optimum(got, _single(sets[i]), sets[i])
    constant_fit = results[3]  # fitted: a decay of height ~0 on the constant
    assert isinstance(constant_fit, FitResult)
    assert constant_fit.stats.rss is not None and constant_fit.stats.rss <= 1e-12 * 1e14
    assert isinstance(results[4], DegenerateData)
    assert "2 points (with a positive weight) cannot determine 3 parameters" in str(results[4])


@pytest.mark.parametrize("name", ["sgd", "momentum", "adam"])
def test_the_gradient_rules_step_each_set_as_its_single_fit(name: OptimizerName) -> None:
    """The same update rule on every row: the same trajectory as the single fit (to
    rounding), here on unit-scale data where a fixed step converges."""
    rng = np.random.default_rng(5)
    x = np.linspace(0.0, 4.0, 30)
    sets = [
        SetData((x, 2.0 * np.exp(-0.7 * x) + 0.3 + rng.normal(0, 0.01, 30)), (1.0, 1.0, 0.0))
        for _ in range(6)
    ]
    options: dict[str, Any] = {
        "optimizer": Optimizer(name),
        "learning_rate": 0.05,
        "epochs": 300,
        "stopping": Stopping(),
    }
    for one, got in zip(sets, _fit(sets, **options), strict=True):
        assert isinstance(got, FitResult)
        want = _single(one, **options)
        assert got.epochs_run == want.epochs_run == 300
        assert all(_close(got.params[n], want.params[n], 1e-9) for n in "abc")
        assert np.allclose(got.loss_history, want.loss_history, rtol=1e-9)


def test_newton_is_not_offered_in_batches() -> None:
    with pytest.raises(ValueError, match="newton"):
        _fit(_decay_sets(2, seed=6), optimizer=Optimizer("newton"))


@pytest.mark.parametrize("name", ["ENSO", "Lanczos1", "MGH17", "Misra1a"])
def test_nist_both_starts_as_one_batch(name: str) -> None:
    """Both of NIST's starts of a problem fitted together: each meets what the single fit
    must (6 certified digits in the parameters, 4 in the standard errors). Four here (the
    largest, the closest fit, the hardest start, the classic); all 19 through HTTP in
    tests/api/test_expression_batch.py."""
    problem = nist.load(name)
    names = tuple(problem.certified)
    expression = parse(problem.expression, problem.variables, names)
    data = (*(problem.x[v] for v in problem.variables), problem.y)
    # As the HTTP route reads them: the decimal text in extended precision (Lanczos1's
    # standard errors need it).
    exact = tuple(np.array([np.longdouble(repr(v)) for v in a.tolist()]) for a in data)
    sets = [
        SetData(data, tuple(start[b] for b in names), options={"exact": exact})
        for start in problem.starts
    ]
    results = _fit(sets, expression)
    for start, fit in enumerate(results, 1):
        assert isinstance(fit, FitResult), (start, fit)
        digits = {b: nist.lre(fit.params[b], problem.certified[b]) for b in names}
        se = dict(zip(names, fit.stats.std_errors, strict=True))
        se_digits = {b: nist.lre(se[b] or 0.0, problem.certified_se[b]) for b in names}
        assert min(digits.values()) >= 6, (start, digits)
        assert min(se_digits.values()) >= 4, (start, se_digits)


@pytest.mark.parametrize("k", [2, 3, 5, 9])
def test_the_inverses_of_many_hessians_are_bitwise_the_scalar_ones(k: int) -> None:
    """Many fits' statistics invert their Hessians at once (small.inverse_positive_definite_rows):
    the same numbers, bit for bit, as one fit's (the scalar function), and None for the same
    rows: indefinite, negative, non-finite, at scales from 1e-6 to 1e6."""
    rng = np.random.default_rng(k)
    a = rng.normal(size=(300, k, k))
    h = a @ np.swapaxes(a, 1, 2) * rng.uniform(1e-6, 1e6, (300, 1, 1))
    h[::7] = -h[::7]
    h[::11, 0, 0] = np.nan
    h[::13, -1, -1] = 0.0
    h = 0.5 * (h + np.swapaxes(h, 1, 2))
    inverse, ok = small.inverse_positive_definite_rows(h)
    assert 0 < ok.sum() < len(h)
    for row in range(len(h)):
        want = small.inverse_positive_definite(small.matrix(h[row].tolist()))
        assert (want is not None) == bool(ok[row])
        if want is not None:
            assert np.array_equal(np.array(want), inverse[row])


def test_whether_a_batch_must_compile_is_known_before_it_runs() -> None:
    """Admission charges a compile's memory only to a batch whose loop is new: the lookup
    says so before the first batch of a model and tile size, not after, and changes no
    cache."""
    engine = FitEngine()
    expression = parse("a*exp(-b*x) + c + 0.8125", ("x",), ("a", "b", "c"))
    sets = _decay_sets(5, seed=7)

    def compiled(count: int) -> bool:
        return expression_sets_compiled(
            engine, expression, 120, count, "levenberg_marquardt", False
        )

    assert not compiled(5)
    assert engine.expressions.peek(expression, 120) is None  # the lookup made nothing
    _fit(sets, expression, engine, epochs=50)
    assert compiled(5) and compiled(8)  # the same tile of 8 rows
    assert not compiled(9)  # 16 rows: another loop


def test_more_parameters_than_the_unrolled_solve_takes() -> None:
    """Past UNROLLED_K (12) parameters the step's normal equations are solved by batched
    matrix kernels: a model linear in 14 parameters, t in the thousands of seconds on a level
    of 1e7, fitted by the single loop and as a batch of two sets, equals numpy's least
    squares (lstsq on the same design) to 1e-6 of each standard error."""
    from service.fitting.loop import UNROLLED_K

    harmonics = 13
    assert harmonics + 1 > UNROLLED_K
    names = ("c", *(f"a{j}" for j in range(1, harmonics + 1)))
    text = " + ".join(["c", *(f"a{j}*sin({j}*t/900 + {0.3 * j:.1f})" for j in range(1, 14))])
    expression = parse(text, ("t",), names)
    rng = np.random.default_rng(8)
    t = np.sort(rng.uniform(0.0, 5000.0, 300))
    design = np.column_stack(
        [np.ones_like(t), *(np.sin(j * t / 900 + round(0.3 * j, 1)) for j in range(1, 14))]
    )
    truth = np.concatenate([[1e7], rng.uniform(-2.0, 2.0, harmonics)])
    ys = [design @ truth + rng.normal(0.0, 0.1, t.size) for _ in range(2)]
    start = (1e7 - 1.0, *([0.0] * harmonics))
    engine = FitEngine()
    single = engine.fit(
        "expression", t, ys[0], learning_rate=1.0, epochs=200, initial=list(start),
        optimizer=LM, options={"expression": expression}, scaling="none",
    )  # fmt: skip
    batch = fit_sets(
        engine, "expression", [SetData((t, y), start) for y in ys], learning_rate=1.0,
        epochs=200, options={"expression": expression}, optimizer=LM,
    )  # fmt: skip
    for fit, y in ((single, ys[0]), *zip(batch, ys, strict=True)):
        assert isinstance(fit, FitResult) and fit.converged, fit
        want, rss, *_ = np.linalg.lstsq(design, y, rcond=None)
        se = np.sqrt(np.diag(rss[0] / (t.size - harmonics - 1) * np.linalg.inv(design.T @ design)))
        got = np.array([fit.params[name] for name in names])
        assert np.all(np.abs(got - want) <= 1e-6 * se), np.max(np.abs(got - want) / se)
        # lstsq's float64 residuals resolve y (~1e7) to eps·|y|: its rss to ~2·eps·|y|/rms.
        resolution = 2.0 * np.finfo(float).eps * float(np.max(np.abs(y))) / np.sqrt(rss[0] / t.size)
        assert fit.stats.rss == pytest.approx(float(rss[0]), rel=4 * resolution)
