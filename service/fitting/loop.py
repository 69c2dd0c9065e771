"""The compiled custom training loop.

Each model gets one XLA-compiled ``tf.function`` that runs up to ``epochs_per_call`` epochs of
the seed's step (``GradientTape`` -> ``tape.gradient`` -> update) on loop-carried parameter
tensors. The data enter once, through :mod:`service.fitting.summary`, so every shape inside
the loop is fixed: one trace and one XLA compilation serve every n, epoch count and learning
rate. A driver calls the compiled chunk until the epochs are done, checking between calls
whether the caller wants it to stop (deadline, disconnect).
"""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import tensorflow as tf

from service.fitting.layers import GaussianFitLayer, LinearRegressionLayer
from service.fitting.losses import mse_from_moments, nll_from_moments
from service.fitting.options import (
    CONVERGED_RTOL,
    NO_STOPPING,
    OPTIMIZERS,
    SGD,
    Optimizer,
    OptimizerName,
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
from service.fitting.stats import (
    CURVATURE_SIZE,
    curvature,
    gaussian_stats,
    linear_stats,
    weight_summary,
)
from service.fitting.summary import (
    gaussian_moments,
    gaussian_moments_numpy,
    linear_moments,
    linear_moments_numpy,
)

Reduction = Literal["sum", "mean"]
#: Called between chunks: None to go on, "timeout" to stop and return what was reached.
#: Raise :class:`FitCancelled` from it to abandon the fit.
StopCheck = Callable[[], StopReason | None]
#: Called between chunks with (epochs done, loss at the current parameters).
Progress = Callable[[int, float], None]

#: The seed's Keras ``random_normal`` initializer: mean 0, standard deviation 0.05.
SLOPE_INIT_STDDEV = 0.05
#: The seed's deliberately-off Gaussian starting point: 0.7·mean(y), 1.3·std(y).
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
#: How a chunk ended.
RUNNING, CONVERGED, NON_FINITE = 0, 1, 2
_HEAD = STATE_SIZE + 2 + CURVATURE_SIZE


def _compile_chunk(
    loss_fn: LossFn,
    summary_size: int,
    chunk: int,
    optimizer: OptimizerName = "sgd",
    stopping: bool = False,
) -> Any:
    """An XLA-compiled loop of up to ``chunk`` epochs of the seed's GradientTape step on
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
            with tf.GradientTape() as tape:
                tape.watch(p)
                loss = loss_fn(p, summary)
            g = tape.gradient(loss, p)
            slots, step, best, stall = s[2:6], s[6], s[7], s[8]

            converged = tf.constant(False)
            if stopping:
                scale = tf.maximum(tf.abs(loss), tf.constant(1.0, tf.float64))
                stall = tf.where((best - loss) > tolerance * scale, 0.0 * stall, stall + 1.0)
                best = tf.minimum(best, loss)
                converged = tf.math.is_finite(loss) & (
                    ((tolerance >= 0.0) & (stall >= patience))
                    | ((gradient_tolerance >= 0.0) & (tf.norm(g) <= gradient_tolerance))
                )

            if optimizer == "sgd":
                new_p = p - learning_rate * g
            elif optimizer == "momentum":
                velocity = beta_1 * slots[0:2] - learning_rate * g
                new_p = p + velocity
                slots = tf.concat([velocity, slots[2:4]], axis=0)
            else:  # adam
                step = step + 1.0
                first = slots[0:2] + (g - slots[0:2]) * (1.0 - beta_1)
                second = slots[2:4] + (g * g - slots[2:4]) * (1.0 - beta_2)
                alpha = learning_rate * tf.sqrt(1.0 - beta_2**step) / (1.0 - beta_1**step)
                new_p = p - alpha * first / (tf.sqrt(second) + epsilon)
                slots = tf.concat([first, second], axis=0)

            updated = tf.concat([new_p, slots, tf.stack([step, best, stall])], axis=0)
            finite = tf.math.is_finite(loss) & tf.reduce_all(tf.math.is_finite(updated[0:6]))
            history = history.write(i, loss)
            status = tf.where(converged, CONVERGED, tf.where(finite, RUNNING, NON_FINITE))
            go_on = finite & ~converged
            return i + tf.where(converged, 0, 1), tf.where(go_on, updated, s), history, status

        done, state, history, status = tf.while_loop(
            lambda i, s, h, status: (i < steps) & (status == RUNNING),
            epoch,
            [tf.constant(0), state, history, tf.constant(RUNNING)],
        )
        flags = tf.stack([tf.cast(done, tf.float64), tf.cast(status, tf.float64)])
        at_end = curvature(loss_fn, state[0:2], summary)  # loss, gradient, Hessian
        return tf.concat([state, flags, at_end, history.stack()], axis=0)

    return run


#: One compiled loop per (update rule, stopping rules on?).
Variant = tuple[OptimizerName, bool]
VARIANTS: tuple[Variant, ...] = tuple(
    (name, stopping) for name in OPTIMIZERS for stopping in (False, True)
)
DEFAULT_VARIANT: Variant = ("sgd", False)


_VECTOR = tf.TensorSpec([None], tf.float64)
_STATE = tf.TensorSpec([STATE_SIZE], tf.float64)
_CONTROLS = tf.TensorSpec([CONTROLS_SIZE], tf.float64)


class FitEngine:
    """Fits the seed's two models; safe to call from many threads at once.

    The layers are templates: their ``add_weight`` variables define the parameters, and the
    compiled loops evaluate them statelessly on loop-carried tensors, so concurrent fits never
    share mutable state.

    A fit of large data makes one call of a "start" function (data in as
    ``TensorSpec([None])``: the summary, the initial values and the first chunk of epochs, in
    one graph); below ``graph_min_points``, or with weights, the same summary comes from numpy
    (a graph call costs more than the whole computation there) and the XLA-compiled loop is
    called directly. Long fits call the loop again for further chunks. Every fit ends with one
    call of a compiled curvature function (loss, gradient and Hessian by nested tapes) for its
    statistics.
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
        self._linear_fn = self._loop_fns["linear", DEFAULT_VARIANT]
        self._gaussian_fn = self._loop_fns["gaussian", DEFAULT_VARIANT]
        self._linear_start_fn = self._build_linear_start()
        self._gaussian_start_fn = self._build_gaussian_start()
        # The large-data entry points are traced on first use (or by warm_up): a fresh
        # process becomes ready on the small-data path alone.
        self._starts: dict[str, Callable[..., Any]] = {}
        self._starts_lock = threading.Lock()

    # -- losses on loop-carried parameters -------------------------------------------------

    def _linear_loss(self, p: Any, summary: Any) -> Any:
        slope, intercept = p[0:1], p[1:2]
        at_mean, _ = self.linear_layer.stateless_call([slope, intercept], [], summary[1:2])
        return mse_from_moments(at_mean[0], p[0], summary)

    @staticmethod
    def _gaussian_loss(p: Any, summary: Any) -> Any:
        return nll_from_moments(p[0], p[1], summary, summary[3])

    # -- the compiled entry points -----------------------------------------------------------

    def _loop(self, model: str, variant: Variant) -> Callable[..., Any]:
        key = (model, variant)
        loop = self._loops.get(key)
        if loop is None:
            with self._loops_lock:
                if key not in self._loops:
                    self._loops[key] = _fast_call(self._loop_fns[key])
                loop = self._loops[key]
        return loop

    def _start(self, model: str) -> Callable[..., Any]:
        start = self._starts.get(model)
        if start is None:
            with self._starts_lock:
                if model not in self._starts:
                    fn = self._linear_start_fn if model == "linear" else self._gaussian_start_fn
                    self._starts[model] = _fast_call(fn)
                start = self._starts[model]
        return start

    def _build_linear_start(self) -> Any:
        chunk = self._linear_fn

        @tf.function(input_signature=[_VECTOR, _VECTOR, _STATE, _CONTROLS])
        def start(x: Any, y: Any, state: Any, controls: Any) -> Any:
            summary = linear_moments(x, y)
            usable = tf.reduce_all(tf.math.is_finite(summary)) & (summary[3] > 0.0)
            return tf.concat([summary, chunk(summary, state, _only_if(usable, controls))], 0)

        return start

    def _build_gaussian_start(self) -> Any:
        chunk = self._gaussian_fn
        m_factor, s_factor = GAUSSIAN_INIT_FACTORS

        @tf.function(input_signature=[_VECTOR, _STATE, _CONTROLS, tf.TensorSpec([2], tf.float64)])
        def start(y: Any, state: Any, controls: Any, flags: Any) -> Any:
            """flags = [seed_start, summed], 0/1: start from the seed's (0.7·mean, 1.3·std),
            use the summed NLL."""
            seed_start, summed = flags[0] > 0.5, flags[1] > 0.5
            moments = gaussian_moments(y)
            scale = tf.where(summed, moments[0], tf.constant(1.0, tf.float64))
            summary = tf.concat([moments, tf.reshape(scale, [1])], axis=0)
            seed_values = tf.stack([m_factor * moments[1], s_factor * tf.sqrt(moments[2])])
            state = tf.concat([tf.where(seed_start, seed_values, state[0:2]), state[2:]], 0)
            usable = (
                tf.reduce_all(tf.math.is_finite(summary))
                & tf.reduce_all(tf.math.is_finite(state[0:2]))
                & (moments[2] > 0.0)
            )
            return tf.concat([summary, chunk(summary, state, _only_if(usable, controls))], 0)

        return start

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
        history_every: int = 1,
        should_stop: StopCheck | None = None,
        on_progress: Progress | None = None,
        progress_every: int | None = None,
    ) -> FitResult:
        """Fit y = m·x + b by minimizing the (weighted) MSE.

        Without ``initial``, m starts from N(0, 0.05²) drawn with ``seed`` (a fresh seed is
        drawn and reported when none is given) and b from 0, as the seed's layer does.
        ``weights`` (one per point, >= 0) make the loss Σw(y - mx - b)² / Σw.
        ``on_progress(epochs_done, loss)`` is called after every ``progress_every`` epochs
        (and at the end); ``should_stop`` is checked as often.
        """
        if initial is None:
            seed = _fresh_seed() if seed is None else seed
            initial = (random.Random(seed).gauss(0.0, SLOPE_INIT_STDDEV), 0.0)
        _check_hyperparameters(learning_rate, epochs, initial, history_every)
        xs, ys = _array(x), _array(y)
        ws = _weights(weights, xs.size)
        plan = self._plan(
            "linear",
            learning_rate,
            epochs,
            optimizer,
            stopping,
            should_stop,
            on_progress,
            progress_every,
        )
        state = _initial_state(initial)
        if ws is not None or xs.size < self.graph_min_points:
            summary = linear_moments_numpy(xs, ys, ws)
            _check(summary, 3, "x")
            first = plan.first(summary, state)
        else:
            start = self._start("linear")
            values = start(_vector(xs), _vector(ys), state, plan.start_controls()).numpy()
            summary = values[:6]
            _check(summary, 3, "x")
            first = plan.after_start(summary, _Chunk(values[6:]))
        run = plan.run(summary, first)
        stats = linear_stats(run.curvature, summary, weight_summary(ws, xs.size), run.params)
        return _result("linear", ("slope", "intercept"), run, stats, stopping, history_every, seed)

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
        history_every: int = 1,
        should_stop: StopCheck | None = None,
        on_progress: Progress | None = None,
        progress_every: int | None = None,
    ) -> FitResult:
        """Fit N(m, s²) by minimizing the (weighted) negative log-likelihood.

        ``reduction="sum"`` is the seed's NLL; ``"mean"`` divides it by N (by Σw with weights)
        so one learning rate suits any N. Without ``initial`` the start is
        (0.7·mean(y), 1.3·std(y)), as in the seed. The returned std is |s| (the NLL depends on
        s only through s²). ``weights`` make the NLL Σ w·nll(y). ``on_progress`` and
        ``progress_every`` as for :meth:`fit_linear`.
        """
        _check_hyperparameters(learning_rate, epochs, initial or (0.0, 1.0), history_every)
        plan = self._plan(
            "gaussian",
            learning_rate,
            epochs,
            optimizer,
            stopping,
            should_stop,
            on_progress,
            progress_every,
        )
        m0, s0 = initial or (0.0, 1.0)
        ys = _array(y)
        ws = _weights(weights, ys.size)
        if ws is not None or ys.size < self.graph_min_points:
            moments = gaussian_moments_numpy(ys, ws)
            total = moments[0] if ws is None else float(ws.sum())
            summary = np.append(moments, total if reduction == "sum" else 1.0)
            if initial is None:
                m_factor, s_factor = GAUSSIAN_INIT_FACTORS
                with np.errstate(over="ignore", invalid="ignore"):
                    m0, s0 = m_factor * summary[1], s_factor * np.sqrt(summary[2])
            _check(summary, 2, "y", (m0, s0))
            first = plan.first(summary, _initial_state((m0, s0)))
        else:
            flags = _vector((float(initial is None), float(reduction == "sum")))
            start = self._start("gaussian")
            state = _initial_state((m0, s0))
            values = start(_vector(ys), state, plan.start_controls(), flags).numpy()
            summary = values[:4]
            _check(summary, 2, "y", values[4:6])
            first = plan.after_start(summary, _Chunk(values[4:]))
        run = plan.run(summary, first)
        stats = gaussian_stats(run.curvature, summary, weight_summary(ws, ys.size), run.params)
        run.params[1] = abs(run.params[1])
        return _result("gaussian", ("mean", "std"), run, stats, stopping, history_every, seed)

    def _plan(
        self,
        model: str,
        learning_rate: float,
        epochs: int,
        optimizer: Optimizer,
        stopping: Stopping,
        should_stop: StopCheck | None,
        on_progress: Progress | None,
        progress_every: int | None,
    ) -> _Plan:
        per_call = min(self.epochs_per_call, progress_every or self.epochs_per_call)
        variant = (optimizer.name, stopping.enabled)
        return _Plan(
            loop=self._loop(model, variant),
            variant=variant,
            controls=_controls(learning_rate, min(per_call, epochs), optimizer, stopping),
            epochs=epochs,
            should_stop=should_stop,
            on_progress=on_progress,
            progress_every=progress_every,
        )

    def warm_up(self, small: bool = True, large: bool = True, variants: bool = True) -> None:
        """Run the compiled functions once so no request pays tracing or XLA compilation:
        the small-data path (numpy moments, default loop, curvature), the large-data entry
        points, and the loops of the other optimizers and of the stopping rules."""
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
        functions = {
            "linear_start": self._linear_start_fn,
            "gaussian_start": self._gaussian_start_fn,
        }
        for (model, (name, stopping)), fn in self._loop_fns.items():
            functions[f"{model}_loop_{name}" + ("_stopping" if stopping else "")] = fn
        return {name: int(fn.experimental_get_tracing_count()) for name, fn in functions.items()}


