"""The compiled custom training loop, for any model spec (:mod:`service.fitting.models`).

Each model and loop variant (update rule, with or without stopping rules) gets one
XLA-compiled ``tf.function`` that runs up to ``epochs_per_call`` epochs of the reference
post's step (``GradientTape`` -> ``tape.gradient`` -> update) on loop-carried parameter
tensors. The data enter once, as the model's summary, so every shape inside the loop is
fixed: one trace and one XLA compilation serve every n, epoch count and learning rate. A
driver calls the compiled chunk until the epochs are done, checking between calls whether
the caller wants it to stop (deadline, disconnect).

What crosses into and out of a compiled call is three flat vectors, each with a stated
layout (:mod:`service.fitting.layout`): the summary, the loop state (:func:`state_layout`)
and the :class:`Controls`; out comes :func:`output_layout`.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import random
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
import tensorflow as tf

from service.fitting.expression import CACHE_BYTES, Expression
from service.fitting.layout import Layout
from service.fitting.models import BUILT_IN, Loss, ModelSpec
from service.fitting.models.expression import (
    CACHE_SIZE,
    ExpressionModels,
    by_position,
    named,
)
from service.fitting.numpy_loop import make_loop
from service.fitting.options import (
    CONVERGED_RTOL,
    LEVENBERG_MARQUARDT,
    NO_STOPPING,
    OPTIMIZERS,
    SGD,
    ExpressionOptimizer,
    Optimizer,
    Reduction,
    Scaling,
    Stopping,
)
from service.fitting.results import (
    DegenerateData,
    FitDiverged,
    FitResult,
    FitStats,
    ModelName,
    StopReason,
)
from service.fitting.scaling import IDENTITY, Coordinates, fit_coordinates, quiet
from service.fitting.small import Numbers
from service.fitting.stats import (
    AtFit,
    curvature,
    curvature_layout,
    is_converged,
    not_converged,
    residuals_and_jacobian,
    weight_summary,
)

log = logging.getLogger(__name__)

#: Called between chunks: None to go on, "timeout" to stop and return what was reached.
#: Raise :class:`FitCancelled` from it to abandon the fit.
StopCheck = Callable[[], StopReason | None]
#: Called between chunks with (epochs done, loss at the current parameters).
Progress = Callable[[int, float], None]

Array = npt.NDArray[np.float64]


class Controls(NamedTuple):
    """The numbers a compiled loop runs with, as one vector in this order. (The update rule,
    and whether the stopping rules run, are chosen by the loop variant.)"""

    learning_rate: float
    #: Epochs to run in this call.
    steps: float
    #: The first optimizer slot's decay: momentum's, or Adam's beta_1.
    first_rate: float
    beta_2: float
    epsilon: float
    #: Negative: this criterion is disabled.
    tolerance: float
    patience: float
    gradient_tolerance: float


class LoopState(NamedTuple):
    """Carried between epochs and chunks: the parameters, the optimizer's two slots
    (momentum's velocity; Adam's first and second moments), Adam's step count, the best
    loss and stall count of the loss tolerance, and Levenberg-Marquardt's damping, its
    growth factor and its parameter scaling."""

    params: Any
    first: Any
    second: Any
    step: Any
    best: Any
    stall: Any
    damping: Any
    growth: Any
    scale: Any


@functools.cache
def state_layout(k: int) -> Layout:
    return Layout.of(
        params=k,
        first=k,
        second=k,
        step=None,
        best=None,
        stall=None,
        damping=None,
        growth=None,
        scale=k,
    )


def _carried(optimizer: ExpressionOptimizer, stopping: bool) -> tuple[str, ...]:
    """The state fields an update rule (and the stopping rules) changes each epoch."""
    own = {
        "sgd": (),
        "newton": (),
        "momentum": ("first",),
        "adam": ("first", "second", "step"),
        LEVENBERG_MARQUARDT: ("damping", "growth", "scale"),
    }[optimizer]
    return ("params", *own, *(("best", "stall") if stopping else ()))


@functools.cache
def input_layout(summary_size: int, k: int) -> Layout:
    """A chunk's one input vector: the model's summary, the loop state, the controls (one
    host-to-device copy, where three tensors cost ~12 µs each)."""
    return Layout.of(
        summary=summary_size, state=state_layout(k).size, controls=len(Controls._fields)
    )


@functools.cache
def output_layout(k: int) -> Layout:
    """A chunk's one output vector: the state, epochs done, how it ended, the
    :func:`~service.fitting.stats.curvature` where it ended, then the loss history."""
    return Layout.of(
        state=state_layout(k).size,
        done=None,
        status=None,
        curvature=curvature_layout(k).size,
        history=-1,
    )


def _pack(layout: Layout, parts: Mapping[str, Any]) -> Any:
    return tf.concat([tf.reshape(v, [-1]) for v in layout.order(parts)], axis=0)


#: How a chunk ended: still running, non-finite, or the stopping rule that fired.
RUNNING, NON_FINITE, LOSS_TOLERANCE, GRADIENT_TOLERANCE, STEP_TOLERANCE = 0, 1, 2, 3, 4
STOPS: dict[int, StopReason] = {
    LOSS_TOLERANCE: "loss_tolerance",
    GRADIENT_TOLERANCE: "gradient_tolerance",
    STEP_TOLERANCE: "step_tolerance",
}
#: Newton's backtracking: at most this many halvings of a step, and Armijo's constant.
MAX_HALVINGS = 60
ARMIJO = 1e-4


def _compile_chunk(
    spec: ModelSpec,
    chunk: int,
    optimizer: ExpressionOptimizer = "sgd",
    stopping: bool = False,
) -> Any:
    """An XLA-compiled loop (without ``spec.xla``, a plain graph: see ``ModelSpec.xla``) of
    up to ``chunk`` epochs of the reference post's GradientTape step on ``spec``'s loss with
    one update rule, and with or without the stopping rules.

    Each variant holds only its own ops (an epoch of plain gradient descent stays a handful of
    fused ops); the numbers they use come in the :class:`Controls`, so one compilation per
    variant serves every request. Returns one :func:`output_layout` vector (one
    device-to-host copy). Each epoch evaluates the loss and its gradient at the current
    parameters, stops there if a stopping rule holds (no update), and otherwise updates. The
    loop also stops when the loss or the update is non-finite; the state is then the one
    before the failing update.

    Traced without AutoGraph: the loop is written with ``tf.while_loop`` and ``tf.where``,
    and every Python ``if`` and ``for`` here and in the models is on static values, so
    AutoGraph's source conversion changes nothing but costs time (measured: the readiness
    warm-up 2.0 -> 0.7-0.9 s, a new expression's first fit 4.1-5.5 -> 2.0-2.4 s, the same
    bytes out). A tensor-valued ``if`` would now fail at trace time, not run wrongly.
    """
    loss_fn, summary_size, k = spec.loss, spec.summary.size, spec.k
    layout = state_layout(k)

    @tf.function(
        jit_compile=spec.xla,
        autograph=False,
        input_signature=[tf.TensorSpec([input_layout(summary_size, k).size], tf.float64)],
    )
    def run(inputs: Any) -> Any:
        given = input_layout(summary_size, k).unpack(inputs)
        summary, state = given["summary"], given["state"]
        c = Controls(*tf.unstack(given["controls"]))
        steps = tf.cast(c.steps, tf.int32)
        history = tf.TensorArray(tf.float64, size=chunk, element_shape=[])

        carried = layout.sub(_carried(optimizer, stopping))

        def epoch(i: Any, vector: Any, history: Any, status: Any) -> Any:
            # The fields this rule does not change are zeros here (built in the loop: outer
            # tensors would become more loop variables); they are restored after the loop.
            blank = layout.unpack(tf.zeros([layout.size], tf.float64))
            s = LoopState(**(blank | carried.unpack(vector)))
            p = s.params
            first, second, step, best, stall = s.first, s.second, s.step, s.best, s.stall
            damping, growth, scale = s.damping, s.growth, s.scale
            if optimizer == "newton":
                at = curvature_layout(k).unpack(curvature(loss_fn, p, summary))
                loss, g = at["loss"], at["gradient"]
            else:
                # Levenberg-Marquardt too. Its step's own loss, which the batched loop reads
                # (2,000 sets: 367-388 against 426-500 ms with the tape), measured slower
                # here: one set of 1,000 points 1.39-1.68 against 1.30-1.41 ms, side by side.
                with tf.GradientTape() as tape:
                    tape.watch(p)
                    loss = loss_fn(p, summary)
                g = tape.gradient(loss, p)
            if optimizer == LEVENBERG_MARQUARDT:
                lm = levenberg_marquardt(spec, summary, p, damping, growth, scale)

            stop = tf.constant(RUNNING)
            if stopping:
                stop, best, stall = stopping_rule(c, loss, g, best, stall, tf.int32)

            if optimizer in GRADIENT_RULES:
                new_p, first, second, step = gradient_step(optimizer, c, p, g, first, second, step)
            elif optimizer == LEVENBERG_MARQUARDT:
                new_p, damping, growth, scale = lm.params, lm.damping, lm.growth, lm.scale
                stop = tf.where((stop == RUNNING) & lm.done, STEP_TOLERANCE, stop)
            else:  # newton
                hessian = tf.reshape(at["hessian"], [k, k])
                new_p, final = _newton_update(loss_fn, summary, p, loss, g, hessian)
                # The step is taken, then the fit stops: after a quadratic step that small,
                # the parameters are at the optimum to rounding.
                stop = tf.where((stop == RUNNING) & final, STEP_TOLERANCE, stop)

            if spec.project is not None:
                new_p = spec.project(new_p, summary)
            history = history.write(i, loss)
            updated = LoopState(new_p, first, second, step, best, stall, damping, growth, scale)
            finite = tf.math.is_finite(loss) & tf.reduce_all(
                tf.math.is_finite(tf.concat([new_p, first, second], axis=0))
            )
            # A tolerance stop halts before the update; Newton's step-tolerance stop keeps the
            # step just taken (and it counts).
            steps_on = (stop == RUNNING) | (stop == STEP_TOLERANCE)
            status = tf.where(steps_on & ~finite, NON_FINITE, stop)
            keep = steps_on & finite
            moved = {
                name: value for name, value in updated._asdict().items() if name in carried.names
            }
            new_vector = tf.where(keep, _pack(carried, moved), vector)
            return i + tf.where(steps_on, 1, 0), new_vector, history, status

        # The loop carries, as one packed vector read by name each epoch, only the fields
        # its update rule changes, gathered from the state and written back into it after the
        # loop by one select. XLA on CPU is touchy here (measured, per call): a loop carrying
        # the fields as separate tensors cost ~120 µs more; one carrying the whole state ran
        # the line's epochs at 0.6 µs instead of 0.04; and writing the carried fields back
        # one by one (an output concatenation XLA no longer fuses) cost ~80 µs more.
        at = layout.positions(carried.names)
        start = tf.gather(state, at)
        done, vector, history, status = tf.while_loop(
            lambda i, s, h, status: (i < steps) & (status == RUNNING),
            epoch,
            [tf.constant(0), start, history, tf.constant(RUNNING)],
        )
        state_out = tf.where(
            tf.constant([j in at for j in range(layout.size)]),
            tf.gather(vector, [at.index(j) if j in at else 0 for j in range(layout.size)]),
            state,
        )
        # On a Newton step-tolerance stop the history holds one entry per step taken.
        return _pack(
            output_layout(k),
            {
                "state": state_out,
                "done": tf.cast(done, tf.float64),
                "status": tf.cast(status, tf.float64),
                "curvature": curvature(loss_fn, layout.read(state_out, "params"), summary),
                "history": history.stack(),
            },
        )

    return run


#: The update rules that step along the gradient (:func:`gradient_step`).
GRADIENT_RULES = ("sgd", "momentum", "adam")


def stopping_rule(
    c: Controls, loss: Any, g: Any, best: Any, stall: Any, dtype: tf.DType
) -> tuple[Any, Any, Any]:
    """The stopping rules on this epoch's loss and gradient, of one set (``loss`` a scalar,
    ``g`` [k]) or of every row of a batch (``loss`` [B], ``g`` [B, k]): the stop code (in
    ``dtype``; RUNNING where no rule holds or the loss is not finite), the best loss and the
    stall count."""
    magnitude = tf.maximum(tf.abs(loss), tf.constant(1.0, tf.float64))
    stall = tf.where((best - loss) > c.tolerance * magnitude, 0.0 * stall, stall + 1.0)
    best = tf.minimum(best, loss)
    loss_stop = (c.tolerance >= 0.0) & (stall >= c.patience)
    norm = tf.norm(g, axis=-1)
    gradient_stop = (c.gradient_tolerance >= 0.0) & (norm <= c.gradient_tolerance)

    def code(value: int) -> Any:
        return tf.constant(value, dtype)

    rule = tf.where(
        gradient_stop,
        code(GRADIENT_TOLERANCE),
        tf.where(loss_stop, code(LOSS_TOLERANCE), code(RUNNING)),
    )
    return tf.where(tf.math.is_finite(loss), rule, code(RUNNING)), best, stall


def gradient_step(
    optimizer: ExpressionOptimizer, c: Controls, p: Any, g: Any, first: Any, second: Any, step: Any
) -> tuple[Any, Any, Any, Any]:
    """One step of SGD, momentum or Adam from ``p`` ([k], or [B, k] with ``step`` [B]): the
    new parameters, the optimizer's two slots and Adam's step count."""
    if optimizer == "sgd":
        return p - c.learning_rate * g, first, second, step
    if optimizer == "momentum":
        first = c.first_rate * first - c.learning_rate * g
        return p + first, first, second, step
    step = step + 1.0
    first = first + (g - first) * (1.0 - c.first_rate)
    second = second + (g * g - second) * (1.0 - c.beta_2)
    alpha = c.learning_rate * tf.sqrt(1.0 - c.beta_2**step) / (1.0 - c.first_rate**step)
    return p - alpha[..., None] * first / (tf.sqrt(second) + c.epsilon), first, second, step


def _newton_update(
    loss_fn: Loss, summary: Any, p: Any, loss: Any, g: Any, hessian: Any
) -> tuple[Any, Any]:
    """One damped Newton step from ``p``, and whether it was the last one needed: a full
    step already within ``CONVERGED_RTOL`` of max(1, |parameters|).

    The direction solves (H + μI)·d = g with μ = 0 where the Hessian is positive definite and
    μ = 2·|λmin| + ε otherwise (so -d always descends); the step halves until Armijo's
    sufficient decrease holds (NaN counts as failure). A full step already within the
    convergence threshold is taken as is: there the loss differs from the current one only by
    rounding. If no halving decreases the loss the parameters stay.
    """
    size = p.shape[0]
    h = 0.5 * (hessian + tf.transpose(hessian))
    eigenvalues = tf.linalg.eigvalsh(h)
    lowest, highest = eigenvalues[0], eigenvalues[-1]
    zero = tf.zeros_like(lowest)
    tiny = tf.constant(1e-300, tf.float64)
    shift = tf.where(lowest > zero, zero, -2.0 * lowest + 1e-8 * tf.abs(highest) + tiny)
    d = tf.linalg.solve(h + shift * tf.eye(size, dtype=tf.float64), g[:, None])[:, 0]
    decrease = tf.reduce_sum(g * d)
    one = tf.constant(1.0, tf.float64)
    negligible = tf.norm(d) <= CONVERGED_RTOL * tf.maximum(one, tf.norm(p - d))

    def accepted(t: Any) -> Any:
        trial = loss_fn(p - t * d, summary)
        return trial <= loss - ARMIJO * t * decrease

    def halve(t: Any, tries: Any, ok: Any) -> Any:
        t = 0.5 * t
        return t, tries + 1, accepted(t)

    t, _, ok = tf.while_loop(
        lambda t, tries, ok: ~ok & (tries < MAX_HALVINGS),
        halve,
        [one, tf.constant(0), negligible | accepted(one)],
    )
    return tf.where(ok, p - t * d, p), negligible


#: Levenberg-Marquardt: the damping to start with, its bounds, and the relative step below
#: which the fit is at its optimum to float64's resolution.
INITIAL_DAMPING = 1e-3
MIN_DAMPING = 1e-15
MAX_DAMPING = 1e16
LM_XTOL = 1e-15


def levenberg_marquardt(
    spec: ModelSpec, summary: Any, p: Any, damping: Any, growth: Any, scale: Any
) -> LMStep:
    """One Levenberg-Marquardt iteration of least-squares ``spec`` from ``p``: the new
    parameters (``p`` if the trial step did not lower the sum of squares; within the spec's
    bounds), the new damping and growth factor, whether the fit is done, and the loss
    (Σr²/Σw) and its gradient (2·Jᵀr/Σw) at ``p``, from the step's own residuals and
    Jacobian: no other evaluation of the model, no tape.

    The Jacobian of the residuals is exact (the model's own one-pass duals, or forward-mode
    autodiff). The step solves min ‖J·d + r‖² + λ·‖D·d‖² with MINPACK's scaling (D² the
    running maximum of diag(JᵀJ): with the current diagonal alone, NIST's MGH17 from its far
    start ends in a wrong minimum), by the normal equations of the unit-scaled columns and
    Cholesky. (It was a QR factorization of [J; √λ·D], which never forms JᵀJ: 2.2x slower a
    fit here, 3.2-4.1 ms against 1.4-1.8 ms for 33 iterations on 1,000 points, with the
    same NIST digits, every problem and start at 6 or more either way.) The
    damping follows Nielsen (1999), as in Madsen, Nielsen and Tingleff's "Methods for
    non-linear least squares problems": with "rho" the actual over the predicted decrease of the
    sum of squares, a step with rho > 0 is taken and λ ← λ·max(1/3, 1 - (2·rho - 1)³), nu ← 2;
    otherwise λ ← λ·nu and nu ← 2·nu. Done: a taken step within LM_XTOL of the parameters'
    size, or λ past MAX_DAMPING (no step lowers the sum of squares in float64: the optimum
    to rounding).

    Written for one set (``p`` [k], scalar damping) and for every set of a batch at once
    (``p`` [B, k], damping [B]) alike: each row takes its own step.
    """
    residuals_fn, project_fn = spec.residuals, spec.project
    assert residuals_fn is not None, f"model {spec.name!r} is not least squares"
    if spec.residuals_jacobian is None:
        r, jacobian = residuals_and_jacobian(residuals_fn, p, summary)
    else:  # the model's own: one pass (an expression's duals)
        r, jacobian = spec.residuals_jacobian(p, summary)
    scale = tf.maximum(scale, tf.reduce_sum(jacobian * jacobian, axis=-2))
    floored = tf.maximum(scale, 1e-30 * tf.reduce_max(scale, axis=-1, keepdims=True) + 1e-300)
    # (ĴᵀĴ + λ·I)·e = -Ĵᵀr with Ĵ = J·D⁻¹ and d = D⁻¹·e, by Cholesky: the columns scaled
    # to unit size first, so the square of J's condition number is only that of its shape,
    # not of its parameters' units.
    inverse = tf.math.rsqrt(floored)
    scaled = jacobian * inverse[..., None, :]
    gram, scaled_jtr = _normal_terms(scaled, r)
    e = _damped_solve(gram, scaled_jtr, damping)
    # One step of iterative refinement against Ĵ itself (corrected semi-normal equations):
    # forming ĴᵀĴ squares the condition number, and on a fit as close as Lanczos1's the
    # unrefined step left the loop short of the minimum (rss 5e-6 above it).
    fitted = r + tf.reduce_sum(scaled * e[..., None, :], axis=-1)  # Ĵ·e + r
    excess = tf.reduce_sum(scaled * fitted[..., None], axis=-2) + damping[..., None] * e
    d = (e + _damped_solve(gram, excess, damping)) * inverse
    trial = p + d if project_fn is None else project_fn(p + d, summary)
    d = trial - p
    rss = tf.reduce_sum(r * r, axis=-1)
    predicted = r + tf.reduce_sum(jacobian * d[..., None, :], axis=-1)  # fuses, as J·d
    predicted_decrease = rss - tf.reduce_sum(predicted * predicted, axis=-1)
    r_trial = residuals_fn(trial, summary)
    rss_trial = tf.reduce_sum(r_trial * r_trial, axis=-1)
    ratio = (rss - rss_trial) / tf.maximum(predicted_decrease, 1e-300)
    better = (
        tf.math.is_finite(rss_trial)
        & (rss_trial < rss)
        & tf.reduce_all(tf.math.is_finite(trial), axis=-1)
    )
    one = tf.constant(1.0, tf.float64)
    shrink = tf.maximum(one / 3.0, one - (2.0 * ratio - 1.0) ** 3)
    new_damping = tf.where(better, tf.maximum(damping * shrink, MIN_DAMPING), damping * growth)
    new_growth = tf.where(better, 2.0 * one, 2.0 * growth)
    small = tf.norm(d, axis=-1) <= LM_XTOL * (tf.norm(p, axis=-1) + LM_XTOL)
    done = (better & small) | (new_damping > MAX_DAMPING)
    weight = spec.summary.columns(summary)[spec.spread]  # Σw
    return LMStep(
        tf.where(better[..., None], trial, p),
        new_damping,
        new_growth,
        scale,
        done,
        rss / weight,
        2.0 * (scaled_jtr / inverse) / weight[..., None],
    )


class LMStep(NamedTuple):
    """What :func:`levenberg_marquardt` returns (see there)."""

    params: Any
    damping: Any
    growth: Any
    scale: Any
    done: Any
    loss: Any
    gradient: Any


#: Up to this many parameters, the normal equations of a batch are formed and solved entry
#: by entry (sums of column products and an unrolled Cholesky factorization: elementwise ops
#: over the batch that XLA fuses), not by batched matrix kernels. Measured on 1,024 sets of
#: 128 points and 3 parameters, XLA on CPU: the Levenberg-Marquardt step 5.9 -> 3.9 ms.
UNROLLED_K = 12


def _normal_terms(jacobian: Any, r: Any) -> tuple[Any, Any]:
    """JᵀJ (as a symmetric k x k nested list of [...] tensors, or one [..., k, k] tensor
    past ``UNROLLED_K``) and Jᵀr ([..., k])."""
    k = jacobian.shape[-1]
    if k > UNROLLED_K:
        return (
            tf.linalg.matmul(jacobian, jacobian, transpose_a=True),
            tf.linalg.matvec(jacobian, r, transpose_a=True),
        )
    columns = [jacobian[..., i] for i in range(k)]
    gram: list[list[Any]] = [[None] * k for _ in range(k)]
    for i in range(k):
        for j in range(i + 1):
            gram[i][j] = gram[j][i] = tf.reduce_sum(columns[i] * columns[j], axis=-1)
    return gram, tf.stack([tf.reduce_sum(column * r, axis=-1) for column in columns], axis=-1)


def _damped_solve(gram: Any, jtr: Any, damping: Any) -> Any:
    """e with (JᵀJ + λ·I)·e = -Jᵀr, by Cholesky (``gram`` as :func:`_normal_terms` gives
    it)."""
    k = jtr.shape[-1]
    if not isinstance(gram, list):
        lhs = (
            gram
            + tf.linalg.diag(damping[..., None] * tf.ones_like(jtr))
            + 1e-300 * tf.eye(k, dtype=jtr.dtype)
        )
        return tf.linalg.cholesky_solve(tf.linalg.cholesky(lhs), -jtr[..., None])[..., 0]
    a = [[gram[i][j] + (damping + 1e-300 if i == j else 0.0) for j in range(k)] for i in range(k)]
    b = [-jtr[..., i] for i in range(k)]
    lower: list[list[Any]] = [[None] * k for _ in range(k)]
    for j in range(k):  # A = L·Lᵀ, column by column
        diagonal = a[j][j]
        for m in range(j):
            diagonal = diagonal - lower[j][m] * lower[j][m]
        lower[j][j] = tf.sqrt(diagonal)
        for i in range(j + 1, k):
            entry = a[i][j]
            for m in range(j):
                entry = entry - lower[i][m] * lower[j][m]
            lower[i][j] = entry / lower[j][j]
    y: list[Any] = [None] * k
    for i in range(k):  # L·y = b
        entry = b[i]
        for m in range(i):
            entry = entry - lower[i][m] * y[m]
        y[i] = entry / lower[i][i]
    x: list[Any] = [None] * k
    for i in reversed(range(k)):  # Lᵀ·x = y
        entry = y[i]
        for m in range(i + 1, k):
            entry = entry - lower[m][i] * x[m]
        x[i] = entry / lower[i][i]
    return tf.stack(x, axis=-1)


#: One compiled loop per (update rule, stopping rules on?).
Variant = tuple[ExpressionOptimizer, bool]
VARIANTS: tuple[Variant, ...] = tuple(
    (name, stopping) for name in OPTIMIZERS for stopping in (False, True)
)


def variants(spec: ModelSpec) -> tuple[Variant, ...]:
    """The loops a model has: every update rule; Levenberg-Marquardt for least squares."""
    if spec.residuals is None:
        return VARIANTS
    return ((LEVENBERG_MARQUARDT, False), (LEVENBERG_MARQUARDT, True), *VARIANTS)


DEFAULT_VARIANT: Variant = ("sgd", False)


#: Epochs per call of the numpy loop (each a few milliseconds at most, within
#: TAPEFIT_UNCOMPILED_MAX_WORK), between which the deadline and cancellation are checked.
NUMPY_EPOCHS_PER_CALL = 16


class FitEngine:
    """Fits any model spec; safe to call from many threads at once.

    The loops evaluate each model's loss statelessly on loop-carried tensors, so concurrent
    fits never share mutable state.

    Every fit reduces its data to the model's summary (numpy below ``graph_min_points`` or
    with weights, where a graph call costs more than the whole computation; a graph function
    above), standardizes it unless ``scaling="none"`` (:mod:`service.fitting.scaling`), and
    calls the XLA-compiled loop in chunks. The loop returns the loss, gradient and Hessian
    where it stops, for the statistics; everything is reported in the caller's units.
    """

    def __init__(
        self,
        epochs_per_call: int = 4096,
        graph_min_points: int = 32_768,
        models: Mapping[str, ModelSpec] = BUILT_IN,
        expression_cache_size: int = CACHE_SIZE,
        expression_cache_bytes: float = CACHE_BYTES,
    ) -> None:
        if epochs_per_call < 1:
            raise ValueError("epochs_per_call must be >= 1")
        self.epochs_per_call = epochs_per_call
        self.graph_min_points = graph_min_points
        self.models: dict[str, ModelSpec] = {}
        # One loop per model and variant; each compiles on its first call (warm_up calls them).
        self._loop_fns: dict[tuple[str, Variant], Any] = {}
        # Fast callers are made on first use: making one traces its function (~0.15 s each).
        self._loops: dict[tuple[str, Variant], Callable[..., Any]] = {}
        self._summaries: dict[str, Callable[..., Any]] = {}
        self._loops_lock = threading.Lock()  # held briefly: never while tracing
        self._tracing: dict[Any, threading.Lock] = {}
        #: Loops over many data sets (:mod:`service.fitting.sets`), by (model, rows, ...).
        self.set_loops: dict[tuple[Any, ...], Any] = {}
        for spec in models.values():
            self.register(spec)
        #: Expressions: a spec per expression and size bucket, the least recent evicted.
        self.expressions = ExpressionModels(
            self._forget, expression_cache_size, expression_cache_bytes
        )

    def register(self, spec: ModelSpec) -> None:
        """Fit ``spec`` too (its loops compile on first use, or in :meth:`warm_up`)."""
        with self._loops_lock:
            self.models[spec.name] = spec
        self._add_loops(spec)

    def _add_loops(self, spec: ModelSpec) -> None:
        if (spec.name, DEFAULT_VARIANT) in self._loop_fns:  # the common case, without the lock
            return
        with self._loops_lock:
            if (spec.name, DEFAULT_VARIANT) in self._loop_fns:
                return
            for variant in variants(spec):
                self._loop_fns[(spec.name, variant)] = _compile_chunk(
                    spec, self.epochs_per_call, *variant
                )

    def _forget(self, name: str) -> None:
        """Drop a model's compiled loops (an expression evicted from the cache)."""
        with self._loops_lock:
            for key in [key for key in self._loop_fns if key[0] == name]:
                del self._loop_fns[key]
                self._loops.pop(key, None)
            for key in [key for key in self.set_loops if key[0] == name]:
                del self.set_loops[key]

    def spec(self, model: str | ModelSpec) -> ModelSpec:
        if isinstance(model, ModelSpec):
            return model
        try:
            return self.models[model]
        except KeyError:
            raise ValueError(f"unknown model {model!r}") from None

    def expression_spec(self, expression: Expression, n: int, cache: bool = True) -> ModelSpec:
        """The spec of ``expression`` for ``n`` points (cached), its loops ready to compile;
        without ``cache``, the cached one or one made for this call alone (for the numpy
        loop: nothing is cached, compiled or charged)."""
        if not cache:
            return self.expressions.transient(expression, n)
        spec = self.expressions.spec(expression, n)
        self._add_loops(spec)
        return spec

    def resolve(
        self,
        model: str | ModelSpec,
        options: Mapping[str, Any] | None,
        n: int,
        cache: bool = True,
    ) -> tuple[ModelSpec, Expression | None, dict[str, Any]]:
        """The spec a fit of ``model`` on (at most) ``n`` points runs, the expression it is
        made of (``model`` "expression", with ``options["expression"]``; else None), and
        the spec's options (an expression's bounds keyed by position)."""
        if model != "expression":
            spec = self.spec(model)
            return spec, None, spec.model_options(options)
        given = dict(options or {})
        expression = given.pop("expression")
        given["bounds"] = by_position(expression, given.get("bounds"))
        spec = self.expression_spec(expression, n, cache)
        return spec, expression, spec.model_options(given)

    def expression_compiled(
        self, expression: Expression, n: int, optimizer: ExpressionOptimizer, stopping: bool
    ) -> bool:
        """Whether a fit of ``expression`` on ``n`` points would run a compiled loop at once;
        a lookup that changes no cache (see :meth:`ExpressionModels.peek`)."""
        spec = self.expressions.peek(expression, n)
        return spec is not None and self.compiled(spec, optimizer, stopping)

    @staticmethod
    def _numpy_loop(spec: ModelSpec, stopping: bool) -> Callable[..., Any]:
        assert spec.numpy_residuals is not None
        k, size = spec.k, spec.summary.size
        return make_loop(
            spec.numpy_residuals,
            spec.summary,
            state_layout(k),
            input_layout(size, k),
            Controls._fields,
            k,
            stopping,
        )

    def compiled(self, spec: ModelSpec, optimizer: ExpressionOptimizer, stopping: bool) -> bool:
        """Whether the loop a fit of ``spec`` would run is compiled already (else the fit
        pays tracing and XLA compilation first: seconds for a large expression)."""
        return self._ready(spec, (optimizer, stopping)) is not None

    def _ready(self, spec: ModelSpec, variant: Variant) -> Callable[..., Any] | None:
        """The compiled caller of a loop of ``spec`` if it is ready now, else None: one
        lookup under the lock, so that an expression evicted meanwhile (its loops
        forgotten) reads as not compiled rather than half there."""
        key = (spec.name, variant)
        with self._loops_lock:
            return self._loops.get(key) if key in self._loop_fns else None

    # -- the compiled entry points -----------------------------------------------------------

    def _caller(
        self, callers: dict[Any, Callable[..., Any]], key: Any, fn: Any
    ) -> Callable[..., Any]:
        """The fast caller of ``fn``, made once (making one traces it: seconds for a large
        expression) under a lock of its own key, so that no other fit, nor the event loop,
        waits for another model's trace."""
        caller = callers.get(key)
        if caller is None:
            with self._loops_lock:
                tracing = self._tracing.setdefault(key, threading.Lock())
            with tracing:
                caller = callers.get(key)
                if caller is None:
                    caller = _fast_call(fn)
                    with self._loops_lock:
                        callers[key] = caller
            with self._loops_lock:
                self._tracing.pop(key, None)
        return caller

    def _loop(self, spec: ModelSpec, variant: Variant) -> Callable[..., Any]:
        """The compiled caller of a loop of ``spec``, made on first use. An expression may
        be evicted from the cache by another thread at any point (:meth:`_forget`): after
        this fit resolved its spec (then the fit compiles a loop of its own, kept by no
        cache), or while its loop traced (then the caller serves this fit and is not kept:
        a kept one would say "compiled" for a model whose loops are gone)."""
        key = (spec.name, variant)
        with self._loops_lock:
            fn = self._loop_fns.get(key)
        if fn is None:
            return _fast_call(_compile_chunk(spec, self.epochs_per_call, *variant))
        caller = self._caller(self._loops, key, fn)
        with self._loops_lock:
            if self._loop_fns.get(key) is not fn and self._loops.get(key) is caller:
                del self._loops[key]
        return caller

    def _moments(self, spec: ModelSpec, weights: Array | None, data: list[Array]) -> Array:
        """The data's moments: by numpy for small or weighted data (a graph call costs more
        than the whole computation there), else by one graph call for all the points."""
        if weights is not None or data[0].size < self.graph_min_points or not spec.moments_graph:
            return spec.moments(*data, weights)
        summarize = self._caller(self._summaries, spec.name, spec.moments_graph)
        return np.asarray(summarize(*(_vector(v) for v in data)).numpy())

    # -- public API --------------------------------------------------------------------------

    def fit(
        self,
        model: str | ModelSpec,
        *data: npt.ArrayLike,
        learning_rate: float,
        epochs: int,
        initial: npt.ArrayLike | None = None,
        seed: int | None = None,
        weights: npt.ArrayLike | None = None,
        options: Mapping[str, Any] | None = None,
        optimizer: Optimizer = SGD,
        stopping: Stopping = NO_STOPPING,
        scaling: Scaling = "standardize",
        history_every: int = 1,
        should_stop: StopCheck | None = None,
        on_progress: Progress | None = None,
        progress_every: int | None = None,
        uncompiled: bool = False,
    ) -> FitResult:
        """Fit ``model`` to ``data`` (its arrays in the spec's order, e.g. x, y).

        Without ``initial`` the fit starts from the model's default: for a random start
        (the line's slope, from N(0, 0.05²) as in the reference post's layer) drawn with
        ``seed`` (a fresh seed is drawn and reported when none is given); a deterministic
        start reports no seed. ``initial`` is in the caller's units, in the spec's parameter
        order. ``weights`` (one per point, >= 0) weight the loss; ``options`` are the model's
        own (e.g. the Gaussian's ``reduction``). ``on_progress(epochs_done, loss)`` is called
        after every ``progress_every`` epochs (and at the end); ``should_stop`` is checked
        as often. With ``uncompiled``, a Levenberg-Marquardt fit whose compiled loop is not
        ready runs the numpy loop instead (:mod:`service.fitting.numpy_loop`: no tracing, no
        XLA), where the spec has numpy residuals.
        """
        _check_hyperparameters(learning_rate, epochs, history_every)
        # The numpy loop may serve a fit whose loop is not compiled: its spec is then not
        # cached (a cached spec is counted as compiled memory).
        numpy_first = uncompiled and optimizer.name == LEVENBERG_MARQUARDT
        n = _array(data[0]).size
        spec, expression, model_options = self.resolve(model, options, n, not numpy_first)
        data_set, start, seed = prepare(
            spec, data, weights, model_options, initial, scaling, seed, self._moments
        )
        per_call = min(self.epochs_per_call, progress_every or self.epochs_per_call)
        variant = (optimizer.name, stopping.enabled)
        numpy_first = numpy_first and spec.numpy_residuals is not None
        ready = self._ready(spec, variant) if numpy_first else None
        if numpy_first and ready is None:
            loop = self._numpy_loop(spec, stopping.enabled)
            per_call = min(per_call, NUMPY_EPOCHS_PER_CALL)  # deadlines checked as often
        else:
            loop = ready if ready is not None else self._loop(spec, variant)
        plan = _Plan(
            loop=loop,
            controls=loop_controls(learning_rate, min(per_call, epochs), optimizer, stopping),
            epochs=epochs,
            k=spec.k,
            coords=data_set.coords,
            should_stop=should_stop,
            on_progress=on_progress,
            progress_every=progress_every,
            advice=FitDiverged.SELF_STEPPING if optimizer.name == LEVENBERG_MARQUARDT else None,
        )
        run = plan.run(data_set.fit_summary, start)
        result = finish(spec, run, data_set, model_options, stopping, scaling, history_every, seed)
        return result if expression is None else named(expression, result)

    def warm_up(self, small: bool = True, large: bool = True, variants: bool = True) -> None:
        """Run the compiled functions of every model once so no request pays tracing or XLA
        compilation: the default loop, the large-data summaries, and the loops of the other
        optimizers and of the stopping rules. (Scaling changes only the numbers the loops
        get.)"""
        rng = np.random.default_rng(0)
        sizes = ([16] if small else []) + ([self.graph_min_points] if large else [])
        for spec in list(self.models.values()):
            for n in sizes:
                data = [rng.random(n) for _ in spec.data]
                self.fit(spec, *data, learning_rate=0.01, epochs=2, seed=0)
            data = [rng.random(16) for _ in spec.data]
            for name, stopping in VARIANTS if variants else ():
                self.fit(
                    spec,
                    *data,
                    learning_rate=0.01,
                    epochs=2,
                    seed=0,
                    optimizer=Optimizer(name),
                    stopping=Stopping(tolerance=0.0) if stopping else NO_STOPPING,
                )

    def xla_input_signatures(self) -> list[Any]:
        """Input specs of the XLA-compiled functions: fully static, so one compilation serves
        all requests (XLA compiles per input shape, and no other shape can reach them)."""
        return [spec for fn in self._loop_fns.values() for spec in fn.input_signature]

    def trace_counts(self) -> dict[str, int]:
        """How often each compiled function was traced (stays 1 after warm-up)."""
        functions = {f"{name}_summary": spec.moments_graph for name, spec in self.models.items()}
        for (model, (name, stopping)), fn in self._loop_fns.items():
            functions[f"{model}_loop_{name}" + ("_stopping" if stopping else "")] = fn
        return {name: int(fn.experimental_get_tracing_count()) for name, fn in functions.items()}


