"""POST /v1/fits/expression/batch: one expression (or named model) over many data sets, the
whole path (route, parser, worker, engine). Each entry is checked against the single-fit
route's answer for its set, NIST's certified values and scipy's ``curve_fit``."""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

import httpx
import numpy as np
import pytest
from scipy.optimize import curve_fit

from service.fitting import inference
from service.fitting.expression import CompileCost, parse
from tests import nist
from tests.conftest import app_settings, running_app
from tests.optimum import assert_same_optimum, resolution_se

pytestmark = pytest.mark.anyio

BATCH = "/v1/fits/expression/batch"
FIT = "/v1/fits/expression"
DECAY = "a*exp(-k*t) + c"


def _decays(count: int, seed: int) -> list[dict[str, Any]]:
    """Decays with t in seconds (up to 5e3) on a background of 1e7 counts, noise 0.1 to 10,
    lengths 15 to 90: the units callers have."""
    rng = np.random.default_rng(seed)
    sets = []
    for _ in range(count):
        n = int(rng.integers(15, 91))
        t = np.sort(rng.uniform(0.0, 5e3, n))
        a, k = rng.uniform(1e3, 1e5), rng.uniform(2e-4, 2e-3)
        y = a * np.exp(-k * t) + 1e7 + rng.normal(0.0, rng.choice([0.1, 1.0, 10.0]), n)
        sets.append({"x": {"t": t.tolist()}, "y": y.tolist(), "parameters": {"a": 0.5 * a}})
    return sets


def _same_optimum(got: dict[str, Any], want: dict[str, Any], one: dict[str, Any]) -> None:
    """The same optimum of set ``one``, to the float64 resolution of its sum of squares."""
    stats = want["stats"]
    tolerance = resolution_se(one["y"], stats["rss"], stats["dof"], one.get("weights"))
    assert_same_optimum(got["params"], want["params"], stats["std_errors"], tolerance)


def _own_table(result: dict[str, Any]) -> None:
    """The entry's parameter table (the batch computes them all at once) is exactly the one
    its own estimates, standard errors and dof give."""
    stats, names = result["stats"], list(result["params"])
    table = stats["inference"]
    want = inference.table(
        names,
        list(result["params"].values()),
        [stats["std_errors"][name] for name in names],
        table["dof"],
        table["confidence"],
    )
    assert table["parameters"] == want
    assert table["method"] == ("normal" if table["dof"] is None else "t")


async def test_each_entry_is_the_single_fit_of_its_set(client: httpx.AsyncClient) -> None:
    shared = {"a": 1e4, "k": 1e-3, "c": 1e7 + 20.0}
    sets = _decays(9, seed=11)
    r = await client.post(BATCH, json={"expression": DECAY, "parameters": shared, "datasets": sets})
    assert r.status_code == 200, r.text
    answer = r.json()
    assert (answer["model"], answer["expression"], answer["named_model"]) == (
        "expression",
        DECAY,
        None,
    )
    assert (answer["succeeded"], answer["failed"]) == (9, 0)
    for i, (one, entry) in enumerate(zip(sets, answer["results"], strict=True)):
        assert entry["index"] == i and entry["error"] is None
        body = {"expression": DECAY, "parameters": shared | one["parameters"]}
        single = await client.post(FIT, json=body | {"x": one["x"], "y": one["y"]})
        assert single.status_code == 200
        want, got = single.json(), entry["result"]
        _same_optimum(got, want, one)
        assert got["start"] == want["start"] == shared | one["parameters"]
        for key in ("n", "stop_reason", "converged", "warnings", "history_every"):
            assert got[key] == want[key], key
        for key in ("dof", "n_used"):
            assert got["stats"][key] == want["stats"][key]
        _own_table(got)
        for name, se in want["stats"]["std_errors"].items():
            assert got["stats"]["std_errors"][name] == pytest.approx(se, rel=1e-6)
        assert got["stats"]["rss"] == pytest.approx(want["stats"]["rss"], rel=1e-7)
        # and the independent reference
        t, y = np.array(one["x"]["t"]), np.array(one["y"])
        popt, pcov = curve_fit(
            lambda t, a, k, c: a * np.exp(-k * t) + c,
            t,
            y,
            p0=list(got["start"].values()),
            ftol=1e-15,
            xtol=1e-15,
            gtol=1e-15,
            maxfev=100_000,
        )
        gaps = np.abs(np.array(list(got["params"].values())) - popt)
        assert np.all(gaps <= 1e-3 * np.sqrt(np.diag(pcov)))


