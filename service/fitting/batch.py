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

Around the loop, almost nothing runs per set (the message of a set that fails):
standardization, the maps back to the caller's units, the divergence checks and the
statistics are the single fit's arithmetic on [B] arrays (each spec's ``standardize_sets``
and ``stats_of_sets``, :mod:`service.fitting.stats`; a spec without them is served by its
scalar code, set by set), random starts are drawn for all seeds at once
(:mod:`service.fitting.draws`), and :class:`BatchResults` holds the outcome as arrays,
building a set's :class:`FitResult` only when it is read. (Per set in Python, this cost
~65 µs a set: ten times the compiled loop.)
"""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, overload

import numpy as np
import numpy.typing as npt
import tensorflow as tf

from service.fitting.loop import RISE_TOLERANCE, StopCheck, check_descended
from service.fitting.models import BUILT_IN, ModelSpec
from service.fitting.options import Scaling
from service.fitting.results import FitDiverged, FitError, FitResult, StopReason
from service.fitting.scaling import (
    IDENTITY,
    Coordinates,
    losses_of_sets,
    one_of,
    quiet,
    stack,
    stacked,
    subset,
)
from service.fitting.stats import (
    AtFit,
    Curvature,
    SetsAtFit,
    SetStats,
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

__all__ = ["BatchEngine", "BatchResults", "FittedSets", "Ragged", "bucket"]


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
    ) -> BatchResults:
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
        if scaling == "none":
            fit_summaries, coords = summaries, stacked()
        elif spec.standardize_sets is not None:
            fit_summaries, coords = spec.standardize_sets(summaries)
        else:
            fit_summaries, coords = _standardize_each(spec, summaries, usable)
        given = _given(initial, rows, spec.k)
        defaults = np.isnan(given[:, 0])
        seeds: list[int | None] = [None] * rows
        if spec.random_start:
            base_seed = random.getrandbits(62) if seed is None else seed
            for i in np.flatnonzero(defaults).tolist():
                seeds[i] = base_seed + i
        starts = spec.start(summaries, scaling, seeds)
        if not defaults.all():
            chosen = np.flatnonzero(~defaults)
            with quiet():
                mapped = subset(coords, chosen).to_fit(tuple(given[chosen].T))
            starts[chosen] = np.stack(np.broadcast_arrays(*mapped), 1)
        usable &= np.all(np.isfinite(starts), axis=1)
        errors = {int(i): _why(spec, summaries[i], starts[i]) for i in np.flatnonzero(~usable)}
        sets = _Sets(
            summaries, fit_summaries, coords, starts, usable, errors, seeds, model_options, data
        )
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
    ) -> BatchResults:
        rows = np.flatnonzero(sets.usable)
        errors = dict(sets.errors)
        if not rows.size:
            return BatchResults(spec.name, len(sets.usable), errors, None)
        run = self._train(
            spec,
            sets.fit_summaries[rows],
            sets.starts[rows],
            learning_rate,
            epochs,
            history_every,
            should_stop,
        )
        coords: Any = subset(sets.coords, rows)  # stacked: numbers are arrays
        with quiet():  # what overflows float64 is reported as null
            losses = losses_of_sets(coords, run.history)  # all histories in your units
            final = coords.loss(run.final_loss)
            # Diverged: non-finite on the way, or at the end, or ended above the start.
            failed = run.diverged_at > 0
            failed |= ~np.isfinite(run.final_loss)
            if run.history.shape[0]:
                first = run.history[0]
                failed |= run.final_loss > first + RISE_TOLERANCE * np.maximum(1.0, np.abs(first))
            for j in np.flatnonzero(failed).tolist():
                errors[int(rows[j])] = _diverged(run, j, learning_rate, subset(coords, j))
            kept = np.flatnonzero(~failed)
            coords_at: Any = subset(coords, kept)
            at = SetsAtFit.of(run.curvature[kept], run.params[kept], coords_at)
            summaries = sets.summaries[rows[kept]]
            fitted = spec.report(coords_at.from_fit(at.params))
            params = np.stack(np.broadcast_arrays(*fitted), 1).reshape(-1, spec.k)
            rss = sets.rss(spec, rows[kept], params)
            options = sets.options if rss is None else {**sets.options, "rss": rss}
            final_kept = np.asarray(final)[kept]
            if rss is not None:  # the loss from the residuals, where they were summed
                lengths = sets.data[0].lengths[rows[kept]]
                final_kept = np.where(np.isnan(rss), final_kept, rss / lengths)
            stats_of_sets = spec.stats_of_sets or partial(_stats_each, spec)
            stats = stats_of_sets(at, summaries, options)
        return BatchResults(
            spec.name,
            len(sets.usable),
            errors,
            FittedSets(
                sets=rows[kept],
                params=params,
                losses=losses[:, kept],
                final_loss=final_kept,
                stats=stats,
                seeds=[sets.seeds[i] for i in rows[kept].tolist()],
                epochs_run=run.epochs_run,
                stop=run.stop,
                history_every=history_every,
                scaling=scaling,
                params_names=spec.params,
            ),
        )

    def _train(
        self,
        spec: ModelSpec,
        summaries: Array,
        starts: Array,
        learning_rate: float,
        epochs: int,
        history_every: int,
        should_stop: StopCheck | None,
    ) -> _Trained:
        """Every row's outcome, as arrays (histories [recorded, rows], fit coordinates)."""
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
        diverged_at[active] = 0
        return _Trained(
            params=params[:rows],
            history=history_all[:, :rows],
            final_loss=at_end[:rows, 0],
            curvature=at_end[:rows],
            epochs_run=done_total,
            stop=stop,
            diverged_at=diverged_at[:rows],
        )


