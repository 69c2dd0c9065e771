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
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import tensorflow as tf

from service.fitting.layers import GaussianFitLayer, LinearRegressionLayer
from service.fitting.losses import mse_from_moments, nll_from_moments
from service.fitting.results import (
    DegenerateData,
    FitDiverged,
    FitResult,
    ModelName,
    StopReason,
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

#: The seed's Keras ``random_normal`` initializer: mean 0, standard deviation 0.05.
SLOPE_INIT_STDDEV = 0.05
#: The seed's deliberately-off Gaussian starting point: 0.7·mean(y), 1.3·std(y).
GAUSSIAN_INIT_FACTORS = (0.7, 1.3)

LossFn = Callable[[Any, Any], Any]


def _compile_chunk(loss_fn: LossFn, summary_size: int, chunk: int) -> Any:
    """An XLA-compiled loop of up to ``chunk`` gradient-descent epochs on ``loss_fn``.

    ``controls`` = [param0, param1, learning_rate, epochs (<= chunk)]. Returns one packed
    vector (one device-to-host copy): [param0, param1, epochs_done, finite, final_loss,
    history(chunk)]. The loop stops early when the loss or the updated parameters are
    non-finite; the parameters are then those before the failing update.
    """

    @tf.function(
        jit_compile=True,
        input_signature=[
            tf.TensorSpec([summary_size], tf.float64),  # data summary (+ loss constants)
            tf.TensorSpec([4], tf.float64),  # controls
        ],
    )
    def run(summary: Any, controls: Any) -> Any:
        params, learning_rate = controls[0:2], controls[2]
        steps = tf.cast(controls[3], tf.int32)
        history = tf.TensorArray(tf.float64, size=chunk, element_shape=[])

        def epoch(i: Any, p: Any, history: Any, finite: Any) -> Any:
            with tf.GradientTape() as tape:
                tape.watch(p)
                loss = loss_fn(p, summary)
            gradients = tape.gradient(loss, p)
            updated = p - learning_rate * gradients
            finite = tf.math.is_finite(loss) & tf.reduce_all(tf.math.is_finite(updated))
            history = history.write(i, loss)
            return i + 1, tf.where(finite, updated, p), history, finite

        done, params, history, finite = tf.while_loop(
            lambda i, p, h, finite: (i < steps) & finite,
            epoch,
            [tf.constant(0), params, history, tf.constant(True)],
        )
        flags = tf.stack(
            [tf.cast(done, tf.float64), tf.cast(finite, tf.float64), loss_fn(params, summary)]
        )
        return tf.concat([params, flags, history.stack()], axis=0)

    return run


_VECTOR = tf.TensorSpec([None], tf.float64)
_CONTROLS = tf.TensorSpec([None], tf.float64)


def _steps(value: Any) -> Any:
    return tf.cast(value, tf.int32)


class FitEngine:
    """Fits the seed's two models; safe to call from many threads at once.

    The layers are templates: their ``add_weight`` variables define the parameters, and the
    compiled loops evaluate them statelessly on loop-carried tensors, so concurrent fits never
    share mutable state.

    A fit of large data makes one call of a "start" function (data in as
    ``TensorSpec([None])``: the summary, the initial values and the first chunk of epochs, in
    one graph); below ``graph_min_points`` the same summary comes from numpy (a graph call
    costs more than the whole computation there) and the XLA-compiled loop is called
    directly. Long fits call the loop again for further chunks.
    """

    def __init__(self, epochs_per_call: int = 4096, graph_min_points: int = 32_768) -> None:
        if epochs_per_call < 1:
            raise ValueError("epochs_per_call must be >= 1")
        self.epochs_per_call = epochs_per_call
        self.graph_min_points = graph_min_points
        self.linear_layer = LinearRegressionLayer(dtype="float64", name="linear")
        self.gaussian_layer = GaussianFitLayer((0.0, 1.0), dtype="float64", name="gaussian")
        self._linear_fn = _compile_chunk(self._linear_loss, 6, epochs_per_call)
        self._gaussian_fn = _compile_chunk(self._gaussian_loss, 4, epochs_per_call)
        self._linear_start_fn = self._build_linear_start()
        self._gaussian_start_fn = self._build_gaussian_start()
        self._linear_chunk = _fast_call(self._linear_fn)
        self._gaussian_chunk = _fast_call(self._gaussian_fn)
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

        @tf.function(input_signature=[_VECTOR, _VECTOR, _CONTROLS])
        def start(x: Any, y: Any, controls: Any) -> Any:
            """controls = [slope0, intercept0, learning_rate, steps]."""
            params, learning_rate, steps = controls[0:2], controls[2], _steps(controls[3])
            summary = linear_moments(x, y)
            usable = tf.reduce_all(tf.math.is_finite(summary)) & (summary[3] > 0.0)
            return _start_outputs(chunk, summary, params, learning_rate, _only_if(usable, steps))

        return start

    def _build_gaussian_start(self) -> Any:
        chunk = self._gaussian_fn
        m_factor, s_factor = GAUSSIAN_INIT_FACTORS

        @tf.function(input_signature=[_VECTOR, _CONTROLS])
        def start(y: Any, controls: Any) -> Any:
            """controls = [mean0, std0, learning_rate, steps, seed_start, summed]; the last two
            are 0/1 flags: start from the seed's (0.7·mean, 1.3·std), use the summed NLL."""
            params, learning_rate, steps = controls[0:2], controls[2], _steps(controls[3])
            seed_start, summed = controls[4] > 0.5, controls[5] > 0.5
            moments = gaussian_moments(y)
            scale = tf.where(summed, moments[0], tf.constant(1.0, tf.float64))
            summary = tf.concat([moments, tf.reshape(scale, [1])], axis=0)
            seed_values = tf.stack([m_factor * moments[1], s_factor * tf.sqrt(moments[2])])
            params = tf.where(seed_start, seed_values, params)
            usable = (
                tf.reduce_all(tf.math.is_finite(summary))
                & tf.reduce_all(tf.math.is_finite(params))
                & (moments[2] > 0.0)
            )
            return _start_outputs(chunk, summary, params, learning_rate, _only_if(usable, steps))

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
        should_stop: StopCheck | None = None,
    ) -> FitResult:
        """Fit y = m·x + b by gradient descent on the MSE.

        Without ``initial``, m starts from N(0, 0.05²) drawn with ``seed`` (a fresh seed is
        drawn and reported when none is given) and b from 0, as the seed's layer does.
        """
        if initial is None:
            seed = _fresh_seed() if seed is None else seed
            initial = (random.Random(seed).gauss(0.0, SLOPE_INIT_STDDEV), 0.0)
        _check_hyperparameters(learning_rate, epochs, initial)
        steps = min(self.epochs_per_call, epochs)
        xs, ys = _array(x), _array(y)
        controls = _vector((*initial, learning_rate, steps))
        if xs.size < self.graph_min_points:
            summary = linear_moments_numpy(xs, ys)
            _check(summary, 3, "x")
            first = _Chunk(self._linear_chunk(_vector(summary), controls).numpy())
        else:
            start = self._start("linear")
            values = start(_vector(xs), _vector(ys), controls).numpy()
            summary = values[:6]
            _check(summary, 3, "x")
            first = _Chunk(values[6:])
        params, history, final_loss, epochs_run, stop = self._continue(
            self._linear_chunk, summary, first, learning_rate, epochs, should_stop
        )
        return FitResult(
            model="linear",
            params={"slope": params[0], "intercept": params[1]},
            loss_history=history,
            final_loss=final_loss,
            epochs_run=epochs_run,
            n=int(summary[0]),
            stop_reason=stop,
            seed=seed,
        )

    def fit_gaussian(
        self,
        y: npt.ArrayLike,
        *,
        learning_rate: float,
        epochs: int,
        initial: tuple[float, float] | None = None,
        reduction: Reduction = "mean",
        seed: int | None = None,
        should_stop: StopCheck | None = None,
    ) -> FitResult:
        """Fit N(m, s²) by gradient descent on the negative log-likelihood.

        ``reduction="sum"`` is the seed's NLL; ``"mean"`` divides it by N so one learning rate
        suits any N. Without ``initial`` the start is (0.7·mean(y), 1.3·std(y)), as in the
        seed. The returned std is |s| (the NLL depends on s only through s²).
        """
        _check_hyperparameters(learning_rate, epochs, initial or (0.0, 1.0))
        steps = min(self.epochs_per_call, epochs)
        m0, s0 = initial or (0.0, 1.0)
        flags = (float(initial is None), float(reduction == "sum"))
        ys = _array(y)
        if ys.size < self.graph_min_points:
            summary = np.append(gaussian_moments_numpy(ys), ys.size if reduction == "sum" else 1.0)
            if initial is None:
                m_factor, s_factor = GAUSSIAN_INIT_FACTORS
                with np.errstate(over="ignore", invalid="ignore"):
                    m0, s0 = m_factor * summary[1], s_factor * np.sqrt(summary[2])
            _check(summary, 2, "y", (m0, s0))
            controls = _vector((m0, s0, learning_rate, steps))
            first = _Chunk(self._gaussian_chunk(_vector(summary), controls).numpy())
        else:
            controls = _vector((m0, s0, learning_rate, steps, *flags))
            values = self._start("gaussian")(_vector(ys), controls).numpy()
            summary = values[:4]
            first = _Chunk(values[4:])
            _check(summary, 2, "y", first.params)
        params, history, final_loss, epochs_run, stop = self._continue(
            self._gaussian_chunk, summary, first, learning_rate, epochs, should_stop
        )
        return FitResult(
            model="gaussian",
            params={"mean": params[0], "std": abs(params[1])},
            loss_history=history,
            final_loss=final_loss,
            epochs_run=epochs_run,
            n=int(summary[0]),
            stop_reason=stop,
            seed=seed,
        )

    def warm_up(self, small: bool = True, large: bool = True) -> None:
        """Run the compiled functions once so no request pays tracing or XLA compilation:
        the small-data path (numpy moments, XLA loop) and the large-data entry points."""
        rng = np.random.default_rng(0)
        sizes = ([16] if small else []) + ([self.graph_min_points] if large else [])
        for n in sizes:
            x = rng.random(n)
            y = 2.0 * x + 1.0 + rng.normal(0, 0.1, n)
            self.fit_linear(x, y, learning_rate=0.1, epochs=2, seed=0)
            self.fit_gaussian(y, learning_rate=0.1, epochs=2)

    def xla_input_signatures(self) -> list[Any]:
        """Input specs of the XLA-compiled loops: fully static, so one compilation serves all
        requests (XLA compiles per input shape, and no other shape can reach them)."""
        return [*self._linear_fn.input_signature, *self._gaussian_fn.input_signature]

    def trace_counts(self) -> dict[str, int]:
        """How often each compiled function was traced (stays 1 after warm-up)."""
        functions = {
            "linear_start": self._linear_start_fn,
            "gaussian_start": self._gaussian_start_fn,
            "linear_loop": self._linear_fn,
            "gaussian_loop": self._gaussian_fn,
        }
        return {name: int(fn.experimental_get_tracing_count()) for name, fn in functions.items()}

    # -- the driver --------------------------------------------------------------------------

    def _continue(
        self,
        chunk_fn: Any,
        summary: npt.NDArray[np.float64],
        first: _Chunk,
        learning_rate: float,
        epochs: int,
        should_stop: StopCheck | None,
    ) -> tuple[list[float], npt.NDArray[np.float64], float, int, StopReason]:
        """Check each chunk's outcome and run further chunks until ``epochs``."""
        chunk = first
        pieces: list[npt.NDArray[np.float64]] = []
        stop: StopReason = "max_epochs"
        done_total = 0
        summary_t = None
        while True:
            if not chunk.finite:
                raise FitDiverged(epoch=done_total + chunk.done, learning_rate=learning_rate)
            pieces.append(chunk.history)
            done_total += chunk.done
            if done_total >= epochs:
                break
            if should_stop is not None and (reason := should_stop()) is not None:
                stop = reason
                break
            if summary_t is None:
                summary_t = _vector(summary)
            steps = min(self.epochs_per_call, epochs - done_total)
            controls = _vector((*chunk.params, learning_rate, steps))
            chunk = _Chunk(chunk_fn(summary_t, controls).numpy())
        final_loss = chunk.final
        if not math.isfinite(final_loss):
            raise FitDiverged(epoch=done_total, learning_rate=learning_rate)
        history = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        check_descended(history, final_loss, learning_rate)
        return [float(v) for v in chunk.params], history, final_loss, done_total, stop


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
    """A chunk's packed output: [param0, param1, epochs_done, finite, final_loss, history]."""

    def __init__(self, values: npt.NDArray[np.float64]) -> None:
        self.params = values[0:2]
        self.done = int(values[2])
        self.finite = bool(values[3] > 0.5)
        self.final = float(values[4])
        self.history = values[5 : 5 + self.done]