@dataclass(frozen=True, slots=True)
class _Plan:
    """How one fit runs: its compiled loop (variant), controls, length, coordinates and
    callbacks. Chunks are at most the first chunk's length (``controls.steps``) and end on
    multiples of ``progress_every``, where progress is reported (and at the end), in the
    caller's units."""

    loop: Callable[..., Any]
    controls: Controls
    epochs: int
    k: int
    coords: Coordinates
    should_stop: StopCheck | None
    on_progress: Progress | None
    progress_every: int | None
    #: What a divergence message advises (None: lower the learning rate).
    advice: str | None = None

    def run(self, summary: Array, start: Numbers) -> Run:
        """Run chunks from ``start`` (fit coordinates) until ``epochs`` or a stop, checking
        each chunk's outcome."""
        controls, epochs = self.controls, self.epochs
        learning_rate = controls.learning_rate
        per_call = int(controls.steps)
        every = self.progress_every or epochs
        should_stop = self.should_stop
        k = self.k
        inputs = np.concatenate([summary, initial_state(start), controls])
        state_at = slice(summary.size, summary.size + state_layout(k).size)
        steps_at = summary.size + state_layout(k).size + Controls._fields.index("steps")
        chunk = _Chunk(self.loop(_vector(inputs)), k)
        pieces: list[Array] = []
        stop: StopReason = "max_epochs"
        done_total = 0
        while True:
            if chunk.status == NON_FINITE:
                raise FitDiverged(
                    epoch=done_total + chunk.done, learning_rate=learning_rate, advice=self.advice
                )
            pieces.append(chunk.history)
            done_total += chunk.done
            rule = STOPS.get(chunk.status)
            if rule is not None:
                stop = rule
            ending = rule is not None or done_total >= epochs
            if not ending and should_stop is not None and (reason := should_stop()) is not None:
                stop, ending = reason, True
            if self.on_progress is not None and (ending or done_total % every == 0):
                self.on_progress(done_total, self.coords.loss(chunk.final))
            if ending:
                break
            inputs[state_at] = chunk.state
            inputs[steps_at] = min(per_call, epochs - done_total, every - done_total % every)
            chunk = _Chunk(self.loop(_vector(inputs)), k)
        final_loss = chunk.final
        if not math.isfinite(final_loss):
            raise FitDiverged(epoch=done_total, learning_rate=learning_rate, advice=self.advice)
        history = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        if history.size:
            check_descended(history, final_loss, learning_rate, self.coords)
        return Run(chunk.params, history, final_loss, done_total, stop, chunk.curvature)


