"""Batch fits: many data sets in one request and one vectorized loop."""

from __future__ import annotations

import io
from typing import Any

import httpx
import numpy as np
import orjson
import pytest

from service.api.models import BUILT_IN
from service.api.routes.fits import _batch_answer, fit_answer
from service.api.schemas import (
    GAUSSIAN_BATCH_EXAMPLE,
    LINEAR_BATCH_EXAMPLE,
    GaussianBatchResponse,
    LinearBatchResponse,
)
from service.fitting import FitEngine, FitResult
from service.fitting.batch import BatchEngine, Ragged
from service.fitting.inference import Reporting
from service.fitting.options import Scaling
from tests.conftest import app_settings, running_app
from tests.reference import gaussian_closed_form, linear_closed_form

pytestmark = pytest.mark.anyio

LINEAR = "/v1/fits/linear/batch"
GAUSSIAN = "/v1/fits/gaussian/batch"


def _sets(seed: int, sizes: list[int]) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    out = []
    for i, n in enumerate(sizes):
        x = rng.random(n) * (i + 1)
        out.append({"x": x.tolist(), "y": (0.5 * i * x - i + rng.normal(0, 0.1, n)).tolist()})
    return out


async def test_linear_example(client: httpx.AsyncClient) -> None:
    r = await client.post(LINEAR, json=LINEAR_BATCH_EXAMPLE)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "linear"
    assert (body["succeeded"], body["failed"]) == (2, 1)
    assert [item["index"] for item in body["results"]] == [0, 1, 2]
    for item, data in zip(body["results"][:2], LINEAR_BATCH_EXAMPLE["datasets"], strict=False):
        slope, intercept = linear_closed_form(data["x"], data["y"])
        assert item["error"] is None
        assert item["result"]["params"]["slope"] == pytest.approx(slope, abs=1e-3)
        assert item["result"]["params"]["intercept"] == pytest.approx(intercept, abs=1e-3)
        assert len(item["result"]["loss_history"]) == 10  # epochs 1000, history_every 100
    failed = body["results"][2]
    assert failed["result"] is None and "all x values are equal" in failed["error"]


async def test_batch_equals_single_fits(client: httpx.AsyncClient, engine: FitEngine) -> None:
    datasets = _sets(1, [2, 7, 50, 300, 13])
    r = await client.post(LINEAR, json={"datasets": datasets, "epochs": 200, "seed": 5})
    assert r.status_code == 200, r.text
    for i, (item, data) in enumerate(zip(r.json()["results"], datasets, strict=True)):
        single = engine.fit(
            "linear", data["x"], data["y"], learning_rate=0.1, epochs=200, seed=5 + i
        )
        result = item["result"]
        assert result["seed"] == 5 + i
        np.testing.assert_allclose(result["loss_history"], single.loss_history, rtol=1e-10)
        assert result["params"]["slope"] == pytest.approx(single.params["slope"], rel=1e-10)
        assert result["params"]["intercept"] == pytest.approx(single.params["intercept"], rel=1e-10)
        assert result["final_loss"] == pytest.approx(single.final_loss, rel=1e-10)
        _same_stats(result, single)
        _same_answer(result, single, "linear")


async def test_every_set_of_a_batch_of_many_pieces_equals_its_single_fit(
    client: httpx.AsyncClient, engine: FitEngine
) -> None:
    """An answer streamed in several pieces (200 sets, 64 entries a piece) keeps every set in
    its place: each entry, in order, is its own single fit (x in the thousands), and a
    constant set in the middle is an error in its own place."""
    from service.api.streaming import ENTRIES_PER_PIECE

    rng = np.random.default_rng(200)
    sizes = rng.integers(3, 40, 200).tolist()
    datasets = _sets(2, sizes)
    for data in datasets:
        data["x"] = [1000.0 + 100.0 * v for v in data["x"]]
    datasets[130] = {"x": [1000.0] * 5, "y": [1.0, 2.0, 3.0, 4.0, 5.0]}
    assert len(datasets) > 3 * ENTRIES_PER_PIECE
    r = await client.post(LINEAR, json={"datasets": datasets, "epochs": 100, "seed": 9})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [item["index"] for item in results] == list(range(len(datasets)))
    assert results[130]["result"] is None and "all x values are equal" in results[130]["error"]
    for i, (item, data) in enumerate(zip(results, datasets, strict=True)):
        if i == 130:
            continue
        single = engine.fit(
            "linear", data["x"], data["y"], learning_rate=0.1, epochs=100, seed=9 + i
        )
        result = item["result"]
        assert item["error"] is None and result["seed"] == 9 + i
        for name in ("slope", "intercept"):
            assert result["params"][name] == pytest.approx(single.params[name], rel=1e-10), i
        # (these lines fit almost exactly: their loss comes from the residuals, where the
        # moment form differed between batch and single from the 7th digit)
        assert result["final_loss"] == pytest.approx(single.final_loss, rel=1e-10), i
        assert result["n"] == len(data["x"])
        _same_stats(result, single)


