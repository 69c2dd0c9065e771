"""HTTP benchmark against the real server (``python -m service``) on loopback."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from service.api.models import BUILT_IN
from service.api.schemas import limits_context
from tests.server import Server, serve

SMALL_N, SMALL_EPOCHS = 100, 100


@dataclass
class Load:
    name: str
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


def _small_fit_body() -> bytes:
    rng = np.random.default_rng(0)
    x = rng.random(SMALL_N)
    y = x + 2.0 + rng.normal(0.0, 0.15, SMALL_N)
    return json.dumps({"x": x.tolist(), "y": y.tolist(), "epochs": SMALL_EPOCHS}).encode()


_WRK_LUA = """
wrk.method = "{method}"
wrk.headers["Content-Type"] = "application/json"
{body}
done = function(summary, latency, requests)
  io.write(string.format("RESULT %d %d %d %f %f\\n", summary.requests,
    summary.errors.status + summary.errors.connect + summary.errors.read
    + summary.errors.write + summary.errors.timeout,
    summary.duration, latency:percentile(50), latency:percentile(99)))
end
"""


def wrk_load(url: str, path: str, body: bytes | None, seconds: int, connections: int) -> Load:
    """Closed-loop load with wrk (2 threads); latency percentiles from wrk's histogram."""
    wrk = shutil.which("wrk")
    assert wrk
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "load.lua"
        lua_body = ""
        if body is not None:
            (Path(tmp) / "body.json").write_bytes(body)
            lua_body = (
                f'local f = io.open("{tmp}/body.json", "rb"); wrk.body = f:read("*a"); f:close()'
            )
        script.write_text(_WRK_LUA.format(method="POST" if body else "GET", body=lua_body))
        out = subprocess.run(
            [wrk, "-t2", f"-c{connections}", f"-d{seconds}s", "-s", str(script), url + path],
            capture_output=True,
            text=True,
            check=True,
            timeout=seconds + 60,
        ).stdout
    match = re.search(r"RESULT (\d+) (\d+) (\d+) ([\d.]+) ([\d.]+)", out)
    assert match, out
    requests, errors, duration_us = (int(match.group(i)) for i in (1, 2, 3))
    return Load(
        path,
        requests,
        requests / (duration_us / 1e6),
        float(match.group(4)) / 1e3,
        float(match.group(5)) / 1e3,
        errors,
    )


async def _httpx_load_async(
    url: str, path: str, body: bytes | None, seconds: float, connections: int
) -> Load:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=connections)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:

        async def user() -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                if body is None:
                    r = await client.get(path)
                else:
                    headers = {"content-type": "application/json"}
                    r = await client.post(path, content=body, headers=headers)
                latencies.append(time.perf_counter() - t0)
                errors += r.status_code != 200

        start = time.perf_counter()
        await asyncio.gather(*(user() for _ in range(connections)))
        elapsed = time.perf_counter() - start
    q = statistics.quantiles(latencies, n=100)
    return Load(path, len(latencies), len(latencies) / elapsed, q[49] * 1e3, q[98] * 1e3, errors)


def load(url: str, path: str, body: bytes | None, seconds: int, connections: int = 16) -> Load:
    if shutil.which("wrk"):
        return wrk_load(url, path, body, seconds, connections)
    return asyncio.run(_httpx_load_async(url, path, body, seconds, connections))


def rss_mib(server: Server) -> float:
    status = Path(f"/proc/{server.process.pid}/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+) kB", status)
    assert match
    return int(match.group(1)) / 1024


def cold_start(runs: int) -> tuple[float, float]:
    """Median seconds: process start to /readyz 200, and a bare ``import tensorflow``."""
    starts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        with serve(TAPEFIT_LOG_LEVEL="warning") as server:
            starts.append(time.perf_counter() - t0)
            server.stop()
    imports = []
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import tensorflow"], check=True, env=env)
        imports.append(time.perf_counter() - t0)
    return statistics.median(starts), statistics.median(imports)


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


