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
import secrets
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
from service.fitting.summary import as_vector, gaussian_summary, linear_summary

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

    Returns ``(params, history[chunk], epochs_done, finite, final_loss)``. It stops early
    when the loss or the updated parameters are non-finite; ``params`` are then those
    before the failing update.
    """

    @tf.function(
        jit_compile=True,
        input_signature=[
            tf.TensorSpec([summary_size], tf.float64),  # data summary (+ loss constants)
            tf.TensorSpec([2], tf.float64),  # parameters
            tf.TensorSpec([], tf.float64),  # learning rate
            tf.TensorSpec([], tf.int32),  # epochs to run, <= chunk
        ],
    )
    def run(summary: Any, params: Any, learning_rate: Any, steps: Any) -> Any:
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
        return params, history.stack(), done, finite, loss_fn(params, summary)

    return run


class FitEngine:
    """Fits the seed's two models; safe to call from many threads at once.

    The layers are templates: their ``add_weight`` variables define the parameters, and the
    compiled loops evaluate them statelessly on loop-carried tensors, so concurrent fits never
    share mutable state.
    """

    def __init__(self, epochs_per_call: int = 4096) -> None:
        if epochs_per_call < 1:
            raise ValueError("epochs_per_call must be >= 1")
        self.epochs_per_call = epochs_per_call
        self.linear_layer = LinearRegressionLayer(dtype="float64", name="linear")
        self.gaussian_layer = GaussianFitLayer((0.0, 1.0), dtype="float64", name="gaussian")
        self._linear_fn = _compile_chunk(self._linear_loss, 6, epochs_per_call)
        self._gaussian_fn = _compile_chunk(self._gaussian_loss, 4, epochs_per_call)
        # Calling the concrete functions skips tf.function's argument dispatch per call.
        self._linear_chunk = self._linear_fn.get_concrete_function()
        self._gaussian_chunk = self._gaussian_fn.get_concrete_function()

    # -- losses on loop-carried parameters -------------------------------------------------

    def _linear_loss(self, p: Any, summary: Any) -> Any:
        slope, intercept = p[0:1], p[1:2]
        at_mean, _ = self.linear_layer.stateless_call([slope, intercept], [], summary[1:2])
        return mse_from_moments(at_mean[0], p[0], summary)

    @staticmethod
    def _gaussian_loss(p: Any, summary: Any) -> Any:
        return nll_from_moments(p[0], p[1], summary, summary[3])

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
        summary = _finite(linear_summary(as_vector(x), as_vector(y)).numpy())
        n = int(summary[0])
        if not summary[3] > 0.0:
            raise DegenerateData("all x values are equal: the slope is not determined")
        if initial is None:
            seed = secrets.randbits(31) if seed is None else seed
            slope0 = float(np.random.default_rng(seed).normal(0.0, SLOPE_INIT_STDDEV))
            initial = (slope0, 0.0)
        params, history, final_loss, epochs_run, stop = self._train(
            self._linear_chunk, summary, initial, learning_rate, epochs, should_stop
        )
        return FitResult(
            model="linear",
            params={"slope": params[0], "intercept": params[1]},
            loss_history=history,
            final_loss=final_loss,
            epochs_run=epochs_run,
            n=n,
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
        summary = _finite(gaussian_summary(as_vector(y)).numpy())
        n = int(summary[0])
        if not summary[2] > 0.0:
            raise DegenerateData("all y values are equal: the standard deviation is zero")
        if initial is None:
            m_factor, s_factor = GAUSSIAN_INIT_FACTORS
            initial = (m_factor * float(summary[1]), s_factor * math.sqrt(float(summary[2])))
        scale = float(n) if reduction == "sum" else 1.0
        params, history, final_loss, epochs_run, stop = self._train(
            self._gaussian_chunk,
            np.append(summary, scale),
            initial,
            learning_rate,
            epochs,
            should_stop,
        )
        return FitResult(
            model="gaussian",
            params={"mean": params[0], "std": abs(params[1])},
            loss_history=history,
            final_loss=final_loss,
            epochs_run=epochs_run,
            n=n,
            stop_reason=stop,
            seed=seed,
        )

    def warm_up(self) -> None:
        """Run both loops once so the first request pays no tracing or XLA compilation."""
        rng = np.random.default_rng(0)
        x = rng.random(16)
        self.fit_linear(x, 2.0 * x + 1.0 + rng.normal(0, 0.1, 16), learning_rate=0.1, epochs=2)
        self.fit_gaussian(rng.normal(2.0, 1.0, 16), learning_rate=0.1, epochs=2)

    def trace_counts(self) -> dict[str, int]:
        """How often each compiled function was traced (stays constant after warm-up)."""
        return {
            "linear_summary": int(linear_summary.experimental_get_tracing_count()),
            "gaussian_summary": int(gaussian_summary.experimental_get_tracing_count()),
            "linear_loop": int(self._linear_fn.experimental_get_tracing_count()),
            "gaussian_loop": int(self._gaussian_fn.experimental_get_tracing_count()),
        }

    # -- the driver --------------------------------------------------------------------------

    def _train(
        self,
        chunk_fn: Any,
        summary: npt.NDArray[np.float64],
        initial: tuple[float, float],
        learning_rate: float,
        epochs: int,
        should_stop: StopCheck | None,
    ) -> tuple[list[float], npt.NDArray[np.float64], float, int, StopReason]:
        if epochs < 1:
            raise ValueError("epochs must be >= 1")
        if not (math.isfinite(learning_rate) and learning_rate > 0):
            raise ValueError("learning_rate must be a positive finite number")
        summary_t = tf.constant(summary, tf.float64)
        lr_t = tf.constant(learning_rate, tf.float64)
        params = tf.constant(initial, tf.float64)
        if not all(math.isfinite(v) for v in initial):
            raise ValueError("initial values must be finite")
        pieces: list[npt.NDArray[np.float64]] = []
        done_total = 0
        stop: StopReason = "max_epochs"
        final_loss = math.nan
        while done_total < epochs:
            if done_total and should_stop is not None and (reason := should_stop()) is not None:
                stop = reason
                break
            steps = min(self.epochs_per_call, epochs - done_total)
            params, history, done, finite, final = chunk_fn(
                summary_t, params, lr_t, tf.constant(steps, tf.int32)
            )
            done = int(done)
            if not bool(finite):
                raise FitDiverged(epoch=done_total + done, learning_rate=learning_rate)
            pieces.append(history.numpy()[:done])
            done_total += done
            final_loss = float(final)
        values = params.numpy()
        if not math.isfinite(final_loss):
            raise FitDiverged(epoch=done_total, learning_rate=learning_rate)
        history_all = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        _check_descended(history_all, final_loss, learning_rate)
        return [float(v) for v in values], history_all, final_loss, done_total, stop


def _finite(summary: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    if not np.all(np.isfinite(summary)):
        raise DegenerateData(
            "the data are too large in magnitude: their mean or variance overflows float64; "
            "rescale them"
        )
    return summary


#: Relative slack before "the loss ended above its start" counts as divergence (rounding).
RISE_TOLERANCE = 1e-9


def _check_descended(
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