async def test_a_set_that_cannot_be_fitted_fails_alone(client: httpx.AsyncClient) -> None:
    """A divergent set, a constant one, one with fewer points than parameters, one whose
    weights leave two points, and sets of other lengths: each its own entry."""
    good = _decays(3, seed=12)
    t = np.linspace(0.0, 5e3, 40).tolist()
    sets = [
        good[0],
        {"x": {"t": t}, "y": [1e7] * 40, "parameters": {"k": -1.0}},  # exp(5e3) overflows
        good[1],
        {"x": {"t": t}, "y": [1e7] * 40},
        {"x": {"t": [0.0, 1.0]}, "y": [1e7 + 1.0, 1e7]},
        {
            "x": {"t": t[:5]},
            "y": [1e7 + 9, 1e7 + 5, 1e7 + 3, 1e7 + 2, 1e7],
            "weights": [1, 1, 0, 0, 0],
        },
        good[2],
    ]
    body = {"expression": DECAY, "parameters": {"a": 1e4, "k": 1e-3, "c": 1e7}, "datasets": sets}
    r = await client.post(BATCH, json=body)
    assert r.status_code == 200, r.text
    entries = r.json()["results"]
    assert r.json()["failed"] == 3
    assert "overflow" in entries[1]["error"] and entries[1]["result"] is None
    assert entries[3]["error"] is None and entries[3]["result"]["stats"]["rss"] <= 1e-2
    assert "2 points (with a positive weight) cannot determine 3 parameters" in entries[4]["error"]
    assert "2 points (with a positive weight)" in entries[5]["error"]
    for i in (0, 2, 6):
        assert entries[i]["error"] is None and entries[i]["result"]["converged"]
        assert entries[i]["result"]["n"] == len(sets[i]["y"])
    for i in (0, 2, 3, 6):  # failed sets between: each table is its own set's
        _own_table(entries[i]["result"])
    known = await client.post(BATCH, json=body | {"absolute_sigma": True, "confidence": 0.9})
    assert known.status_code == 200, known.text
    for i in (0, 2, 6):
        result = known.json()["results"][i]["result"]
        assert result["stats"]["inference"]["method"] == "normal"
        assert result["stats"]["inference"]["confidence"] == 0.9
        _own_table(result)


async def test_a_named_model_guesses_each_sets_start(client: httpx.AsyncClient) -> None:
    rng = np.random.default_rng(13)
    sets = []
    for vmax, km in ((2e-6, 3e3), (5e-6, 800.0)):
        x = np.linspace(100.0, 2e4, 30)
        y = vmax * x / (km + x) * (1 + rng.normal(0, 1e-3, x.size))
        sets.append({"x": x.tolist(), "y": y.tolist()})
    r = await client.post(BATCH, json={"model": "michaelis_menten", "datasets": sets})
    assert r.status_code == 200, r.text
    for one, entry in zip(sets, r.json()["results"], strict=True):
        single = (await client.post(FIT, json={"model": "michaelis_menten", **one})).json()
        assert entry["result"]["start"] == single["start"]  # guessed from its own data
        _same_optimum(entry["result"], single, one)