def _same_stats(result: dict[str, Any], single: FitResult) -> None:
    """A batch entry carries the statistics its single fit would (same Hessian, by the
    batch's vectorized nested tapes)."""
    stats, expected = result["stats"], single.stats
    assert expected is not None and stats is not None
    assert result["converged"] == single.converged
    assert stats["parameters"] == list(expected.names)
    ours = [stats["std_errors"][name] for name in expected.names]
    if expected.std_errors[0] is None:
        assert ours == [None, None]
    else:
        np.testing.assert_allclose(ours, np.array(expected.std_errors, dtype=float), rtol=1e-8)
    assert stats["gradient_norm"] == pytest.approx(expected.gradient_norm, rel=1e-6, abs=1e-12)
    if expected.log_likelihood is None:  # a perfect fit (two points): no finite likelihood
        assert stats["log_likelihood"] is None
    else:
        assert stats["log_likelihood"] == pytest.approx(expected.log_likelihood, rel=1e-10)
    assert list(stats["closed_form"]["params"].values()) == pytest.approx(
        expected.closed_form, rel=1e-12
    )


#: Answer fields that are differences of nearly equal numbers (the gap to the closed form) or
#: vanish at the optimum: batch and single agree on them to within rounding of the
#: parameters, not relatively.
_NEAR_ZERO = {"gap", "gradient_norm", "newton_step"}


def _same_answer(entry: dict[str, Any], single: FitResult, model: str) -> None:
    """A batch entry is its single fit's whole answer (every field, every statistic, None
    where it is None), to rounding: the batch computes its statistics for all sets at once."""
    expected = orjson.loads(fit_answer(BUILT_IN[model], single, Reporting(0.95)))
    assert entry.keys() == expected.keys()
    assert len(entry["warnings"]) == len(expected["warnings"])
    for key in entry.keys() - {"warnings"}:
        _close(entry[key], expected[key], key, key in _NEAR_ZERO)


def _close(ours: Any, theirs: Any, where: str, near_zero: bool) -> None:
    if isinstance(theirs, dict):
        assert isinstance(ours, dict) and ours.keys() == theirs.keys(), where
        for key in theirs:
            _close(ours[key], theirs[key], f"{where}.{key}", near_zero or key in _NEAR_ZERO)
    elif isinstance(theirs, list):
        assert isinstance(ours, list) and len(ours) == len(theirs), where
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            _close(a, b, f"{where}[{i}]", near_zero)
    elif isinstance(theirs, float) and not isinstance(theirs, bool):
        assert isinstance(ours, float), where
        rel, absolute = (1e-6, 1e-7) if near_zero else (1e-8, None)
        assert ours == pytest.approx(theirs, rel=rel, abs=absolute), where
    else:
        assert ours == theirs, where


