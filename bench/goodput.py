"""Goodput (issue #14): tapefit against the afternoon peer (:mod:`bench.peer`) under the same
closed-loop load, a long fit end to end against a numpy loop, and an overload of long fits.

Every figure is a ratio measured side by side in this run; nothing here asserts a timing."""

from __future__ import annotations

import asyncio
import json
import math
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import httpx
import numpy as np

from bench.load import Load, load
from tests.server import Server, free_port, serve, wait_warm

#: The goodput load: n = 100 points, the default 1000 epochs, 16 connections.
N, CONNECTIONS = 100, 16
#: The overload: this many long fits at once, each ~1 s of compiled calls.
OVERLOAD_FITS, OVERLOAD_EPOCHS = 64, 20_000


def _body() -> bytes:
    rng = np.random.default_rng(0)
    x = 1000.0 + 100.0 * rng.random(N)
    y = 3.0 * x - 50.0 + rng.normal(0.0, 1.0, N)
    return json.dumps({"x": x.tolist(), "y": y.tolist()}).encode()


@contextmanager
def peer(module: str = "bench.peer") -> Iterator[str]:
    """A peer (``bench.peer``, or ``bench.tf_peer``) on a free loopback port (stopped, and
    waited for, on the way out)."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", module, str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@dataclass
class Goodput:
    peer: Load
    tf_peer: Load
    tapefit: Load
    #: tapefit with each fit computed once and reused (:mod:`bench.free_fit`).
    without_fit: Load
    seconds: int
    rounds: int

    @property
    def refusals(self) -> int:
        return self.tapefit.errors

    @property
    def ratio(self) -> float:
        """tapefit's successful fits/s over the peer's requests/s."""
        good = self.tapefit.rps * (1 - self.tapefit.errors / max(1, self.tapefit.requests))
        return good / self.peer.rps


def _check_answer(url: str, body: bytes) -> None:
    """The server's fit is the least-squares line (a fast wrong answer measures nothing)."""
    data = json.loads(body)
    slope, intercept = np.polyfit(data["x"], data["y"], 1)
    headers = {"content-type": "application/json"}
    params = httpx.post(url + "/v1/fits/linear", content=body, headers=headers).json()["params"]
    for got, want in ((params["slope"], slope), (params["intercept"], intercept)):
        assert math.isclose(got, want, rel_tol=1e-6), (url, params, slope, intercept)


def goodput(server: Server, seconds: int, rounds: int = 2) -> Goodput:
    """16 connections of default fits against the peer, the least TensorFlow service,
    tapefit with its fits reused (everything but the fit) and tapefit at its default
    settings: all up at once, each warmed, then loaded one after the other, ``rounds`` times
    over (so a slow spell of the machine falls on all of them); each one's best round."""
    body = _body()
    with ExitStack() as servers:
        urls = [servers.enter_context(peer(m)) for m in ("bench.peer", "bench.tf_peer")]
        urls += [servers.enter_context(peer("bench.free_fit")), server.url]
        wait_warm(urls[2])  # its background warm-up would share the CPU
        for url in urls:
            _check_answer(url, body)
            load(url, "/v1/fits/linear", body, 2, CONNECTIONS)  # warm (and compile)
        runs = [
            [load(url, "/v1/fits/linear", body, seconds, CONNECTIONS) for url in urls]
            for _ in range(rounds)
        ]
    polyfit_peer, tf_peer, without_fit, tapefit = (
        max(each, key=lambda r: r.rps) for each in zip(*runs, strict=True)
    )
    return Goodput(polyfit_peer, tf_peer, tapefit, without_fit, seconds, rounds)


@dataclass
class CustomModel:
    """A cached custom-model fit (NIST's Misra1a from its first start) over HTTP: tapefit
    against FastAPI + curve_fit hard-coded to that one model (:mod:`bench.curve_fit_peer`)."""

    peer: Load
    tapefit: Load
    #: The certified digits (LRE) of b1 in each answer.
    peer_digits: float
    tapefit_digits: float

    @property
    def ratio(self) -> float:
        good = self.tapefit.rps * (1 - self.tapefit.errors / max(1, self.tapefit.requests))
        return good / self.peer.rps


