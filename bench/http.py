"""HTTP benchmark against the real server (``python -m service``) on loopback."""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import numpy as np

from bench import goodput
from bench.load import Load, load
from service.admission import rss_bytes
from service.api.models import BUILT_IN
from service.api.schemas import limits_context
from tests.server import Server, named_processes, serve

SMALL_N, SMALL_EPOCHS = 100, 100


def _small_fit_body() -> bytes:
    rng = np.random.default_rng(0)
    x = rng.random(SMALL_N)
    y = x + 2.0 + rng.normal(0.0, 0.15, SMALL_N)
    return json.dumps({"x": x.tolist(), "y": y.tolist(), "epochs": SMALL_EPOCHS}).encode()


def rss_mib(server: Server) -> float:
    return rss_bytes([server.process.pid]) / 2**20


def fit_process_rss_mib(server: Server) -> float | None:
    """The fit process's RSS (where the small fits run), or None when the server has none."""
    pids = named_processes(server.mark, "tapefit-fit")
    return rss_bytes(pids) / 2**20 if pids else None


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


async def _big_request(
    url: str, body: bytes, headers: dict[str, str]
) -> tuple[float, float, tuple[float, float]]:
    """Seconds for one big fit, the slowest /healthz another client of this process saw
    meanwhile, and the request's (start, end) on ``time.monotonic``."""
    async with (
        httpx.AsyncClient(base_url=url, timeout=120) as client,
        httpx.AsyncClient(base_url=url, timeout=120) as prober,
    ):
        slowest = 0.0
        t0, started = time.perf_counter(), time.monotonic()
        task = asyncio.create_task(client.post("/v1/fits/linear", content=body, headers=headers))
        while not task.done():
            p0 = time.perf_counter()
            await prober.get("/healthz")
            slowest = max(slowest, time.perf_counter() - p0)
            await asyncio.sleep(0.005)
        response = await task
        assert response.status_code == 200, response.text[:300]
        return time.perf_counter() - t0, slowest, (started, time.monotonic())


@contextmanager
def probing(url: str) -> Iterator[list[tuple[float, float]]]:
    """/healthz probed from a process of its own (:mod:`bench.probe`) while the block runs;
    the list holds its (start, seconds) samples once the block is done."""
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.probe", url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    samples: list[tuple[float, float]] = []
    try:
        assert process.stdout is not None
        if process.stdout.readline().strip() != "ready":
            raise RuntimeError("the probe process did not start")
        yield samples
    finally:
        out, _ = process.communicate(timeout=60)  # closing its stdin stops it
        if lines := out.strip().splitlines():
            samples.extend((float(t), float(s)) for t, s in json.loads(lines[-1]))


def _slowest(samples: list[tuple[float, float]], windows: list[tuple[float, float]]) -> float:
    """The slowest probe that overlapped any of the windows."""
    return max(
        (s for t, s in samples if any(t <= end and t + s >= start for start, end in windows)),
        default=0.0,
    )


@dataclass
class Big:
    parse_json: float
    json_request: float
    json_health_max: float
    npy_request: float
    npy_health_max: float
    body_mb: float
    #: The same, probed from another process (what the server did, without the sending
    #: process's own pauses).
    json_health_max_apart: float
    npy_health_max_apart: float


def big_requests(server: Server, n: int = 1_000_000, runs: int = 3) -> Big:
    rng = np.random.default_rng(1)
    x = rng.random(n)
    y = x + 2.0 + rng.normal(0.0, 0.15, n)
    body = json.dumps({"x": x.tolist(), "y": y.tolist(), "epochs": 1000}).encode()
    context = limits_context(n, 100_000, 10**12)
    parse = statistics.median(
        _time(lambda: BUILT_IN["linear"].parse_json(body, context)) for _ in range(runs)
    )
    npy_body = _npy(np.stack([x, y]))
    with probing(server.url) as apart:
        json_runs = [
            asyncio.run(_big_request(server.url, body, {"content-type": "application/json"}))
            for _ in range(runs)
        ]
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
        _slowest(apart, [r[2] for r in json_runs]),
        _slowest(apart, [r[2] for r in npy_runs]),
    )


def _time(fn: object) -> float:
    t0 = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - t0


@dataclass
class BatchBench:
    datasets: int
    batch_request: float
    batch_npy: float
    single_requests: float
    sequential_requests: float
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

    options = {"epochs": epochs, "seed": 0, "history_every": epochs}
    npy = io.BytesIO()
    np.save(npy, np.stack([x, y], 1))
    answers: dict[str, bytes] = {}

    client = httpx.Client(base_url=server.url, timeout=300)  # kept, as the singles' is

    def post_batch(binary: bool = False) -> float:
        """The request, answer read whole; the client decodes it afterwards, untimed (the
        single requests are not decoded either)."""
        t0 = time.perf_counter()
        r = client.post(
            "/v1/fits/linear/batch" + ("/binary" if binary else ""),
            content=npy.getvalue() if binary else body,
            headers={"content-type": "application/x-npy" if binary else "application/json"},
            params=options if binary else None,
        )
        seconds = time.perf_counter() - t0
        assert r.status_code == 200 and r.json()["failed"] == 0, r.text[:300]
        answers["npy" if binary else "json"] = r.content
        return seconds

    with client:
        post_batch()  # the first batch of this size compiles its bucket
        batch = min(post_batch() for _ in range(2))
        batch_npy = min(post_batch(binary=True) for _ in range(3))
    assert answers["npy"] == answers["json"], "the binary batch must answer as the JSON one"
    singles = [  # the same sets with the same options, one request each
        json.dumps(
            {"x": d["x"], "y": d["y"], "epochs": epochs, "seed": 0, "history_every": epochs}
        ).encode()
        for d in datasets
    ]
    single = asyncio.run(_singles(server.url, singles))
    sequential = asyncio.run(_singles(server.url, singles, connections=1))
    t0 = time.perf_counter()
    _numpy_batch_loop(x, y, 0.1, epochs)
    numpy_time = time.perf_counter() - t0
    return BatchBench(count, batch, batch_npy, single, sequential, numpy_time)


