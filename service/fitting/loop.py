"""The compiled custom training loop.

Each model and loop variant (optimizer, with or without stopping rules) gets one XLA-compiled
``tf.function`` that runs up to ``epochs_per_call`` epochs of
the post's step (``GradientTape`` -> ``tape.gradient`` -> update) on loop-carried parameter
tensors. The data enter once, through :mod:`service.fitting.summary`, so every shape inside
the loop is fixed: one trace and one XLA compilation serve every n, epoch count and learning
rate. A driver calls the compiled chunk until the epochs are done, checking between calls
whether the caller wants it to stop (deadline, disconnect).
"""

from __future__ import annotations

import logging
import math
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import tensorflow as tf

from service.fitting import scaling as scaling_
from service.fitting.layers import GaussianFitLayer, LinearRegressionLayer
from service.fitting.losses import mse_from_moments, nll_from_moments
from service.fitting.options import (
    CONVERGED_RTOL,
    NO_STOPPING,
    OPTIMIZERS,
    SGD,
    Optimizer,
    OptimizerName,
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
from service.fitting.scaling import IDENTITY, Coordinates, fit_coordinates
from service.fitting.stats import (
    CURVATURE_SIZE,
    AtFit,
    curvature,
    gaussian_stats,
    is_converged,
    linear_stats,
    not_converged,
    weight_summary,
)
from service.fitting.summary import (
    gaussian_moments_numpy,
    gaussian_summary,
    linear_moments_numpy,
    linear_summary,
)

log = logging.getLogger(__name__)

#: Called between chunks: None to go on, "timeout" to stop and return what was reached.
#: Raise :class:`FitCancelled` from it to abandon the fit.
StopCheck = Callable[[], StopReason | None]
#: Called between chunks with (epochs done, loss at the current parameters).
Progress = Callable[[int, float], None]

#: The reference post's Keras ``random_normal`` initializer: mean 0, standard deviation 0.05.
SLOPE_INIT_STDDEV = 0.05
#: The reference post's deliberately-off Gaussian starting point: 0.7·mean(y), 1.3·std(y).
GAUSSIAN_INIT_FACTORS = (0.7, 1.3)

LossFn = Callable[[Any, Any], Any]


#: Carried between chunks: [param0, param1, slot0 (2), slot1 (2), step, best_loss, stall].
#: The slots are the optimizer's (momentum's velocity, Adam's two moments); ``best_loss`` and
#: ``stall`` serve the loss tolerance.
STATE_SIZE = 9
#: [learning_rate, steps, momentum|beta_1, beta_2, epsilon, tolerance, patience,
#: gradient_tolerance]; a negative tolerance disables that criterion. (The update rule and
#: whether the stopping rules run are chosen by the loop variant.)
CONTROLS_SIZE = 8
#: How a chunk ended: still running, non-finite, or the stopping rule that fired.
RUNNING, NON_FINITE, LOSS_TOLERANCE, GRADIENT_TOLERANCE, STEP_TOLERANCE = 0, 1, 2, 3, 4
_STOPS: dict[int, StopReason] = {
    LOSS_TOLERANCE: "loss_tolerance",
    GRADIENT_TOLERANCE: "gradient_tolerance",
    STEP_TOLERANCE: "step_tolerance",
}
_HEAD = STATE_SIZE + 2 + CURVATURE_SIZE
#: Newton's backtracking: at most this many halvings of a step, and Armijo's constant.
MAX_HALVINGS = 60
ARMIJO = 1e-4


def _compile_chunk(
    loss_fn: LossFn,
    summary_size: int,
    chunk: int,
    optimizer: OptimizerName = "sgd",
    stopping: bool = False,
) -> Any:
    """An XLA-compiled loop of up to ``chunk`` epochs of the reference post's GradientTape step on
    ``loss_fn`` with one update rule, and with or without the stopping rules.

    Each variant holds only its own ops (an epoch of plain gradient descent stays a handful of
    fused ops); the numbers they use (learning rate, betas, tolerances) come in ``controls``,
    so one compilation per variant serves every request. Returns one packed vector (one
    device-to-host copy): [state (9), epochs_done, status, final_loss, history (chunk)]. Each
    epoch evaluates the loss and its gradient at the current parameters, stops there if a
    stopping rule holds (no update), and otherwise updates. The loop also stops when the loss
    or the update is non-finite; the state is then the one before the failing update.
    """

    @tf.function(
        jit_compile=True,
        input_signature=[
            tf.TensorSpec([summary_size], tf.float64),  # data summary (+ loss constants)
            tf.TensorSpec([STATE_SIZE], tf.float64),
            tf.TensorSpec([CONTROLS_SIZE], tf.float64),
        ],
    )
    def run(summary: Any, state: Any, controls: Any) -> Any:
        learning_rate, steps = controls[0], tf.cast(controls[1], tf.int32)
        beta_1, beta_2, epsilon = controls[2], controls[3], controls[4]
        tolerance, patience, gradient_tolerance = controls[5], controls[6], controls[7]
        history = tf.TensorArray(tf.float64, size=chunk, element_shape=[])

        def epoch(i: Any, s: Any, history: Any, status: Any) -> Any:
            p = s[0:2]
            if optimizer == "newton":
                at = curvature(loss_fn, p, summary)
                loss, g = at[0], at[1:3]
            else:
                with tf.GradientTape() as tape:
                    tape.watch(p)
                    loss = loss_fn(p, summary)
                g = tape.gradient(loss, p)
            slots, step, best, stall = s[2:6], s[6], s[7], s[8]

            stop = tf.constant(RUNNING)
            if stopping:
                scale = tf.maximum(tf.abs(loss), tf.constant(1.0, tf.float64))
                stall = tf.where((best - loss) > tolerance * scale, 0.0 * stall, stall + 1.0)
                best = tf.minimum(best, loss)
                loss_stop = (tolerance >= 0.0) & (stall >= patience)
                gradient_stop = (gradient_tolerance >= 0.0) & (tf.norm(g) <= gradient_tolerance)
                stop = tf.where(
                    tf.math.is_finite(loss),
                    tf.where(
                        gradient_stop,
                        GRADIENT_TOLERANCE,
                        tf.where(loss_stop, LOSS_TOLERANCE, RUNNING),
                    ),
                    RUNNING,
                )

            if optimizer == "sgd":
                new_p = p - learning_rate * g
            elif optimizer == "momentum":
                velocity = beta_1 * slots[0:2] - learning_rate * g
                new_p = p + velocity
                slots = tf.concat([velocity, slots[2:4]], axis=0)
            elif optimizer == "adam":
                step = step + 1.0
                first = slots[0:2] + (g - slots[0:2]) * (1.0 - beta_1)
                second = slots[2:4] + (g * g - slots[2:4]) * (1.0 - beta_2)
                alpha = learning_rate * tf.sqrt(1.0 - beta_2**step) / (1.0 - beta_1**step)
                new_p = p - alpha * first / (tf.sqrt(second) + epsilon)
                slots = tf.concat([first, second], axis=0)
            else:  # newton
                new_p, final = _newton_update(loss_fn, summary, p, loss, g, at[3:7])
                # The step is taken, then the fit stops: after a quadratic step that small,
                # the parameters are at the optimum to rounding.
                stop = tf.where((stop == RUNNING) & final, STEP_TOLERANCE, stop)

            updated = tf.concat([new_p, slots, tf.stack([step, best, stall])], axis=0)
            finite = tf.math.is_finite(loss) & tf.reduce_all(tf.math.is_finite(updated[0:6]))
            history = history.write(i, loss)
            # A tolerance stop halts before the update; Newton's step-tolerance stop keeps the
            # step just taken (and it counts).
            steps_on = (stop == RUNNING) | (stop == STEP_TOLERANCE)
            status = tf.where(steps_on & ~finite, NON_FINITE, stop)
            new_s = tf.where(steps_on & finite, updated, s)
            return i + tf.where(steps_on, 1, 0), new_s, history, status

        done, state, history, status = tf.while_loop(
            lambda i, s, h, status: (i < steps) & (status == RUNNING),
            epoch,
            [tf.constant(0), state, history, tf.constant(RUNNING)],
        )
        flags = tf.stack([tf.cast(done, tf.float64), tf.cast(status, tf.float64)])
        # On a Newton step-tolerance stop the history holds one entry per step taken.
        at_end = curvature(loss_fn, state[0:2], summary)  # loss, gradient, Hessian
        return tf.concat([state, flags, at_end, history.stack()], axis=0)

    return run


def _newton_update(
    loss_fn: LossFn, summary: Any, p: Any, loss: Any, g: Any, hessian: Any
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
    h = tf.reshape(hessian, [size, size])
    h = 0.5 * (h + tf.transpose(h))
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


#: One compiled loop per (update rule, stopping rules on?).
Variant = tuple[OptimizerName, bool]
VARIANTS: tuple[Variant, ...] = tuple(
    (name, stopping) for name in OPTIMIZERS for stopping in (False, True)
)
DEFAULT_VARIANT: Variant = ("sgd", False)


_VECTOR = tf.TensorSpec([None], tf.float64)


class FitEngine:
    """Fits the reference post's two models; safe to call from many threads at once.

    The layers are templates: their ``add_weight`` variables define the parameters, and the
    compiled loops evaluate them statelessly on loop-carried tensors, so concurrent fits never
    share mutable state.

    Every fit reduces its data to a summary (numpy below ``graph_min_points`` or with
    weights, where a graph call costs more than the whole computation; a graph function
    above), standardizes it unless ``scaling="none"`` (:mod:`service.fitting.scaling`), and
    calls the XLA-compiled loop in chunks. The loop returns the loss, gradient and Hessian
    where it stops, for the statistics; everything is reported in the caller's units.
    """

    def __init__(self, epochs_per_call: int = 4096, graph_min_points: int = 32_768) -> None:
        if epochs_per_call < 1:
            raise ValueError("epochs_per_call must be >= 1")
        self.epochs_per_call = epochs_per_call
        self.graph_min_points = graph_min_points
        self.linear_layer = LinearRegressionLayer(dtype="float64", name="linear")
        self.gaussian_layer = GaussianFitLayer((0.0, 1.0), dtype="float64", name="gaussian")
        # One loop per model and variant; each compiles on its first call (warm_up calls them).
        self._loop_fns = {
            (model, variant): _compile_chunk(loss, size, epochs_per_call, *variant)
            for model, loss, size in (
                ("linear", self._linear_loss, 6),
                ("gaussian", self._gaussian_loss, 4),
            )
            for variant in VARIANTS
        }
        # Fast callers are made on first use: making one traces its function (~0.15 s each).
        self._loops: dict[tuple[str, Variant], Callable[..., Any]] = {}
        self._loops_lock = threading.Lock()
        # The large-data summaries (data in as TensorSpec([None])), traced on first use.
        self._summary_fns = {"linear": linear_summary, "gaussian": gaussian_summary}
        self._summaries: dict[str, Callable[..., Any]] = {}

    # -- losses on loop-carried parameters -------------------------------------------------

    def _linear_loss(self, p: Any, summary: Any) -> Any:
        slope, intercept = p[0:1], p[1:2]
        at_mean, _ = self.linear_layer.stateless_call([slope, intercept], [], summary[1:2])
        return mse_from_moments(at_mean[0], p[0], summary)

    @staticmethod
    def _gaussian_loss(p: Any, summary: Any) -> Any:
        return nll_from_moments(p[0], p[1], summary, summary[3])

    # -- the compiled entry points -----------------------------------------------------------

    def _caller(
        self, callers: dict[Any, Callable[..., Any]], key: Any, fn: Any
    ) -> Callable[..., Any]:
        """The fast caller of ``fn``, made once (making one traces it) under the lock."""
        caller = callers.get(key)
        if caller is None:
            with self._loops_lock:
                if key not in callers:
                    callers[key] = _fast_call(fn)
                caller = callers[key]
        return caller

    def _loop(self, model: str, variant: Variant) -> Callable[..., Any]:
        key = (model, variant)
        return self._caller(self._loops, key, self._loop_fns[key])

    def _moments(
        self,
        model: str,
        in_numpy: Callable[..., npt.NDArray[np.float64]],
        weights: npt.NDArray[np.float64] | None,
        *data: npt.NDArray[np.float64],
    ) -> npt.NDArray[np.float64]:
        """The data's summary: by numpy for small or weighted data (a graph call costs more
        than the whole computation there), else by one graph call for all the points."""
        if weights is not None or data[0].size < self.graph_min_points:
            return in_numpy(*data, weights)
        summarize = self._caller(self._summaries, model, self._summary_fns[model])
        return np.asarray(summarize(*(_vector(v) for v in data)).numpy())

    # -- public API --------------------------------------------------------------------------

    def fit_linear(
        self,
        x: npt.ArrayLike,
        y: npt.ArrayLike,
        *,
        learning_rate: float,
        epochs: int,
        initial: tuple[float, float] | None = None,
        seed: int | None = None,
        weights: npt.ArrayLike | None = None,
        optimizer: Optimizer = SGD,
        stopping: Stopping = NO_STOPPING,
        scaling: Scaling = "standardize",
        history_every: int = 1,
        should_stop: StopCheck | None = None,
        on_progress: Progress | None = None,
        progress_every: int | None = None,
    ) -> FitResult:
        """Fit y = m·x + b by minimizing the (weighted) MSE.

        Without ``initial``, m starts from N(0, 0.05²) drawn with ``seed`` (a fresh seed is
        drawn and reported when none is given) and b from 0, as the reference post's layer
        does: in standardized coordinates by default, in raw units with ``scaling="none"``.
        ``initial`` is in the caller's units. ``weights`` (one per point, >= 0) make the loss
        Σw(y - mx - b)² / Σw. ``on_progress(epochs_done, loss)`` is called after every
        ``progress_every`` epochs (and at the end); ``should_stop`` is checked as often.
        """
        _check_hyperparameters(learning_rate, epochs, initial or (0.0, 0.0), history_every)
        xs, ys = _array(x), _array(y)
        ws = _weights(weights, xs.size)
        summary = self._moments("linear", linear_moments_numpy, ws, xs, ys)
        _check(summary, 3, "x")
        fit_summary, coords = fit_coordinates(scaling, summary, scaling_.linear)
        if initial is None:
            seed = _fresh_seed() if seed is None else seed
            start = (random.Random(seed).gauss(0.0, SLOPE_INIT_STDDEV), 0.0)
        else:
            seed, start = None, coords.to_fit(initial)  # nothing random: no seed to report
        _check(fit_summary, 3, "x", start)
        plan = self._plan(
            "linear",
            learning_rate,
            epochs,
            optimizer,
            stopping,
            coords,
            on_progress,
            should_stop,
            progress_every,
        )
        run = plan.run(fit_summary, start)
        at = AtFit.of(run.curvature, run.params, coords)
        stats = linear_stats(at, summary, weight_summary(ws, xs.size))
        return _result("linear", run, at, stats, stopping, scaling, history_every, seed)

    def fit_gaussian(
        self,
        y: npt.ArrayLike,
        *,
        learning_rate: float,
        epochs: int,
        initial: tuple[float, float] | None = None,
        reduction: Reduction = "mean",
        seed: int | None = None,
        weights: npt.ArrayLike | None = None,
        optimizer: Optimizer = SGD,
        stopping: Stopping = NO_STOPPING,
        scaling: Scaling = "standardize",
        history_every: int = 1,
        should_stop: StopCheck | None = None,
        on_progress: Progress | None = None,
        progress_every: int | None = None,
    ) -> FitResult:
        """Fit N(m, s²) by minimizing the (weighted) negative log-likelihood.

        Nothing here is random: ``seed`` is accepted like the linear fit's, and the result's
        ``seed`` is None.

        ``reduction="sum"`` is the reference post's NLL; ``"mean"`` divides it by N (by Σw
        with weights) so one learning rate suits any N. Without ``initial`` the start is
        (ȳ - 0.3·sd, 1.3·sd): the post's deliberately-off 0.7 and 1.3 factors, measured in
        standard deviations so the start is O(1) away at any scale; with
        ``scaling="none"`` it is the post's own (0.7·ȳ, 1.3·sd). ``initial`` is in the
        caller's units. The returned std is |s| (the NLL depends on s only through s²).
        ``weights`` make the NLL Σ w·nll(y). ``on_progress`` and ``progress_every`` as for
        :meth:`fit_linear`.
        """
        _check_hyperparameters(learning_rate, epochs, initial or (0.0, 1.0), history_every)
        ys = _array(y)
        ws = _weights(weights, ys.size)
        moments = self._moments("gaussian", gaussian_moments_numpy, ws, ys)
        total = moments[0] if ws is None else float(ws.sum())
        summary = np.append(moments, total if reduction == "sum" else 1.0)
        _check(summary, 2, "y")
        fit_summary, coords = fit_coordinates(scaling, summary, scaling_.gaussian)
        if initial is not None:
            start = coords.to_fit(initial)
        elif scaling == "none":
            m_factor, s_factor = GAUSSIAN_INIT_FACTORS
            with np.errstate(over="ignore", invalid="ignore"):
                start = (m_factor * float(summary[1]), s_factor * math.sqrt(summary[2]))
        else:
            start = STANDARDIZED_GAUSSIAN_START
        _check(fit_summary, 2, "y", start)
        plan = self._plan(
            "gaussian",
            learning_rate,
            epochs,
            optimizer,
            stopping,
            coords,
            on_progress,
            should_stop,
            progress_every,
        )
        run = plan.run(fit_summary, start)
        at = AtFit.of(run.curvature, run.params, coords)
        stats = gaussian_stats(at, summary, weight_summary(ws, ys.size))
        # The Gaussian start is deterministic: there is no seed to report.
        return _result("gaussian", run, at, stats, stopping, scaling, history_every, None)

    def _plan(
        self,
        model: str,
        learning_rate: float,
        epochs: int,
        optimizer: Optimizer,
        stopping: Stopping,
        coords: Coordinates,
        on_progress: Progress | None,
        should_stop: StopCheck | None,
        progress_every: int | None,
    ) -> _Plan:
        per_call = min(self.epochs_per_call, progress_every or self.epochs_per_call)
        variant = (optimizer.name, stopping.enabled)
        return _Plan(
            loop=self._loop(model, variant),
            controls=_controls(learning_rate, min(per_call, epochs), optimizer, stopping),
            epochs=epochs,
            coords=coords,
            should_stop=should_stop,
            on_progress=on_progress,
            progress_every=progress_every,
        )

    def warm_up(self, small: bool = True, large: bool = True, variants: bool = True) -> None:
        """Run the compiled functions once so no request pays tracing or XLA compilation:
        the default loop, the large-data summaries, and the loops of the other optimizers
        and of the stopping rules. (Scaling changes only the numbers the loops get.)"""
        rng = np.random.default_rng(0)
        sizes = ([16] if small else []) + ([self.graph_min_points] if large else [])
        x = rng.random(16)
        y = 2.0 * x + 1.0 + rng.normal(0, 0.1, 16)
        for n in sizes:
            x = rng.random(n)
            y = 2.0 * x + 1.0 + rng.normal(0, 0.1, n)
            self.fit_linear(x, y, learning_rate=0.1, epochs=2, seed=0)
            self.fit_gaussian(y, learning_rate=0.1, epochs=2)
        for name, stopping in VARIANTS if variants else ():
            options: dict[str, Any] = {
                "learning_rate": 0.01,
                "epochs": 2,
                "optimizer": Optimizer(name),
                "stopping": Stopping(tolerance=0.0) if stopping else NO_STOPPING,
            }
            self.fit_linear(x[:16], y[:16], seed=0, **options)
            self.fit_gaussian(y[:16], **options)

    def xla_input_signatures(self) -> list[Any]:
        """Input specs of the XLA-compiled functions: fully static, so one compilation serves
        all requests (XLA compiles per input shape, and no other shape can reach them)."""
        return [spec for fn in self._loop_fns.values() for spec in fn.input_signature]

    def trace_counts(self) -> dict[str, int]:
        """How often each compiled function was traced (stays 1 after warm-up)."""
        functions = {f"{model}_summary": fn for model, fn in self._summary_fns.items()}
        for (model, (name, stopping)), fn in self._loop_fns.items():
            functions[f"{model}_loop_{name}" + ("_stopping" if stopping else "")] = fn
        return {name: int(fn.experimental_get_tracing_count()) for name, fn in functions.items()}


#: The default Gaussian start in standardized units: the reference post's deliberately-off
#: factors 0.7 and 1.3, as 0.3 standard deviations below the mean and 1.3 of them wide.
STANDARDIZED_GAUSSIAN_START = (-0.3, 1.3)


@dataclass(frozen=True, slots=True)
class _Plan:
    """How one fit runs: its compiled loop (variant), controls, length, coordinates and
    callbacks. Chunks are at most the first chunk's length (``controls[1]``) and end on
    multiples of ``progress_every``, where progress is reported (and at the end), in the
    caller's units."""

    loop: Callable[..., Any]
    controls: npt.NDArray[np.float64]
    epochs: int
    coords: Coordinates
    should_stop: StopCheck | None
    on_progress: Progress | None
    progress_every: int | None

    def run(self, summary: npt.NDArray[np.float64], start: tuple[float, float]) -> _Run:
        """Run chunks from ``start`` (fit coordinates) until ``epochs`` or a stop, checking
        each chunk's outcome."""
        controls, epochs = self.controls, self.epochs
        learning_rate = float(controls[0])
        per_call = int(controls[1])
        every = self.progress_every or epochs
        should_stop = self.should_stop
        summary_t = _vector(summary)
        chunk = _Chunk(self.loop(summary_t, _initial_state(start), _vector(controls)).numpy())
        pieces: list[npt.NDArray[np.float64]] = []
        stop: StopReason = "max_epochs"
        done_total = 0
        while True:
            if chunk.status == NON_FINITE:
                raise FitDiverged(epoch=done_total + chunk.done, learning_rate=learning_rate)
            pieces.append(chunk.history)
            done_total += chunk.done
            rule = _STOPS.get(chunk.status)
            if rule is not None:
                stop = rule
            ending = rule is not None or done_total >= epochs
            if not ending and should_stop is not None and (reason := should_stop()) is not None:
                stop, ending = reason, True
            if self.on_progress is not None and (ending or done_total % every == 0):
                self.on_progress(done_total, self.coords.loss(chunk.final))
            if ending:
                break
            controls = controls.copy()
            controls[1] = min(per_call, epochs - done_total, every - done_total % every)
            chunk = _Chunk(self.loop(summary_t, _vector(chunk.state), _vector(controls)).numpy())
        final_loss = chunk.final
        if not math.isfinite(final_loss):
            raise FitDiverged(epoch=done_total, learning_rate=learning_rate)
        history = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        if history.size:
            check_descended(history, final_loss, learning_rate, self.coords)
        return _Run(
            (float(chunk.params[0]), float(chunk.params[1])),
            history,
            final_loss,
            done_total,
            stop,
            chunk.curvature,
        )


@dataclass(frozen=True, slots=True)
class _Run:
    """What the driver reached, in fit coordinates: parameters, full loss history, final
    loss, updates, why it stopped, and the loss, gradient and Hessian at the parameters."""

    params: tuple[float, float]
    history: npt.NDArray[np.float64]
    final_loss: float
    epochs_run: int
    stop: StopReason
    curvature: npt.NDArray[np.float64]


def _result(
    model: ModelName,
    run: _Run,
    at: AtFit,
    stats: FitStats,
    stopping: Stopping,
    scaling: Scaling,
    history_every: int,
    seed: int | None,
) -> FitResult:
    coords = at.coords
    converged = is_converged(at, stopping.gradient_tolerance)
    fitted = coords.from_fit(run.params)
    if model == "gaussian":
        fitted = (fitted[0], abs(fitted[1]))
    return FitResult(
        model=model,
        params=dict(zip(stats.names, fitted, strict=True)),
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
    """Call the single concrete function of ``function`` with tensors, skipping argument
    binding (~0.3 ms a call, more than a small fit's whole compute).

    ``_call_flat`` is TensorFlow's internal entry point behind ``ConcreteFunction.__call__``
    (private API). If a TensorFlow version lacks it, the public call is used (same results,
    slower) with a warning, and ``tests/fitting/test_engine.py`` fails, so an upgrade cannot
    lose the speed silently.
    """
    concrete = function.get_concrete_function()
    call_flat = getattr(concrete, "_call_flat", None)
    if call_flat is None:
        log.warning("ConcreteFunction._call_flat is gone: compiled calls take the slow path")
        return concrete  # type: ignore[no-any-return]
    captured = concrete.captured_inputs

    def call(*args: Any) -> Any:
        return call_flat(list(args), captured)

    return call


class _Chunk:
    """A chunk's packed output: [state (9), epochs_done, status, curvature (7), history]."""

    def __init__(self, values: npt.NDArray[np.float64]) -> None:
        self.state = values[0:STATE_SIZE]
        self.params = values[0:2]
        self.done = int(values[STATE_SIZE])
        self.status = int(values[STATE_SIZE + 1])
        self.curvature = values[STATE_SIZE + 2 : _HEAD].copy()
        self.final = float(self.curvature[0])
        # A copy, not a view: a view would keep the whole chunk-sized buffer alive, and a
        # fit of many short chunks (progress every epoch) would hold gigabytes.
        self.history = values[_HEAD : _HEAD + self.done].copy()


def _controls(
    learning_rate: float, steps: int, optimizer: Optimizer, stopping: Stopping
) -> npt.NDArray[np.float64]:
    def disabled_if_none(value: float | None) -> float:
        return -1.0 if value is None else value

    return np.array(
        [
            learning_rate,
            steps,
            optimizer.first_rate,
            optimizer.beta_2,
            optimizer.epsilon,
            disabled_if_none(stopping.tolerance),
            stopping.patience,
            disabled_if_none(stopping.gradient_tolerance),
        ],
        dtype=np.float64,
    )


def _initial_state(params: tuple[float, float]) -> Any:
    """Parameters, empty optimizer slots, step 0, best loss +inf, no stall."""
    return _vector((*params, 0.0, 0.0, 0.0, 0.0, 0.0, math.inf, 0.0))


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
    return tf.constant(_array(values))


_CONSTANT = {
    "x": "all x values are equal (or so close that their variance underflows float64): "
    "the slope is not determined",
    "y": "all y values are equal (or so close that their variance underflows float64): "
    "the standard deviation is zero",
}


def unusable(
    summary: npt.NDArray[np.float64], spread: int, what: str, initial: npt.ArrayLike = ()
) -> DegenerateData | None:
    """Why data with this summary cannot be fitted (``summary[spread]`` is the variance that
    must be positive), or None. Shared by single and batch fits."""
    if not (np.all(np.isfinite(summary)) and np.all(np.isfinite(initial))):
        return DegenerateData(
            "the data are too large in magnitude: their mean or variance overflows float64; "
            "rescale them"
        )
    if not summary[spread] > 0.0:
        return DegenerateData(_CONSTANT[what])
    return None


def _check(
    summary: npt.NDArray[np.float64], spread: int, what: str, initial: npt.ArrayLike = ()
) -> None:
    if (error := unusable(summary, spread, what, initial)) is not None:
        raise error


def _check_hyperparameters(
    learning_rate: float, epochs: int, initial: tuple[float, float], history_every: int
) -> None:
    if history_every < 1:
        raise ValueError("history_every must be >= 1")
    if epochs < 1:
        raise ValueError("epochs must be >= 1")
    if not (math.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError("learning_rate must be a positive finite number")
    if not all(math.isfinite(v) for v in initial):
        raise ValueError("initial values must be finite")


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


__all__ = ["FitEngine", "ModelName", "Progress", "Reduction", "StopCheck"]