@pytest.mark.parametrize("model", ["linear", "gaussian"])
def test_batch_answer_entries_are_the_single_answer_of_each_result(model: str) -> None:
    """The batch answer is written column by column from the engine's arrays; each entry must
    be exactly what the single-fit answer writes for that set's result (read one by one from
    the same arrays): converged, not converged (warnings), perfect and unfittable sets, far
    from unit scale."""
    rng = np.random.default_rng(4)
    if model == "linear":
        xs = [1000.0 + 100.0 * rng.random(n) for n in (2, 30, 5, 200)]
        ys = [3.0 * x - 50.0 + rng.normal(0, 1, x.size) for x in xs]
        ys[0] = 3.0 * xs[0]  # two points: a perfect fit, no finite likelihood
        xs.insert(2, np.full(4, 7.0))  # constant x: unfittable
        ys.insert(2, np.arange(4.0))
        data = [Ragged.of(xs), Ragged.of(ys)]
    else:
        sets = [rng.normal(1e7, 0.1, n) for n in (3, 40, 400)]
        sets.insert(1, np.ones(5))  # constant: unfittable
        data = [Ragged.of(sets)]
    for epochs in (3, 400):  # not converged, then converged
        results = BatchEngine().fit(model, *data, learning_rate=0.1, epochs=epochs, seed=1)
        http = BUILT_IN[model]
        answer = orjson.loads(b"".join(_batch_answer(http, results, Reporting(0.9))))
        assert answer["failed"] == 1 == len(results.errors)
        for i, item in enumerate(answer["results"]):
            one = results[i]
            if isinstance(one, Exception):
                assert item == {"index": i, "result": None, "error": str(one)}
                continue
            expected = orjson.loads(fit_answer(http, one, Reporting(0.9)))
            assert item["result"] == expected, (epochs, i)
            # Not converged, or (the two-point line) no residual degrees of freedom.
            undefined = expected["stats"]["dof"] <= 0
            assert bool(expected["warnings"]) == (epochs == 3 or undefined)
            assert expected["stats"]["inference"]["confidence"] == 0.9


async def test_gaussian_batch_equals_single_fits(
    client: httpx.AsyncClient, engine: FitEngine
) -> None:
    rng = np.random.default_rng(2)
    datasets: list[dict[str, Any]] = [
        {"y": rng.normal(i, 1 + i, n).tolist()} for i, n in enumerate([3, 40, 400])
    ]
    datasets[1]["initial"] = {"mean": 5.0, "std": 3.0}
    r = await client.post(
        GAUSSIAN,
        json={"datasets": datasets, "epochs": 100, "reduction": "sum", "learning_rate": 0.001},
    )
    assert r.status_code == 200, r.text
    for item, data in zip(r.json()["results"], datasets, strict=True):
        initial = (data["initial"]["mean"], data["initial"]["std"]) if "initial" in data else None
        single = engine.fit(
            "gaussian",
            data["y"],
            learning_rate=0.001,
            epochs=100,
            options={"reduction": "sum"},
            initial=initial,
        )
        np.testing.assert_allclose(item["result"]["loss_history"], single.loss_history, rtol=1e-10)
        assert item["result"]["params"]["std"] == pytest.approx(single.params["std"], rel=1e-10)
        _same_stats(item["result"], single)
        _same_answer(item["result"], single, "gaussian")


async def test_one_bad_set_does_not_spoil_the_others(client: httpx.AsyncClient) -> None:
    datasets = _sets(3, [20, 20, 20])
    big = np.linspace(0, 100, 20)  # Vxx ~ 850: a raw learning rate 0.1 overshoots at once
    datasets.insert(1, {"x": big.tolist(), "y": (2 * big).tolist()})
    datasets.append({"x": [1.0, 2.0], "y": [3.0, 3.0]})  # constant y is fine for a line
    r = await client.post(LINEAR, json={"datasets": datasets, "seed": 0, "scaling": "none"})
    assert r.status_code == 200
    body = r.json()
    assert (body["succeeded"], body["failed"]) == (4, 1)
    assert "diverged at epoch" in body["results"][1]["error"]
    assert "lower learning_rate" in body["results"][1]["error"]
    for item, data in zip(body["results"], datasets, strict=True):
        if item["error"] is None:
            slope, _ = linear_closed_form(data["x"], data["y"])
            assert item["result"]["params"]["slope"] == pytest.approx(slope, abs=1e-2)
    assert "NaN" not in r.text and "Infinity" not in r.text

    r = await client.post(GAUSSIAN, json=GAUSSIAN_BATCH_EXAMPLE)
    assert r.json()["failed"] == 0
    mean, _ = gaussian_closed_form(GAUSSIAN_BATCH_EXAMPLE["datasets"][1]["y"])
    assert r.json()["results"][1]["result"]["params"]["mean"] == pytest.approx(mean, abs=1e-3)
    r = await client.post(GAUSSIAN, json={"datasets": [{"y": [1.0, 1.0]}, {"y": [1.0, 2.0]}]})
    assert r.json()["failed"] == 1
    assert "all y values are equal" in r.json()["results"][0]["error"]


