"""Equivalent expressions share one compiled fit, never one another's names.

Every answer carries the caller's own parameter names, with the right value under each
name, whatever names, parameter order or predictor names an earlier request compiled the
same model with: checked against a real server (the cache is the server's) and against
scipy's ``curve_fit`` on the same data, for fits, bounds, plots and 8 interleaved clients.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest
from scipy.optimize import curve_fit

from tests.server import Server

pytestmark = pytest.mark.slow
FIT, PLOT = "/v1/fits/expression", "/v1/plots/expression"
#: Fitted values agree with curve_fit to this (relatively).
TOLERANCE = 1e-6

RNG = np.random.default_rng(7)
#: Decay over x in the thousands: y = 3·exp(-0.5e-3·x) + 0.0078125, noise 1e-3.
X = np.linspace(0.0, 6000.0, 60)
Y = 3.0 * np.exp(-0.5e-3 * X) + 0.0078125 + RNG.normal(0.0, 1e-3, X.size)
#: Saturation: y = 2e-6·x/(3e3 + x).
S = np.linspace(100.0, 2e4, 40)
V = 2e-6 * S / (3e3 + S) * (1.0 + RNG.normal(0.0, 1e-3, S.size))
#: A line in the thousands: y = 3·x - 20 + 0.25.
L = np.linspace(1000.0, 1100.0, 30)
W = 3.0 * L - 19.75 + RNG.normal(0.0, 0.01, L.size)


def _decay(x: np.ndarray, a: float, k: float) -> np.ndarray:
    return a * np.exp(-k * x) + 0.0078125


def _reference(f: Any, x: np.ndarray, y: np.ndarray, p0: list[float]) -> np.ndarray:
    popt, _ = curve_fit(f, x, y, p0=p0, ftol=1e-15, xtol=1e-15, gtol=1e-15, maxfev=100_000)
    return np.asarray(popt)


A_DECAY, K_DECAY = _reference(_decay, X, Y, [2.0, 1e-3])
VMAX, KM = _reference(lambda s, v, k: v * s / (k + s), S, V, [1e-6, 1e3])
SLOPE, OFFSET = _reference(lambda x, m, b: m * x + b + 0.25, L, W, [1.0, 0.0])

#: (request, {name: expected value}): groups of the same model under other names, in the
#: order they are sent (the first compiles; the others must not see its names).
GROUPS: list[list[tuple[dict[str, Any], dict[str, float]]]] = [
    [
        (
            {"expression": "rate*exp(-amp*x)+0.0078125", "parameters": {"rate": 2, "amp": 1e-3}},
            {"rate": A_DECAY, "amp": K_DECAY},
        ),
        (
            {"expression": "amp*exp(-rate*x)+0.0078125", "parameters": {"amp": 2, "rate": 1e-3}},
            {"amp": A_DECAY, "rate": K_DECAY},
        ),
        (  # the parameters listed in the other order than they appear
            {"expression": "A*exp(-K*t)+0.0078125", "parameters": {"K": 1e-3, "A": 2}, "t": True},
            {"A": A_DECAY, "K": K_DECAY},
        ),
    ],
    [
        (
            {"expression": "km*x/(vmax + x)", "parameters": {"km": 1e-6, "vmax": 1e3}},
            {"km": VMAX, "vmax": KM},
            # (the names swapped on purpose: km is the amplitude here)
        ),
        ({"model": "michaelis_menten"}, {"vmax": VMAX, "km": KM}),
        (
            {"expression": "p*s/(q+s)", "parameters": {"p": 1e-6, "q": 1e3}, "s": True},
            {"p": VMAX, "q": KM},
        ),
    ],
    [
        (
            {"expression": "u*x+v+0.25", "parameters": {"u": 1, "v": 0}},
            {"u": SLOPE, "v": OFFSET},
        ),
        (  # bounds on v (the slope here; the offset, -20, in the cached model's order)
            {
                "expression": "v*x+u+0.25",
                "parameters": {"v": 1, "u": 0},
                "bounds": {"v": [0, 5]},
            },
            {"v": SLOPE, "u": OFFSET},
        ),
        (  # names disjoint from the cached ones, with bounds
            {
                "expression": "slope*z+offset+0.25",
                "parameters": {"offset": 0, "slope": 1},
                "bounds": {"offset": [-30, 10]},
                "z": True,
            },
            {"slope": SLOPE, "offset": OFFSET},
        ),
    ],
]


def _body(request: dict[str, Any], group: int) -> dict[str, Any]:
    body = dict(request)
    x, y = [(X, Y), (S, V), (L, W)][group]
    variable = next((name for name in ("t", "s", "z") if body.pop(name, False)), None)
    body["x"] = {variable: x.tolist()} if variable else x.tolist()
    body["y"] = y.tolist()
    return body


def _check(answer: httpx.Response, expected: dict[str, float], request: dict[str, Any]) -> None:
    assert answer.status_code == 200, answer.text
    fit = answer.json()
    names = list(expected)
    assert sorted(fit["params"]) == sorted(names), (request, fit["params"])
    assert sorted(fit["start"]) == sorted(names)
    assert sorted(fit["stats"]["std_errors"]) == sorted(names)
    assert sorted(fit["stats"]["parameters"]) == sorted(names)
    for name, value in expected.items():
        assert fit["params"][name] == pytest.approx(value, rel=TOLERANCE), (request, name, fit)
    assert fit["converged"] and fit["warnings"] == [], (request, fit["warnings"])


def test_each_caller_gets_its_own_names_with_the_right_values(live_server: Server) -> None:
    with httpx.Client(base_url=live_server.url, timeout=120) as client:
        for group, requests in enumerate(GROUPS):
            for request, expected in requests:
                _check(client.post(FIT, json=_body(request, group)), expected, request)


def test_plots_of_renamed_expressions_draw(live_server: Server) -> None:
    with httpx.Client(base_url=live_server.url, timeout=120) as client:
        for group, requests in enumerate(GROUPS):
            for request, _ in reversed(requests):
                answer = client.post(PLOT, json=_body(request, group))
                assert answer.status_code == 200, (request, answer.text)
                assert answer.headers["content-type"] == "image/png"
                assert answer.content.startswith(b"\x89PNG")


def test_eight_interleaved_clients_each_get_their_own_names(live_server: Server) -> None:
    jobs = [(group, request, expected) for group, g in enumerate(GROUPS) for request, expected in g]
    order = np.random.default_rng(3).permutation(len(jobs) * 4) % len(jobs)

    def run(i: int) -> None:
        group, request, expected = jobs[i]
        with httpx.Client(base_url=live_server.url, timeout=120) as client:
            for _ in range(60):  # new expressions past the compile queue: 429, retry after
                answer = client.post(FIT, json=_body(request, group))
                if answer.status_code != 429:
                    break
                time.sleep(float(answer.headers["retry-after"]))
            _check(answer, expected, request)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(run, order.tolist()))