@dataclass(frozen=True, slots=True)
class _Plan:
    """How one fit runs: its compiled loop (variant), controls, length and callbacks. Chunks
    are at most the first chunk's length (``controls[1]``) and end on multiples of
    ``progress_every``, where progress is reported (and at the end)."""

    loop: Callable[..., Any]
    variant: Variant
    controls: npt.NDArray[np.float64]
    epochs: int
    should_stop: StopCheck | None
    on_progress: Progress | None
    progress_every: int | None

    def first(self, summary: npt.NDArray[np.float64], state: Any) -> _Chunk:
        """The first chunk, from the summary numpy computed (small or weighted data)."""
        return _Chunk(self.loop(_vector(summary), state, _vector(self.controls)).numpy())

    def start_controls(self) -> Any:
        """Controls for a start function, whose built-in first chunk is the default loop's:
        other variants take no epochs there."""
        if self.variant == DEFAULT_VARIANT:
            return _vector(self.controls)
        idle = self.controls.copy()
        idle[1] = 0
        return _vector(idle)

    def after_start(self, summary: npt.NDArray[np.float64], started: _Chunk) -> _Chunk:
        """The first chunk of a large fit: the start function ran it with the default loop,
        or, for another variant, ran no epochs and left the initial state for this loop."""
        if self.variant == DEFAULT_VARIANT:
            return started
        return _Chunk(
            self.loop(_vector(summary), _vector(started.state), _vector(self.controls)).numpy()
        )

    def run(self, summary: npt.NDArray[np.float64], first: _Chunk) -> _Run:
        """Check each chunk's outcome and run further chunks until ``epochs`` or a stop."""
        controls, epochs = self.controls, self.epochs
        learning_rate = float(controls[0])
        per_call = int(controls[1])
        every = self.progress_every or epochs
        should_stop = self.should_stop
        chunk = first
        pieces: list[npt.NDArray[np.float64]] = []
        stop: StopReason = "max_epochs"
        done_total = 0
        summary_t = None
        while True:
            if chunk.status == NON_FINITE:
                raise FitDiverged(epoch=done_total + chunk.done, learning_rate=learning_rate)
            pieces.append(chunk.history)
            done_total += chunk.done
            if chunk.status == CONVERGED:
                stop = "converged"
            ending = stop == "converged" or done_total >= epochs
            if not ending and should_stop is not None and (reason := should_stop()) is not None:
                stop, ending = reason, True
            if self.on_progress is not None and (ending or done_total % every == 0):
                self.on_progress(done_total, chunk.final)
            if ending:
                break
            if summary_t is None:
                summary_t = _vector(summary)
            controls = controls.copy()
            controls[1] = min(per_call, epochs - done_total, every - done_total % every)
            chunk = _Chunk(self.loop(summary_t, _vector(chunk.state), _vector(controls)).numpy())
        final_loss = chunk.final
        if not math.isfinite(final_loss):
            raise FitDiverged(epoch=done_total, learning_rate=learning_rate)
        history = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        if history.size:
            check_descended(history, final_loss, learning_rate)
        return _Run(
            [float(v) for v in chunk.params], history, final_loss, done_total, stop, chunk.curvature
        )