def _start_outputs(chunk: Any, summary: Any, params: Any, learning_rate: Any, steps: Any) -> Any:
    """[summary, the chunk's packed output]: one vector, one device-to-host copy."""
    controls = tf.concat([params, tf.stack([learning_rate, tf.cast(steps, tf.float64)])], 0)
    return tf.concat([summary, chunk(summary, controls)], axis=0)


def _only_if(condition: Any, steps: Any) -> Any:
    return tf.where(condition, steps, tf.zeros_like(steps))


def _fresh_seed() -> int:
    """A seed for a request that gave none (reported back, so the fit can be replayed).
    Not a secret: the process-wide Mersenne Twister is enough and costs no system call."""
    return random.getrandbits(63)


def _array(values: npt.ArrayLike) -> npt.NDArray[np.float64]:
    return np.asarray(values, dtype=np.float64).reshape(-1)


def _vector(values: npt.ArrayLike) -> Any:
    return tf.constant(_array(values))


_CONSTANT = {
    "x": "all x values are equal: the slope is not determined",
    "y": "all y values are equal: the standard deviation is zero",
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


def _check_hyperparameters(learning_rate: float, epochs: int, initial: tuple[float, float]) -> None:
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


__all__ = ["FitEngine", "ModelName", "Reduction", "StopCheck"]
