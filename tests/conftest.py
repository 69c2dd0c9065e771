"""Shared fixtures: the seed's data sets, the engine, and an in-process app with lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import pytest
from asgi_lifespan import LifespanManager

from service.app import create_app
from service.fitting import FitEngine
from service.settings import Settings
from service.worker import settings_engine
from tests.server import Server, kill_marked, serve

Array = npt.NDArray[np.float64]


def seed_linear_data(seed: int = 0, n: int = 100) -> tuple[Array, Array]:
    """The seed's ``generate_noisy_data(m=1, b=2)``: x ~ U(0, 1), noise ~ N(0, 0.15²)."""
    rng = np.random.default_rng(seed)
    x = rng.random(n)
    return x, 1.0 * x + 2.0 + rng.normal(0.0, 0.15, n)


def seed_gaussian_data(seed: int = 0, n: int = 1000) -> Array:
    """The seed's ``generate_gaussian_data(m=2, s=1)``."""
    return np.random.default_rng(seed).normal(2.0, 1.0, n)


@pytest.fixture(scope="session", autouse=True)
def no_process_left_behind() -> Iterator[None]:
    """Whatever the tests did (failed ones included), no process a test server started may
    outlive the session: servers, parser processes, resource trackers."""
    yield
    left = kill_marked()
    assert not left, f"processes left behind by test servers: {left}"


@pytest.fixture(scope="session")
def live_server() -> Iterator[Server]:
    """One real server (``python -m service`` on a free loopback port, default settings,
    warm) shared by every test that needs no settings of its own: a start costs ~20 s. It
    must stop gracefully at the end."""
    with serve() as running:
        running.wait_warm()
        yield running
        assert running.stop(), running.log()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def engine() -> FitEngine:
    settings = Settings()
    return settings_engine(settings)


def app_settings(**overrides: Any) -> Settings:
    """Settings for in-process apps: no parser or fit process unless a test asks for one."""
    values: dict[str, Any] = {"parse_processes": 0, "fit_processes": 0, **overrides}
    return Settings(**values)


@asynccontextmanager
async def running_app(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan run and warm-up finished, behind an AsyncClient."""
    app = create_app(settings)
    async with LifespanManager(app, startup_timeout=120):
        await app.state.worker_started
        await app.state.worker.wait_warm()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://tapefit") as client:
            yield client


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with running_app(app_settings()) as c:
        yield c


def module_scoped() -> tuple[Any, Any]:
    """Module-scoped ``anyio_backend`` and ``client`` fixtures, for a module whose tests only
    read answers (default settings, nothing they change): the app's start and warm-up (~1 s)
    once per module instead of once per test. Use: ``anyio_backend, client =
    module_scoped()``."""

    @pytest.fixture(scope="module")
    def anyio_backend() -> str:
        return "asyncio"

    @pytest.fixture(scope="module")
    async def client(anyio_backend: str) -> AsyncIterator[httpx.AsyncClient]:
        async with running_app(app_settings()) as c:
            yield c

    return anyio_backend, client