@pytest.mark.parametrize(
    ("payload", "loc", "kind"),
    [
        ({"datasets": []}, ["body", "datasets"], "too_short"),
        ({"datasets": [{"x": [1.0, 2.0], "y": [1.0]}]}, ["body", "datasets", 0, "y"], None),
        ({"datasets": [{"x": [1.0, "2"], "y": [1.0, 2.0]}]}, ["body", "datasets", 0, "x", 1], None),
        # Each limit alone (history_every keeps the history cap out of the way):
        ({"datasets": _sets(0, [2, 2, 2]), "history_every": 1000}, ["body"], "too_many_datasets"),
        ({"datasets": _sets(0, [30]), "history_every": 1000}, ["body"], "too_many_points"),
        ({"datasets": _sets(0, [5, 5]), "epochs": 100}, ["body"], "too_much_history"),
        ({"datasets": _sets(0, [5]), "history_every": 0}, ["body", "history_every"], None),
    ],
)
async def test_batch_limits_and_invalid_requests(
    payload: dict[str, Any], loc: list[Any], kind: str | None
) -> None:
    settings = app_settings(max_batch=2, max_points=20, max_batch_history=150)
    async with running_app(settings) as c:
        r = await c.post(LINEAR, json=payload)
        assert r.status_code == 422, r.text
        (error,) = r.json()["detail"]
        assert error["loc"][: len(loc)] == loc
        assert kind is None or error["type"] == kind
        assert "input" not in error
    messages = {
        "too_many_datasets": "at most 2 data sets per batch (TAPEFIT_MAX_BATCH), got 3",
        "too_many_points": "at most 20 points are allowed (TAPEFIT_MAX_POINTS), got 30",
        "too_much_history": "200 loss-history values exceed 150 (TAPEFIT_MAX_BATCH_HISTORY); "
        "raise history_every",
    }
    if kind in messages:
        assert error["msg"] == messages[kind]


async def test_batch_limits_are_inclusive() -> None:
    """Exactly at each limit is allowed: 2 sets, 20 points, 150 history values."""
    settings = app_settings(max_batch=2, max_points=20, max_batch_history=150)
    async with running_app(settings) as c:
        for payload in (
            {"datasets": _sets(0, [10, 10]), "epochs": 75, "history_every": 1},  # 2 x 75 = 150
            {"datasets": _sets(0, [20]), "epochs": 150, "history_every": 1},
        ):
            r = await c.post(LINEAR, json=payload)
            assert r.status_code == 200, r.text


async def test_batch_work_is_capped_by_points_times_epochs() -> None:
    async with running_app(app_settings(max_work=1000)) as c:
        r = await c.post(LINEAR, json={"datasets": _sets(0, [6, 6]), "epochs": 100})
        (error,) = r.json()["detail"]
        assert (error["type"], error["msg"]) == (
            "too_much_work",
            "points x epochs = 1200 exceeds 1000 (TAPEFIT_MAX_WORK); send fewer points or ask "
            "for fewer epochs",
        )
        ok = await c.post(LINEAR, json={"datasets": _sets(0, [5, 5]), "epochs": 100})
        assert ok.status_code == 200, ok.text


async def test_batches_take_json_only(client: httpx.AsyncClient) -> None:
    r = await client.post(
        LINEAR, content=b"\x93NUMPY", headers={"content-type": "application/x-npy"}
    )
    assert r.status_code == 415
    assert r.json()["detail"].endswith("send application/json")
    r = await client.post(LINEAR, json=LINEAR_BATCH_EXAMPLE, params={"epochs": "5"})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["query", "epochs"]