def is_converged(stats: FitStats, params: list[float], stopping: Stopping) -> bool:
    """At the optimum: the Newton step to it is within CONVERGED_RTOL of the parameters, or
    the gradient is within the caller's gradient_tolerance. (A loss-tolerance stop alone is
    not enough: an oscillating optimizer can stall far from the optimum.)"""
    tolerance = stopping.gradient_tolerance
    gradient_norm = stats.gradient_norm
    if tolerance is not None and gradient_norm is not None and gradient_norm <= tolerance:
        return True
    scale = max(1.0, math.hypot(*params))
    return stats.newton_step is not None and stats.newton_step <= CONVERGED_RTOL * scale


class _Run:
    """What the driver reached: parameters, full loss history, final loss, updates, why, and
    the loss, gradient and Hessian at the parameters."""

    __slots__ = ("curvature", "epochs_run", "final_loss", "history", "params", "stop")

    def __init__(
        self,
        params: list[float],
        history: npt.NDArray[np.float64],
        final_loss: float,
        epochs_run: int,
        stop: StopReason,
        curvature: npt.NDArray[np.float64],
    ) -> None:
        self.curvature = curvature
        self.params = params
        self.history = history
        self.final_loss = final_loss
        self.epochs_run = epochs_run
        self.stop = stop


