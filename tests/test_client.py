"""service.client against the real server on a loopback port."""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from service.client import (
    AsyncClient,
    Client,
    FitFailed,
    InvalidArguments,
    Overloaded,
    Progress,
    ValidationFailed,
)
from tests.conftest import seed_gaussian_data, seed_linear_data
from tests.reference import gaussian_closed_form, linear_closed_form
from tests.server import Server, serve

pytestmark = pytest.mark.slow

#: One fit at a time and no queue, so a second concurrent fit is refused with 429; one epoch per
#: compiled call, so a long fit is easy to make.
SERVER = {
    "TAPEFIT_MAX_CONCURRENT_FITS": "1",
    "TAPEFIT_MAX_QUEUED_FITS": "0",
    "TAPEFIT_EPOCHS_PER_CALL": "1",
}


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with serve(**SERVER) as running:
        yield running
        assert running.stop(), running.log()


class CountingTransport(httpx.HTTPTransport):
    def __init__(self) -> None:
        super().__init__()
        self.statuses: list[int] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        self.statuses.append(response.status_code)
        return response


def test_sync_client_fits_plots_and_makes_data(server: Server) -> None:
    with Client(server.url) as tapefit:
        assert tapefit.ready()
        data = tapefit.linear_dataset(200, slope=2.0, intercept=-1.0, seed=3)
        assert len(data.x) == 200 and data.seed == 3
        fit = tapefit.fit_linear(data.x, data.y, learning_rate=0.5, epochs=2000, seed=1)
        slope, intercept = linear_closed_form(data.x, data.y)
        assert fit.params.slope == pytest.approx(slope, abs=1e-6)
        assert fit.stats is not None and fit.stats.closed_form is not None
        assert fit.stats.closed_form.params.intercept == pytest.approx(intercept, rel=1e-12)
        assert fit.converged

        # numpy arrays travel as .npy: the same answer as JSON lists.
        as_npy = tapefit.fit_linear(
            np.array(data.x), np.array(data.y), learning_rate=0.5, epochs=2000, seed=1
        )
        assert as_npy == fit

        y = seed_gaussian_data(1)
        gaussian = tapefit.fit_gaussian(y, optimizer="adam", learning_rate=0.05, epochs=3000)
        mean, std = gaussian_closed_form(y)
        assert gaussian.params.mean == pytest.approx(mean, abs=1e-4)
        assert gaussian.params.std == pytest.approx(std, abs=1e-4)

        batch = tapefit.fit_gaussian_batch([{"y": y[:500]}, {"y": [1.0, 1.0]}], epochs=500)
        assert (batch.succeeded, batch.failed) == (1, 1)

        png = tapefit.plot_gaussian(y, seed=2)
        assert Image.open(io.BytesIO(png)).size == (1200, 400)


def test_errors_carry_the_server_detail(server: Server) -> None:
    x, y = seed_linear_data(0)
    with Client(server.url) as tapefit:
        with pytest.raises(ValidationFailed) as invalid:
            tapefit.fit_linear([1.0, 1.0], [1.0, 2.0])
        assert invalid.value.status == 422
        assert invalid.value.fields == ["x"]
        with pytest.raises(FitFailed) as diverged:
            tapefit.fit_linear(x, y, learning_rate=100.0, epochs=100, seed=1)
        assert diverged.value.stop_reason == "diverged"
        assert diverged.value.epoch is not None
        assert "lower learning_rate" in str(diverged.value)
        with pytest.raises(InvalidArguments) as typo:  # checked here, no round trip
            tapefit.fit_linear(x, y, optimiser="adam")
        assert typo.value.fields == ["optimiser"]


def test_stream_yields_progress_then_the_result(server: Server) -> None:
    y = seed_gaussian_data(2)
    with Client(server.url) as tapefit:
        events = list(tapefit.stream_gaussian(y, epochs=500, progress_every=100))
        plain = tapefit.fit_gaussian(y, epochs=500)
    progress = [e for e in events if isinstance(e, Progress)]
    assert [p.epoch for p in progress] == [100, 200, 300, 400, 500]
    assert events[-1] == plain


def test_busy_server_is_retried_after_retry_after(server: Server) -> None:
    x, y = seed_linear_data(0)
    with Client(server.url) as blocker:
        long_fit = threading.Thread(
            target=blocker.fit_gaussian,
            args=(seed_gaussian_data(0),),
            kwargs={"epochs": 100_000, "timeout_s": 1.5},
        )
        long_fit.start()
        deadline = time.monotonic() + 30
        while "tapefit_fits_running 1.0" not in httpx.get(f"{server.url}/metrics").text:
            assert time.monotonic() < deadline
            time.sleep(0.02)

        with Client(server.url, max_retries=0) as impatient, pytest.raises(Overloaded) as busy:
            impatient.fit_linear(x, y, epochs=10, seed=0)
        # Retry-After is the work ahead: the running fit's expected time, capped by its
        # 1.5 s deadline, rounded up.
        assert busy.value.status == 429 and busy.value.retry_after == 2.0

        transport = CountingTransport()
        with Client(server.url, max_retries=10, transport=transport) as patient:
            fit = patient.fit_linear(x, y, epochs=10, seed=0)
        long_fit.join()
    assert fit.epochs_run == 10
    assert transport.statuses[0] == 429 and transport.statuses[-1] == 200


