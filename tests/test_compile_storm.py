"""A flood of new expressions (each one traced and XLA-compiled: seconds) against the real
server: compiles queue on their own thread, the overflow answers 429 with Retry-After, and
meanwhile /healthz keeps answering fast and a cached expression keeps fitting."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from tests.server import serve

pytestmark = pytest.mark.slow

X = np.linspace(0.1, 5.0, 50)
Y = 3.0 * np.exp(-0.8 * X) + 0.05 * np.cos(3 * X)


def _body(expression: str, parameters: dict[str, float]) -> dict[str, object]:
    return {"expression": expression, "parameters": parameters, "x": X.tolist(), "y": Y.tolist()}


def test_a_compile_storm_leaves_health_and_cached_fits_alone() -> None:
    cached = _body("a*exp(-b*x)", {"a": 1.0, "b": 1.0})
    storm = [
        _body(f"a*exp(-b*x) + c*x**{2 + i % 5} + {i}", {"a": 1.0, "b": 1.0, "c": 0.0})
        for i in range(40)
    ]
    # A cache of 4: refused requests must not take places in it (they evicted the cached
    # expression, whose fits then had to compile and were refused too).
    # The compile path: no first fits from the numpy loop (tests/fitting/test_numpy_loop.py
    # and tests/api/test_expressions.py cover those).
    with serve(
        TAPEFIT_MAX_QUEUED_COMPILES="2",
        TAPEFIT_EXPRESSION_CACHE_SIZE="4",
        TAPEFIT_UNCOMPILED_MAX_WORK="0",
    ) as server:
        server.wait_warm()
        with httpx.Client(base_url=server.url, timeout=120) as client:
            assert client.post("/v1/fits/expression", json=cached).status_code == 200
            stop = threading.Event()
            health: list[tuple[int, float]] = []
            cached_statuses: list[int] = []

            def poll_health() -> None:
                with httpx.Client(base_url=server.url, timeout=30) as c:
                    while not stop.is_set():
                        start = time.perf_counter()
                        status = c.get("/healthz").status_code
                        health.append((status, time.perf_counter() - start))
                        time.sleep(0.05)

            def fit_cached() -> None:
                with httpx.Client(base_url=server.url, timeout=120) as c:
                    while not stop.is_set():
                        cached_statuses.append(
                            c.post("/v1/fits/expression", json=cached).status_code
                        )
                        time.sleep(0.05)

            def send(body: dict[str, object]) -> tuple[int, str | None]:
                with httpx.Client(base_url=server.url, timeout=120) as c:
                    r = c.post("/v1/fits/expression", json=body)
                    return r.status_code, r.headers.get("retry-after")

            watchers = [threading.Thread(target=poll_health), threading.Thread(target=fit_cached)]
            for w in watchers:
                w.start()
            try:
                with ThreadPoolExecutor(max_workers=16) as pool:
                    answers = list(pool.map(send, storm))
            finally:
                stop.set()
                for w in watchers:
                    w.join(timeout=60)
            metrics = client.get("/metrics").text
    refused = float(
        metrics.split('tapefit_fit_rejections_total{reason="compiling"} ')[1].split()[0]
    )
    statuses = [status for status, _ in answers]
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(200) >= 3 and statuses.count(429) >= 1, statuses
    assert all(retry is not None and int(retry) >= 1 for status, retry in answers if status == 429)
    assert health and all(status == 200 for status, _ in health)
    assert max(seconds for _, seconds in health) < 1.0, max(seconds for _, seconds in health)
    assert cached_statuses and set(cached_statuses) == {200}, cached_statuses
    assert refused == statuses.count(429)  # each refusal counted once
