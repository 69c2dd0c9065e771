"""Many independent fits of one model in one vectorized, XLA-compiled training loop.

Every data set is reduced to the model's summary (one vectorized numpy pass over all the
points, however ragged the lengths), so a batch is a [B, S] matrix of summaries and a [B, k]
matrix of parameters. The loop is the post's step on all rows at once: one ``GradientTape``
over the sum of the per-row losses gives each row its own gradient (rows share no parameters).
A row whose loss or parameters turn non-finite is frozen at its last finite parameters and
reported as diverged; the others go on. Any model spec serves: its loss is written for one
row and for many alike (:mod:`service.fitting.models`).

B is padded to a power of two (harmless dummy rows), so the loop compiles once per size bucket
(at most ``log2(max_batch)`` buckets, each on first use) and never per batch.
"""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import tensorflow as tf

from service.fitting.loop import StopCheck, check_descended
from service.fitting.models import BUILT_IN, ModelSpec
from service.fitting.options import Scaling
from service.fitting.results import FitDiverged, FitError, FitResult, StopReason
from service.fitting.scaling import (
    IDENTITY,
    Coordinates,
    fit_coordinates,
    losses_of_sets,
    quiet,
)
from service.fitting.stats import (
    AtFit,
    curvature_layout,
    curvature_rows,
    is_converged,
    not_converged,
    weight_summary,
)
from service.fitting.summary import Ragged

Array = npt.NDArray[np.float64]
#: Most history values one compiled call may hold (rows x recorded epochs), ~32 MB of float64.
HISTORY_BUDGET = 1 << 22
#: Epochs per compiled call at most (deadlines and cancellation are checked between calls).
MAX_STEPS_PER_CALL = 65_536
MIN_BUCKET = 8

__all__ = ["BatchEngine", "Ragged", "bucket"]


def bucket(rows: int) -> int:
    """The padded batch size: the next power of two, at least ``MIN_BUCKET``."""
    return max(MIN_BUCKET, 1 << max(0, rows - 1).bit_length())