@dataclass(frozen=True, slots=True)
class _Sets:
    """The sets of one batch: summaries in the caller's units and in fit coordinates, the
    map between them, starts (fit coordinates), which sets train, why the others can't, and
    the seeds of random starts."""

    summaries: Array
    fit_summaries: Array
    coords: Coordinates
    starts: Array
    usable: npt.NDArray[np.bool_]
    errors: dict[int, FitError]
    seeds: list[int | None]
    options: Mapping[str, Any]
    data: tuple[Ragged, ...]

    def rss(self, spec: ModelSpec, rows: npt.NDArray[Any], fitted: Array) -> Array | None:
        """``spec.residual_sum`` of the sets ``rows`` at their fitted parameters ([B, k]),
        where their moment form cancels; NaN elsewhere (None: the model has none)."""
        residual = spec.residual_sum
        if residual is None:
            return None
        offsets = self.data[0].offsets
        rss = np.full(len(rows), np.nan)
        for j in np.flatnonzero(residual.cancels(self.summaries[rows])).tolist():
            i = int(rows[j])
            cut = slice(offsets[i], offsets[i] + self.data[0].lengths[i])
            value = residual.rss(
                self.summaries[i], tuple(fitted[j]), [d.values[cut] for d in self.data], None
            )
            rss[j] = value if math.isfinite(value) else np.nan
        return rss


def _standardize_each(
    spec: ModelSpec, summaries: Array, usable: npt.NDArray[np.bool_]
) -> tuple[Array, Coordinates]:
    """``standardize_sets`` for a model written for single fits only: its ``standardize`` on
    each usable set, the maps stacked."""
    rows = summaries.copy()
    maps = [IDENTITY] * len(summaries)
    for i in np.flatnonzero(usable).tolist():
        rows[i], maps[i] = spec.standardize(summaries[i])
    return rows, stack(maps, spec.k)


