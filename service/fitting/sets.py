"""Fits of one model to many data sets in one compiled call: the data sets are a leading
dimension B of every tensor in the loop.

A batch of B sets of one spec is a [B, S] matrix of summaries (an expression's summary is its
padded data, so sets of different lengths share the spec of the longest: the others are
padded with weight-0 points) and a [B, k] matrix of parameters. Each epoch is the single
fit's step on every row at once: the loss of each row ([B]), one ``GradientTape`` over their
sum (each row's gradient: rows share no parameters), and the update rule, written once for
one set and for a batch (:func:`~service.fitting.loop._levenberg_marquardt` takes each row's
own step, damping and scaling). Every row carries its own status: a row that meets a
stopping rule, or turns non-finite, stops there while the others go on; the loop ends when
no row runs. Nothing one row does reaches another: a divergent or degenerate set fails
alone.

B is padded to a power of two with copies of a real set (held stopped), so a compiled loop
serves every batch size up to its bucket. Each set's answer is then what its single fit
answers: the same statistics code (:func:`~service.fitting.loop.finish`) on the row it
ended on.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import tensorflow as tf

from service.fitting.expression import Expression
from service.fitting.loop import (
    GRADIENT_RULES,
    NON_FINITE,
    RUNNING,
    STEP_TOLERANCE,
    STOPS,
    Controls,
    DataSet,
    FitEngine,
    Run,
    StopCheck,
    check_descended,
    finish,
    fit_result,
    gradient_step,
    initial_state,
    levenberg_marquardt,
    loop_controls,
    prepare,
    state_layout,
    stopping_rule,
)
from service.fitting.models import ModelSpec
from service.fitting.models.expression import named
from service.fitting.options import (
    LEVENBERG_MARQUARDT,
    NO_STOPPING,
    ExpressionOptimizer,
    Optimizer,
    Stopping,
)
from service.fitting.results import (
    DegenerateData,
    FitDiverged,
    FitError,
    FitResult,
    FitStats,
    StopReason,
)
from service.fitting.scaling import quiet
from service.fitting.small import Numbers
from service.fitting.stats import AtFit, Curvature, curvature_rows, weight_summary

Array = npt.NDArray[np.float64]

#: Rows of the compiled loop at most: a batch of more sets streams through them.
TILE = 1024
#: Epochs per compiled call: a row whose set ended takes the next set between calls.
CALL_EPOCHS = 8
#: When every set has its own row (nothing waits to take a row), a call runs up to this many
#: epochs, and about ``CALL_WORK`` summary values x epochs (the deadline is checked between
#: calls): fewer calls, each ending with the curvature of every row.
LONG_CALL_EPOCHS = 128
CALL_WORK = 1 << 22
MIN_ROWS = 4
#: Rows whose statistics are computed at once (their extended-precision temporaries, about
#: 6 x 16 bytes a padded point, stay ~100 MB for 1,024 rows of 16,384 points).
STATS_ROWS = 1024
#: The update rules a batch offers (Newton's line search is per set: not yet in batches).
SET_OPTIMIZERS: tuple[ExpressionOptimizer, ...] = (LEVENBERG_MARQUARDT, "sgd", "momentum", "adam")


LM = Optimizer(LEVENBERG_MARQUARDT)


def rows_bucket(sets: int) -> int:
    """The padded number of rows: the next power of two, at least ``MIN_ROWS``."""
    return max(MIN_ROWS, 1 << max(0, sets - 1).bit_length())


@dataclass(frozen=True, slots=True)
class SetData:
    """One data set of a batch: the model's arrays (e.g. x, y), its weights (or None), its
    start (caller's units, the spec's parameter order) and its own model options (e.g. an
    expression's ``exact`` data), merged over the batch's."""

    data: tuple[Array, ...]
    initial: Sequence[float]
    weights: Array | None = None
    options: Mapping[str, Any] | None = None


def fit_sets(
    engine: FitEngine,
    model: str,
    sets: Sequence[SetData],
    *,
    learning_rate: float,
    epochs: int,
    options: Mapping[str, Any] | None = None,
    optimizer: Optimizer = LM,
    stopping: Stopping = NO_STOPPING,
    history_every: int = 1,
    should_stop: StopCheck | None = None,
) -> list[FitResult | FitError]:
    """Fit ``model`` (a built-in name, or ``"expression"`` with ``options["expression"]``)
    to every set in one compiled loop; each set's answer, or its own error, in order. Sets
    are fitted in the caller's units (no standardization), from their given starts."""
    if optimizer.name not in SET_OPTIMIZERS:
        raise ValueError(f"the {optimizer.name} update rule is not offered in batches")
    if not sets:
        return []
    n = max(one.data[0].size for one in sets)
    spec, expression, shared = engine.resolve(model, options, n)
    if optimizer.name == LEVENBERG_MARQUARDT and spec.residuals is None:
        raise ValueError(f"model {spec.name!r} is not least squares: no Levenberg-Marquardt")
    outcomes: list[FitResult | FitError | None] = [None] * len(sets)
    prepared: dict[int, tuple[DataSet, dict[str, Any], Numbers]] = {}
    for i, one in enumerate(sets):
        own = shared | dict(one.options or {})
        used = one.data[0].size if one.weights is None else int(np.count_nonzero(one.weights > 0))
        if used < spec.k:
            outcomes[i] = DegenerateData(
                f"{used} points (with a positive weight) cannot determine {spec.k} parameters"
            )
            continue
        try:
            data_set, start, _ = prepare(spec, one.data, one.weights, own, one.initial, "none")
        except FitError as error:
            outcomes[i] = error
            continue
        except ValueError as error:  # this set's arrays or start: its own error
            outcomes[i] = FitError(str(error))
            continue
        prepared[i] = (data_set, own, start)
    if prepared:
        runs = _SetLoop(engine, spec, optimizer, stopping, learning_rate, epochs).run(
            [prepared[i][0].summary for i in prepared],
            np.array([prepared[i][2] for i in prepared]),
            should_stop,
        )
        ran = dict(zip(prepared, runs, strict=True))
        for i, run in ran.items():
            if isinstance(run, FitError):
                outcomes[i] = run
        done = {i: run for i, run in ran.items() if not isinstance(run, FitError)}
        finished = _finish(spec, done, prepared, stopping, history_every)
        for i, result in finished.items():
            outcomes[i] = (
                result
                if expression is None or isinstance(result, FitError)
                else named(expression, result)
            )
    answered = [outcome for outcome in outcomes if outcome is not None]
    assert len(answered) == len(sets), "every set answers, with its result or its error"
    return answered


def _finish(
    spec: ModelSpec,
    runs: dict[int, Run],
    prepared: dict[int, tuple[DataSet, dict[str, Any], Numbers]],
    stopping: Stopping,
    history_every: int,
) -> dict[int, FitResult | FitError]:
    """Each run's result, as its single fit's (:func:`finish`): the statistics of all rows
    at once where the spec has them so."""
    if spec.stats_of_rows is None or spec.residual_sum is not None:
        out: dict[int, FitResult | FitError] = {}
        for i, run in runs.items():
            data_set, own, _ = prepared[i]
            try:
                out[i] = finish(spec, run, data_set, own, stopping, "none", history_every, None)
            except FitError as error:
                out[i] = error
        return out
    indices = list(runs)
    if not indices:
        return {}
    points = Curvature.of_rows(np.array([runs[i].curvature for i in indices]), spec.k)
    at = {
        i: AtFit(point, tuple(runs[i].params.tolist()))
        for i, point in zip(indices, points, strict=True)
    }
    stats: list[FitStats] = []
    for first in range(0, len(indices), STATS_ROWS):  # bounded extended-precision temporaries
        rows = indices[first : first + STATS_ROWS]
        with quiet():
            stats += spec.stats_of_rows(
                [at[i] for i in rows],
                np.stack([prepared[i][0].summary for i in rows]),
                [
                    weight_summary(prepared[i][0].weights, prepared[i][0].arrays[0].size)
                    for i in rows
                ],
                [prepared[i][1] for i in rows],
            )
    return {
        i: fit_result(spec, runs[i], at[i], stats[j], stopping, "none", history_every, None)
        for j, i in enumerate(indices)
    }


class _SetLoop:
    """The compiled loop of one spec, update rule and stopping rules for a bucket of rows,
    and its driver."""

    def __init__(
        self,
        engine: FitEngine,
        spec: ModelSpec,
        optimizer: Optimizer,
        stopping: Stopping,
        learning_rate: float,
        epochs: int,
    ) -> None:
        self.engine, self.spec, self.optimizer, self.stopping = engine, spec, optimizer, stopping
        self.learning_rate, self.epochs = learning_rate, epochs

    def run(
        self, summaries: list[Array], starts: Array, should_stop: StopCheck | None
    ) -> list[Run | FitError]:
        """Fit every set in a tile of rows (at most ``TILE``) that is refilled as sets end:
        a row whose set stopped takes the next set, so neither the sets that need the most
        iterations nor the padding of a batch to its compiled size keep the others' rows
        computing. Between calls (``CALL_EPOCHS`` epochs) the deadline is checked."""
        spec = self.spec
        sets = len(summaries)
        key = _loop_key(self.engine, spec, sets, self.optimizer.name, self.stopping.enabled)
        _, rows, chunk, _, _ = key
        loop = set_loop(self.engine, spec, key)
        summary = np.repeat(summaries[0][None], rows, 0)
        state = np.repeat(initial_state(starts[0])[None], rows, 0)
        status = np.full(rows, -1.0)  # -1: an empty row
        occupant = np.full(rows, -1)
        done = np.zeros(sets, dtype=np.int64)
        histories: list[list[Array]] = [[] for _ in range(sets)]
        runs: list[Run | FitError | None] = [None] * sets
        waiting = iter(range(sets))

        def fill(row: int) -> None:
            i = next(waiting, None)
            occupant[row] = -1 if i is None else i
            status[row] = -1.0 if i is None else float(RUNNING)
            if i is not None:
                summary[row] = summaries[i]
                state[row] = initial_state(starts[i])

        for row in range(rows):
            fill(row)
        curvature = np.zeros((rows, 1))
        while (active := occupant >= 0).any():
            if should_stop is not None and (reason := should_stop()) is not None:
                for row in np.flatnonzero(active).tolist():
                    i = int(occupant[row])
                    if done[i]:  # a set not yet started is answered as not fitted
                        runs[i] = self._ended(
                            i, state[row], RUNNING, curvature[row], done, histories, reason
                        )
                break
            # No set runs past its epochs: the call's length is the least any set has left.
            steps = min(chunk, self.epochs - int(done[occupant[active]].max()))
            c = np.array(loop_controls(self.learning_rate, steps, self.optimizer, self.stopping))
            out = loop(
                tf.constant(summary), tf.constant(state), tf.constant(status), tf.constant(c)
            )
            state, status, history, curvature, ran = (np.array(t) for t in out)
            for row in np.flatnonzero(active).tolist():
                i, count = int(occupant[row]), int(ran[row])
                if count:
                    histories[i].append(history[:count, row].copy())
                done[i] += count
                if status[row] != RUNNING or done[i] >= self.epochs:
                    runs[i] = self._ended(
                        i, state[row], status[row], curvature[row], done, histories, None
                    )
                    fill(row)
        return [
            run if run is not None else FitError("the deadline came before this set was fitted")
            for run in runs
        ]

    def _ended(
        self,
        i: int,
        state: Array,
        status: float,
        curvature: Array,
        done: npt.NDArray[np.int64],
        histories: list[list[Array]],
        reason: StopReason | None,
    ) -> Run | FitError:
        """Set ``i``'s run, ended in ``state`` with ``status`` (RUNNING: by its epochs, or
        by ``reason``), or its error."""
        epochs = int(done[i])
        if int(status) == NON_FINITE:
            return FitDiverged(
                epoch=epochs,
                learning_rate=self.learning_rate,
                advice=FitDiverged.SELF_STEPPING
                if self.optimizer.name == LEVENBERG_MARQUARDT
                else None,
            )
        parts = histories[i]
        history = np.concatenate(parts) if parts else np.zeros(0)
        histories[i] = []
        final = float(curvature[0])
        if not math.isfinite(final):
            return FitDiverged(epoch=epochs, learning_rate=self.learning_rate)
        stop: StopReason = STOPS.get(int(status)) or reason or "max_epochs"
        try:
            if history.size:
                check_descended(history, final, self.learning_rate)
        except FitError as error:
            return error
        params = state[: self.spec.k].copy()
        return Run(params, history, final, epochs, stop, curvature.copy())


_compile_lock = threading.Lock()


def code(value: int) -> Any:
    """A status code as the loop's float64 status tensors hold it."""
    return tf.constant(float(value), tf.float64)


LoopKey = tuple[str, int, int, ExpressionOptimizer, bool]


def _loop_key(
    engine: FitEngine, spec: ModelSpec, sets: int, optimizer: ExpressionOptimizer, stopping: bool
) -> LoopKey:
    """Which compiled loop ``sets`` sets of ``spec`` run in: its rows (a tile of at most
    ``TILE``) and epochs per call, with the update rule and the stopping rules."""
    rows = min(rows_bucket(sets), TILE)
    chunk = CALL_EPOCHS
    if sets <= rows:  # no set waits for a row: longer calls, bounded in work
        chunk = max(CALL_EPOCHS, min(LONG_CALL_EPOCHS, CALL_WORK // (rows * spec.summary.size)))
    return spec.name, rows, max(1, min(engine.epochs_per_call, chunk)), optimizer, stopping


def set_loop(engine: FitEngine, spec: ModelSpec, key: LoopKey) -> Any:
    """The compiled loop ``key`` of ``spec`` (made once; dropped with the spec's other loops
    when an expression is evicted)."""
    with _compile_lock:
        loop = engine.set_loops.get(key)
        if loop is None:
            loop = engine.set_loops[key] = _compile(spec, *key[1:])
    return loop


def expression_sets_compiled(
    engine: FitEngine,
    expression: Expression,
    n: int,
    sets: int,
    optimizer: ExpressionOptimizer,
    stopping: bool,
) -> bool:
    """Whether ``sets`` sets of ``expression`` (the longest of ``n`` points) would run a
    loop already traced and compiled (else the batch pays that first: seconds, and the
    compile's memory); a lookup that changes no cache."""
    spec = engine.expressions.peek(expression, n)
    if spec is None:
        return False
    loop = engine.set_loops.get(_loop_key(engine, spec, sets, optimizer, stopping))
    return loop is not None and loop.experimental_get_tracing_count() > 0


def _compile(
    spec: ModelSpec, rows: int, chunk: int, optimizer: ExpressionOptimizer, stopping: bool
) -> Any:
    """Up to ``chunk`` epochs of every running row: in are the summaries [rows, S], the
    state [rows, L] (:func:`state_layout`), the status of each row (RUNNING, a stop code,
    or -1: a padding row) and the :class:`Controls`; out are the state, the status, the
    loss history [chunk, rows], each row's loss, gradient and Hessian where it is, and the
    epochs each row ran."""
    layout = state_layout(spec.k)
    loss_fn, project_fn = spec.loss, spec.project
    signature = [
        tf.TensorSpec([rows, spec.summary.size], tf.float64),
        tf.TensorSpec([rows, layout.size], tf.float64),
        tf.TensorSpec([rows], tf.float64),
        tf.TensorSpec([len(Controls._fields)], tf.float64),
    ]

    @tf.function(jit_compile=spec.xla, autograph=False, input_signature=signature)
    def run(summary: Any, state: Any, status: Any, controls: Any) -> Any:
        c = Controls(*tf.unstack(controls))
        steps = tf.cast(c.steps, tf.int32)
        fields = layout.columns(state)
        start = [fields[name] for name in layout.names]
        history = tf.TensorArray(tf.float64, size=chunk, element_shape=[rows])

        def epoch(i: Any, status: Any, ran: Any, history: Any, *values: Any) -> Any:
            s = dict(zip(layout.names, values, strict=True))
            p = s["params"]
            running = tf.equal(status, code(RUNNING))
            first, second, step = s["first"], s["second"], s["step"]
            best, stall = s["best"], s["stall"]
            damping, growth, scale = s["damping"], s["growth"], s["scale"]
            if optimizer in GRADIENT_RULES:
                with tf.GradientTape() as tape:
                    tape.watch(p)
                    loss = loss_fn(p, summary)
                    total = tf.reduce_sum(loss)  # each row's gradient: rows share no parameters
                g = tape.gradient(total, p)
            else:  # the loss from the step's own residuals
                lm = levenberg_marquardt(spec, summary, p, damping, growth, scale)
                loss, g = lm.loss, lm.gradient
            stop = tf.fill([rows], code(RUNNING))
            if stopping:
                stop, best, stall = stopping_rule(c, loss, g, best, stall, tf.float64)
            if optimizer in GRADIENT_RULES:
                new_p, first, second, step = gradient_step(optimizer, c, p, g, first, second, step)
            else:
                new_p, damping, growth, scale = lm.params, lm.damping, lm.growth, lm.scale
                stop = tf.where(tf.equal(stop, code(RUNNING)) & lm.done, code(STEP_TOLERANCE), stop)
            if project_fn is not None:
                new_p = project_fn(new_p, summary)
            history = history.write(i, loss)
            finite = tf.math.is_finite(loss) & tf.reduce_all(
                tf.math.is_finite(tf.concat([new_p, first, second], axis=-1)), axis=-1
            )
            steps_on = tf.equal(stop, code(RUNNING)) | tf.equal(stop, code(STEP_TOLERANCE))
            new_status = tf.where(steps_on & ~finite, code(NON_FINITE), stop)
            keep = running & steps_on & finite
            updated = {
                "params": new_p,
                "first": first,
                "second": second,
                "step": step,
                "best": best,
                "stall": stall,
                "damping": damping,
                "growth": growth,
                "scale": scale,
            }
            moved = [
                tf.where(keep[:, None] if value.shape.rank == 2 else keep, updated[name], value)
                for name, value in zip(layout.names, values, strict=True)
            ]
            ran = ran + tf.cast(running & steps_on, tf.float64)
            return (i + 1, tf.where(running, new_status, status), ran, history, *moved)

        def going(i: Any, status: Any, *_: Any) -> Any:  # while any row runs
            return (i < steps) & tf.reduce_any(tf.equal(status, code(RUNNING)))

        out = tf.while_loop(
            going, epoch, [tf.constant(0), status, tf.zeros([rows], tf.float64), history, *start]
        )
        _, status_out, ran, history, *values = out
        state_out = tf.concat([tf.reshape(v, [rows, -1]) for v in values], axis=1)  # layout order
        params = values[layout.names.index("params")]
        curvature = curvature_rows(loss_fn, params, summary)
        return state_out, status_out, history.stack(), curvature, ran

    return run


__all__ = ["SET_OPTIMIZERS", "SetData", "expression_sets_compiled", "fit_sets", "rows_bucket"]
