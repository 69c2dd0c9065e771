"""The expression parser: an allow-list over Python's syntax tree, never evaluated by Python.
Each safety rule of the contract, and the evaluation it builds, checked here; the HTTP 422s
in tests/api/test_expressions.py."""

from __future__ import annotations

import math

import pytest

from service.fitting.expression import (
    MAX_DEPTH,
    MAX_LENGTH,
    MAX_PARAMETERS,
    ExpressionError,
    evaluate,
    parse,
)
from service.fitting.operations import NUMPY


def _value(text: str, x: float, **params: float) -> float:
    expression = parse(text, ("x",), list(params))
    return float(evaluate(expression.tree, list(params.values()), [x], NUMPY))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("b1*(1-exp(-b2*x))", 2.0 * (1 - math.exp(-0.5 * 3.0))),
        (
            "b1 - b2*x - atan(b3/(x-b4))/pi",
            2.0 - 0.5 * 3.0 - math.atan(4.0 / (3.0 - 5.0)) / math.pi,
        ),
        ("-b1**2 + +b2", -(2.0**2) + 0.5),  # ** binds tighter than unary minus, as in Python
        (
            "b1*e**(b2*x) + sqrt(abs(b3)) + log(b4) + sin(x) + cos(x) + tan(b2) + tanh(b1)",
            2.0 * math.e**1.5
            + 2.0
            + math.log(5.0)
            + math.sin(3)
            + math.cos(3)
            + math.tan(0.5)
            + math.tanh(2.0),
        ),
        ("b1/b2/b3 + b4 - b1 - b2", 2.0 / 0.5 / 4.0 + 5.0 - 2.0 - 0.5),
        ("2**-1*b1 + 1e-3*b2 + .5*b3 + 3*b4", 1.0 + 0.0005 + 2.0 + 15.0),
    ],
)
def test_allowed_expressions_compute_what_python_would(text: str, expected: float) -> None:
    params = {"b1": 2.0, "b2": 0.5, "b3": 4.0, "b4": 5.0}
    used = {k: v for k, v in params.items() if k in text}
    assert _value(text, 3.0, **used) == pytest.approx(expected, rel=1e-14)


@pytest.mark.parametrize(
    ("text", "kind", "words"),
    [
        ("b1.__class__", "not_allowed", "attribute access"),
        ("x[0]*b1", "not_allowed", "a subscript"),
        ("__import__('os')", "not_allowed", "calling __import__"),
        ("open(b1)", "not_allowed", "calling open"),
        ("exp.__call__(b1)", "not_allowed", "calling attribute access"),
        ("(lambda: b1)()", "not_allowed", "calling a lambda"),
        ("lambda: b1", "not_allowed", "a lambda"),
        ("[b1 for b1 in x]", "not_allowed", "a comprehension"),
        ("b1 if x else x", "not_allowed", "a conditional"),
        ("b1 < x", "not_allowed", "a comparison"),
        ("b1 and x", "not_allowed", "a boolean operator"),
        ("f'{b1}'", "not_allowed", "an f-string"),
        ("'b1'", "not_allowed", "is not a number"),
        ("b1 % x", "not_allowed", "the operator %"),
        ("b1 // x", "not_allowed", "the operator //"),
        ("~b1", "not_allowed", "the operator ~"),
        ("(b1 := 2)", "not_allowed", "an assignment"),
        ("exp(b1, x)", "not_allowed", "exactly one argument"),
        ("exp(x=b1)", "not_allowed", "exactly one argument"),
        ("exp(*x) + b1", "not_allowed", "exactly one argument"),
        ("exp + b1", "not_allowed", "must be called"),
        ("import os", "syntax", "not a valid expression"),
        ("b1 = 2", "syntax", "not a valid expression"),
        ("b1 +", "syntax", "not a valid expression"),
        ("b1 * y", "unknown_name", "unknown name 'y': add y to parameters"),
        ("b1 * True", "not_allowed", "not a number"),
        ("b1 * 1j", "not_allowed", "not a number"),
        ("b1 * 1e999", "not_allowed", "overflows"),
        ("b1 * " + "9" * 400, "not_allowed", "overflows"),
    ],
)
def test_each_refused_construct_names_the_problem(text: str, kind: str, words: str) -> None:
    with pytest.raises(ExpressionError, match=words.replace("(", r"\(")) as info:
        parse(text, ("x",), ["b1"])
    assert info.value.kind == kind