async def _big_request(url: str, body: bytes, headers: dict[str, str]) -> tuple[float, float]:
    """Seconds for one big fit, and the slowest /healthz answered meanwhile (another client)."""
    async with (
        httpx.AsyncClient(base_url=url, timeout=120) as client,
        httpx.AsyncClient(base_url=url, timeout=120) as prober,
    ):
        slowest = 0.0
        t0 = time.perf_counter()
        task = asyncio.create_task(client.post("/v1/fits/linear", content=body, headers=headers))
        while not task.done():
            p0 = time.perf_counter()
            await prober.get("/healthz")
            slowest = max(slowest, time.perf_counter() - p0)
            await asyncio.sleep(0.005)
        response = await task
        assert response.status_code == 200, response.text[:300]
        return time.perf_counter() - t0, slowest


@dataclass
class Big:
    parse_json: float
    json_request: float
    json_health_max: float
    npy_request: float
    npy_health_max: float
    body_mb: float


def big_requests(server: Server, n: int = 1_000_000, runs: int = 3) -> Big:
    rng = np.random.default_rng(1)
    x = rng.random(n)
    y = x + 2.0 + rng.normal(0.0, 0.15, n)
    body = json.dumps({"x": x.tolist(), "y": y.tolist(), "epochs": 1000}).encode()
    context = limits_context(n, 100_000, 10**12)
    parse = statistics.median(
        _time(lambda: BUILT_IN["linear"].parse_json(body, context)) for _ in range(runs)
    )
    json_runs = [
        asyncio.run(_big_request(server.url, body, {"content-type": "application/json"}))
        for _ in range(runs)
    ]
    npy_body = _npy(np.stack([x, y]))
    npy_runs = [
        asyncio.run(_big_request(server.url, npy_body, {"content-type": "application/x-npy"}))
        for _ in range(runs)
    ]
    return Big(
        parse,
        statistics.median(r[0] for r in json_runs),
        max(r[1] for r in json_runs),
        statistics.median(r[0] for r in npy_runs),
        max(r[1] for r in npy_runs),
        len(body) / 1e6,
    )


def _time(fn: object) -> float:
    t0 = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - t0


@dataclass
class BatchBench:
    datasets: int
    batch_request: float
    single_requests: float
    numpy_loop: float


def _numpy_batch_loop(x: np.ndarray, y: np.ndarray, lr: float, epochs: int) -> np.ndarray:
    """Gradient descent on every row at once (vectorized over the batch), MSE per row."""
    m = np.zeros(x.shape[0])
    b = np.zeros(x.shape[0])
    for _ in range(epochs):
        r = m[:, None] * x + b[:, None] - y
        m -= lr * 2.0 * np.mean(r * x, axis=1)
        b -= lr * 2.0 * np.mean(r, axis=1)
    return m


async def _singles(url: str, bodies: list[bytes], connections: int = 16) -> float:
    limits = httpx.Limits(max_connections=connections)
    queue = list(reversed(bodies))
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:

        async def user() -> None:
            while queue:
                body = queue.pop()
                r = await client.post(
                    "/v1/fits/linear", content=body, headers={"content-type": "application/json"}
                )
                assert r.status_code == 200, r.text[:200]

        t0 = time.perf_counter()
        await asyncio.gather(*(user() for _ in range(connections)))
        return time.perf_counter() - t0


def batch_bench(server: Server, count: int, n: int = 100, epochs: int = 1000) -> BatchBench:
    rng = np.random.default_rng(3)
    x = rng.random((count, n))
    y = 2.0 * x + 1.0 + rng.normal(0.0, 0.1, (count, n))
    datasets = [{"x": xi.tolist(), "y": yi.tolist()} for xi, yi in zip(x, y, strict=True)]
    body = json.dumps(
        {"datasets": datasets, "epochs": epochs, "seed": 0, "history_every": epochs}
    ).encode()

    def post_batch() -> float:
        t0 = time.perf_counter()
        r = httpx.post(
            server.url + "/v1/fits/linear/batch",
            content=body,
            headers={"content-type": "application/json"},
            timeout=300,
        )
        assert r.status_code == 200 and r.json()["failed"] == 0, r.text[:300]
        return time.perf_counter() - t0

    post_batch()  # the first batch of this size compiles its bucket
    batch = min(post_batch() for _ in range(2))
    singles = [
        json.dumps({"x": d["x"], "y": d["y"], "epochs": epochs, "seed": 0}).encode()
        for d in datasets
    ]
    single = asyncio.run(_singles(server.url, singles))
    t0 = time.perf_counter()
    _numpy_batch_loop(x, y, 0.1, epochs)
    numpy_time = time.perf_counter() - t0
    return BatchBench(count, batch, single, numpy_time)


