"""The fit process (service.fit_process): fits too small for a thread run there, beside the
event loop, and answer exactly what the server itself would; its death or a hang loses no fit.
(That it never outlives the server: tests/test_server.py.)"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import pickle
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import numpy as np
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from service import fit_process
from service.app import create_app
from service.fit_process import ProcessLost, WarmProcess
from service.fitting.models import BUILT_IN
from service.fitting.options import Optimizer, Stopping
from service.fitting.results import FitResult, FitStats
from service.worker import FitJob, FitWorker, Training
from tests.conftest import app_settings
from tests.process_helpers import (
    answers_unreadably,
    busy_in_tensorflow,
    echo,
    fails_in_setup,
    raises,
)

pytestmark = [pytest.mark.slow, pytest.mark.anyio]

LINEAR = "/v1/fits/linear"
GAUSSIAN = "/v1/fits/gaussian"


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, bool]]:
    """uvloop, as under uvicorn: its transports differ from asyncio's."""
    return "asyncio", {"use_uvloop": True}


def _bodies() -> list[tuple[str, dict[str, Any]]]:
    """Fits in real units, every outcome: x in the thousands (raw and standardized, SGD,
    Adam, stopping on the loss), a mean of 1e7 with a spread of 0.1, weights, a diverged fit
    (a 422 raised in the process) and degenerate data (a 422 before any fit)."""
    rng = np.random.default_rng(21)
    x = 1000.0 + 100.0 * rng.random(100)
    y = 3.0 * x - 50.0 + rng.normal(0.0, 1.0, 100)
    g = rng.normal(1e7, 0.1, 200)
    xy = {"x": x.tolist(), "y": y.tolist(), "seed": 3}
    return [
        (LINEAR, xy),
        (LINEAR, {**xy, "optimizer": "adam", "learning_rate": 0.05, "tolerance": 1e-9}),
        (LINEAR, {**xy, "scaling": "none", "learning_rate": 1e-7, "epochs": 50}),
        (LINEAR, {**xy, "weights": rng.uniform(0.5, 2.0, 100).tolist()}),
        (GAUSSIAN, {"y": g.tolist()}),
        (GAUSSIAN, {"y": g.tolist(), "optimizer": "momentum", "history_every": 10}),
        (GAUSSIAN, {"y": g.tolist(), "learning_rate": 1e9}),
        (LINEAR, {"x": [5.0] * 10, "y": list(range(10)), "seed": 1}),
    ]


@asynccontextmanager
async def app_running(**settings: Any) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    app = create_app(app_settings(**settings))
    async with LifespanManager(app, startup_timeout=120, shutdown_timeout=60):
        await app.state.worker_started
        await app.state.worker.wait_warm()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://tapefit") as client:
            yield app, client


def _fitting_here_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """From now on a fit run in the server itself fails the request: the answers that
    succeed came from the fit process."""

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("fitted in the server, not in the fit process")

    monkeypatch.setattr(FitWorker, "_run", fail)


async def test_small_fits_run_in_the_process_and_answer_the_same_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every body answers byte for byte as on the event loop (statuses and errors too), the
    fits counted in the server's metrics."""
    bodies = _bodies()
    async with app_running(fit_processes=0) as (_, client):
        here = [await client.post(path, json=body) for path, body in bodies]
    async with app_running(fit_processes=1) as (app, client):
        process = app.state.worker.fit_process
        assert process is not None and process.ready and process.pid != os.getpid()
        with monkeypatch.context() as patch:
            _fitting_here_fails(patch)
            there = [await client.post(path, json=body) for path, body in bodies]
        metrics = (await client.get("/metrics")).text
    assert [r.status_code for r in here] == [200] * 6 + [422, 422]
    for a, b in zip(here, there, strict=True):
        assert (a.status_code, a.content) == (b.status_code, b.content)
    slope, intercept = np.polyfit(bodies[0][1]["x"], bodies[0][1]["y"], 1)
    params = there[0].json()["params"]
    assert params["slope"] == pytest.approx(slope, rel=1e-9)
    assert params["intercept"] == pytest.approx(intercept, rel=1e-9)
    assert there[4].json()["params"]["mean"] == pytest.approx(np.mean(bodies[4][1]["y"]), rel=1e-14)
    assert 'tapefit_fits_total{model="linear",outcome="max_epochs"} 3.0' in metrics
    assert 'tapefit_fits_total{model="gaussian",outcome="diverged"} 1.0' in metrics
    assert 'tapefit_fit_epochs_total{model="gaussian"}' in metrics
    assert 'tapefit_fit_duration_seconds_count{model="linear"} 4.0' in metrics