def _result(
    model: ModelName,
    names: tuple[str, str],
    run: _Run,
    stats: FitStats,
    stopping: Stopping,
    history_every: int,
    seed: int | None,
) -> FitResult:
    converged = is_converged(stats, run.params, stopping)
    return FitResult(
        model=model,
        params=dict(zip(names, run.params, strict=True)),
        loss_history=run.history[::history_every],
        final_loss=run.final_loss,
        epochs_run=run.epochs_run,
        n=stats.n,
        stop_reason=run.stop,
        converged=converged,
        history_every=history_every,
        stats=stats,
        seed=seed,
    )


def _fast_call(function: Any) -> Callable[..., Any]:
    """Call the single concrete function of ``function`` with tensors, skipping argument
    binding (~0.3 ms a call, more than a small fit's whole compute).

    ``_call_flat`` is TensorFlow's internal entry point behind ``ConcreteFunction.__call__``;
    if a TensorFlow version lacks it, the public call is used (same results, slower).
    """
    concrete = function.get_concrete_function()
    call_flat = getattr(concrete, "_call_flat", None)
    if call_flat is None:  # pragma: no cover - depends on the TensorFlow version
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
        self.curvature = values[STATE_SIZE + 2 : _HEAD]
        self.final = float(self.curvature[0])
        self.history = values[_HEAD : _HEAD + self.done]


def _only_if(condition: Any, controls: Any) -> Any:
    """``controls`` with zero steps unless ``condition``."""
    steps = tf.where(condition, controls[1], tf.zeros_like(controls[1]))
    return tf.concat([controls[0:1], tf.reshape(steps, [1]), controls[2:]], axis=0)


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
    history: npt.NDArray[np.float64], final_loss: float, learning_rate: float
) -> None:
    """Gradient descent that ends above its starting loss has overshot, however finite.

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
        reason=f"the loss rose above its starting value {start:.6g} and ended at {final_loss:.6g}",
    )


__all__ = ["FitEngine", "ModelName", "Progress", "Reduction", "StopCheck"]