@dataclass
class HttpReport:
    trivial: Load
    fits: Load
    rss_warm: float
    rss_after: float
    fit_requests: int
    cold: float
    tf_import: float
    big: Big | None
    batch: BatchBench
    driver: str


def run(quick: bool) -> HttpReport:
    seconds = 3 if quick else 10
    body = _small_fit_body()
    # Enough queue for the load generator's 16 connections: measure throughput, not 429s.
    with serve(TAPEFIT_LOG_LEVEL="warning", TAPEFIT_MAX_QUEUED_FITS="32") as server:
        server.wait_warm()
        # Warm-up: every code path once, then a short burst.
        load(server.url, "/v1/fits/linear", body, 2)
        load(server.url, "/healthz", None, 1)
        rss_warm = rss_mib(server)
        trivial = load(server.url, "/healthz", None, seconds)
        fits = load(server.url, "/v1/fits/linear", body, seconds)
        total = fits.requests
        while total < 10_000:
            total += load(server.url, "/v1/fits/linear", body, 3).requests
        rss_after = rss_mib(server)
        big = None if quick else big_requests(server)
        batch = batch_bench(server, 1_000 if quick else 10_000)
        server.stop()
    cold, tf_import = cold_start(1 if quick else 3)
    driver = "wrk -t2 -c16" if shutil.which("wrk") else "httpx async, 16 connections"
    return HttpReport(
        trivial, fits, rss_warm, rss_after, total, cold, tf_import, big, batch, driver
    )


def report(r: HttpReport) -> str:
    ratio = r.fits.rps / r.trivial.rps
    lines = [
        f"HTTP (real server on loopback, load generator: {r.driver}, same run):",
        "",
        "| endpoint | requests | req/s | p50 | p99 | p99/p50 | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, load_ in (
        ("GET /healthz (trivial JSON)", r.trivial),
        (
            f"POST /v1/fits/linear (n={SMALL_N}, {SMALL_EPOCHS} epochs)",
            r.fits,
        ),
    ):
        lines.append(
            f"| {name} | {load_.requests:,} | {load_.rps:,.0f} | {load_.p50_ms:.2f} ms "
            f"| {load_.p99_ms:.2f} ms | {load_.p99_ms / load_.p50_ms:.1f} | {load_.errors} |"
        )
    lines += [
        "",
        f"- small fits reach {ratio:.0%} of the trivial endpoint's requests/s",
        f"- cold start (process start to /readyz 200): {r.cold:.2f} s; bare `import tensorflow`: "
        f"{r.tf_import:.2f} s; ratio {r.cold / r.tf_import:.2f}",
        f"- RSS after warm-up {r.rss_warm:.0f} MiB, after {r.fit_requests:,} fit requests "
        f"{r.rss_after:.0f} MiB ({(r.rss_after - r.rss_warm) / r.rss_warm:+.1%})",
    ]
    if r.big is not None:
        b = r.big
        lines += [
            f"- 1,000,000-point linear fit, 1000 epochs: parsing its {b.body_mb:.0f} MB JSON body "
            f"alone (pydantic + numpy) {b.parse_json * 1e3:.0f} ms; the JSON request end to end "
            f"{b.json_request * 1e3:.0f} ms ({b.json_request / b.parse_json:.2f}x the parse); "
            f"as application/x-npy {b.npy_request * 1e3:.0f} ms "
            f"({b.npy_request / b.parse_json:.2f}x the JSON parse)",
            f"- slowest /healthz answered during those requests: JSON "
            f"{b.json_health_max * 1e3:.1f} ms, npy {b.npy_health_max * 1e3:.1f} ms",
        ]
    bb = r.batch
    lines += [
        "",
        f"Batch: {bb.datasets:,} data sets of 100 points, 1000 epochs (linear):",
        "",
        "| path | time | batch request is |",
        "|---|---|---|",
        f"| one batch request (JSON, history_every=1000) | {bb.batch_request:.2f} s | |",
        f"| {bb.datasets:,} single requests (httpx, 16 connections) | {bb.single_requests:.2f} s "
        f"| {bb.single_requests / bb.batch_request:.0f}x faster |",
        f"| numpy loop vectorized over the batch (in process, no HTTP) | {bb.numpy_loop:.2f} s "
        f"| {bb.numpy_loop / bb.batch_request:.1f}x faster |",
    ]
    return "\n".join(lines)