@dataclass
class HttpReport:
    trivial: Load
    fits: Load
    rss_warm: float
    rss_after: float
    fit_rss_warm: float | None
    fit_rss_after: float | None
    fit_requests: int
    cold: float
    tf_import: float
    big: Big | None
    batch: BatchBench
    driver: str
    good: goodput.Goodput
    custom: goodput.CustomModel
    seconds: int
    long_fit: goodput.LongFit | None
    overload: goodput.Overload


def run(quick: bool) -> HttpReport:
    seconds = 3 if quick else 10
    body = _small_fit_body()
    with serve(TAPEFIT_LOG_LEVEL="warning") as server:  # default settings
        server.wait_warm()
        # Warm-up: every code path once, then a short burst.
        load(server.url, "/v1/fits/linear", body, 2)
        load(server.url, "/healthz", None, 1)
        rss_warm, fit_rss_warm = rss_mib(server), fit_process_rss_mib(server)
        trivial = load(server.url, "/healthz", None, seconds)
        fits = load(server.url, "/v1/fits/linear", body, seconds)
        total = fits.requests
        while total < 10_000:
            total += load(server.url, "/v1/fits/linear", body, 3).requests
        rss_after, fit_rss_after = rss_mib(server), fit_process_rss_mib(server)
        good = goodput.goodput(server, seconds)
        custom = goodput.custom_model(server, seconds)
        long = goodput.long_fit(server)
        big = None if quick else big_requests(server)
        batch = batch_bench(server, 1_000 if quick else 10_000)
        server.stop()
    overload = goodput.overload()
    cold, tf_import = cold_start(1 if quick else 3)
    driver = "wrk -t2 -c16" if shutil.which("wrk") else "httpx async, 16 connections"
    return HttpReport(
        trivial,
        fits,
        rss_warm,
        rss_after,
        fit_rss_warm,
        fit_rss_after,
        total,
        cold,
        tf_import,
        big,
        batch,
        driver,
        good,
        custom,
        seconds,
        long,
        overload,
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
    if r.fit_rss_warm is not None and r.fit_rss_after is not None:
        lines.append(
            f"- the fit process (where those fits ran): {r.fit_rss_warm:.0f} MiB after warm-up, "
            f"{r.fit_rss_after:.0f} MiB after "
            f"({(r.fit_rss_after - r.fit_rss_warm) / r.fit_rss_warm:+.1%})"
        )
    if r.big is not None:
        b = r.big
        lines += [
            f"- 1,000,000-point linear fit, 1000 epochs: parsing its {b.body_mb:.0f} MB JSON body "
            f"alone (pydantic + numpy) {b.parse_json * 1e3:.0f} ms; the JSON request end to end "
            f"{b.json_request * 1e3:.0f} ms ({b.json_request / b.parse_json:.2f}x the parse); "
            f"as application/x-npy {b.npy_request * 1e3:.0f} ms "
            f"({b.npy_request / b.parse_json:.2f}x the JSON parse)",
            f"- slowest /healthz answered during those requests: JSON "
            f"{b.json_health_max * 1e3:.1f} ms, npy {b.npy_health_max * 1e3:.1f} ms; probed "
            f"from a process of its own: JSON {b.json_health_max_apart * 1e3:.1f} ms, npy "
            f"{b.npy_health_max_apart * 1e3:.1f} ms",
        ]
    bb = r.batch
    lines += [
        "",
        f"Batch: {bb.datasets:,} data sets of 100 points, 1000 epochs (linear):",
        "",
        "| path | time | the JSON batch request is | the .npy batch request is |",
        "|---|---|---|---|",
        f"| one batch request (JSON, history_every=1000) | {bb.batch_request:.2f} s | | |",
        f"| one batch request (.npy body, `/batch/binary`, same options) | {bb.batch_npy:.2f} s "
        "| | |",
        f"| {bb.datasets:,} single requests (httpx, 16 connections) | {bb.single_requests:.2f} s "
        f"| {bb.single_requests / bb.batch_request:.0f}x faster "
        f"| {bb.single_requests / bb.batch_npy:.0f}x faster |",
        f"| {bb.datasets:,} single requests one after another (httpx, 1 connection) "
        f"| {bb.sequential_requests:.2f} s | {bb.sequential_requests / bb.batch_request:.0f}x "
        f"faster | {bb.sequential_requests / bb.batch_npy:.0f}x faster |",
        f"| numpy loop vectorized over the batch (in process, no HTTP) | {bb.numpy_loop:.2f} s "
        f"| {bb.numpy_loop / bb.batch_request:.1f}x faster "
        f"| {bb.numpy_loop / bb.batch_npy:.1f}x faster |",
    ]
    lines += ["", goodput.report(r.good, r.long_fit, r.overload, r.driver)]
    lines += ["", goodput.custom_report(r.custom, r.driver, r.seconds)]
    return "\n".join(lines)