def test_names_must_match_the_parameters_both_ways() -> None:
    with pytest.raises(ExpressionError, match="parameter b2 does not appear") as info:
        parse("b1*x", ("x",), ["b1", "b2"])
    assert info.value.kind == "unused_parameter"
    with pytest.raises(ExpressionError, match="unknown name 'b2'"):
        parse("b1*x + b2", ("x",), ["b1"])
    for reserved in ("x", "exp", "pi"):
        with pytest.raises(ExpressionError, match="cannot be a parameter") as info:
            parse("b1*x", ("x",), ["b1", reserved])
        assert info.value.kind == "reserved_name"


def test_the_size_limits_hold() -> None:
    with pytest.raises(ExpressionError, match=f"at most {MAX_LENGTH}") as info:
        parse("b1" + "+x" * MAX_LENGTH, ("x",), ["b1"])
    assert info.value.kind == "too_long"
    deep = "(" * MAX_DEPTH + "b1" + ")" * MAX_DEPTH  # parentheses alone add no depth
    parse(deep, ("x",), ["b1"])
    nested = "exp(" * MAX_DEPTH + "b1" + ")" * MAX_DEPTH
    with pytest.raises(ExpressionError, match=f"deeper than {MAX_DEPTH}") as info:
        parse(nested, ("x",), ["b1"])
    assert info.value.kind == "too_deep"
    names = [f"p{i}" for i in range(MAX_PARAMETERS + 1)]
    with pytest.raises(ExpressionError, match=f"at most {MAX_PARAMETERS}") as info:
        parse("+".join(names), ("x",), names)
    assert info.value.kind == "too_many_parameters"
    parse("+".join(names[:-1]), ("x",), names[:-1])  # exactly the limit is fine


def test_nothing_is_computed_while_parsing() -> None:
    """A power tower is parsed, not folded: 9**9**9 would take Python minutes and gigabytes."""
    expression = parse("b1 * 9**9**9**9", ("x",), ["b1"])
    assert expression.canonical == "(p0*(9**(9**(9**9))))"


def test_the_canonical_form_ignores_names_and_spacing() -> None:
    a = parse("b1*(1-exp(-b2*x))", ("x",), ["b1", "b2"])
    b = parse(" amp * ( 1 - exp( - rate * t ) ) ", ("t",), ["amp", "rate"])
    assert a.canonical == b.canonical == "(p0*(1-exp(((-p1)*x0))))"  # -b2*x is (-b2)*x
    assert parse("b2*x + b1", ("x",), ["b1", "b2"]).canonical == "((p1*x0)+p0)"


def test_several_variables() -> None:
    expression = parse("b1 - b2*x1 * exp(-b3*x2)", ("x1", "x2"), ["b1", "b2", "b3"])
    value = evaluate(expression.tree, [1.0, 2.0, 0.5], [3.0, 4.0], NUMPY)
    assert value == pytest.approx(1.0 - 2.0 * 3.0 * math.exp(-2.0))


def test_asking_whether_an_expression_is_compiled_changes_no_cache() -> None:
    """Admission asks before it may refuse: a refused request must neither add a spec to
    the cache nor evict one (75 refusals evicted a cached expression)."""
    from service.fitting import FitEngine

    engine = FitEngine(models={}, expression_cache_size=2)
    kept = parse("a*exp(-b*x)", ("x",), ("a", "b"))
    engine.expression_spec(kept, 10)
    for i in range(10):
        other = parse(f"a*x + {i}", ("x",), ("a",))
        assert not engine.expression_compiled(other, 10, "levenberg_marquardt", False)
        assert engine.expressions.peek(other, 10) is None
    assert engine.expressions.peek(kept, 10) is not None