@dataclass(frozen=True, slots=True)
class DataSet:
    """One data set as a fit takes it: its arrays, weights (or None), summary (caller's
    units), fit coordinates and the summary in them."""

    arrays: list[Array]
    weights: Array | None
    summary: Array
    coords: Coordinates
    fit_summary: Array


def prepare(
    spec: ModelSpec,
    data: tuple[npt.ArrayLike, ...],
    weights: npt.ArrayLike | None,
    model_options: Mapping[str, Any],
    initial: npt.ArrayLike | None,
    scaling: Scaling,
    seed: int | None = None,
    moments: Callable[[ModelSpec, Array | None, list[Array]], Array] | None = None,
) -> tuple[DataSet, Numbers, int | None]:
    """One data set made ready to fit (checked: :class:`DegenerateData` if it cannot be),
    its start in fit coordinates and the seed of a random start (None: nothing random).
    ``moments`` computes the data's moments (default: the spec's numpy function)."""
    arrays = _arrays(spec, data)
    n = arrays[0].size
    ws = _weights(weights, n)
    m = spec.moments(*arrays, ws) if moments is None else moments(spec, ws, arrays)
    total = np.asarray(n if ws is None else ws.sum(), dtype=np.float64)
    summary = spec.complete(m, total, model_options)
    _check(spec, summary)
    fit_summary, coords = fit_coordinates(scaling, summary, spec.standardize)
    if initial is not None:
        given = _initial(spec, initial)
        seed, start = None, coords.to_fit(given)  # nothing random: no seed to report
    else:
        seed = (_fresh_seed() if seed is None else seed) if spec.random_start else None
        start = tuple(spec.start(summary[None, :], scaling, [seed])[0].tolist())
    _check(spec, fit_summary, start)
    return DataSet(arrays, ws, summary, coords, fit_summary), start, seed


