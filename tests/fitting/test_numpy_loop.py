"""The numpy Levenberg-Marquardt loop (a new expression's first fits, before its loop is
compiled) and the forward-mode jets under it, against independent references: NIST's
certified values, TensorFlow's derivatives, and the compiled loop's answers."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import tensorflow as tf

import service.fitting.loop as compiled_loop
from service.fitting import FitEngine
from service.fitting import numpy_loop as numpy_loop
from service.fitting.expression import parse
from service.fitting.models.expression import expression_spec
from service.fitting.numpy_loop import curvature, jacobian, jacobian_rows
from service.fitting.options import Optimizer, Stopping
from service.fitting.results import FitDiverged, FitResult
from service.fitting.stats import curvature as tf_curvature
from service.fitting.stats import residuals_and_jacobian
from tests import nist
from tests.optimum import assert_same_optimum, resolution_se

LM = Optimizer("levenberg_marquardt")

#: Every function and operator of the grammar, parameter exponents included.
MODELS = [
    ("a*exp(-x/k)+c", {"a": 2.0, "k": 3000.0, "c": 0.5}, (1000.0, 9000.0)),
    ("b1*(1-exp(-b2*x))", {"b1": 240.0, "b2": 5.5e-4}, (10.0, 800.0)),
    ("a*x**b + c", {"a": 1.5, "b": 0.7, "c": 1.0}, (0.5, 5.0)),
    ("(x-a)**2*b + sqrt(abs(c*x)) + log(x+d)", {"a": 1.0, "b": 0.3, "c": -2.0, "d": 3.0}, (0.1, 4)),
    (
        "a*sin(b*x) + c*cos(x) + tan(d*x) + atan(x/a) + tanh(b*x)",
        {"a": 1.2, "b": 0.8, "c": 0.3, "d": 0.1},
        (-2, 2),
    ),
    ("a/(b+x) - 1/(c*x+1) + a**b - pi*e", {"a": 2.0, "b": 1.5, "c": 0.4}, (0.0, 3.0)),
    ("b**x", {"b": 1.3}, (-1.0, 2.0)),
    ("c", {"c": 2.0}, (0.0, 1.0)),
]


def _spec_and_summary(text: str, params: dict[str, float], span: tuple[float, float]) -> Any:
    x = np.linspace(*span, 37)
    y = np.random.default_rng(len(text)).normal(size=x.size)
    weights = np.random.default_rng(1).uniform(0.5, 2.0, x.size)
    spec = expression_spec(parse(text, ("x",), tuple(params)), 64, xla=False)
    summary = spec.complete(
        spec.moments(x, y, weights), np.asarray(weights.sum()), spec.model_options({})
    )
    return spec, summary, np.array(list(params.values()))


def _close(ours: Any, theirs: Any, rtol: float) -> None:
    """Equal to ``rtol`` of the largest magnitude (entries near zero are compared to it)."""
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    scale = max(float(np.max(np.abs(theirs))), 1e-300)
    assert float(np.max(np.abs(ours - theirs))) <= rtol * scale, (ours, theirs)


@pytest.mark.parametrize(("text", "params", "span"), MODELS)
def test_jets_give_tensorflows_residuals_jacobian_and_curvature(
    text: str, params: dict[str, float], span: tuple[float, float]
) -> None:
    spec, summary, p = _spec_and_summary(text, params, span)
    r_tf, j_tf = residuals_and_jacobian(spec.residuals, tf.constant(p), tf.constant(summary))
    r, j = jacobian(spec.numpy_residuals, p, summary)
    _close(r, r_tf.numpy(), 1e-13)
    _close(j, j_tf.numpy(), 1e-13)
    total = float(spec.summary.read(summary, "total"))
    ours = curvature(spec.numpy_residuals, p, summary, total)
    theirs = tf_curvature(spec.loss, tf.constant(p), tf.constant(summary)).numpy()
    _close(ours, theirs, 1e-12)
    # Of many rows at once, as the statistics of a batch take them.
    rows = np.stack([p * (1 + 0.01 * i) for i in range(5)])
    summaries = np.repeat(summary[None], 5, 0)
    _, j_rows_tf = residuals_and_jacobian(spec.residuals, tf.constant(rows), tf.constant(summaries))
    _close(jacobian_rows(spec.numpy_residuals, rows, summaries), j_rows_tf.numpy(), 1e-13)


def test_the_loops_constants_are_the_compiled_loops() -> None:
    """numpy_loop repeats the compiled loop's status codes and damping limits by value (to
    stay free of TensorFlow): they must not drift apart."""
    names = ["RUNNING", "NON_FINITE", "LOSS_TOLERANCE", "GRADIENT_TOLERANCE", "STEP_TOLERANCE"]
    names += ["MIN_DAMPING", "MAX_DAMPING", "LM_XTOL"]
    for name in names:
        assert getattr(numpy_loop, name) == getattr(compiled_loop, name), name


def _expression_traces(engine: FitEngine) -> int:
    """How often this engine traced an expression's loop (the built-in models' summary
    graphs are shared by every engine in the process)."""
    counts = engine.trace_counts()
    return sum(count for name, count in counts.items() if name.startswith("expression["))


def _fit(engine: FitEngine, problem: nist.Problem, start: dict[str, float], **kw: Any) -> Any:
    names = tuple(problem.certified)
    data = (*(problem.x[v] for v in problem.variables), problem.y)
    exact = tuple(np.array([np.longdouble(repr(v)) for v in a.tolist()]) for a in data)
    return engine.fit(
        "expression",
        *data,
        learning_rate=1.0,
        epochs=1000,
        initial=[start[b] for b in names],
        options={"expression": parse(problem.expression, problem.variables, names), "exact": exact},
        optimizer=LM,
        scaling="none",
        **kw,
    )


@pytest.mark.parametrize("name", nist.names())
def test_nist_certified_from_both_starts_with_nothing_compiled(name: str) -> None:
    """Each of NIST's 19 problems from both starts, by the numpy loop alone (a fresh engine:
    no loop is compiled, and none gets compiled): 6 certified digits in every parameter, 4
    in every standard error, 5.5 in the residual sum of squares; converged."""
    engine = FitEngine()
    problem = nist.load(name)
    for start in problem.starts:
        fit = _fit(engine, problem, start, uncompiled=True)
        assert isinstance(fit, FitResult) and fit.converged, fit.warnings
        names = tuple(problem.certified)
        digits = {b: nist.lre(fit.params[b], problem.certified[b]) for b in names}
        se = dict(zip(names, fit.stats.std_errors, strict=True))
        se_digits = {b: nist.lre(se[b] or 0.0, problem.certified_se[b]) for b in names}
        assert min(digits.values()) >= 6, digits
        assert min(se_digits.values()) >= 4, se_digits
        assert nist.lre(fit.stats.rss or 0.0, problem.rss) >= 5.5
    assert _expression_traces(engine) == 0


def _decay(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Callers' units: t in the thousands of seconds, y around 1e7, weights."""
    rng = np.random.default_rng(seed)
    t = np.sort(rng.uniform(0.0, 5e3, 90))
    y = 1e7 + 40.0 * np.exp(-t / 1.3e3) + rng.normal(0, 0.1, t.size)
    return t, y, rng.uniform(0.5, 2.0, t.size)