def custom_model(server: Server, seconds: int, rounds: int = 2) -> CustomModel:
    """16 connections of Misra1a fits against each, loaded one after the other ``rounds``
    times over; each one's best round. Both answers are checked against NIST first."""
    from tests import nist

    problem = nist.load("Misra1a")
    body = json.dumps(
        {
            "expression": problem.expression,
            "parameters": problem.starts[0],
            "x": nist.json_x(problem),
            "y": problem.y.tolist(),
        }
    ).encode()
    headers = {"content-type": "application/json"}
    path = "/v1/fits/expression"
    with peer("bench.curve_fit_peer") as peer_url:
        digits = []
        for url in (peer_url, server.url):
            answer = httpx.post(url + path, content=body, headers=headers, timeout=60).json()
            digits.append(nist.lre(answer["params"]["b1"], problem.certified["b1"]))
            assert digits[-1] >= 6.0, (url, answer)
            load(url, path, body, 2, CONNECTIONS)  # warm (and compile)
        runs = [
            [load(url, path, body, seconds, CONNECTIONS) for url in (peer_url, server.url)]
            for _ in range(rounds)
        ]
    theirs, ours = (max(each, key=lambda r: r.rps) for each in zip(*runs, strict=True))
    return CustomModel(theirs, ours, digits[0], digits[1])


@dataclass
class LongFit:
    points: int
    epochs: int
    request: float
    numpy_loop: float


def _numpy_loop(x: np.ndarray, y: np.ndarray, lr: float, epochs: int) -> None:
    """The reference post's training loop in numpy: full-batch gradient descent on the MSE."""
    m = b = 0.0
    for _ in range(epochs):
        r = m * x + b - y
        m -= lr * 2.0 * float(np.mean(r * x))
        b -= lr * 2.0 * float(np.mean(r))


def long_fit(server: Server, points: int = 10_000, epochs: int = 10_000, runs: int = 3) -> LongFit:
    """One 10,000-point, 10,000-epoch JSON fit end to end, against the numpy loop."""
    rng = np.random.default_rng(2)
    x = rng.random(points)
    y = 2.0 * x + 1.0 + rng.normal(0.0, 0.1, points)
    body = json.dumps({"x": x.tolist(), "y": y.tolist(), "epochs": epochs, "seed": 0}).encode()
    headers = {"content-type": "application/json"}
    times = []
    with httpx.Client(base_url=server.url, timeout=120) as client:
        client.post("/v1/fits/linear", content=body, headers=headers)
        for _ in range(runs):
            t0 = time.perf_counter()
            r = client.post("/v1/fits/linear", content=body, headers=headers)
            times.append(time.perf_counter() - t0)
            assert r.status_code == 200, r.text[:300]
    t0 = time.perf_counter()
    _numpy_loop(x, y, 0.1, epochs)
    return LongFit(points, epochs, min(times), time.perf_counter() - t0)


@dataclass
class Overload:
    statuses: Counter[int]
    without_retry_after: int
    health_p99_ms: float
    health_max_ms: float
    probes: int


async def _overload(url: str) -> Overload:
    body = json.dumps(
        {"y": list(np.random.default_rng(4).normal(1e7, 0.1, 100)), "epochs": OVERLOAD_EPOCHS}
    ).encode()
    headers = {"content-type": "application/json"}
    limits = httpx.Limits(max_connections=OVERLOAD_FITS + 1)
    async with (
        httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client,
        httpx.AsyncClient(base_url=url, timeout=30) as prober,
    ):
        fits = [
            asyncio.create_task(client.post("/v1/fits/gaussian", content=body, headers=headers))
            for _ in range(OVERLOAD_FITS)
        ]
        health: list[float] = []
        while not all(task.done() for task in fits):
            t0 = time.perf_counter()
            r = await prober.get("/healthz")
            health.append(time.perf_counter() - t0)
            assert r.status_code == 200
            await asyncio.sleep(0.02)
        answers = [await task for task in fits]
    statuses = Counter(r.status_code for r in answers)
    missing = sum(r.status_code in (429, 503) and "retry-after" not in r.headers for r in answers)
    q = statistics.quantiles(health, n=100) if len(health) > 1 else health * 99
    return Overload(statuses, missing, q[98] * 1e3, max(health) * 1e3, len(health))