@pytest.mark.parametrize(
    ("path", "model", "body"),
    [
        (LINEAR, LinearBatchResponse, LINEAR_BATCH_EXAMPLE),
        (GAUSSIAN, GaussianBatchResponse, GAUSSIAN_BATCH_EXAMPLE),
    ],
)
async def test_batch_answers_are_exactly_their_response_model(
    client: httpx.AsyncClient,
    path: str,
    model: type[LinearBatchResponse | GaussianBatchResponse],
    body: dict[str, Any],
) -> None:
    """The batch answer is serialized without the model (for speed): it must still be exactly
    what the model would produce, no field missing, extra or differently typed."""
    r = await client.post(path, json=body)
    assert r.status_code == 200, r.text
    assert model.model_validate_json(r.content).model_dump(mode="json") == r.json()


@pytest.mark.parametrize("scaling", ["standardize", "none"])
async def test_batch_equals_single_fits_far_from_unit_scale(
    client: httpx.AsyncClient, engine: FitEngine, scaling: Scaling
) -> None:
    """Lines with x in the thousands and normals with a mean of 1e7 and a spread of 0.1,
    histories thinned, standardized and in raw units: each set's answer, its loss history in
    your units included (every set's mapped in one pass), is its single fit's; a set that
    cannot be fitted, in the middle, leaves the others in their places."""
    rng = np.random.default_rng(11)
    standardized = scaling == "standardize"
    epochs, every = 60, 7
    lines = []
    for n in (5, 40, 300):
        x = 1000.0 + 100.0 * rng.random(n)
        lines.append({"x": x.tolist(), "y": (3.0 * x - 50.0 + rng.normal(0, 1, n)).tolist()})
    lines.insert(1, {"x": [1500.0] * 4, "y": [1.0, 2.0, 3.0, 4.0]})  # constant x
    rate = 0.1 if standardized else 1e-7
    options = {"epochs": epochs, "history_every": every, "scaling": scaling}
    body = {"datasets": lines, "seed": 5, "learning_rate": rate, **options}
    r = await client.post(LINEAR, json=body)
    assert r.status_code == 200, r.text
    items = r.json()["results"]
    assert items[1]["result"] is None and "all x values are equal" in items[1]["error"]
    for i in (0, 2, 3):
        x, y = lines[i]["x"], lines[i]["y"]
        single = engine.fit(
            "linear", x, y, learning_rate=rate, epochs=epochs, history_every=every,
            scaling=scaling, seed=5 + i,
        )  # fmt: skip
        result = items[i]["result"]
        assert len(result["loss_history"]) == len(single.loss_history) == 9
        np.testing.assert_allclose(result["loss_history"], single.loss_history, rtol=1e-10)
        assert result["final_loss"] == pytest.approx(single.final_loss, rel=1e-10)
        assert result["params"]["slope"] == pytest.approx(single.params["slope"], rel=1e-10)
        _same_answer(result, single, "linear")
    normals = [{"y": rng.normal(1e7, 0.1, n).tolist()} for n in (3, 50, 400)]
    rate = 0.1 if standardized else 1e-4
    r = await client.post(GAUSSIAN, json={"datasets": normals, "learning_rate": rate, **options})
    assert r.status_code == 200, r.text
    for item, data in zip(r.json()["results"], normals, strict=True):
        single = engine.fit(
            "gaussian", data["y"], learning_rate=rate, epochs=epochs, history_every=every,
            scaling=scaling,
        )  # fmt: skip
        result = item["result"]
        np.testing.assert_allclose(result["loss_history"], single.loss_history, rtol=1e-10)
        assert result["final_loss"] == pytest.approx(single.final_loss, rel=1e-10)
        assert result["params"]["mean"] == pytest.approx(single.params["mean"], rel=1e-12)
        _same_answer(result, single, "gaussian")


def _npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


NPY = {"content-type": "application/x-npy"}