class BatchEngine:
    """Vectorized fits of many data sets; thread-safe (compiles each bucket once, locked)."""

    def __init__(
        self, max_epochs_per_call: int = 4096, models: Mapping[str, ModelSpec] = BUILT_IN
    ) -> None:
        self.max_epochs_per_call = max_epochs_per_call
        self.models = dict(models)
        self._loops: dict[tuple[str, int], tuple[Any, int]] = {}
        self._lock = threading.Lock()

    # -- public API ------------------------------------------------------------------------

    def fit(
        self,
        model: str | ModelSpec,
        *data: Ragged,
        learning_rate: float,
        epochs: int,
        initial: npt.ArrayLike | None = None,
        seed: int | None = None,
        options: Mapping[str, Any] | None = None,
        scaling: Scaling = "standardize",
        history_every: int = 1,
        should_stop: StopCheck | None = None,
    ) -> list[FitResult | FitError]:
        """Fit ``model`` to every set (``data``: the spec's arrays, each cut the same way),
        each standardized on its own unless ``scaling="none"``. ``initial`` is [B, k]
        (caller's units) with NaN rows where a set gave none; such a set starts like a
        single fit, a random start with seed ``seed + i``. Results come back in order, each
        a result or an error."""
        spec = model if isinstance(model, ModelSpec) else self.models[model]
        model_options = spec.model_options(options)
        rows = len(data[0].lengths)
        counts = data[0].lengths.astype(np.float64)
        summaries = spec.complete(spec.moments_of_sets(*data), counts, model_options)
        spread = summaries[:, spec.summary.names.index(spec.spread)]
        usable = np.all(np.isfinite(summaries), axis=1) & (spread > 0.0)
        fit_summaries, coords = _standardized(scaling, summaries, usable, spec)
        given = _given(initial, rows, spec.k)
        defaults = np.isnan(given[:, 0])
        seeds: list[int | None] = [None] * rows
        if spec.random_start:
            base_seed = random.getrandbits(62) if seed is None else seed
            for i in np.flatnonzero(defaults):
                seeds[i] = base_seed + int(i)
        starts = spec.start(summaries, scaling, seeds)
        for i in np.flatnonzero(~defaults):
            starts[i] = coords[i].to_fit(given[i])
        usable &= np.all(np.isfinite(starts), axis=1)
        errors = {int(i): _why(spec, summaries[i], starts[i]) for i in np.flatnonzero(~usable)}
        sets = _Sets(summaries, fit_summaries, coords, starts, usable, errors, seeds, model_options)
        return self._run(spec, sets, learning_rate, epochs, scaling, history_every, should_stop)

    def warm_up(self) -> None:
        """Compile the smallest bucket of every model (larger ones compile on first use)."""
        rng = np.random.default_rng(0)
        for spec in self.models.values():
            data = [Ragged.of([rng.random(4), rng.random(5)]) for _ in spec.data]
            self.fit(spec, *data, learning_rate=0.01, epochs=2, seed=0)

    def compiled_buckets(self) -> list[tuple[str, int]]:
        """The (model, padded size) loops compiled so far: one per bucket, never per batch."""
        with self._lock:
            return sorted(self._loops)

    # -- the loop ----------------------------------------------------------------------------

    def _loop(self, spec: ModelSpec, size: int) -> tuple[Any, int]:
        key = (spec.name, size)
        with self._lock:
            if key not in self._loops:
                capacity = max(1, min(self.max_epochs_per_call, HISTORY_BUDGET // size))
                self._loops[key] = (_compile_batch_loop(spec, size, capacity), capacity)
            return self._loops[key]

    def _run(
        self,
        spec: ModelSpec,
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
            trained, histories = self._train(
                spec,
                sets.fit_summaries[rows],
                sets.starts[rows],
                learning_rate,
                epochs,
                history_every,
                should_stop,
            )
            coords = [sets.coords[row] for row in rows.tolist()]
            losses = losses_of_sets(coords, histories)  # all sets' histories in your units
            with quiet():  # what overflows float64 is reported as null
                for j, (row, result) in enumerate(zip(rows.tolist(), trained, strict=True)):
                    out[row] = _result(
                        spec,
                        sets.options,
                        result,
                        losses[:, j],
                        sets.summaries[row],
                        coords[j],
                        sets.seeds[row],
                        learning_rate,
                        scaling,
                        history_every,
                    )
        return [r for r in out if r is not None]

    def _train(
        self,
        spec: ModelSpec,
        summaries: Array,
        starts: Array,
        learning_rate: float,
        epochs: int,
        history_every: int,
        should_stop: StopCheck | None,
    ) -> tuple[list[_Row], Array]:
        """Each row's outcome, and every row's loss history at once ([recorded, rows], fit
        coordinates; each ``_Row.history`` is its column)."""
        rows = len(summaries)
        size = bucket(rows)
        run, capacity = self._loop(spec, size)
        padded = np.tile(np.asarray(spec.dummy), (size, 1))
        padded[:rows] = summaries
        params = np.tile(np.asarray(spec.dummy_start), (size, 1))
        params[:rows] = starts
        summary_t = tf.constant(padded)
        lr_t = tf.constant(learning_rate, tf.float64)
        active = np.arange(size) < rows  # padding rows never train
        diverged_at = np.zeros(size, dtype=np.int64)
        histories: list[Array] = []
        done_total = 0
        stop: StopReason = "max_epochs"
        at_end = np.zeros((size, curvature_layout(spec.k).size))
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
        trained = [
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
        return trained, history_all[:, :rows]


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
    options: Mapping[str, Any]


def _standardized(
    scaling: Scaling, summaries: Array, usable: npt.NDArray[np.bool_], spec: ModelSpec
) -> tuple[Array, list[Coordinates]]:
    """Each usable set's summary in fit coordinates, and its map (identity elsewhere).
    (Rows are gathered in a list and stacked once: assigning each into the array cost three
    times the standardizing.)"""
    rows: list[Any] = summaries.tolist()
    coords = [IDENTITY] * len(summaries)
    for i in np.flatnonzero(usable).tolist():
        rows[i], coords[i] = fit_coordinates(scaling, summaries[i], spec.standardize)
    return np.array(rows, dtype=np.float64).reshape(summaries.shape), coords


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
    spec: ModelSpec,
    options: Mapping[str, Any],
    row: _Row,
    losses: Array,
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
    at = AtFit.of(row.curvature, row.params, coords)
    stats = spec.stats(at, summary, weight_summary(None, int(summary[0])), options)
    fitted = spec.report(coords.from_fit(at.params))
    converged = is_converged(at)
    return FitResult(
        model=spec.name,
        params={name: float(v) for name, v in zip(spec.params, fitted, strict=True)},
        loss_history=losses,
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


def _given(initial: npt.ArrayLike | None, rows: int, k: int) -> Array:
    """Initial values as [rows, k], NaN where a set gave none."""
    if initial is None:
        return np.full((rows, k), np.nan)
    return np.array(initial, dtype=np.float64).reshape(rows, k)


def _why(spec: ModelSpec, summary: Array, initial: npt.ArrayLike = ()) -> FitError:
    """The single-fit reason for a row the vectorized mask found unusable."""
    error = spec.unusable(summary, initial)
    assert error is not None
    return error


def _compile_batch_loop(spec: ModelSpec, size: int, capacity: int) -> Any:
    """The XLA loop for ``size`` rows: the post's step on all rows at once, recording the loss
    every ``every`` epochs into at most ``capacity`` history rows.

    Returns (params [size, k], history [capacity, size], epochs_done, rows_recorded,
    finite [size], curvature [size, 1 + k + k·k] (loss, gradient, Hessian),
    first_bad_epoch [size]).
    Inactive rows (diverged) stay frozen.
    """
    losses = spec.loss

    @tf.function(
        jit_compile=True,
        input_signature=[
            tf.TensorSpec([size, spec.summary.size], tf.float64),
            tf.TensorSpec([size, spec.k], tf.float64),
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
