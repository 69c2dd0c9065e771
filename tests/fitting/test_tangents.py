"""The one-pass forward-mode Jacobian of an expression (:mod:`service.fitting.tangents`)
against TensorFlow's own forward-mode autodiff (``tf.autodiff.ForwardAccumulator``, one
parameter at a time), on every function and power form, at callers' scales."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from service.fitting.expression import parse
from service.fitting.models.expression import expression_spec
from service.fitting.stats import residuals_and_jacobian

N = 32
CASES = [
    # (expression, parameters, x range, parameter range)
    ("c + a*exp(-t/k)", "cak", (0.0, 5e3), (1e2, 2e3)),
    ("b1*(1-exp(-b2*t))", ("b1", "b2"), (20.0, 800.0), (2e-4, 5e-4)),
    ("a/(1+exp(-(t-m)/s))", "ams", (-3.0, 3.0), (0.5, 1.5)),
    ("a*t**b + c", "abc", (1e-9, 1e-6), (0.5, 2.0)),
    ("sqrt(a*t) + tan(b*t/100) - atan(c*t) + abs(a-t)*tanh(b)", "abc", (0.5, 3.0), (0.5, 1.5)),
    ("log(c+t) + sin(a)*cos(b*t) - a/b", "abc", (0.5, 3.0), (0.5, 1.5)),
    ("2**(b*t) + t**a + (a-t)**b", "ab", (0.5, 3.0), (0.5, 1.5)),  # NaN where a - t < 0
    ("c", "c", (0.0, 1.0), (0.5, 1.5)),
]


@pytest.mark.parametrize(("text", "names", "xs", "ps"), CASES)
def test_one_pass_jacobian_is_forward_mode_autodiff(
    text: str, names: str, xs: tuple[float, float], ps: tuple[float, float]
) -> None:
    expression = parse(text, ("t",), tuple(names))
    spec = expression_spec(expression, N)
    assert spec.residuals is not None and spec.residuals_jacobian is not None
    rng = np.random.default_rng(3)
    rows, k = 3, spec.k
    summary = np.zeros((rows, spec.summary.size))
    summary[:, :N] = rng.uniform(*xs, (rows, N))
    summary[:, N : 2 * N] = 1e7 + rng.normal(0.0, 0.1, (rows, N))
    summary[:, 2 * N : 3 * N] = rng.uniform(0.5, 2.0, (rows, N))
    summary[:, 3 * N] = N
    p = tf.constant(rng.uniform(*ps, (rows, k)))
    want_r, want_j = residuals_and_jacobian(spec.residuals, p, tf.constant(summary))
    got_r, got_j = spec.residuals_jacobian(p, tf.constant(summary))
    assert got_j.shape == (rows, N, k)
    np.testing.assert_allclose(got_r.numpy(), want_r.numpy(), rtol=1e-15, atol=0.0)
    np.testing.assert_allclose(got_j.numpy(), want_j.numpy(), rtol=1e-13, atol=0.0)


def test_one_pass_jacobian_of_one_set() -> None:
    """A single fit's parameters are a vector [k] and its summary [S]: the same columns."""
    spec = expression_spec(parse("a*exp(-k*t) + c", ("t",), tuple("akc")), N)
    assert spec.residuals is not None and spec.residuals_jacobian is not None
    summary = np.zeros(spec.summary.size)
    summary[:N] = np.linspace(0.0, 5e3, N)
    summary[N : 2 * N] = 3.0 * np.exp(-summary[:N] / 1e3)
    summary[2 * N : 3 * N] = 1.0
    summary[3 * N] = N
    p = tf.constant([2.0, 1.1e-3, 0.1], tf.float64)
    want_r, want_j = residuals_and_jacobian(spec.residuals, p, tf.constant(summary))
    got_r, got_j = spec.residuals_jacobian(p, tf.constant(summary))
    assert got_j.shape == (N, 3)
    np.testing.assert_allclose(got_r.numpy(), want_r.numpy(), rtol=1e-15, atol=0.0)
    np.testing.assert_allclose(got_j.numpy(), want_j.numpy(), rtol=1e-13, atol=0.0)
