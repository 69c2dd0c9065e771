"""Bounded execution of fits: admission, deadlines, cancellation.

- At most ``max_concurrent_fits`` fits run at once, in a dedicated thread pool; what may
  wait is decided by :mod:`service.admission` (places, memory, expected time), which
  raises :class:`~service.admission.Refused` at once (429 with Retry-After, or 413).
- Every fit has a deadline; the engine checks it between compiled chunks of epochs and
  returns what it reached with ``stop_reason="timeout"``.
- A caller that stops waiting (client gone) sets the fit's cancel flag; the engine abandons
  the fit at the next chunk boundary.
- Fits too small for a thread handoff run in the fit process (:mod:`service.fit_process`),
  beside the event loop; while it is not running (starting, or restarting after a death),
  on the event loop itself.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copyreg
import gc
import logging
import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field, replace
from functools import lru_cache, partial
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from service import tracing
from service.admission import (
    Admission,
    Refused,
    Ticket,
    memory_limit,
    release_memory,
    rss_bytes,
)
from service.fit_process import ProcessLost, WarmProcess
from service.fitting import (
    DegenerateData,
    FitCancelled,
    FitDiverged,
    FitEngine,
    FitError,
    FitResult,
    StopReason,
    configure_threads,
)
from service.fitting.batch import BatchEngine, BatchResults, Ragged
from service.fitting.datasets import gaussian_data, gaussian_samples, linear_data
from service.fitting.expression import CACHE_BYTES, CompileCost
from service.fitting.models import BUILT_IN
from service.fitting.models.expression import CACHE_SIZE, compile_key
from service.fitting.options import (
    LEVENBERG_MARQUARDT,
    NO_STOPPING,
    SGD,
    Optimizer,
    Scaling,
    Stopping,
)
from service.fitting.results import FitStats
from service.fitting.sets import SetData, expression_sets_compiled, fit_sets
from service.settings import Settings

log = logging.getLogger(__name__)

#: Memory each parser process may keep between parses (see service.api.parser_pool): the
#: automatic budget leaves this for each.
PARSER_RESERVE_BYTES = 128 * 1024 * 1024
#: What the fit process adds to the container once warm: its own memory, 516 MiB measured
#: (898 MiB resident, of which 381 MiB are TensorFlow's libraries, mapped by the server too
#: and counted in its resident memory), and the small fits it runs.
FIT_PROCESS_RESERVE_BYTES = 576 * 1024 * 1024
#: The fit process takes small fits only (milliseconds each). One it has not answered this
#: long after it was sent, or by its deadline if that comes first (but never sooner than
#: STUCK_FLOOR_S: in its first seconds the process may still compile a loop its background
#: warm-up has not reached, ~0.3-0.5 s), means the process is stuck (stopped, deadlocked):
#: it is killed (and restarted) and the fit runs in the server. (It was 10 s past the
#: deadline: with SIGSTOP on the process, fits with timeout_s 2 answered at 12 s, and those
#: without at 40 s.)
STUCK_AFTER_S = 2.0
STUCK_FLOOR_S = 1.0
#: What the warm-up after readiness adds to the server (batch loops, other variants):
#: measured ~250 MiB.
WARM_UP_BYTES = 300 * 1024 * 1024
#: Seconds a client refused because every compile place is taken is told to wait: a compile
#: takes one to a few seconds.
COMPILE_RETRY_S = 2
#: The automatic budget leaves this share of the limit for what no estimate counts.
BUDGET_SHARE = 0.95
MIN_BUDGET_BYTES = 64 * 1024 * 1024

T = TypeVar("T")
#: Uncompiled models remembered as fitted once (compiled at their second fit).
SEEN_MODELS = 4096
#: Seconds a client refused a place for a new expression's numpy fit is told to wait
#: (such fits take milliseconds).
FIRST_FIT_RETRY_S = 1
Array = npt.NDArray[np.float64]

__all__ = [
    "BatchJob",
    "BatchResults",
    "DegenerateData",
    "FitDiverged",
    "FitError",
    "FitJob",
    "FitResult",
    "FitStats",
    "FitWorker",
    "Optimizer",
    "Refused",
    "Reporter",
    "SetData",
    "SetsJob",
    "StillCompiling",
    "Stopping",
    "Ticket",
    "Training",
    "Unavailable",
    "gaussian_data",
    "gaussian_samples",
    "linear_data",
]


@dataclass(frozen=True, slots=True)
class Training:
    """How a single fit trains: step size, length, update rule, stopping, history."""

    learning_rate: float
    epochs: int
    optimizer: Optimizer = SGD
    stopping: Stopping = NO_STOPPING
    scaling: Scaling = "standardize"
    history_every: int = 1

    def keywords(self) -> dict[str, Any]:
        """What a single fit and a batch of sets both take from it (a batch fits in the
        caller's units: no scaling)."""
        return {
            "learning_rate": self.learning_rate,
            "epochs": self.epochs,
            "optimizer": self.optimizer,
            "stopping": self.stopping,
            "history_every": self.history_every,
        }


@dataclass(frozen=True, slots=True)
class FitJob:
    """One fit of ``model`` to ``data`` (the model's arrays in its order, e.g. x, y);
    ``initial`` in the caller's units and the model's parameter order; ``options`` the
    model's own (e.g. the Gaussian's reduction)."""

    model: str
    data: tuple[Array, ...]
    training: Training
    initial: tuple[float, ...] | None = None
    seed: int | None = None
    weights: Array | None = None
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class BatchJob:
    """Many data sets of one model: each array's values laid end to end, cut by ``lengths``."""

    model: str
    lengths: npt.NDArray[np.int64]
    data: tuple[Array, ...]
    learning_rate: float
    epochs: int
    initial: Array | None = None  # [B, k], NaN rows where a set gave none
    options: Mapping[str, Any] = field(default_factory=dict)
    seed: int | None = None
    scaling: Scaling = "standardize"
    history_every: int = 1


@dataclass(frozen=True, slots=True)
class SetsJob:
    """One model fitted to many data sets in one compiled loop (:mod:`service.fitting.sets`):
    ``options`` the model's (an expression's ``expression`` and ``bounds``)."""

    model: str
    sets: tuple[SetData, ...]
    training: Training
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Reporter:
    """Where a fit reports its progress: ``report(epochs_done, loss)`` every ``every`` epochs
    (called from the fit's thread)."""

    report: Callable[[int, float], None]
    every: int


class Unavailable(Exception):
    """Not now: 503 with Retry-After. The worker is not taking fits (still warming up, or
    shutting down), or (:class:`StillCompiling`) not this one yet."""

    retry_after = 1


class StillCompiling(Unavailable):
    """The fit's deadline came while its model was still compiling."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class FitMetrics:
    """Prometheus metrics of the execution layer."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.in_flight = Gauge(
            "tapefit_fits_in_flight",
            "Fit requests admitted and not finished (running or queued).",
            registry=registry,
        )
        self.running = Gauge(
            "tapefit_fits_running",
            "Fits executing (in the fit threads, the fit process or on the event loop).",
            registry=registry,
        )
        self.warm = Gauge(
            "tapefit_warm_up_complete",
            "1 once every compiled path is warm, the fit process's too (readiness needs only "
            "the default one).",
            registry=registry,
        )
        self.rejections = Counter(
            "tapefit_fit_rejections",
            "Fit requests refused at admission.",
            ["reason"],
            registry=registry,
        )
        self.fits = Counter(
            "tapefit_fits",
            "Finished fits by model and outcome "
            "(max_epochs, loss_tolerance, gradient_tolerance, step_tolerance, timeout, diverged, "
            "degenerate, cancelled, error).",
            ["model", "outcome"],
            registry=registry,
        )
        self.epochs = Counter(
            "tapefit_fit_epochs", "Training epochs run.", ["model"], registry=registry
        )
        self.duration = Histogram(
            "tapefit_fit_duration_seconds",
            "Wall time of a fit in the pool, queueing excluded.",
            ["model"],
            buckets=(
                0.001,
                0.0025,
                0.005,
                0.01,
                0.025,
                0.05,
                0.1,
                0.25,
                0.5,
                1,
                2.5,
                5,
                10,
                30,
                60,
            ),
            registry=registry,
        )
        self.process_restarts = Counter(
            "tapefit_fit_process_restarts",
            "Times the fit process died (or hung) and was started again.",
            registry=registry,
        )
        self.memory_budget = Gauge(
            "tapefit_memory_budget_bytes",
            "Memory admitted requests may hold (TAPEFIT_MEMORY_BUDGET_BYTES, or derived from "
            "the memory limit).",
            registry=registry,
        )
        self.compiled_bytes = Gauge(
            "tapefit_compiled_expression_bytes",
            "Memory compiled expressions keep (estimated; at most "
            "TAPEFIT_EXPRESSION_CACHE_BYTES, taken from the memory budget).",
            registry=registry,
        )
        self.memory_charged = Gauge(
            "tapefit_memory_charged_bytes",
            "Memory charged to the requests in progress (estimated peaks).",
            registry=registry,
        )
        self.uncompiled = Counter(
            "tapefit_uncompiled_fits",
            "Expression fits answered by the numpy loop while their loop was not compiled "
            "(a new expression or size bucket; TAPEFIT_UNCOMPILED_MAX_WORK).",
            registry=registry,
        )