@pytest.mark.parametrize(
    ("change", "loc", "kind"),
    [
        (
            lambda b: b["datasets"][1].update(x={"u": [1.0, 2.0, 3.0, 4.0]}),
            ["datasets", 1, "x"],
            "variables",
        ),
        (lambda b: b["datasets"][0].update(y=[1.0, 2.0]), ["datasets", 0, "y"], "length_mismatch"),
        (
            lambda b: b["datasets"][1].update(parameters={"q": 1.0}),
            ["datasets", 1, "parameters"],
            "unknown_parameter",
        ),
        (lambda b: b.update(expression="a*exp(-k*t) + "), ["expression"], "expression_syntax"),
        (lambda b: b.update(datasets=[]), ["datasets"], "too_short"),
        (
            lambda b: b["datasets"][0].update(y=[1.0, float("nan"), 2.0, 3.0]),
            ["datasets", 0, "y", 1],
            "finite_number",
        ),
    ],
)
async def test_refusals_name_the_field(
    client: httpx.AsyncClient, change: Any, loc: list[Any], kind: str
) -> None:
    body: dict[str, Any] = {
        "expression": DECAY,
        "parameters": {"a": 1.0, "k": 0.1, "c": 0.0},
        "datasets": [
            {"x": {"t": [0.0, 1.0, 2.0, 3.0]}, "y": [3.0, 2.0, 1.5, 1.2]},
            {"x": {"t": [0.0, 1.0, 2.0, 3.0]}, "y": [4.0, 2.5, 1.7, 1.3]},
        ],
    }
    change(body)
    content = json.dumps(body).encode()  # NaN written as JSON's extension, as clients do
    r = await client.post(BATCH, content=content, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    errors = r.json()["detail"]
    assert any(e["loc"][1:] == loc and e["type"] == kind for e in errors), errors


async def test_a_batch_is_charged_for_its_sets_not_only_its_points() -> None:
    """Each set of a batch holds its prepared data, run, result and statistics until the
    answer has streamed (measured ~15-19 KB a set at 100 points, more than its points): a
    budget that holds a compile and 300 sets' charge admits 300 sets of 4 points and
    refuses 1,000 (413, naming memory), though their points alone would fit many times."""
    expression = parse("a*x", ("x",), ("a",))
    budget = int(CompileCost.peak_bytes(expression)) + 16 * 2**20
    one = {"x": [1.0, 2.0, 3.0, 4.0], "y": [2.0, 4.1, 5.9, 8.0]}
    async with running_app(app_settings(memory_budget_bytes=budget)) as client:

        async def batch(sets: int) -> httpx.Response:
            body = {"expression": "a*x", "parameters": {"a": 1.0}, "datasets": [one] * sets}
            return await client.post(BATCH, json=body | {"history_every": 1000})

        assert (await batch(300)).status_code == 200
        refused = await batch(1000)
        assert refused.status_code == 413, refused.text
        assert "memory" in refused.json()["detail"]


async def test_over_the_batch_limit_is_a_422_naming_it() -> None:
    async with running_app(app_settings(max_batch=2)) as client:
        body = {
            "expression": "a*x",
            "parameters": {"a": 1.0},
            "datasets": [{"x": [1.0, 2.0], "y": [2.0, 4.0]}] * 3,
        }
        r = await client.post(BATCH, json=body)
        assert r.status_code == 422
        assert r.json()["detail"][0]["type"] == "too_many_datasets"
        assert "TAPEFIT_MAX_BATCH" in r.json()["detail"][0]["msg"]


def _nist_batch(problem: nist.Problem) -> dict[str, Any]:
    x = nist.json_x(problem)
    return {
        "expression": problem.expression,
        "parameters": problem.starts[0],
        "datasets": [
            {"x": x, "y": problem.y.tolist()},
            {"x": x, "y": problem.y.tolist(), "parameters": problem.starts[1]},
        ],
    }


@pytest.mark.parametrize("name", nist.names())
async def test_nist_both_starts_in_one_batch_request(client: httpx.AsyncClient, name: str) -> None:
    """NIST's problem with both of its starts as the two sets of one request: each meets
    the single fit's bar (:func:`tests.nist.check_certified`)."""
    problem = nist.load(name)
    r = await client.post(BATCH, json=_nist_batch(problem))
    assert r.status_code == 200, r.text
    for entry in r.json()["results"]:
        assert entry["result"] is not None, entry["error"]
        nist.check_certified(entry["result"], problem)


async def test_the_typed_client_fits_a_batch_from_numpy_arrays() -> None:
    """The client's method takes numpy arrays and returns the typed answer; a request error
    raises, naming the field."""
    from asgi_lifespan import LifespanManager

    from service.app import create_app
    from service.client import AsyncClient, ValidationFailed

    app = create_app(app_settings())
    async with LifespanManager(app, startup_timeout=120):
        await app.state.worker_started
        transport = httpx.ASGITransport(app=app)
        client = AsyncClient("http://tapefit", transport=transport, max_retries=0)
        problem = nist.load("Misra1a")
        x, y = problem.x["x"], problem.y
        answer = await client.fit_expression_batch(
            [
                {"x": x, "y": y},
                {"x": x, "y": y, "parameters": problem.starts[1]},
            ],
            problem.expression,
            problem.starts[0],
        )
        assert (answer.succeeded, answer.failed) == (2, 0)
        for entry in answer.results:
            assert entry.result is not None
            assert entry.result.params["b1"] == pytest.approx(problem.certified["b1"], rel=1e-9)
        with pytest.raises(ValidationFailed) as refused:
            await client.fit_expression_batch([{"x": x, "y": y}], "b1*os.system", {"b1": 1.0})
        assert refused.value.detail[0]["loc"] == ["body", "expression"]


async def test_the_binary_batch_answers_as_the_json_one(client: httpx.AsyncClient) -> None:
    """Sets of one length as one .npy array (sets, variables + 1, n), options in the query
    string: the same parameters as the JSON batch of the same sets, and its statistics
    to 1e-9."""
    rng = np.random.default_rng(14)
    t = np.linspace(0.0, 4e3, 25)
    ys = [3e4 * np.exp(-k * t) + 1e7 + rng.normal(0, 1.0, t.size) for k in (4e-4, 9e-4, 1.5e-3)]
    shared = {"a": 1e4, "k": 1e-3, "c": 1e7}
    sets = [{"x": {"t": t.tolist()}, "y": y.tolist()} for y in ys]
    json_answer = await client.post(
        BATCH, json={"expression": DECAY, "parameters": shared, "datasets": sets}
    )
    buffer = io.BytesIO()
    np.save(buffer, np.stack([np.stack([t, y]) for y in ys]))
    query = {
        "expression": DECAY,
        "parameters": json.dumps(shared),
        "variables": json.dumps(["t"]),
    }
    npy_answer = await client.post(
        BATCH + "/binary",
        content=buffer.getvalue(),
        params=query,
        headers={"content-type": "application/x-npy"},
    )
    assert json_answer.status_code == npy_answer.status_code == 200, npy_answer.text
    assert npy_answer.json()["succeeded"] == 3
    # The JSON body's decimal text is read in extended precision for the statistics; the
    # .npy's values are float64 already: the parameters are the same, the statistics agree.
    for a, b in zip(json_answer.json()["results"], npy_answer.json()["results"], strict=True):
        assert a["result"]["params"] == b["result"]["params"]
        for name, se in a["result"]["stats"]["std_errors"].items():
            assert b["result"]["stats"]["std_errors"][name] == pytest.approx(se, rel=1e-9)


@pytest.mark.parametrize(
    ("query", "body_shape", "loc", "kind"),
    [
        ({"variables": '["t"]'}, (2, 2, 5), ["query", "expression"], "expression_or_model"),
        (
            {"expression": DECAY, "parameters": "{}"},
            (2, 2, 5),
            ["query", "parameters"],
            "expression_no_parameters",
        ),
        (
            {"expression": DECAY, "parameters": '{"a": 1, "k": 1, "c": 1}'},
            (2, 3, 5),
            ["body"],
            "npy_shape",
        ),
        (
            {"expression": DECAY, "parameters": '{"a": 1, "k": 1, "c": 1}', "variables": '["exp"]'},
            (2, 2, 5),
            ["query", "variables"],
            "variable_name",
        ),
    ],
)
async def test_binary_refusals_name_the_field(
    client: httpx.AsyncClient,
    query: dict[str, str],
    body_shape: tuple[int, ...],
    loc: list[str],
    kind: str,
) -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.ones(body_shape))
    r = await client.post(
        BATCH + "/binary",
        content=buffer.getvalue(),
        params=query,
        headers={"content-type": "application/x-npy"},
    )
    assert r.status_code == 422, r.text
    errors = r.json()["detail"]
    assert any(e["loc"] == loc and e["type"] == kind for e in errors), errors