def finish(
    spec: ModelSpec,
    run: Run,
    data: DataSet,
    model_options: dict[str, Any],
    stopping: Stopping,
    scaling: Scaling,
    history_every: int,
    seed: int | None,
) -> FitResult:
    """The result of a run on one data set: its statistics where it ended, in the caller's
    units (a single fit's and each set's of a batch alike)."""
    coords, summary, n = data.coords, data.summary, data.arrays[0].size
    at = AtFit.of(run.curvature, run.params, coords)
    residual = spec.residual_sum
    if residual is not None and residual.cancels(summary):
        fitted = spec.report(coords.from_fit(run.params))
        if math.isfinite(rss := residual.rss(summary, fitted, data.arrays, data.weights)):
            model_options = model_options | {"rss": rss}
    with quiet():  # what overflows float64 is reported as null
        stats = spec.stats(at, summary, weight_summary(data.weights, n), model_options)
    result = fit_result(spec, run, at, stats, stopping, scaling, history_every, seed)
    if "rss" in model_options:  # the loss from the residuals
        total = n if data.weights is None else float(data.weights.sum())
        result = replace(result, final_loss=model_options["rss"] / float(total))
    return result


@dataclass(frozen=True, slots=True)
class Run:
    """What the driver reached, in fit coordinates: parameters, full loss history, final
    loss, updates, why it stopped, and the loss, gradient and Hessian at the parameters."""

    params: Array
    history: Array
    final_loss: float
    epochs_run: int
    stop: StopReason
    curvature: Array