async def test_models_the_process_lacks_are_fitted_in_the_server(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A model registered in the server only (here: the linear spec replaced by an equal
    copy) is fitted in the server, never sent to a process that would not know it."""
    path, body = _bodies()[0]
    async with app_running(fit_processes=1) as (app, client):
        worker = app.state.worker
        expected = (await client.post(path, json=body)).content
        here = 0
        run = FitWorker._run

        def counting(self: FitWorker, *args: Any, **kwargs: Any) -> Any:
            nonlocal here
            here += 1
            return run(self, *args, **kwargs)

        monkeypatch.setattr(FitWorker, "_run", counting)
        copy = dataclasses.replace(BUILT_IN["linear"])
        monkeypatch.setitem(worker.engine.models, "linear", copy)
        r = await client.post(path, json=body)
    assert here == 1
    assert (r.status_code, r.content) == (200, expected)


async def test_fits_the_process_dies_with_are_fitted_in_the_server() -> None:
    """SIGKILL (an OOM kill) of the process with fits in it: each still answers 200, the
    same bytes as before; the process is restarted, counted, and serves again."""
    path, body = _bodies()[0]
    async with app_running(fit_processes=1) as (app, client):
        worker = app.state.worker
        process = worker.fit_process
        expected = (await client.post(path, json=body)).content
        first = process.pid
        os.kill(first, signal.SIGSTOP)  # the fits wait in it...
        posts = [asyncio.create_task(client.post(path, json=body)) for _ in range(3)]
        await asyncio.sleep(0.5)
        assert not any(post.done() for post in posts)
        os.kill(first, signal.SIGKILL)  # ...and it dies with them
        answers = await asyncio.gather(*posts)
        assert [(r.status_code, r.content) for r in answers] == [(200, expected)] * 3
        await asyncio.wait_for(process.wait_ready(), 120)
        assert process.pid not in (None, first)
        again = await client.post(path, json=body)
        metrics = (await client.get("/metrics")).text
    assert (again.status_code, again.content) == (200, expected)
    assert "tapefit_fit_process_restarts_total 1.0" in metrics
    assert 'tapefit_fits_total{model="linear",outcome="max_epochs"} 5.0' in metrics


@pytest.mark.parametrize("fit_timeout_s", [0.5, 600.0])
async def test_a_hung_process_is_killed_and_its_fit_answered(fit_timeout_s: float) -> None:
    """A stopped process (SIGSTOP) is noticed within STUCK_AFTER_S whatever the deadline (by
    the deadline itself when that is sooner, never under STUCK_FLOOR_S; with 600 s it used to
    wait 610 s: the request is bounded at 60 s here), killed and replaced; the fit runs in
    the server and answers. (A short deadline has passed, but the engine checks it between
    compiled chunks, and a default fit is one chunk: it answers in full.)"""
    path, body = _bodies()[0]
    async with app_running(fit_processes=1, fit_timeout_s=fit_timeout_s) as (app, client):
        process = app.state.worker.fit_process
        expected = (await client.post(path, json=body)).content
        hung = process.pid
        assert (await client.get("/readyz")).json() == {"status": "ready"}
        os.kill(hung, signal.SIGSTOP)
        r = await asyncio.wait_for(client.post(path, json=body), 60)
        assert (r.status_code, r.content) == (200, expected)
        # Killed as hung: /readyz says so until the new process is ready (it takes seconds
        # to start: TensorFlow's import alone).
        degraded = await client.get("/readyz")
        assert (degraded.status_code, degraded.json()) == (503, {"status": "degraded"})
        await asyncio.wait_for(process.wait_ready(), 120)
        assert process.pid != hung
        assert (await client.get("/readyz")).json() == {"status": "ready"}
        metrics = (await client.get("/metrics")).text
    assert "tapefit_fit_process_restarts_total 1.0" in metrics


class _Counted(WarmProcess):
    """A test process (restarted after short pauses), counting its restarts."""

    def __init__(self, setup: Any, call: Any) -> None:
        super().__init__(setup, call, name="tapefit-test", on_restart=self._restarted)
        self.restarts = 0

    def _restarted(self) -> None:
        self.restarts += 1


@asynccontextmanager
async def started(
    monkeypatch: pytest.MonkeyPatch, setup: Any, call: Any
) -> AsyncIterator[_Counted]:
    monkeypatch.setattr(fit_process, "RESTART_PAUSE_S", (0.05, 0.2))
    process = _Counted(setup, call)
    process.start()
    try:
        yield process
    finally:
        await process.stop()


async def test_errors_come_back_whole_and_a_process_that_cannot_start_retries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An exception that would not survive pickling comes back as a RuntimeError naming it
    (instead of breaking the pipe); a setup that fails is retried with growing pauses, and
    calls meanwhile raise ProcessLost at once."""
    async with started(monkeypatch, object, raises) as works:
        await asyncio.wait_for(works.wait_ready(), 120)
        with pytest.raises(RuntimeError, match="Unpicklable: 1 and 2"):
            await works.call(timeout_s=60)
    async with started(monkeypatch, fails_in_setup, echo) as broken:
        deadline = time.monotonic() + 120
        while broken.restarts < 2 and time.monotonic() < deadline:
            with pytest.raises(ProcessLost):
                await broken.call(1, timeout_s=1)
            await asyncio.sleep(0.05)
        assert broken.restarts >= 2
    assert not broken.ready


async def test_an_answer_the_server_cannot_read_kills_the_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An answer that will not unpickle (the process runs other code than the server: its
    files were replaced under it) cannot be matched to its call: the process is killed, so its
    calls raise ProcessLost now rather than at their deadline, and a new one serves the next."""
    async with started(monkeypatch, object, answers_unreadably) as process:
        await asyncio.wait_for(process.wait_ready(), 120)
        with pytest.raises(ProcessLost):
            await asyncio.wait_for(process.call(False, timeout_s=3600), 120)
        await asyncio.wait_for(process.wait_ready(), 120)
        assert await process.call(True, timeout_s=60) == "fine"
        assert process.restarts == 1


def test_a_job_crosses_to_the_process_whole() -> None:
    """Jobs are pickled lean (service.worker registers their reducers): every field comes
    back, the arrays as float64 copies of the values (of a strided view too), writable."""
    x = np.arange(20.0)[::2]
    y = np.linspace(-1e7, 1e7, 10) + 0.1
    training = Training(
        learning_rate=0.05,
        epochs=77,
        optimizer=Optimizer(name="adam", beta_1=0.8),
        stopping=Stopping(tolerance=1e-9, patience=3, gradient_tolerance=1e-12),
        scaling="none",
        history_every=7,
    )
    job = FitJob(
        "linear",
        (x, y),
        training,
        initial=(1.0, 2.0),
        seed=9,
        weights=np.full(10, 0.5),
        options={"reduction": "mean"},
    )
    back = pickle.loads(pickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL))
    assert (back.model, back.initial, back.seed) == ("linear", (1.0, 2.0), 9)
    assert back.training == training
    assert back.options == {"reduction": "mean"}
    for got, want in zip((*back.data, back.weights), (x, y, job.weights), strict=True):
        assert got is not None and want is not None
        assert got.dtype == np.float64 and got.flags.writeable
        np.testing.assert_array_equal(got, want)


def test_a_result_crosses_back_whole() -> None:
    """Results come back pickled lean too: every field of the result and of its statistics,
    the loss history as a writable float64 copy."""
    stats = FitStats(
        names=("m", "b"),
        n=10,
        n_used=9,
        dof=7,
        loss=0.25,
        gradient_norm=1e-9,
        newton_step=None,
        std_errors=(0.5, None),
        covariance=((0.25, 0.1), (0.1, None)),
        correlation=((1.0, 0.2), (0.2, 1.0)),
        log_likelihood=-3.5,
        aic=11.0,
        bic=12.5,
        closed_form=(3.0, 1e7),
        closed_form_loss=0.24,
        gap=((1e-6, -0.1), 0.01),
        r_squared=0.99,
        residual_std=0.2,
        rss=2.25,
    )
    result = FitResult(
        model="linear",
        params={"m": 3.0, "b": 1e7 + 0.1},
        loss_history=np.linspace(9.0, 0.25, 13)[::2],
        final_loss=0.25,
        epochs_run=13,
        n=10,
        stop_reason="loss_tolerance",
        stats=stats,
        converged=True,
        history_every=2,
        seed=4,
        warnings=("one", "two"),
    )
    back = pickle.loads(pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))
    assert back.stats == stats
    assert back.loss_history.dtype == np.float64 and back.loss_history.flags.writeable
    np.testing.assert_array_equal(back.loss_history, result.loss_history)
    for field in dataclasses.fields(FitResult):
        if field.name != "loss_history":
            assert getattr(back, field.name) == getattr(result, field.name), field.name


async def test_a_process_stopped_with_a_thread_inside_tensorflow_exits_quietly(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """The fit process warms its other loops in a thread while it serves; stopped meanwhile,
    it must exit at once, not abort in the interpreter's finalization ("terminate called
    after throwing...", "FATAL: exception not rethrown", seen when a test stopped a server
    during that warm-up)."""
    async with started(monkeypatch, busy_in_tensorflow, echo) as process:
        await asyncio.wait_for(process.wait_ready(), 120)
        assert await process.call(7, timeout_s=60) == (7,)
        pid = process.pid
    assert pid is not None
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    written = capfd.readouterr().err
    assert "FATAL" not in written and "terminate called" not in written, written
