"""Many independent fits in one vectorized, XLA-compiled training loop.

Every data set is reduced to its sufficient statistics (one vectorized numpy pass over all the
points, however ragged the lengths), so a batch is a [B, S] matrix of summaries and a [B, 2]
matrix of parameters. The loop is the post's step on all rows at once: one ``GradientTape``
over the sum of the per-row losses gives each row its own gradient (rows share no parameters).
A row whose loss or parameters turn non-finite is frozen at its last finite parameters and
reported as diverged; the others go on.

B is padded to a power of two (harmless dummy rows), so the loop compiles once per size bucket
(at most ``log2(max_batch)`` buckets, each on first use) and never per batch.
"""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import tensorflow as tf

from service.fitting import scaling as scaling_
from service.fitting.layers import LinearRegressionLayer
from service.fitting.loop import (
    GAUSSIAN_INIT_FACTORS,
    SLOPE_INIT_STDDEV,
    STANDARDIZED_GAUSSIAN_START,
    Reduction,
    StopCheck,
    check_descended,
    unusable,
)
from service.fitting.losses import mse_from_moments, nll_from_moments
from service.fitting.options import Scaling
from service.fitting.results import FitDiverged, FitError, FitResult, StopReason
from service.fitting.scaling import (
    IDENTITY,
    Coordinates,
    Standardize,
    fit_coordinates,
)
from service.fitting.stats import (
    CURVATURE_SIZE,
    AtFit,
    curvature_rows,
    gaussian_stats,
    is_converged,
    linear_stats,
    not_converged,
    weight_summary,
)

Array = npt.NDArray[np.float64]
#: Most history values one compiled call may hold (rows x recorded epochs), ~32 MB of float64.
HISTORY_BUDGET = 1 << 22
#: Epochs per compiled call at most (deadlines and cancellation are checked between calls).
MAX_STEPS_PER_CALL = 65_536
MIN_BUCKET = 8
LINEAR_DUMMY = (2.0, 0.0, 0.0, 1.0, 0.0, 1.0)  # n, x̄, ȳ, Vxx, Vxy, Vyy of a harmless row
GAUSSIAN_DUMMY = (2.0, 0.0, 1.0, 1.0)  # n, ȳ, Vyy, scale


@dataclass(frozen=True, slots=True)
class Ragged:
    """Data sets laid end to end: ``values[offsets[i]:offsets[i] + lengths[i]]`` is set i."""

    values: Array
    lengths: npt.NDArray[np.int64]

    @classmethod
    def of(cls, arrays: Sequence[npt.ArrayLike]) -> Ragged:
        parts = [np.asarray(a, dtype=np.float64).reshape(-1) for a in arrays]
        lengths = np.array([p.size for p in parts], dtype=np.int64)
        return cls(np.concatenate(parts) if parts else np.empty(0), lengths)

    @property
    def offsets(self) -> npt.NDArray[np.int64]:
        return np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)


def _centred(data: Ragged) -> tuple[Array, Array]:
    """Per-set means and the deviations from them (two passes, vectorized over sets)."""
    n = data.lengths.astype(np.float64)
    offsets = data.offsets
    means = np.add.reduceat(data.values, offsets) / n
    dev = data.values - np.repeat(means, data.lengths)
    correction = np.add.reduceat(dev, offsets) / n
    return means + correction, dev - np.repeat(correction, data.lengths)


def linear_summaries(x: Ragged, y: Ragged) -> Array:
    """[B, 6] rows of [n, x̄, ȳ, Vxx, Vxy, Vyy], as :func:`summary.linear_moments` per set."""
    with np.errstate(over="ignore", invalid="ignore"):
        n = x.lengths.astype(np.float64)
        x_mean, dx = _centred(x)
        y_mean, dy = _centred(y)
        offsets = x.offsets
        moments = [np.add.reduceat(a * b, offsets) / n for a, b in ((dx, dx), (dx, dy), (dy, dy))]
    return np.stack([n, x_mean, y_mean, *moments], axis=1)


