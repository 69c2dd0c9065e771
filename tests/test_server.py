"""End to end against the real server process on loopback."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from service.fitting.reference import gaussian_closed_form, linear_closed_form
from tests.conftest import seed_gaussian_data, seed_linear_data
from tests.server import serve

pytestmark = [pytest.mark.slow, pytest.mark.anyio]


async def test_real_server_fits_and_stops_cleanly() -> None:
    with serve() as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            x, y = seed_linear_data(0)
            r = await client.post("/v1/fits/linear", json={"x": x.tolist(), "y": y.tolist()})
            assert r.status_code == 200, r.text
            slope, intercept = linear_closed_form(x, y)
            assert r.json()["params"]["slope"] == pytest.approx(slope, abs=1e-2)
            assert r.json()["params"]["intercept"] == pytest.approx(intercept, abs=1e-2)

            # 200,000 points (~8 MB of JSON): parsed in the parser process.
            yg = seed_gaussian_data(1, n=200_000)
            r = await client.post("/v1/fits/gaussian", json={"y": yg.tolist()})
            assert r.status_code == 200, r.text
            mean, std = gaussian_closed_form(yg)
            assert r.json()["params"]["mean"] == pytest.approx(mean, abs=1e-4)
            assert r.json()["params"]["std"] == pytest.approx(std, abs=1e-4)
            assert r.json()["n"] == 200_000
        assert server.stop(), server.log()
        assert "Traceback" not in server.log()


async def test_health_answers_while_a_long_fit_runs() -> None:
    # One epoch per compiled call makes a 100,000-epoch fit slow; the deadline ends it.
    with serve(TAPEFIT_EPOCHS_PER_CALL="1", TAPEFIT_FIT_TIMEOUT_S="4") as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            y = seed_gaussian_data(0).tolist()
            fit = asyncio.create_task(
                client.post("/v1/fits/gaussian", json={"y": y, "epochs": 100_000})
            )
            answered_during_fit = 0
            while not fit.done():
                r = await client.get("/healthz")
                assert r.status_code == 200
                if not fit.done():
                    answered_during_fit += 1
                await asyncio.sleep(0.05)
            assert answered_during_fit >= 5
            body = (await fit).json()
            assert body["stop_reason"] == "timeout"
            assert 0 < body["epochs_run"] < 100_000
        assert server.stop(), server.log()