def fit_result(
    spec: ModelSpec,
    run: Run,
    at: AtFit,
    stats: FitStats,
    stopping: Stopping,
    scaling: Scaling,
    history_every: int,
    seed: int | None,
) -> FitResult:
    coords = at.coords
    converged = is_converged(at, stopping.gradient_tolerance)
    fitted = spec.report(coords.from_fit(run.params))
    return FitResult(
        model=spec.name,
        params={name: float(v) for name, v in zip(spec.params, fitted, strict=True)},
        loss_history=coords.losses(run.history[::history_every]),
        final_loss=coords.loss(run.final_loss),
        epochs_run=run.epochs_run,
        n=stats.n,
        stop_reason=run.stop,
        converged=converged,
        history_every=history_every,
        stats=stats,
        seed=seed,
        warnings=() if converged else not_converged(stats, run.stop, scaling),
    )


def _fast_call(function: Any) -> Callable[..., Any]:
    """Call the single concrete function of ``function`` with tensors, skipping what a call
    of one eager tensor to one tensor does not need: argument binding (~0.3 ms a call, more
    than a small fit's whole compute), then the wrappers around TensorFlow's execute.

    Private API, two levels, each guarded. Below ``ConcreteFunction._call_flat`` (TensorFlow's
    entry point behind ``ConcreteFunction.__call__``), the call goes straight to
    ``execute.quick_execute`` with the function's name and call attributes, as
    ``Context.call_function`` does: ~33 µs a call less than ``_call_flat`` (measured 83 ->
    50 µs for the default loop, the same bytes out), skipping the tape, control-dependency
    and output-packing wrappers that a tensor-in, tensor-out call outside any tape leaves
    unused. If a TensorFlow version lacks a piece, the next level is used (same results,
    slower) with a warning, and ``tests/fitting/test_engine.py`` fails, so an upgrade cannot
    lose the speed silently.
    """
    concrete = function.get_concrete_function()
    direct = _direct_call(concrete)
    if direct is not None:
        return direct
    call_flat = getattr(concrete, "_call_flat", None)
    if call_flat is None:
        log.warning("ConcreteFunction._call_flat is gone: compiled calls take the slow path")
        return concrete  # type: ignore[no-any-return]
    captured = concrete.captured_inputs

    def call(*args: Any) -> Any:
        return call_flat(list(args), captured)

    return call


