"""Engine benchmark: the seed's eager loop, a numpy loop, tapefit's engine, the closed form."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from service.fitting import FitEngine
from tests.reference import (
    gaussian_closed_form,
    linear_closed_form,
    reference_gaussian,
    reference_linear,
)

Array = npt.NDArray[np.float64]
LR = {"linear": 0.1, "gaussian": 0.1}


def timed(fn: Callable[[], object], min_time: float = 0.3, max_reps: int = 200) -> float:
    """Median wall time of ``fn`` over enough repetitions (at least 3 unless slow)."""
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < max_reps:
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
        if len(samples) >= 3 and time.perf_counter() - start > min_time:
            break
        if samples[-1] > 2.0:  # slow baselines: one run is enough
            break
    return statistics.median(samples)


def numpy_linear(x: Array, y: Array, lr: float, epochs: int) -> tuple[float, float, Array]:
    """Plain gradient descent on the MSE with hand-written gradients."""
    m, b = 0.0, 0.0
    history = np.empty(epochs)
    for i in range(epochs):
        r = m * x + b - y
        history[i] = np.dot(r, r) / r.size
        m -= lr * 2.0 * np.dot(r, x) / r.size
        b -= lr * 2.0 * r.mean()
    return m, b, history


def numpy_gaussian(y: Array, lr: float, epochs: int) -> tuple[float, float, Array]:
    """Plain gradient descent on the mean NLL with hand-written gradients."""
    m, s = 0.7 * y.mean(), 1.3 * y.std()
    history = np.empty(epochs)
    for i in range(epochs):
        d = y - m
        ss = np.dot(d, d) / d.size
        history[i] = 0.5 * np.log(2 * np.pi * s * s) + ss / (2 * s * s)
        gm = -d.mean() / (s * s)
        gs = 1.0 / s - ss / s**3
        m -= lr * gm
        s -= lr * gs
    return m, s, history


def one_pass(x: Array, y: Array) -> float:
    """One fused numpy pass over the data (a dot product reads both arrays once)."""
    return float(np.dot(x, y))


def first_call_seconds(model: str) -> float:
    """A fresh process: engine construction plus the first fit (tracing, XLA compilation)."""
    code = f"""
import time, numpy as np
from service.fitting import FitEngine
x = np.random.default_rng(0).random(100); y = 2 * x + 1
t = time.perf_counter()
e = FitEngine()
e.fit({'"linear", x, y' if model == "linear" else '"gaussian", y'}, learning_rate=0.1, epochs=100)
print(time.perf_counter() - t)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    )
    return float(out.stdout.strip().splitlines()[-1])


@dataclass
class Row:
    model: str
    n: int
    epochs: int
    eager: float
    numpy: float
    engine: float
    closed: float
    floor: float

    @property
    def vs_eager(self) -> float:
        return self.eager / self.engine

    @property
    def vs_numpy(self) -> float:
        return self.numpy / self.engine

    @property
    def vs_floor(self) -> float:
        return self.engine / self.floor


def measure(engine: FitEngine, model: str, n: int, epochs: int, eager_cap: int) -> Row:
    rng = np.random.default_rng(n + epochs)
    x = rng.random(n)
    y = x + 2.0 + rng.normal(0.0, 0.15, n) if model == "linear" else rng.normal(2.0, 1.0, n)
    tiny_x, tiny_y = x[:2].copy(), y[:2].copy()
    lr = LR[model]
    if model == "linear":
        eager_epochs = min(epochs, eager_cap)
        eager = timed(lambda: reference_linear(x, y, lr, eager_epochs, (0.0, 0.0)), max_reps=3)
        eager *= epochs / eager_epochs
        numpy_t = timed(lambda: numpy_linear(x, y, lr, epochs), max_reps=5)
        engine_t = timed(
            lambda: engine.fit("linear", x, y, learning_rate=lr, epochs=epochs, seed=0)
        )
        closed = timed(lambda: linear_closed_form(x, y))
        loop_only = timed(
            lambda: engine.fit(
                "linear", tiny_x, tiny_y + np.array([0.0, 1.0]), learning_rate=lr, epochs=epochs
            )
        )
    else:
        eager_epochs = min(epochs, eager_cap)
        eager = timed(lambda: reference_gaussian(y, lr, eager_epochs), max_reps=3)
        eager *= epochs / eager_epochs
        numpy_t = timed(lambda: numpy_gaussian(y, lr, epochs), max_reps=5)
        engine_t = timed(lambda: engine.fit("gaussian", y, learning_rate=lr, epochs=epochs))
        closed = timed(lambda: gaussian_closed_form(y))
        loop_only = timed(
            lambda: engine.fit(
                "gaussian", tiny_y + np.array([0.0, 1.0]), learning_rate=lr, epochs=epochs
            )
        )
    floor = timed(lambda: one_pass(x, y)) + loop_only
    return Row(model, n, epochs, eager, numpy_t, engine_t, closed, floor)


CONFIGS = [(100, 30), (100, 1000), (10_000, 1000), (1_000_000, 1000)]
QUICK_CONFIGS = [(100, 30), (100, 1000), (10_000, 1000)]


def run(quick: bool) -> tuple[list[Row], dict[str, float]]:
    engine = FitEngine()
    engine.warm_up()
    rows = []
    for model in ("linear", "gaussian"):
        for n, epochs in QUICK_CONFIGS if quick else CONFIGS:
            # The eager loop costs ~2 ms per epoch whatever n is; at n = 1e6 it runs 100
            # epochs and is scaled to the full count (its per-epoch cost is constant).
            rows.append(measure(engine, model, n, epochs, eager_cap=100 if n >= 1e6 else 1000))
    first = {model: first_call_seconds(model) for model in ("linear", "gaussian")}
    before = engine.trace_counts()
    assert set(before.values()) == {1}, before
    return rows, first


def fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.0f} µs"


def table(rows: list[Row], first: dict[str, float]) -> str:
    head = (
        "| model | n | epochs | seed eager loop | numpy loop | tapefit engine | closed form "
        "| engine vs eager | engine vs numpy | engine / (1 pass + loop) |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.n:,} | {r.epochs:,} | {fmt_time(r.eager)} | {fmt_time(r.numpy)} "
            f"| {fmt_time(r.engine)} | {fmt_time(r.closed)} | {r.vs_eager:,.0f}x "
            f"| {r.vs_numpy:,.1f}x | {r.vs_floor:.2f} |"
        )
    lines.append("")
    lines.append(
        "First call in a fresh process (engine construction, tracing, XLA compilation, one fit): "
        + ", ".join(f"{m} {fmt_time(t)}" for m, t in first.items())
    )
    return "\n".join(lines)