def _stats_each(
    spec: ModelSpec, at: SetsAtFit, summaries: Array, options: Mapping[str, Any]
) -> SetStats:
    """``stats_of_sets`` for a model written for single fits only: its ``stats`` on each
    set (~100 µs a set), stacked."""
    rows, converged = [], []
    for j in range(len(at.loss)):
        one = AtFit(
            Curvature(
                float(at.loss[j]),
                tuple(float(g[j]) for g in at.gradient),
                tuple(tuple(float(h[j]) for h in row) for row in at.hessian),
            ),
            tuple(float(p[j]) for p in at.params),
            one_of(at.coords, j),
        )
        n = int(summaries[j][0])
        rows.append(spec.stats(one, summaries[j], weight_summary(None, n), options))
        converged.append(is_converged(one))
    return SetStats.of_rows(spec.params, rows, converged)


@dataclass(frozen=True, slots=True)
class _Trained:
    """What the compiled loop left of every row: parameters [B, k], histories [T, B], final
    losses and curvature rows (fit coordinates), and the epoch each row diverged at (0: it
    did not)."""

    params: Array
    history: Array
    final_loss: Array
    curvature: Array
    epochs_run: int
    stop: StopReason
    diverged_at: npt.NDArray[np.int64]


def _diverged(run: _Trained, j: int, learning_rate: float, coords: Coordinates) -> FitError:
    """Row ``j``'s divergence, worded as its single fit would word it."""
    if run.diverged_at[j]:
        return FitDiverged(epoch=int(run.diverged_at[j]), learning_rate=learning_rate)
    final = float(run.final_loss[j])
    if not math.isfinite(final):
        return FitDiverged(epoch=run.epochs_run, learning_rate=learning_rate)
    try:  # (``coords``: the row's map, its numbers picked out of the stacked arrays)
        check_descended(run.history[:, j], final, learning_rate, coords)
    except FitDiverged as diverged:
        return diverged
    raise AssertionError("a row the vectorized check found diverged passed the single check")


@dataclass(frozen=True, slots=True)
class FittedSets:
    """The sets that were fitted (``sets``, their indices), as arrays, row j set sets[j]."""

    sets: npt.NDArray[np.int64]
    params: Array
    losses: Array
    final_loss: Array
    stats: SetStats
    seeds: list[int | None]
    epochs_run: int
    stop: StopReason
    history_every: int
    scaling: Scaling
    params_names: tuple[str, ...]


class BatchResults(Sequence[FitResult | FitError]):
    """Every set's outcome, in order: a :class:`FitResult`, or the error that set's single
    fit would raise. Results are built from the batch's arrays as they are read."""

    def __init__(
        self, model: str, size: int, errors: dict[int, FitError], fitted: FittedSets | None
    ) -> None:
        self.model = model
        #: The sets that could not be fitted, by index, and the arrays of those that were.
        self.errors = errors
        self.fitted = fitted
        self._size = size
        self._position = np.full(size, -1, dtype=np.int64)
        if fitted is not None:
            self._position[fitted.sets] = np.arange(len(fitted.sets))
            self._params = fitted.params.tolist()
            self._final = fitted.final_loss.tolist()
            self._converged = fitted.stats.converged.tolist()
            self._n = fitted.stats.n.tolist()

    def __len__(self) -> int:
        return self._size

    @overload
    def __getitem__(self, i: int) -> FitResult | FitError: ...
    @overload
    def __getitem__(self, i: slice) -> list[FitResult | FitError]: ...
    def __getitem__(self, i: int | slice) -> FitResult | FitError | list[FitResult | FitError]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._size))]
        if i < 0:
            i += self._size
        if not 0 <= i < self._size:
            raise IndexError(i)
        if i in self.errors:
            return self.errors[i]
        f, j = self.fitted, int(self._position[i])
        assert f is not None and j >= 0
        stats = f.stats.row(j)
        converged = bool(self._converged[j])
        return FitResult(
            model=self.model,
            params=dict(zip(f.params_names, self._params[j], strict=True)),
            loss_history=f.losses[:, j],
            final_loss=self._final[j],
            epochs_run=f.epochs_run,
            n=self._n[j],
            stop_reason=f.stop,
            converged=converged,
            history_every=f.history_every,
            stats=stats,
            seed=f.seeds[j],
            warnings=() if converged else not_converged(stats, f.stop, f.scaling),
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
        autograph=False,
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