def gaussian_summaries(y: Ragged) -> Array:
    """[B, 3] rows of [n, ȳ, Vyy]."""
    with np.errstate(over="ignore", invalid="ignore"):
        n = y.lengths.astype(np.float64)
        y_mean, dy = _centred(y)
        vyy = np.add.reduceat(dy * dy, y.offsets) / n
    return np.stack([n, y_mean, vyy], axis=1)


def bucket(rows: int) -> int:
    """The padded batch size: the next power of two, at least ``MIN_BUCKET``."""
    return max(MIN_BUCKET, 1 << max(0, rows - 1).bit_length())


class BatchEngine:
    """Vectorized fits of many data sets; thread-safe (compiles each bucket once, locked)."""

    def __init__(self, max_epochs_per_call: int = 4096) -> None:
        self.max_epochs_per_call = max_epochs_per_call
        self._loops: dict[tuple[str, int], tuple[Any, int]] = {}
        self._lock = threading.Lock()

    # -- public API ------------------------------------------------------------------------

    def fit_linear(
        self,
        x: Ragged,
        y: Ragged,
        *,
        learning_rate: float,
        epochs: int,
        initial: npt.ArrayLike | None = None,
        seed: int | None = None,
        scaling: Scaling = "standardize",
        history_every: int = 1,
        should_stop: StopCheck | None = None,
    ) -> list[FitResult | FitError]:
        """Fit y = m·x + b to every set, each standardized on its own unless
        ``scaling="none"``. ``initial`` is [B, 2] (caller's units) with NaN rows where a set
        gave none; such a set starts like a single fit with seed ``seed + i``. Results come
        back in order, each a result or an error."""
        rows = len(x.lengths)
        base_seed = random.getrandbits(62) if seed is None else seed
        given = _given(initial, rows)
        random_start = np.isnan(given[:, 0])
        seeds: list[int | None] = [None] * rows
        starts = np.zeros((rows, 2))
        for i in np.flatnonzero(random_start):
            seeds[i] = base_seed + int(i)
            starts[i] = (random.Random(base_seed + int(i)).gauss(0.0, SLOPE_INIT_STDDEV), 0.0)
        summaries = linear_summaries(x, y)
        usable = np.all(np.isfinite(summaries), axis=1) & (summaries[:, 3] > 0.0)
        fit_summaries, coords = _standardized(scaling, summaries, usable, scaling_.linear)
        for i in np.flatnonzero(~random_start):
            starts[i] = coords[i].to_fit((float(given[i, 0]), float(given[i, 1])))
        usable &= np.all(np.isfinite(starts), axis=1)
        errors = {int(i): _why(summaries[i], 3, "x", starts[i]) for i in np.flatnonzero(~usable)}
        return self._run(
            "linear",
            _Sets(summaries, fit_summaries, coords, starts, usable, errors, seeds),
            learning_rate,
            epochs,
            scaling,
            history_every,
            should_stop,
        )

    def fit_gaussian(
        self,
        y: Ragged,
        *,
        learning_rate: float,
        epochs: int,
        initial: npt.ArrayLike | None = None,
        reduction: Reduction = "mean",
        scaling: Scaling = "standardize",
        history_every: int = 1,
        should_stop: StopCheck | None = None,
    ) -> list[FitResult | FitError]:
        """Fit N(m, s²) to every set, starting like a single fit unless given, each set
        standardized on its own unless ``scaling="none"``."""
        rows = len(y.lengths)
        moments = gaussian_summaries(y)
        scale = moments[:, 0] if reduction == "sum" else np.ones(rows)
        summaries = np.concatenate([moments, scale[:, None]], axis=1)
        usable = np.all(np.isfinite(summaries), axis=1) & (summaries[:, 2] > 0.0)
        fit_summaries, coords = _standardized(scaling, summaries, usable, scaling_.gaussian)
        if scaling == "none":
            m_factor, s_factor = GAUSSIAN_INIT_FACTORS
            with np.errstate(over="ignore", invalid="ignore"):
                default = np.stack([m_factor * moments[:, 1], s_factor * np.sqrt(moments[:, 2])], 1)
        else:
            default = np.tile(STANDARDIZED_GAUSSIAN_START, (rows, 1))
        given = _given(initial, rows)
        starts = default.copy()
        for i in np.flatnonzero(~np.isnan(given[:, 0])):
            starts[i] = coords[i].to_fit((float(given[i, 0]), float(given[i, 1])))
        usable &= np.all(np.isfinite(starts), axis=1)
        errors = {int(i): _why(summaries[i], 2, "y", starts[i]) for i in np.flatnonzero(~usable)}
        return self._run(
            "gaussian",
            _Sets(summaries, fit_summaries, coords, starts, usable, errors, [None] * rows),
            learning_rate,
            epochs,
            scaling,
            history_every,
            should_stop,
        )

    def warm_up(self) -> None:
        """Compile the smallest bucket of both models (larger ones compile on first use)."""
        rng = np.random.default_rng(0)
        x = Ragged.of([rng.random(4), rng.random(5)])
        y = Ragged.of([rng.random(4), rng.random(5)])
        self.fit_linear(x, y, learning_rate=0.1, epochs=2, seed=0)
        self.fit_gaussian(y, learning_rate=0.1, epochs=2)

    def compiled_buckets(self) -> list[tuple[str, int]]:
        """The (model, padded size) loops compiled so far: one per bucket, never per batch."""
        with self._lock:
            return sorted(self._loops)

    # -- the loop ----------------------------------------------------------------------------

    def _loop(self, model: str, size: int) -> tuple[Any, int]:
        key = (model, size)
        with self._lock:
            if key not in self._loops:
                capacity = max(1, min(self.max_epochs_per_call, HISTORY_BUDGET // size))
                self._loops[key] = (_compile_batch_loop(model, size, capacity), capacity)
            return self._loops[key]

    def _run(
        self,
        model: str,
        sets: _Sets,
        learning_rate: float,
        epochs: int,
        scaling: Scaling,
        history_every: int,
        should_stop: StopCheck | None,
    ) -> list[FitResult | FitError]:
        rows = np.flatnonzero(sets.usable)
        out: list[FitResult | FitError | None] = [None] * len(sets.usable)
        for i, error in sets.errors.items():
            out[i] = error
        if rows.size:
            trained = self._train(
                model,
                sets.fit_summaries[rows],
                sets.starts[rows],
                learning_rate,
                epochs,
                history_every,
                should_stop,
            )
            for row, result in zip(rows, trained, strict=True):
                out[row] = _result(
                    model,
                    result,
                    sets.summaries[row],
                    sets.coords[row],
                    sets.seeds[row],
                    learning_rate,
                    scaling,
                    history_every,
                )
        return [r for r in out if r is not None]

    def _train(
        self,
        model: str,
        summaries: Array,
        starts: Array,
        learning_rate: float,
        epochs: int,
        history_every: int,
        should_stop: StopCheck | None,
    ) -> list[_Row]:
        rows = len(summaries)
        size = bucket(rows)
        run, capacity = self._loop(model, size)
        dummy = LINEAR_DUMMY if model == "linear" else GAUSSIAN_DUMMY
        padded = np.tile(np.asarray(dummy), (size, 1))
        padded[:rows] = summaries
        params = np.tile(starts[:1] if rows else np.zeros((1, 2)), (size, 1))
        params[:rows] = starts
        if model == "gaussian":
            params[rows:] = (0.0, 1.0)
        summary_t = tf.constant(padded)
        lr_t = tf.constant(learning_rate, tf.float64)
        active = np.arange(size) < rows  # padding rows never train
        diverged_at = np.zeros(size, dtype=np.int64)
        histories: list[Array] = []
        done_total = 0
        stop: StopReason = "max_epochs"
        at_end = np.zeros((size, CURVATURE_SIZE))
        while done_total < epochs and active.any():
            if done_total and should_stop is not None and (reason := should_stop()) is not None:
                stop = reason
                break
            steps = min(capacity * history_every, epochs - done_total, MAX_STEPS_PER_CALL)
            p, history, done, written, finite, at_end_t, first_bad = run(
                summary_t,
                tf.constant(params),
                tf.constant(active),
                lr_t,
                tf.constant(steps, tf.int32),
                tf.constant(history_every, tf.int32),
                tf.constant(done_total, tf.int32),
            )
            params, at_end = p.numpy(), at_end_t.numpy()
            newly = active & ~finite.numpy()
            diverged_at[newly] = done_total + first_bad.numpy()[newly] + 1
            active &= finite.numpy()
            histories.append(history[: int(written)].numpy())
            done_total += int(done)
        history_all = np.concatenate(histories) if histories else np.empty((0, size))
        return [
            _Row(
                params[i],
                history_all[:, i],
                float(at_end[i, 0]),
                at_end[i],
                done_total,
                stop,
                int(diverged_at[i]) if not active[i] else 0,
            )
            for i in range(rows)
        ]


@dataclass(frozen=True, slots=True)
class _Sets:
    """The sets of one batch: summaries in the caller's units and in fit coordinates, the
    map between them, starts (fit coordinates), which sets train, why the others can't, and
    the seeds of random starts."""

    summaries: Array
    fit_summaries: Array
    coords: list[Coordinates]
    starts: Array
    usable: npt.NDArray[np.bool_]
    errors: dict[int, FitError]
    seeds: list[int | None]


def _standardized(
    scaling: Scaling, summaries: Array, usable: npt.NDArray[np.bool_], standardize: Standardize
) -> tuple[Array, list[Coordinates]]:
    """Each usable set's summary in fit coordinates, and its map (identity elsewhere)."""
    fit_summaries = summaries.copy()
    coords = [IDENTITY] * len(summaries)
    for i in np.flatnonzero(usable):
        fit_summaries[i], coords[i] = fit_coordinates(scaling, summaries[i], standardize)
    return fit_summaries, coords


@dataclass(frozen=True, slots=True)
class _Row:
    params: Array
    history: Array
    final_loss: float
    curvature: Array
    epochs_run: int
    stop: StopReason
    diverged_at: int


def _result(
    model: str,
    row: _Row,
    summary: Array,
    coords: Coordinates,
    seed: int | None,
    learning_rate: float,
    scaling: Scaling,
    history_every: int,
) -> FitResult | FitError:
    if row.diverged_at:
        return FitDiverged(epoch=row.diverged_at, learning_rate=learning_rate)
    if not math.isfinite(row.final_loss):
        return FitDiverged(epoch=row.epochs_run, learning_rate=learning_rate)
    try:
        check_descended(row.history, row.final_loss, learning_rate, coords)
    except FitDiverged as diverged:
        return diverged
    at = AtFit.of(row.curvature, (float(row.params[0]), float(row.params[1])), coords)
    weights = weight_summary(None, int(summary[0]))
    first, second = coords.from_fit(at.params)
    if model == "linear":
        params = {"slope": first, "intercept": second}
        stats = linear_stats(at, summary, weights)
    else:
        params = {"mean": first, "std": abs(second)}
        stats = gaussian_stats(at, summary, weights)
    converged = is_converged(at)
    return FitResult(
        model="linear" if model == "linear" else "gaussian",
        params=params,
        loss_history=coords.losses(row.history),
        final_loss=coords.loss(row.final_loss),
        epochs_run=row.epochs_run,
        n=int(summary[0]),
        stop_reason=row.stop,
        converged=converged,
        history_every=history_every,
        stats=stats,
        seed=seed,
        warnings=() if converged else not_converged(stats, row.stop, scaling),
    )


def _given(initial: npt.ArrayLike | None, rows: int) -> Array:
    """Initial values as [rows, 2], NaN where a set gave none."""
    if initial is None:
        return np.full((rows, 2), np.nan)
    return np.array(initial, dtype=np.float64).reshape(rows, 2)


def _why(summary: Array, spread: int, what: str, initial: npt.ArrayLike = ()) -> FitError:
    """The single-fit reason for a row the vectorized mask found unusable."""
    error = unusable(summary, spread, what, initial)
    assert error is not None
    return error


def _compile_batch_loop(model: str, size: int, capacity: int) -> Any:
    """The XLA loop for ``size`` rows: the post's step on all rows at once, recording the loss
    every ``every`` epochs into at most ``capacity`` history rows.

    Returns (params [size, 2], history [capacity, size], epochs_done, rows_recorded,
    finite [size], curvature [size, 7] (loss, gradient, Hessian), first_bad_epoch [size]).
    Inactive rows (diverged) stay frozen.
    """
    summary_size = 6 if model == "linear" else 4
    layer = (
        LinearRegressionLayer(dtype="float64", name=f"linear_batch_{size}", units=size)
        if model == "linear"
        else None
    )

    def losses(p: Any, s: Any) -> Any:
        if layer is not None:
            at_mean, _ = layer.stateless_call([p[:, 0], p[:, 1]], [], s[:, 1])
            return mse_from_moments(at_mean, p[:, 0], tf.transpose(s))
        return nll_from_moments(p[:, 0], p[:, 1], tf.transpose(s), s[:, 3])

    @tf.function(
        jit_compile=True,
        input_signature=[
            tf.TensorSpec([size, summary_size], tf.float64),
            tf.TensorSpec([size, 2], tf.float64),
            tf.TensorSpec([size], tf.bool),
            tf.TensorSpec([], tf.float64),  # learning rate
            tf.TensorSpec([], tf.int32),  # epochs to run (records at most `capacity` rows)
            tf.TensorSpec([], tf.int32),  # record the loss every this many epochs...
            tf.TensorSpec([], tf.int32),  # ...counting from this global epoch index
        ],
    )
    def run(
        summary: Any,
        params: Any,
        active: Any,
        learning_rate: Any,
        steps: Any,
        every: Any,
        offset: Any,
    ) -> Any:
        history = tf.zeros([capacity, size], tf.float64)
        first_bad = tf.zeros([size], tf.int32)

        def epoch(i: Any, p: Any, history: Any, written: Any, finite: Any, first_bad: Any) -> Any:
            with tf.GradientTape() as tape:
                tape.watch(p)
                loss = losses(p, summary)
                total = tf.reduce_sum(tf.where(finite, loss, tf.zeros_like(loss)))
            gradients = tape.gradient(total, p)
            updated = p - learning_rate * gradients
            ok = finite & tf.math.is_finite(loss) & tf.reduce_all(tf.math.is_finite(updated), 1)
            first_bad = tf.where(finite & ~ok, i, first_bad)
            record = tf.equal((offset + i) % every, 0)
            history = tf.cond(
                record,
                lambda: tf.tensor_scatter_nd_update(history, [[written]], loss[None, :]),
                lambda: history,
            )
            written = written + tf.cast(record, tf.int32)
            return i + 1, tf.where(ok[:, None], updated, p), history, written, ok, first_bad

        done, params, history, written, finite, first_bad = tf.while_loop(
            lambda i, p, h, w, f, b: (i < steps) & tf.reduce_any(f),
            epoch,
            [tf.constant(0), params, history, tf.constant(0), active, first_bad],
        )
        at_end = curvature_rows(losses, params, summary)  # loss, gradient, Hessian per row
        return params, history, done, written, finite, at_end, first_bad

    return run.get_concrete_function()
