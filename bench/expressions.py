"""Expression fits: a cached fit against scipy's ``curve_fit`` in process; the first call of
a new expression, compiled (tracing and XLA compilation) and by the numpy loop (nothing to
compile); and the first answer for a new expression over HTTP, request to response, with
the numpy loop's first fits on (the default) and off (``TAPEFIT_UNCOMPILED_MAX_WORK=0``),
side by side in one run."""

from __future__ import annotations

import statistics
import time

import httpx
import numpy as np
from scipy.optimize import curve_fit

from bench.engine import fmt_time, timed
from service.fitting import FitEngine, bands, profile
from service.fitting.expression import parse
from service.fitting.options import Optimizer
from service.fitting.results import FitResult

LM = Optimizer("levenberg_marquardt")
TEXT = "a*exp(-k*x) + c"


def run(http: bool = True) -> str:
    rng = np.random.default_rng(7)
    x = np.sort(rng.uniform(0.0, 10.0, 1000))
    y = 3.0 * np.exp(-0.7 * x) + 0.5 + rng.normal(0.0, 0.02, x.size)
    start = (1.0, 1.0, 0.0)
    engine = FitEngine()

    def fitted(text: str = TEXT, on: FitEngine = engine, uncompiled: bool = False) -> FitResult:
        expression = parse(text, ("x",), ("a", "k", "c"))
        return on.fit(
            "expression",
            x,
            y,
            learning_rate=0.01,
            epochs=1000,
            initial=start,
            optimizer=LM,
            options={"expression": expression},
            uncompiled=uncompiled,
        )

    def ours(
        text: str = TEXT, on: FitEngine = engine, uncompiled: bool = False
    ) -> dict[str, float]:
        return fitted(text, on, uncompiled).params

    def scipy() -> list[float]:
        popt, _ = curve_fit(lambda x, a, k, c: a * np.exp(-k * x) + c, x, y, p0=start)
        return [float(v) for v in popt]

    compile_start = time.perf_counter()
    ours()  # the first call traces and compiles
    first = time.perf_counter() - compile_start
    second_start = time.perf_counter()
    ours("a*exp(-k*x) + c*1")  # another expression, same shape: a second compile
    second = time.perf_counter() - second_start
    # The numpy loop: an engine that never compiles this model (each call is a first call).
    fresh = FitEngine()
    uncompiled = timed(lambda: ours(on=fresh, uncompiled=True), min_time=1.0)
    cached, reference = timed(ours, min_time=1.0), timed(scipy, min_time=1.0)
    agree = max(abs(v - w) / abs(w) for v, w in zip(ours().values(), scipy(), strict=True))
    same = max(
        abs(v - w) / abs(w)
        for v, w in zip(ours().values(), ours(on=fresh, uncompiled=True).values(), strict=True)
    )
    expression_traces = [n for n, c in fresh.trace_counts().items() if n.startswith("expr") and c]
    assert not expression_traces, "the numpy loop traced something"
    profiled, conf_interval = _profile_costs(x, y, fitted())
    lines = [
        "| expression fit, n = 1,000, 3 parameters | time |",
        "|---|---|",
        f"| tapefit, cached (Levenberg-Marquardt, compiled) | {fmt_time(cached)} |",
        f"| scipy curve_fit (MINPACK, finite differences) | {fmt_time(reference)} |",
        f"| first call of a new expression, compiled (trace + XLA compile + fit) | "
        f"{fmt_time(first)} |",
        f"| a second new expression in the same process, compiled | {fmt_time(second)} |",
        f"| first call of a new expression, numpy loop (nothing compiled) | "
        f"{fmt_time(uncompiled)} |",
        f"| profile-likelihood intervals of the cached fit (6 ends, batched) | "
        f"{fmt_time(profiled)} |",
        f"| lmfit conf_interval of the same fit (the same criterion) | {fmt_time(conf_interval)} |",
        "",
        f"- cached fit vs curve_fit: {reference / cached:.2f}x; parameters agree to "
        f"{agree:.1e} (relative)",
        f"- a new expression's first call: numpy loop {first / uncompiled:.0f}x faster than "
        f"compiling; its parameters equal the compiled fit's to {same:.1e} (relative)",
        f"- a fit with profile intervals costs {(cached + profiled) / cached:.1f}x the plain "
        f"fit; the intervals take {conf_interval / profiled:.0f}x less time than lmfit's",
    ]
    if http:
        lines += ["", first_answers_http(x, y)]
    return "\n".join(lines)


def _profile_costs(x: np.ndarray, y: np.ndarray, fit: FitResult) -> tuple[float, float]:
    """The profile intervals of the cached fit, and lmfit's conf_interval of the same fit."""
    import lmfit

    expression = parse(TEXT, ("x",), ("a", "k", "c"))
    stats, params = fit.stats, list(fit.params.values())
    assert stats.rss is not None
    rss, curve = stats.rss, bands.expression_curve(expression.tree)

    def ours() -> object:
        errors, dof = stats.std_errors, stats.dof
        return profile.intervals(curve, [x], y, None, params, errors, rss, dof, 0.95)

    model = lmfit.Model(lambda x, a, k, c: a * np.exp(-k * x) + c)
    result = model.fit(y, x=x, **fit.params)

    def theirs() -> object:
        return lmfit.conf_interval(result, result, sigmas=[0.95])

    return timed(ours, min_time=1.0), timed(theirs, min_time=1.0)


def first_answers_http(x: np.ndarray, y: np.ndarray, count: int = 7) -> str:
    """Request to response for ``count`` new 3-parameter expressions on a real server, one
    after another, with the numpy loop's first fits on (the default) and off."""
    from tests.server import serve

    rows = []
    for label, env in (
        ("numpy loop first (default)", {}),
        ("compile first (TAPEFIT_UNCOMPILED_MAX_WORK=0)", {"TAPEFIT_UNCOMPILED_MAX_WORK": "0"}),
    ):
        with serve(**env) as server:
            server.wait_warm()
            times = []
            with httpx.Client(base_url=server.url, timeout=120) as client:
                for i in range(count):
                    body = {
                        "expression": f"a*exp(-k*x) + c + {i}.25",
                        "parameters": {"a": 1.0, "k": 1.0, "c": 0.0},
                        "x": x.tolist(),
                        "y": (y + i + 0.25).tolist(),
                    }
                    t0 = time.perf_counter()
                    r = client.post("/v1/fits/expression", json=body)
                    times.append(time.perf_counter() - t0)
                    assert r.status_code == 200, r.text
        rows.append((label, statistics.median(times), max(times)))
    (_, numpy_median, _), (_, compile_median, _) = rows
    return "\n".join(
        [
            f"| first answer for a new expression over HTTP, n = {x.size:,}, {count} "
            "expressions | median | worst |",
            "|---|---|---|",
            *(f"| {label} | {fmt_time(m)} | {fmt_time(w)} |" for label, m, w in rows),
            "",
            f"- numpy loop first: {compile_median / numpy_median:.0f}x faster to the first answer",
        ]
    )