async def test_one_model_under_other_names_answers_in_each_requests_names(
    client: httpx.AsyncClient,
) -> None:
    """Two batches of the same model written with other parameter and variable names share
    one cached spec and compiled loop: each answers in its own names, with the same
    numbers."""
    sets = _decays(4, seed=15)
    renamed = [
        {"x": {"s": one["x"]["t"]}, "y": one["y"], "parameters": {"p": one["parameters"]["a"]}}
        for one in sets
    ]
    first, second = await asyncio.gather(
        client.post(
            BATCH,
            json={
                "expression": DECAY,
                "parameters": {"a": 1e4, "k": 1e-3, "c": 1e7},
                "datasets": sets,
            },
        ),
        client.post(
            BATCH,
            json={
                "expression": "p*exp(-q*s) + r",
                "parameters": {"p": 1e4, "q": 1e-3, "r": 1e7},
                "datasets": renamed,
            },
        ),
    )
    assert first.status_code == second.status_code == 200
    for a, b in zip(first.json()["results"], second.json()["results"], strict=True):
        mine, theirs = a["result"], b["result"]
        assert list(mine["params"]) == list(mine["start"]) == ["a", "k", "c"]
        assert list(theirs["params"]) == list(theirs["start"]) == ["p", "q", "r"]
        assert list(theirs["stats"]["std_errors"]) == ["p", "q", "r"]
        _own_table(mine)
        _own_table(theirs)  # the batch's tables, in each request's own names
        for x, y in zip(mine["params"].values(), theirs["params"].values(), strict=True):
            assert y == pytest.approx(x, rel=1e-12)