@pytest.mark.parametrize(
    ("stopping", "bounds"),
    [
        (Stopping(), None),
        (Stopping(tolerance=1e-12, patience=3), None),
        (Stopping(), {"k": (1.5e3, None)}),  # the optimum (1.3e3) is outside: held at 1.5e3
    ],
)
def test_the_numpy_loop_answers_what_the_compiled_loop_answers(
    stopping: Stopping, bounds: dict[str, tuple[float | None, float | None]] | None
) -> None:
    """The same fit by both loops (each its own engine): parameters equal to 1e-9
    relatively, or within the float64 resolution of the sum of squares in standard errors
    (:mod:`tests.optimum`: where each loop stops in that is rounding), the same standard errors
    to 1e-6, and the same stop reason, convergence, warnings and statistics otherwise."""
    t, y, w = _decay(3)
    expression = parse("c + a*exp(-t/k)", ("t",), ("c", "a", "k"))
    options = {"expression": expression, "bounds": bounds}
    answers = []
    for uncompiled in (True, False):
        engine = FitEngine()
        answers.append(
            engine.fit(
                "expression",
                t,
                y,
                weights=w,
                learning_rate=1.0,
                epochs=500,
                initial=[9.9e6, 10.0, 500.0],
                options=options,
                optimizer=LM,
                stopping=stopping,
                scaling="none",
                uncompiled=uncompiled,
            )
        )
        assert _expression_traces(engine) == (0 if uncompiled else 1)
    ours, theirs = answers
    assert theirs.stats.rss is not None
    tolerance = resolution_se(y, theirs.stats.rss, theirs.stats.dof, w)
    assert_same_optimum(ours.params, theirs.params, theirs.stats.std_errors, tolerance)
    for i, se in enumerate(theirs.stats.std_errors):
        if se is not None:
            assert ours.stats.std_errors[i] == pytest.approx(se, rel=1e-6)
    assert ours.stop_reason == theirs.stop_reason
    assert (ours.converged, ours.warnings, ours.n) == (theirs.converged, theirs.warnings, theirs.n)
    assert ours.stats.dof == theirs.stats.dof
    # Each residual is float64's rounding of y (~1e7) minus the model: ~eps·|y| absolute, so
    # the loss (mean square, rms ~3) is known to ~2·eps·|y|/rms relatively (~1.5e-9 here).
    resolution = 2.0 * np.finfo(float).eps * float(np.max(np.abs(y))) / theirs.final_loss**0.5
    assert ours.final_loss == pytest.approx(theirs.final_loss, rel=max(1e-9, 4 * resolution))
    if bounds:
        assert ours.params["k"] == theirs.params["k"] == 1.5e3


def test_a_divergence_is_the_compiled_loops_divergence() -> None:
    """A model that overflows: the same error, worded the same, from both loops."""
    x = np.linspace(0.0, 800.0, 30)
    expression = parse("exp(a*x)", ("x",), ("a",))
    errors = []
    for uncompiled in (True, False):
        with pytest.raises(FitDiverged) as caught:
            FitEngine().fit(
                "expression",
                x,
                np.ones_like(x),
                learning_rate=1.0,
                epochs=50,
                initial=[5.0],
                options={"expression": expression},
                optimizer=LM,
                scaling="none",
                uncompiled=uncompiled,
            )
        errors.append(str(caught.value))
    assert errors[0] == errors[1]