@pytest.mark.anyio
async def test_async_client(server: Server) -> None:
    async with AsyncClient(server.url) as tapefit:
        assert await tapefit.ready()
        data = await tapefit.gaussian_dataset(1000, mean=-1.0, std=0.5, seed=4)
        fit = await tapefit.fit_gaussian(data.y, learning_rate=0.1, epochs=1000)
        assert fit.params.mean == pytest.approx(np.mean(data.y), abs=1e-6)
        events = [
            e async for e in tapefit.stream_linear(data.x, data.y, epochs=50, progress_every=25)
        ]
        assert [e.epoch for e in events if isinstance(e, Progress)] == [25, 50]
        png = await tapefit.plot_linear(data.x, data.y, epochs=50)
        assert Image.open(io.BytesIO(png)).format == "PNG"
        with pytest.raises(ValidationFailed):
            await tapefit.linear_dataset(1)


def test_clients_compare_and_evaluate(server: Server) -> None:
    """compare and evaluate, sync and async, with numpy arrays: the evaluation of a fit's
    numbers answers its own prediction."""
    x = np.linspace(0.0, 10.0, 30)
    y = 2.0 + 0.5 * x + 0.03 * x**2 + np.random.default_rng(6).normal(0, 0.05, x.size)
    text, start = "a + b*x + c*x**2", {"a": 0.0, "b": 0.0, "c": 0.0}
    quadratic: dict[str, Any] = {"expression": text, "parameters": start}
    with Client(server.url) as tapefit:
        compared = tapefit.compare(x, y, [{"model": "linear"}, quadratic], nested=[[0, 1]])
        assert compared.ranking[0].index == 1 and compared.f_tests[0].p_value is not None
        fit = tapefit.fit_expression(x, y, text, start, predict={"x": [12.0]})
        s = fit.stats
        assert s.residual_std is not None and fit.prediction is not None
        shown = tapefit.evaluate(
            [12.0],
            fit.params,
            text,
            covariance=s.covariance,
            residual_variance=s.residual_std**2,
            dof=s.dof,
        )
    assert shown.prediction.obs_upper == pytest.approx(fit.prediction.obs_upper, rel=1e-12)
    with Client(server.url) as tapefit:
        decays = [{"x": x, "y": a * np.exp(-0.3 * x) + 1.0} for a in (5.0, 9.0)]
        joint = tapefit.fit_expression_global(
            decays, "a*exp(-k*x) + c", {"a": 1.0, "k": 0.1, "c": 0.0}, shared=["k"]
        )
        assert joint.shared["k"] == pytest.approx(0.3, rel=1e-9)
        assert [d.params["a"] for d in joint.datasets] == pytest.approx([5.0, 9.0], rel=1e-9)
        robust = tapefit.fit_expression(x, y, text, start, loss="soft_l1", f_scale=0.1)
        assert robust.stats.downweighted is not None

    async def asynchronous() -> None:
        async with AsyncClient(server.url) as tapefit:
            again = await tapefit.compare(x, y, [{"model": "linear"}, quadratic])
            assert [r.index for r in again.ranking] == [r.index for r in compared.ranking]
            line = await tapefit.evaluate(
                np.array([1.0, 2.0]), {"slope": 2.0, "intercept": 1.0}, model="linear"
            )
            assert line.prediction.y == [3.0, 5.0]

    asyncio.run(asynchronous())


def _readme_block(after: str, language: str) -> str:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    start = readme.index(f"```{language}\n", readme.index(after)) + len(language) + 4
    return readme[start : readme.index("```", start)]


@pytest.fixture(scope="module")
def light_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with only the client installed (`pip install tapefit`: httpx, pydantic),
    at the locked versions, from a wheel of this tree; its python."""
    root, work = Path(__file__).parents[1], tmp_path_factory.mktemp("light")
    source = work / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, source)
    shutil.copytree(root / "service", source / "service", ignore=shutil.ignore_patterns("__py*"))
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation"),
            *("--wheel-dir", str(work / "wheels"), str(source)),
        ],
        check=True,
        timeout=120,
    )
    lock = (root / "requirements" / "test.lock").read_text().splitlines()
    locked = [line.split(" ")[0] for line in lock]
    (work / "constraints.txt").write_text("\n".join(pin for pin in locked if "==" in pin))
    subprocess.run([sys.executable, "-m", "venv", str(work / "venv")], check=True, timeout=120)
    python = work / "venv" / "bin" / "python"
    wheel = next((work / "wheels").glob("tapefit-*.whl"))
    subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            str(wheel),
            "--constraint",
            str(work / "constraints.txt"),
        ],
        check=True,
        timeout=300,
    )
    return python


def test_readme_quickstart_runs_with_only_the_client_installed(
    server: Server, light_python: Path, tmp_path: Path
) -> None:
    installed = subprocess.run(
        [str(light_python), "-m", "pip", "list", "--format=freeze"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.lower()
    assert "httpx==" in installed and "pydantic==" in installed
    for heavy in ("tensorflow", "fastapi", "matplotlib", "numpy", "uvicorn"):
        assert f"{heavy}==" not in installed, heavy
    code = _readme_block("### Python client", "python")
    expected = _readme_block("### Python client", "text")
    run = subprocess.run(
        [str(light_python), "-c", code.replace("http://localhost:8000", server.url)],
        cwd=tmp_path,
        env={"PATH": os.environ["PATH"]},  # no PYTHONPATH: the installed client, nothing else
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout == expected
    with Image.open(tmp_path / "fit.png") as image:
        assert image.size == (1200, 400)