def _direct_call(concrete: Any) -> Callable[..., Any] | None:
    """A caller running ``concrete`` (one tensor out, no tape) by ``execute.quick_execute``,
    or None where TensorFlow lacks the private pieces (see :func:`_fast_call`)."""
    try:
        from tensorflow.python.eager import execute

        atomic = concrete._inference_function
        context = atomic._bound_context
        name = atomic.name.decode()
        attrs = tuple(itertools.chain(*context.function_call_options.as_attrs().items()))
        outputs = len(atomic.function_type.flat_outputs)
        quick_execute = execute.quick_execute
    except (AttributeError, ImportError):
        log.warning("TensorFlow's execute entry point is gone: compiled calls take _call_flat")
        return None
    if outputs != 1 or concrete.structured_outputs is None:
        return None  # several outputs are packed into their structure: _call_flat does it
    captured = list(concrete.captured_inputs)

    # The function stays registered while its caller lives (``_function``): a fit under way
    # keeps it through the eviction of its expression. Dropping the last reference to a
    # function removes it from the context, and a call by its name then fails (NotFoundError).
    def call(*args: Any, _function: Any = concrete) -> Any:
        return quick_execute(name, 1, [*args, *captured], attrs, context)[0]

    return call


class _Chunk:
    """A chunk's :func:`output_layout` vector, read by name."""

    def __init__(self, output: Any, k: int) -> None:
        parts = output_layout(k).unpack(np.asarray(output))  # a tensor, or the numpy loop's
        self.state = parts["state"]
        self.params = self.state[:k]  # state_layout(k) begins with the parameters
        self.done = int(parts["done"])
        self.status = int(parts["status"])
        self.curvature = parts["curvature"]
        self.final = float(self.curvature[0])
        # A copy, not a view: a view would keep the whole chunk-sized buffer alive, and a
        # fit of many short chunks (progress every epoch) would hold gigabytes.
        self.history = parts["history"][: self.done].copy()