def overload() -> Overload:
    """64 long fits at once at a default server whose compiled calls run one epoch each
    (``TAPEFIT_EPOCHS_PER_CALL=1``: a 20,000-epoch fit then takes ~1 s), with /healthz probed
    throughout."""
    env = {"TAPEFIT_LOG_LEVEL": "warning", "TAPEFIT_EPOCHS_PER_CALL": "1"}
    with serve(**env) as server:
        server.wait_warm()
        result = asyncio.run(_overload(server.url))
        server.stop()
    return result


def custom_report(c: CustomModel, driver: str, seconds: int) -> str:
    """The custom-model rows: tapefit against FastAPI + curve_fit, and their ratio."""
    lines = [
        f"A cached custom-model fit over HTTP ({driver}, {seconds} s each, 2 rounds, each "
        "server's best): NIST's Misra1a from its first start, 14 points, 2 parameters:",
        "",
        "| server | requests | req/s | refused or failed | p50 | p99 | p99/p50 | b1 digits |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r, digits in (
        ("peer: FastAPI + pydantic + scipy curve_fit (Misra1a only)", c.peer, c.peer_digits),
        ("tapefit `POST /v1/fits/expression`, default settings", c.tapefit, c.tapefit_digits),
    ):
        lines.append(
            f"| {name} | {r.requests:,} | {r.rps:,.0f} | {r.errors} | {r.p50_ms:.2f} ms "
            f"| {r.p99_ms:.2f} ms | {r.p99_ms / r.p50_ms:.1f} | {digits:.1f} |"
        )
    lines += ["", f"- tapefit's successful fits/s over the curve_fit peer's: {c.ratio:.2f}x"]
    return "\n".join(lines)


def report(g: Goodput, long: LongFit | None, o: Overload, driver: str) -> str:
    rows = [
        ("peer: FastAPI + pydantic + numpy.polyfit", g.peer),
        ("least TensorFlow service: the peer with one compiled GradientTape loop", g.tf_peer),
        ("tapefit, default settings", g.tapefit),
        ("diagnostic: tapefit with each fit computed once and reused", g.without_fit),
    ]
    lines = [
        f"Goodput ({driver}, {g.seconds} s each, one server after the "
        f"other, {g.rounds} rounds, each server's best) of n = {N} linear fits, x in the "
        "thousands, tapefit's default 1000 epochs:",
        "",
        "| server | requests | req/s | refused or failed | p50 | p99 | p99/p50 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in rows:
        lines.append(
            f"| {name} | {r.requests:,} | {r.rps:,.0f} | {r.errors} | {r.p50_ms:.2f} ms "
            f"| {r.p99_ms:.2f} ms | {r.p99_ms / r.p50_ms:.1f} |"
        )
    lines += [
        "",
        f"- tapefit's successful fits/s over the peer's requests/s: {g.ratio:.2f}x "
        f"({g.refusals} refusals)",
        f"- the least TensorFlow service over the peer: {g.tf_peer.rps / g.peer.rps:.2f}x "
        "(what TensorFlow costs; the rest of the gap is what tapefit's statistics, history, "
        "admission, deadlines, metrics and middleware cost)",
        f"- tapefit with its fits reused over the peer: {g.without_fit.rps / g.peer.rps:.2f}x "
        f"(everything but the fit, on the event loop); per request, the fit costs the event "
        f"loop {1e3 / g.tapefit.rps - 1e3 / g.without_fit.rps:.2f} ms of its "
        f"{1e3 / g.tapefit.rps:.2f} ms (with the fit process, its handoff there and back), "
        f"the peer's whole request {1e3 / g.peer.rps:.2f} ms",
    ]
    if long is not None:
        lines.append(
            f"- one {long.points:,}-point, {long.epochs:,}-epoch JSON fit end to end: "
            f"{long.request * 1e3:.1f} ms, against {long.numpy_loop * 1e3:.0f} ms for the numpy "
            f"loop ({long.numpy_loop / long.request:.1f}x)"
        )
    answered = ", ".join(f"{code}: {count}" for code, count in sorted(o.statuses.items()))
    lines.append(
        f"- overload, {OVERLOAD_FITS} fits of ~1 s at once ({OVERLOAD_EPOCHS:,} epochs, one per "
        f"compiled call): answered {answered}; {o.without_retry_after} 429/503 without "
        f"Retry-After; /healthz p99 {o.health_p99_ms:.1f} ms, max {o.health_max_ms:.1f} ms over "
        f"{o.probes} probes"
    )
    return "\n".join(lines)