async def test_binary_batch_answers_as_the_json_batch(client: httpx.AsyncClient) -> None:
    """One .npy array of (sets, 2, n) lines, x in the thousands (a constant-x set among
    them), and (sets, n) normals of mean 1e7: the answer is byte for byte the JSON batch's
    for the same sets and options."""
    rng = np.random.default_rng(8)
    x = 1000.0 + 100.0 * rng.random((5, 30))
    y = 3.0 * x - 50.0 + rng.normal(0.0, 1.0, x.shape)
    x[2] = 1500.0
    options: dict[str, Any] = {"seed": 3, "epochs": 300, "history_every": 50}
    binary = await client.post(
        LINEAR + "/binary", content=_npy(np.stack([x, y], 1)), headers=NPY, params=options
    )
    datasets = [{"x": a.tolist(), "y": b.tolist()} for a, b in zip(x, y, strict=True)]
    json_answer = await client.post(LINEAR, json={"datasets": datasets, **options})
    assert binary.status_code == json_answer.status_code == 200, binary.text
    assert binary.content == json_answer.content
    assert binary.json()["failed"] == 1 and "all x values are equal" in binary.text

    normals = rng.normal(1e7, 0.1, (3, 50))
    options = {"reduction": "sum", "learning_rate": 0.01, "epochs": 200}
    for array in (normals, normals[:, None, :]):  # (sets, n) and (sets, 1, n)
        binary = await client.post(
            GAUSSIAN + "/binary", content=_npy(array), headers=NPY, params=options
        )
        sets = [{"y": row.tolist()} for row in normals]
        json_answer = await client.post(GAUSSIAN, json={"datasets": sets, **options})
        assert binary.status_code == 200, binary.text
        assert binary.content == json_answer.content
        assert binary.json()["succeeded"] == 3


@pytest.mark.parametrize(
    ("array", "params", "loc", "kind"),
    [
        (np.ones((2, 3, 5)), {}, ["body"], "npy_shape"),  # three arrays for a line
        (np.ones((2, 10)), {}, ["body"], "npy_shape"),
        (np.ones((2, 2, 1)), {}, ["body"], "too_short"),
        (np.ones((3, 2, 5)), {"history_every": 1000}, ["body"], "too_many_datasets"),
        (np.ones((1, 2, 30)), {"history_every": 1000}, ["body"], "too_many_points"),
        (np.ones((2, 2, 5)), {"epochs": 100}, ["body"], "too_much_history"),
        (np.ones((2, 2, 5)), {"epochs": "many"}, ["query", "epochs"], "int_type"),
        (np.ones((2, 2, 5)), {"datasets": "[]"}, ["query", "datasets"], "extra_forbidden"),
    ],
)
async def test_binary_batch_limits_and_invalid_requests(
    array: np.ndarray, params: dict[str, Any], loc: list[Any], kind: str
) -> None:
    """The JSON batch's limits hold for the binary one, checked on the .npy header."""
    settings = app_settings(max_batch=2, max_points=20, max_batch_history=150)
    async with running_app(settings) as c:
        r = await c.post(LINEAR + "/binary", content=_npy(array), headers=NPY, params=params)
        assert r.status_code == 422, r.text
        (error,) = r.json()["detail"]
        assert (error["loc"], error["type"]) == (loc, kind)


async def test_binary_batch_names_the_first_bad_number(client: httpx.AsyncClient) -> None:
    data = np.ones((4, 2, 6))
    data[:, 0, :] = np.arange(6.0)
    data[3, 1, 4] = np.inf
    data[3, 0, 5] = np.nan  # set 3: its x comes before its y
    r = await client.post(LINEAR + "/binary", content=_npy(data), headers=NPY)
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "datasets", 3, "x", 5]
    assert r.json()["detail"][0]["type"] == "finite_number"
    r = await client.post(
        LINEAR + "/binary",
        content=data.tobytes(),
        headers={"content-type": "application/octet-stream"},
    )
    # Raw values carry no shape, so no set lengths: refused before the body is read.
    assert r.status_code == 415 and "application/x-npy" in r.json()["detail"]
    assert "octet-stream" not in r.json()["detail"].split("send")[1]
    r = await client.post(LINEAR + "/binary", json=LINEAR_BATCH_EXAMPLE)
    assert r.status_code == 415