def loop_controls(
    learning_rate: float, steps: int, optimizer: Optimizer, stopping: Stopping
) -> Controls:
    def disabled_if_none(value: float | None) -> float:
        return -1.0 if value is None else value

    return Controls(
        learning_rate=learning_rate,
        steps=steps,
        first_rate=optimizer.first_rate,
        beta_2=optimizer.beta_2,
        epsilon=optimizer.epsilon,
        tolerance=disabled_if_none(stopping.tolerance),
        patience=stopping.patience,
        gradient_tolerance=disabled_if_none(stopping.gradient_tolerance),
    )


def initial_state(params: Numbers) -> Array:
    """Parameters, empty optimizer slots, step 0, best loss +inf, no stall, the initial
    damping."""
    k = len(params)
    state = _empty_state(k).copy()
    state[:k] = params
    return state


@functools.cache
def _empty_state(k: int) -> Array:
    zeros = np.zeros(k)
    parts = {"params": zeros, "first": zeros, "second": zeros, "step": 0.0, "best": math.inf}
    parts |= {"scale": zeros}
    return state_layout(k).pack(parts | {"stall": 0.0, "damping": INITIAL_DAMPING, "growth": 2.0})


def _arrays(spec: ModelSpec, data: tuple[npt.ArrayLike, ...]) -> list[Array]:
    """The model's arrays, flat float64, all of one length."""
    if len(data) != len(spec.data):
        raise ValueError(f"model {spec.name!r} takes {len(spec.data)} arrays {spec.data}")
    arrays = [_array(v) for v in data]
    for name, values in zip(spec.data, arrays, strict=True):
        if values.size != arrays[0].size:
            raise ValueError(f"{values.size} {name} values for {arrays[0].size} points")
    return arrays