@lru_cache(maxsize=4)
def shared_engine(
    epochs_per_call: int,
    expression_cache_size: int = CACHE_SIZE,
    expression_cache_bytes: int = CACHE_BYTES,
) -> FitEngine:
    """One engine per process and chunk size: it is stateless and thread-safe. Returned warm
    for small data (enough for readiness); see :meth:`FitWorker.start` for the rest."""
    engine = FitEngine(
        epochs_per_call=epochs_per_call,
        expression_cache_size=expression_cache_size,
        expression_cache_bytes=expression_cache_bytes,
    )
    engine.warm_up(large=False, variants=False)
    return engine


def settings_engine(settings: Settings) -> FitEngine:
    """The process's :func:`shared_engine` for these settings."""
    s = settings
    return shared_engine(s.epochs_per_call, s.expression_cache_size, s.expression_cache_bytes)


@lru_cache(maxsize=1)
def shared_batch_engine() -> BatchEngine:
    """One batch engine per process; its smallest bucket is compiled ahead of traffic."""
    engine = BatchEngine()
    engine.warm_up()
    return engine


class FitWorker:
    """Owns the fit thread pool, the parser process pool and admission control."""

    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.metrics = FitMetrics(registry or CollectorRegistry())
        self.admission = Admission(
            places=settings.max_concurrent_fits + settings.max_queued_fits,
            slots=settings.max_concurrent_fits,
            memory_budget=settings.memory_budget_bytes or (1 << 62),  # set at readiness
            max_queue_wait_s=settings.max_queue_wait_s,
        )
        # Read when scraped: charges end with requests and with compiles alike.
        self.metrics.memory_charged.set_function(lambda: self.admission.bytes)
        self.ready = False
        self.draining = False
        self.engine: FitEngine | None = None
        self._batch_ready: asyncio.Future[BatchEngine] | None = None
        self._warming: list[asyncio.Future[Any]] = []
        self._fit_pool = ThreadPoolExecutor(
            max_workers=settings.max_concurrent_fits, thread_name_prefix="fit"
        )
        # Fits that must first compile (a new expression or size bucket) run here, apart
        # from the fit slots: a flood of new expressions queues (then 429s) on its own.
        self._compile_pool = ThreadPoolExecutor(
            max_workers=settings.compile_threads, thread_name_prefix="compile"
        )
        # Fits of new expressions answered by the numpy loop run here, one at a time, apart
        # from the fit slots too (and at most MAX_QUEUED_COMPILES wait): cached fits keep
        # their slots and their pace through a flood of new expressions.
        self._first_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="first-fit")
        self._first_fits = 0
        #: Compiles in progress (running or queued), by what they make; each done when its
        #: compile thread is.
        self._pending: dict[tuple[str, str, bool], asyncio.Future[None]] = {}
        #: Models fitted once by the numpy loop (the most recent SEEN_MODELS): compiled when
        #: fitted again.
        self._seen: OrderedDict[tuple[str, str, bool], None] = OrderedDict()
        self._process: WarmProcess | None = None
        self._warm_here = False
        self._base_budget = self.admission.memory_budget
        self._trim: asyncio.TimerHandle | None = None
        self._trimmed = self._ended = 0.0

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self, *warm_ups: Callable[[], object]) -> None:
        """Set TensorFlow's threads, build and warm the compiled loops; the rest of the
        warm-up, and ``warm_ups`` (the app's: its parser processes), run after readiness."""
        s = self.settings
        loop = asyncio.get_running_loop()
        configure_threads(s.intra_op_threads, s.inter_op_threads)
        self.engine = await loop.run_in_executor(self._fit_pool, settings_engine, s)
        self._set_budget(warm=False)
        self.ready = True
        # The large-data entry points and the batch loops warm after readiness, so start-up
        # stays close to a bare TensorFlow import; a request that needs them earlier waits
        # for the same one-time tracing (a lock), never for a second one.
        engine = self.engine
        # Until the parser process is up, large bodies are parsed in a thread.
        # (In the default executor: warm-ups never take a fit slot.)
        self._batch_ready = loop.run_in_executor(None, shared_batch_engine)
        self._warming = [
            *(loop.run_in_executor(None, warm_up) for warm_up in warm_ups),
            loop.run_in_executor(None, lambda: engine.warm_up(small=False)),
            self._batch_ready,
        ]
        for future in self._warming:
            future.add_done_callback(_log_failure)
        if s.fit_processes:
            setup = partial(
                _warm_fit_engine,
                s.epochs_per_call,
                s.expression_cache_size,
                s.intra_op_threads,
                s.inter_op_threads,
            )
            self._process = WarmProcess(
                setup,
                _fit_here,
                on_ready=self._mark_warm,
                on_restart=self.metrics.process_restarts.inc,
            )
            self._process.start()
        warm = asyncio.gather(*self._warming, return_exceptions=True)
        warm.add_done_callback(lambda _: self._warmed())
        log.info("worker ready", extra={"trace_counts": engine.trace_counts()})

    def _warmed(self) -> None:
        """Everything is compiled: move the millions of long-lived objects TensorFlow and
        Keras made into the collector's permanent generation. Otherwise every full
        collection walks them all, holding the GIL for hundreds of milliseconds, and a burst
        of allocations (a large batch answer) stalls the event loop with it."""
        gc.collect()
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        self._set_budget(warm=True)
        self._warm_here = True
        self._mark_warm()

    def _mark_warm(self) -> None:
        """``tapefit_warm_up_complete`` is 1 once this process and the fit process are warm
        (the latter's restarts do not reset it: they are counted)."""
        process = self._process
        if self._warm_here and (process is None or process.ready):
            self.metrics.warm.set(1)

    def _set_budget(self, warm: bool) -> None:
        """The memory budget, unless set: from the limit less what the server holds, first at
        readiness (allowing for the warm-up still to come), then once warm; less, always,
        what compiled expressions keep (:class:`ExpressionModels`, at most
        ``TAPEFIT_EXPRESSION_CACHE_BYTES``)."""
        s = self.settings
        if not s.memory_budget_bytes:
            limit = s.memory_limit_bytes or memory_limit()
            budget = auto_memory_budget(limit, s.parse_processes, s.fit_processes)
            self._base_budget = budget if warm else budget - WARM_UP_BYTES
        self._count_compiled()

    def _count_compiled(self) -> None:
        """The budget less what compiled expressions keep now (after each compile)."""
        kept = int(self.engine.expressions.bytes) if self.engine is not None else 0
        self.metrics.compiled_bytes.set(kept)
        if not self.settings.memory_budget_bytes:
            self.admission.memory_budget = max(MIN_BUDGET_BYTES, self._base_budget - kept)
        self.metrics.memory_budget.set(self.admission.memory_budget)

    async def wait_warm(self) -> None:
        """Wait for the background warm-ups that follow readiness, and for the fit process
        (tests, benchmarks)."""
        await asyncio.gather(*self._warming)
        if self._process is not None:
            await self._process.wait_ready()

    @property
    def fit_process(self) -> WarmProcess | None:
        return self._process

    def begin_drain(self) -> None:
        """Stop admitting fits; those in progress go on."""
        self.draining = True

    async def stop(self) -> None:
        self.begin_drain()
        self.ready = False
        self._fit_pool.shutdown(wait=False, cancel_futures=True)
        self._compile_pool.shutdown(wait=False, cancel_futures=True)
        self._first_pool.shutdown(wait=False, cancel_futures=True)
        if self._process is not None:
            await self._process.stop()

    # -- admission ----------------------------------------------------------------------------

    @asynccontextmanager
    async def admit(self) -> AsyncIterator[Ticket]:
        """A ticket for one request: refused at once (before its body is read) when the
        service is not serving or every place is taken; the request then charges its body and
        its fit to the ticket (:mod:`service.admission`), and everything is released when it
        ends."""
        if self.draining or not self.ready:
            self.metrics.rejections.labels("unavailable").inc()
            raise Unavailable(
                "the service is shutting down" if self.draining else "the service is warming up"
            )
        ticket = self.admission.open()
        try:
            self.admission.check_place()
            self.metrics.in_flight.inc()
            try:
                yield ticket
            finally:
                self.metrics.in_flight.dec()
        except Refused as refused:
            self.metrics.rejections.labels(refused.reason).inc()
            raise
        finally:
            ticket.close()
            self._trim_soon()

    def _trim_soon(self) -> None:
        """Hand freed heap memory back (:func:`release_memory`, in a thread) once requests
        pause for TRIM_QUIET_S, or at least every TRIM_EVERY_S under steady load. Trimming
        as each request's handler returned missed what its answer freed after (8 concurrent
        300k-point expression fits left the server 232 MiB that one later trim gave back),
        and requests whose charge was small (a 20,000-event progress stream) never trimmed.
        A request's end only notes the time; one timer at most is pending."""
        loop = asyncio.get_running_loop()
        self._ended = loop.time()
        if self._trim is None:
            self._trim = loop.call_later(TRIM_QUIET_S, self._trim_if_quiet)

    def _trim_if_quiet(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        quiet_at = self._ended + TRIM_QUIET_S
        if now < quiet_at and now - self._trimmed < TRIM_EVERY_S:
            self._trim = loop.call_later(quiet_at - now, self._trim_if_quiet)
            return
        self._trim = None
        self._trimmed = now
        with contextlib.suppress(RuntimeError):  # the executor is shut down: exiting
            loop.run_in_executor(None, release_memory).add_done_callback(_log_failure)

    # -- fitting --------------------------------------------------------------------------

    async def fit(
        self,
        job: FitJob,
        timeout_s: float | None = None,
        progress: Reporter | None = None,
        ticket: Ticket | None = None,
    ) -> FitResult:
        """Run one fit in the pool; cancelling the caller abandons the fit. ``progress``
        receives (epochs done, loss) in the fit's thread every ``progress.every`` epochs.
        The time it took sets admission's pace against the estimate on its ``ticket``."""
        if self.engine is None:
            raise Unavailable("the service is warming up")
        engine = self.engine
        deadline = time.monotonic() + self.deadline_s(timeout_s)
        cancelled, should_stop = self._stop_check(deadline)
        trace = Trace.here()
        if job.model == "expression" and not self._compiled(engine, job):
            key = self._compile_key(job)
            if self.uncompiled_serves(job):
                # Answered now by the numpy loop (its time says nothing of the compiled
                # pace); the compiled loop is made behind it, for the fits that follow.
                self._compile_behind(engine, job, key)
                return await self._first_fit(engine, job, cancelled, should_stop, progress, trace)
            while (compiling := self._pending.get(key)) is not None:
                # The same loop is compiling for another request (perhaps under other
                # names): wait for it, not compile it twice.
                remaining = max(0.0, deadline - time.monotonic())
                await asyncio.wait({compiling}, timeout=remaining)
                if not compiling.done():
                    raise self._still_compiling(job)
            if not self._compiled(engine, job):
                # A compiling fit's time says nothing of the pace.
                return await self._compile(
                    engine, job, key, deadline, cancelled, should_stop, progress, trace
                )
        if progress is None and self.inline(ticket):
            result, seconds = await self._run_small(engine, job, deadline, should_stop, trace)
        else:
            loop = asyncio.get_running_loop()
            future = loop.run_in_executor(
                self._fit_pool, self._run, engine, job, should_stop, progress, trace
            )
            result, seconds = await self._cancellable(future, cancelled, job.model)
        # One cut by its deadline says nothing of the pace either.
        if ticket is not None and result.stop_reason != "timeout":
            ticket.observe(seconds)
        return result

    async def _compile(
        self,
        engine: FitEngine,
        job: FitJob,
        key: tuple[str, str, bool],
        deadline: float,
        cancelled: threading.Event,
        should_stop: Callable[[], StopReason | None],
        progress: Reporter | None,
        trace: Trace | None,
    ) -> FitResult:
        """A fit that must first compile its loops (a new expression or size bucket), on the
        compile threads, apart from the fit slots: a flood of new expressions queues (then
        is refused) on its own.

        The compile's memory (:class:`CompileCost`) is charged to the budget from before it
        starts until it ends, and its place on the compile threads is held as long: past the
        request's deadline the request answers :class:`StillCompiling` (503, Retry-After),
        a compile not yet started never starts, and one under way finishes (bounded by
        ``TAPEFIT_MAX_EXPRESSION_COMPLEXITY``) and stays cached for the retry."""
        running = self._start_compile(
            engine,
            job,
            key,
            partial(self._run_compiling, engine, job, should_stop, progress, trace),
        )
        answer = asyncio.wrap_future(running)
        answer.add_done_callback(read_outcome)
        try:
            result, _ = await asyncio.wait_for(
                asyncio.shield(answer), max(0.0, deadline - time.monotonic())
            )
        except TimeoutError:
            cancelled.set()  # a compile under way finishes, then its fit stops at once
            running.cancel()  # one still queued never starts
            raise self._still_compiling(job) from None
        except asyncio.CancelledError:
            cancelled.set()
            running.cancel()
            self.metrics.fits.labels(job.model, "cancelled").inc()
            raise
        return result

    async def _first_fit(
        self,
        engine: FitEngine,
        job: FitJob,
        cancelled: threading.Event,
        should_stop: Callable[[], StopReason | None],
        progress: Reporter | None,
        trace: Trace | None,
    ) -> FitResult:
        """A fit of a new expression by the numpy loop, on the first-fit thread; 429 when it
        and its queue (``TAPEFIT_MAX_QUEUED_COMPILES``) are full."""
        if self._first_fits >= 1 + self.settings.max_queued_compiles:
            # (counted once, by admit(), as every refusal inside a request is)
            raise Refused(
                "compiling",
                FIRST_FIT_RETRY_S,
                "every place for fits of new expressions is taken; retry, or reuse an "
                "expression (compiled ones fit at once)",
            )
        self._first_fits += 1
        self.metrics.uncompiled.inc()
        try:
            loop = asyncio.get_running_loop()
            future = loop.run_in_executor(
                self._first_pool, self._run, engine, job, should_stop, progress, trace, True
            )
            result, _ = await self._cancellable(future, cancelled, job.model)
            return result
        finally:
            self._first_fits -= 1

    def _start_compile(
        self, engine: FitEngine, job: FitJob, key: tuple[str, str, bool], work: Callable[[], T]
    ) -> concurrent.futures.Future[T]:
        """``work`` (a fit that compiles ``key``) on a compile thread, admitted as compiles
        are: a place among the compile threads and their queue (429 past them), and the
        compile's memory (:class:`CompileCost`) charged to the budget from now until it
        ends (429 or 413). Requests for ``key`` meanwhile find it in ``_pending``."""
        if len(self._pending) >= self.settings.compile_threads + self.settings.max_queued_compiles:
            # (counted once, by admit(), as every refusal inside a request is)
            raise Refused(
                "compiling",
                COMPILE_RETRY_S,
                "every compile thread and queue place is taken by new expressions; "
                "retry, or reuse an expression (compiled ones fit at once)",
            )
        expression = job.options["expression"]
        charge = self.admission.open()
        # Less the plain graphs the new spec evicts before it compiles: one held beyond
        # TAPEFIT_EXPRESSION_CACHE_BYTES (the newest alone may be) must not refuse the next.
        busy = {compiling[0] for compiling in self._pending}
        freed = engine.expressions.freed_by(expression, job.data[0].size, busy)
        try:
            charge.charge_bytes(max(0.0, CompileCost.peak_bytes(expression) - freed))
        except Refused:
            charge.close()  # a refused compile holds nothing (its ticket counted as in progress)
            raise
        loop = asyncio.get_running_loop()
        running = self._compile_pool.submit(work)
        self._pending[key] = done = loop.create_future()

        def compiled() -> None:
            charge.close()
            self._count_compiled()
            self._pending.pop(key, None)
            done.set_result(None)

        def when_done(_: concurrent.futures.Future[T]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: the service ended
                loop.call_soon_threadsafe(compiled)

        running.add_done_callback(when_done)
        return running

    def _compile_behind(self, engine: FitEngine, job: FitJob, key: tuple[str, str, bool]) -> None:
        """Compile ``key`` in the background (one epoch of ``job``, its answer dropped) once
        it is fitted a second time, if it is not compiling already and a compile thread and
        the memory are free: else the next fit of the model answers from the numpy loop
        again, and tries again. (A model fitted once, as someone trying models in /docs
        does, never pays a compile; one fitted again is compiled while it is answered. A
        trace holds the GIL for much of its second or two, and slowed the numpy fits of
        the next new models beside it ~8x.)"""
        if key in self._pending:
            return
        if key not in self._seen:
            self._seen[key] = None
            if len(self._seen) > SEEN_MODELS:
                self._seen.popitem(last=False)
            return
        del self._seen[key]
        one_epoch = replace(job, training=replace(job.training, epochs=1))
        work = partial(self._warm, engine, one_epoch)
        try:
            running = self._start_compile(engine, job, key, work)
        except Refused as refused:
            log.info("not compiling %s behind its first fit now: %s", key[0], refused.reason)
            return
        running.add_done_callback(_log_failure)

    @staticmethod
    def _warm(engine: FitEngine, job: FitJob) -> None:
        """Compile a job's loop by running it (how it ends does not matter); then the memory
        the compile freed goes back to the system."""
        try:
            FitWorker._dispatch(engine, job, lambda: None)
        except FitError:
            pass
        finally:
            release_memory()

    def _still_compiling(self, job: FitJob) -> StillCompiling:
        """A fit whose deadline came while its model compiled: counted, and its answer."""
        self.metrics.fits.labels(job.model, "timeout").inc()
        retry = max(1, math.ceil(CompileCost.seconds(job.options["expression"])))
        return StillCompiling(
            f"the expression was still compiling at the fit's deadline (a new expression or "
            f"size bucket compiles first: about {retry} s for this one); retry after {retry} s: "
            "its compiled fit is kept",
            retry_after=retry,
        )

    @staticmethod
    def _compile_key(job: FitJob) -> tuple[str, str, bool]:
        """What one compile makes: the loop of an expression's spec for a size bucket."""
        t = job.training
        spec = compile_key(job.options["expression"], job.data[0].size)
        return spec, t.optimizer.name, t.stopping.enabled

    def _run_compiling(
        self,
        engine: FitEngine,
        job: FitJob,
        should_stop: Callable[[], StopReason | None],
        progress: Reporter | None,
        trace: Trace | None,
    ) -> tuple[FitResult, float]:
        """:meth:`_run` on a compile thread; then the memory a compile freed (graphs of
        evicted expressions, the compiler's scratch) goes back to the system."""
        try:
            return self._run(engine, job, should_stop, progress, trace)
        finally:
            release_memory()

    def inline(self, ticket: Ticket | None) -> bool:
        """Whether a fit charged on ``ticket`` is expected to take so little that it runs on
        the event loop: no thread handoff, no disconnect watcher. Judged by the cost model
        alone, not the pace: fits in the pool wait for the GIL and measure slower, and a
        pace-driven choice would push more fits there (measured: a load that settled at
        ~1.3 ms of CPU a request flipped to ~4 ms)."""
        return ticket is not None and 0.0 < ticket.estimate <= self.settings.inline_fit_max_s

    def runs_apart(self, job: FitJob) -> bool:
        """Whether this fit runs apart from the fit slots, as fits of models not compiled
        yet do: compiled first, or answered by the numpy loop (a new expression or
        bucket)."""
        engine = self.engine
        if engine is None or job.model != "expression":
            return False
        return not self._compiled(engine, job)

    def uncompiled_serves(self, job: FitJob) -> bool:
        """Whether an expression fit whose loop is not compiled answers from the numpy loop
        (Levenberg-Marquardt, points x complexity within ``TAPEFIT_UNCOMPILED_MAX_WORK``)
        rather than wait for its compile."""
        work = job.data[0].size * job.options["expression"].complexity
        return (
            work <= self.settings.uncompiled_max_work
            and job.training.optimizer.name == LEVENBERG_MARQUARDT
        )

    @staticmethod
    def _compiled(engine: FitEngine, job: FitJob) -> bool:
        """Whether the loop an expression fit will run is compiled (cheap: a cache lookup
        that changes nothing, so that refused requests never flush the cache)."""
        training = job.training
        return engine.expression_compiled(
            job.options["expression"],
            job.data[0].size,
            training.optimizer.name,
            training.stopping.enabled,
        )

    async def fit_batch(
        self, job: BatchJob, timeout_s: float | None = None, ticket: Ticket | None = None
    ) -> BatchResults:
        """Run a batch in the pool: one vectorized loop; per-set errors come back in place."""
        if self._batch_ready is None:
            raise Unavailable("the service is warming up")
        engine = await asyncio.shield(self._batch_ready)
        return await self._batch(
            f"{job.model}_batch",
            lambda should_stop: _run_batch(engine, job, should_stop),
            timeout_s,
            ticket,
        )

    async def fit_sets(
        self, job: SetsJob, timeout_s: float | None = None, ticket: Ticket | None = None
    ) -> list[FitResult | FitError]:
        """Fit every set of ``job`` in one compiled loop on a fit thread (its first call of
        a new expression or bucket of rows compiles there); each set's result or error."""
        if self.engine is None:
            raise Unavailable("the service is warming up")
        engine = self.engine

        def run(should_stop: Callable[[], StopReason | None]) -> list[FitResult | FitError]:
            return fit_sets(
                engine,
                job.model,
                job.sets,
                options=job.options,
                should_stop=should_stop,
                **job.training.keywords(),
            )

        return await self._batch(f"{job.model}_batch", run, timeout_s, ticket)

    def sets_compiled(self, job: SetsJob) -> bool:
        """Whether an expression batch would run a compiled loop at once (else it compiles
        first, and its admission charges the compile's memory)."""
        if self.engine is None:
            return False
        t = job.training
        return expression_sets_compiled(
            self.engine,
            job.options["expression"],
            max(one.data[0].size for one in job.sets),
            len(job.sets),
            t.optimizer.name,
            t.stopping.enabled,
        )

    async def _batch(
        self,
        label: str,
        work: Callable[[Callable[[], StopReason | None]], T],
        timeout_s: float | None,
        ticket: Ticket | None,
    ) -> T:
        """``work(should_stop)`` on a fit thread, counted under ``label`` (running, its
        duration and outcome); cancelling the caller stops it at its next chunk. The time it
        took sets admission's pace against the estimate on its ``ticket``."""
        cancelled, should_stop = self._stop_check(time.monotonic() + self.deadline_s(timeout_s))
        seconds = 0.0

        def run() -> T:
            nonlocal seconds
            start = time.perf_counter()
            outcome = "error"
            self.metrics.running.inc()
            try:
                results = work(should_stop)
                outcome = "batch"
                return results
            except FitCancelled:
                outcome = "cancelled"  # counted by the caller
                raise
            finally:
                self.metrics.running.dec()
                seconds = time.perf_counter() - start
                self.metrics.duration.labels(label).observe(seconds)
                if outcome != "cancelled":
                    self.metrics.fits.labels(label, outcome).inc()

        future = asyncio.get_running_loop().run_in_executor(self._fit_pool, run)
        results = await self._cancellable(future, cancelled, label)
        if ticket is not None:
            ticket.observe(seconds)
        return results

    @staticmethod
    def _stop_check(
        deadline: float,
    ) -> tuple[threading.Event, Callable[[], StopReason | None]]:
        """A cancel flag, and the check the engine runs between compiled chunks."""
        cancelled = threading.Event()

        def should_stop() -> StopReason | None:
            if cancelled.is_set():
                raise FitCancelled
            return _past(deadline)

        return cancelled, should_stop

    async def _cancellable(
        self, future: asyncio.Future[T], cancelled: threading.Event, label: str
    ) -> T:
        try:
            return await future
        except asyncio.CancelledError:
            # Counted here, queued or running: a running fit stops at its next chunk.
            cancelled.set()
            self.metrics.fits.labels(label, "cancelled").inc()
            raise

    def deadline_s(self, timeout_s: float | None) -> float:
        """Seconds a fit asking for ``timeout_s`` may run (queueing included)."""
        limit = self.settings.fit_timeout_s
        return limit if timeout_s is None else min(timeout_s, limit)

    async def _run_small(
        self,
        engine: FitEngine,
        job: FitJob,
        deadline: float,
        should_stop: Callable[[], StopReason | None],
        trace: Trace | None = None,
    ) -> tuple[FitResult, float]:
        """A fit too small for a thread: in the fit process when it is running and has the
        model (its engine has the built-in ones; expressions, and models registered here
        only, fit here), else on the event loop. A fit the process lost (it died, or hung)
        runs here: nothing accepted is lost."""
        process = self._process
        spec = engine.models.get(job.model)
        if (
            process is not None
            and process.ready
            and spec is not None
            and spec is BUILT_IN.get(job.model)
        ):
            # Linux's monotonic clock is the machine's: the process reads the same deadline.
            try:
                with self._counted(job.model) as tally:
                    left = deadline - time.monotonic()
                    stuck = min(STUCK_AFTER_S, max(left, STUCK_FLOOR_S))
                    tally.result, tally.seconds = await process.call(
                        job, deadline, None if trace is None else trace.crossing(), timeout_s=stuck
                    )
            except ProcessLost:
                log.warning("the fit process lost a fit: fitting it here")
            else:
                return tally.result, tally.seconds
        return self._run(engine, job, should_stop, None, trace)

    def _run(
        self,
        engine: FitEngine,
        job: FitJob,
        should_stop: Callable[[], StopReason | None],
        progress: Reporter | None = None,
        trace: Trace | None = None,
        uncompiled: bool = False,
    ) -> tuple[FitResult, float]:
        """The fit here, and the seconds it took."""
        start = time.perf_counter()
        with self._counted(job.model) as tally, traced(trace, job) as done:
            tally.result = self._dispatch(engine, job, should_stop, progress, uncompiled)
            done(tally.result)
        return tally.result, time.perf_counter() - start

    @contextmanager
    def _counted(self, model: str) -> Iterator[_Tally]:
        """The metrics of one fit: running while in the block, then its duration (the
        tally's seconds, else the block's), its epochs and its outcome. A fit the fit process
        lost is not counted (it runs again, and counts then); one abandoned in a thread
        (FitCancelled) is counted by its caller, and one whose awaiting caller was cancelled,
        here."""
        tally = _Tally()
        outcome = "error"
        start = time.perf_counter()
        self.metrics.running.inc()
        try:
            yield tally
            outcome = tally.result.stop_reason
            self.metrics.epochs.labels(model).inc(tally.result.epochs_run)
        except FitDiverged:
            outcome = "diverged"
            raise
        except DegenerateData:
            outcome = "degenerate"
            raise
        except FitCancelled:
            outcome = "abandoned"  # the caller counts it cancelled
            raise
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except ProcessLost:
            outcome = "lost"
            raise
        finally:
            self.metrics.running.dec()
            if outcome != "lost":
                seconds = time.perf_counter() - start if tally.seconds is None else tally.seconds
                self.metrics.duration.labels(model).observe(seconds)
            if outcome not in ("abandoned", "lost"):
                self.metrics.fits.labels(model, outcome).inc()

    @staticmethod
    def _dispatch(
        engine: FitEngine,
        job: FitJob,
        should_stop: Callable[[], StopReason | None],
        progress: Reporter | None = None,
        uncompiled: bool = False,
    ) -> FitResult:
        return engine.fit(
            job.model,
            *job.data,
            scaling=job.training.scaling,
            initial=job.initial,
            seed=job.seed,
            weights=job.weights,
            options=job.options,
            should_stop=should_stop,
            on_progress=progress.report if progress is not None else None,
            progress_every=progress.every if progress is not None else None,
            uncompiled=uncompiled,
            **job.training.keywords(),
        )


def _by_fields(obj: Any) -> tuple[type[Any], tuple[Any, ...]]:
    """Pickle a slotted dataclass as its class and its fields (pickle's default, through
    ``dataclasses.fields``, takes ~3x longer)."""
    return type(obj), tuple([getattr(obj, name) for name in obj.__slots__])


def _job_by_fields(job: FitJob) -> tuple[Callable[..., FitJob], tuple[Any, ...]]:
    """A fit job as its fields, its arrays as their float64 bytes."""
    weights = None if job.weights is None else _raw(job.weights)
    data = tuple([_raw(values) for values in job.data])
    fields = (job.model, data, job.training, job.initial, job.seed, weights, dict(job.options))
    return _job_from_fields, fields


def _job_from_fields(
    model: str,
    data: tuple[bytes, ...],
    training: Training,
    initial: tuple[float, ...] | None,
    seed: int | None,
    weights: bytes | None,
    options: dict[str, Any],
) -> FitJob:
    return FitJob(
        model,
        tuple([_array(values) for values in data]),
        training,
        initial,
        seed,
        None if weights is None else _array(weights),
        options,
    )


_HISTORY_AT = FitResult.__slots__.index("loss_history")


def _result_by_fields(result: FitResult) -> tuple[Callable[..., FitResult], tuple[Any, ...]]:
    """A fit's result as its fields, its loss history as float64 bytes."""
    fields = [getattr(result, name) for name in result.__slots__]
    fields[_HISTORY_AT] = _raw(result.loss_history)
    return _result_from_fields, tuple(fields)


def _result_from_fields(*fields: Any) -> FitResult:
    values = list(fields)
    values[_HISTORY_AT] = _array(values[_HISTORY_AT])
    return FitResult(*values)


def _raw(values: Array) -> bytes:
    return np.ascontiguousarray(values, dtype=np.float64).tobytes()


def _array(raw: bytes) -> Array:
    return np.frombuffer(raw, dtype=np.float64).copy()


# Every small fit crosses to the fit process pickled, and back: lean pickles measured 17 -> 7 µs
# a job, and 13 -> 7 µs a result's unpickling, on the event loop.
copyreg.pickle(FitJob, _job_by_fields)
copyreg.pickle(FitResult, _result_by_fields)
for _slotted in (Training, Optimizer, Stopping, FitStats):
    copyreg.pickle(_slotted, _by_fields)


@dataclass(frozen=True, slots=True)
class Trace:
    """A fit's place in its request's trace: the context its spans are children of, and
    when it was handed over (the ``admission`` span is the wait from then until it runs)."""

    context: Any
    submitted_ns: int

    @classmethod
    def here(cls) -> Trace | None:
        """The current request's, or None while tracing is off."""
        context = tracing.current()
        return None if context is None else cls(context, time.time_ns())

    def crossing(self) -> tuple[dict[str, str], int]:
        """What crosses to the fit process: the context as W3C headers, and the time."""
        return tracing.carrier(self.context), self.submitted_ns


def traced(
    trace: Trace | None, job: FitJob
) -> contextlib.AbstractContextManager[Callable[[FitResult], None]]:
    """The ``admission`` span (the wait) and, around the block, the ``fit`` span with the
    fit's model, n, epochs, optimizer, request id and, once known, its stop reason; a null
    context (nothing made on a fit's path) while the fit is not traced."""
    if trace is None or not tracing.enabled():
        return contextlib.nullcontext(_ignore)
    return _spans(trace, job)


@contextmanager
def _spans(trace: Trace, job: FitJob) -> Iterator[Callable[[FitResult], None]]:
    with tracing.span("admission", context=trace.context, start_time=trace.submitted_ns):
        pass
    t = job.training
    attributes = {
        "tapefit.model": job.model,
        "tapefit.n": int(job.data[0].size),
        "tapefit.epochs": t.epochs,
        "tapefit.optimizer": t.optimizer.name,
    }
    if (request_id := tracing.request_id(trace.context)) is not None:
        attributes[tracing.REQUEST_ID] = request_id
    with tracing.span("fit", context=trace.context, attributes=attributes) as span:
        assert span is not None

        def done(result: FitResult) -> None:
            span.set_attribute("tapefit.stop_reason", result.stop_reason)
            span.set_attribute("tapefit.epochs_run", result.epochs_run)

        yield done


def _ignore(result: FitResult) -> None:
    pass


class _Tally:
    """What a fit produced, and the seconds it took where it ran (another process's)."""

    result: FitResult
    seconds: float | None = None


def _warm_fit_engine(
    epochs_per_call: int, expression_cache_size: int, intra_op_threads: int, inter_op_threads: int
) -> FitEngine:
    """The fit process's engine: the server's threads and its default loops warm, so that
    the process takes small fits soon (from process start 9.5-10.1 s here, against 20.7 s
    when it warmed every loop first; /readyz comes at ~4 s). The other optimizers' and
    stopping rules' loops warm in a thread of the process while it already serves (a fit
    that needs one first compiles it, as before warm-up)."""
    configure_threads(intra_op_threads, inter_op_threads)
    tracing.configure("tapefit-fit")  # only if OTEL_EXPORTER_OTLP_*ENDPOINT asks for it
    engine = shared_engine(epochs_per_call, expression_cache_size)
    threading.Thread(
        target=partial(engine.warm_up, small=True, large=False), name="warm-up", daemon=True
    ).start()
    gc.set_threshold(*GC_THRESHOLDS)
    return engine


def _fit_here(
    engine: FitEngine,
    job: FitJob,
    deadline: float,
    crossing: tuple[dict[str, str], int] | None = None,
) -> tuple[FitResult, float]:
    """One fit in the fit process, stopped at ``deadline`` (``time.monotonic()``); and the
    seconds it took. Its spans (``crossing``: the request's trace) are this process's."""
    trace = None if crossing is None else Trace(tracing.extract(crossing[0]), crossing[1])
    start = time.perf_counter()
    with traced(trace, job) as done:
        result = FitWorker._dispatch(engine, job, partial(_past, deadline))
        done(result)
    return result, time.perf_counter() - start


def _past(deadline: float) -> StopReason | None:
    """The stop check of a deadline (``time.monotonic()``)."""
    return "timeout" if time.monotonic() >= deadline else None


def read_outcome(future: asyncio.Future[Any]) -> None:
    """Read the outcome of a future nobody awaits any more (a fit abandoned at its deadline,
    or by a client gone), so that asyncio does not log it as never retrieved."""
    if not future.cancelled():
        future.exception()


def _log_failure(future: asyncio.Future[Any] | concurrent.futures.Future[Any]) -> None:
    if not future.cancelled() and (error := future.exception()) is not None:
        log.error(
            "background work failed (warm-up, memory trim, or a compile behind a fit)",
            exc_info=error,
        )


def _run_batch(
    engine: BatchEngine, job: BatchJob, should_stop: Callable[[], StopReason | None]
) -> BatchResults:
    return engine.fit(
        job.model,
        *(Ragged(values, job.lengths) for values in job.data),
        learning_rate=job.learning_rate,
        epochs=job.epochs,
        initial=job.initial,
        options=job.options,
        seed=job.seed,
        scaling=job.scaling,
        history_every=job.history_every,
        should_stop=should_stop,
    )


def auto_memory_budget(limit: int, parse_processes: int, fit_processes: int) -> int:
    """What admitted requests may use: a share of the memory ``limit`` less what this process
    holds once warm and what its parser processes and fit process will keep."""
    held = (
        rss_bytes([os.getpid()])
        + parse_processes * PARSER_RESERVE_BYTES
        + fit_processes * FIT_PROCESS_RESERVE_BYTES
    )
    return max(MIN_BUDGET_BYTES, int(BUDGET_SHARE * limit) - held)


#: The collector's thresholds once warm (Python's defaults: 700, 10, 10). A young collection
#: every 700 allocations ran thousands of times a second under batch answers (10,000 entries
#: of dicts and lists each), each holding the GIL: `make chaos`'s batch attack saw /healthz
#: p99 ~95 ms with the defaults and 36-41 ms with these.
GC_THRESHOLDS = (50_000, 20, 20)

#: Freed heap memory goes back to the system once requests pause this long, and at least this
#: often under steady load (:meth:`FitWorker._trim_soon`).
TRIM_QUIET_S = 0.25
TRIM_EVERY_S = 5.0