def _initial(spec: ModelSpec, initial: npt.ArrayLike) -> Array:
    given = _array(initial)
    if given.size != spec.k:
        raise ValueError(f"initial needs {spec.k} values {spec.params}")
    if not np.all(np.isfinite(given)):
        raise ValueError("initial values must be finite")
    return given


def _weights(weights: npt.ArrayLike | None, n: int) -> npt.NDArray[np.float64] | None:
    if weights is None:
        return None
    ws = _array(weights)
    if ws.size != n:
        raise ValueError(f"{ws.size} weights for {n} points")
    if not (np.all(np.isfinite(ws)) and np.all(ws >= 0.0)):
        raise ValueError("weights must be finite and >= 0")
    if not np.count_nonzero(ws) >= 2:
        raise DegenerateData("fewer than 2 points have a positive weight")
    return ws


def _fresh_seed() -> int:
    """A seed for a request that gave none (reported back, so the fit can be replayed).
    Not a secret: the process-wide Mersenne Twister is enough and costs no system call."""
    return random.getrandbits(63)


def _array(values: npt.ArrayLike) -> npt.NDArray[np.float64]:
    return np.asarray(values, dtype=np.float64).reshape(-1)


def _vector(values: npt.ArrayLike) -> Any:
    return _eager_vector()(_array(values))


@functools.cache
def _eager_vector() -> Callable[[npt.NDArray[np.float64]], Any]:
    """float64 arrays to eager tensors on this process's device. ``tf.constant`` costs
    ~45 µs a call inside a fit (dtype inference, its weak-tensor wrapper), more than a tenth
    of a small fit; constructing ``EagerTensor``, the class behind every eager tensor (private
    API), costs ~6 µs. If a TensorFlow version lacks it, ``tf.constant`` is used (same
    tensors, slower) with a warning, and ``tests/fitting/test_engine.py`` fails."""
    from tensorflow.python.framework import ops

    eager = getattr(ops, "EagerTensor", None)
    if eager is None:
        log.warning("EagerTensor is gone: tensors are made by tf.constant (slower)")
        return tf.constant  # type: ignore[no-any-return]
    device = tf.constant(0.0, tf.float64).device  # the full name: placement is then free
    dtype = tf.float64.as_datatype_enum

    def vector(values: npt.NDArray[np.float64]) -> Any:
        # A copy of its own: the tensor may share an aligned array's memory, and callers
        # reuse theirs (tf.constant copies).
        return eager(values.copy(), device, dtype)

    return vector


def _check(spec: ModelSpec, summary: Array, initial: npt.ArrayLike = ()) -> None:
    if (error := spec.unusable(summary, initial)) is not None:
        raise error


def _check_hyperparameters(learning_rate: float, epochs: int, history_every: int) -> None:
    if history_every < 1:
        raise ValueError("history_every must be >= 1")
    if epochs < 1:
        raise ValueError("epochs must be >= 1")
    if not (math.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError("learning_rate must be a positive finite number")


#: Relative slack before "the loss ended above its start" counts as divergence (rounding).
RISE_TOLERANCE = 1e-9


def check_descended(
    history: npt.NDArray[np.float64],
    final_loss: float,
    learning_rate: float,
    coords: Coordinates = IDENTITY,
) -> None:
    """Gradient descent that ends above its starting loss has overshot, however finite
    (judged in fit coordinates; ``coords`` puts the message in the caller's units).

    (The Gaussian NLL rarely overflows: a too-large step throws s far out, where the
    gradients are tiny, and the loss stays finite but far worse than at the start.)
    """
    start = float(history[0])
    limit = start + RISE_TOLERANCE * max(1.0, abs(start))
    if final_loss <= limit:
        return
    above = np.flatnonzero(history > limit)
    epoch = int(above[0]) + 1 if above.size else len(history)
    raise FitDiverged(
        epoch=epoch,
        learning_rate=learning_rate,
        reason=f"the loss rose above its starting value {coords.loss(start):.6g} and ended at "
        f"{coords.loss(final_loss):.6g}",
    )


__all__ = ["FitEngine", "ModelName", "ModelSpec", "Progress", "Reduction", "StopCheck"]
