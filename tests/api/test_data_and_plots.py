"""Synthetic data sets and PNG plots over HTTP."""

from __future__ import annotations

import io
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from service.api.schemas import GAUSSIAN_EXAMPLE, LINEAR_EXAMPLE
from tests.conftest import app_settings, running_app, seed_linear_data

pytestmark = pytest.mark.anyio


async def test_linear_dataset_is_seeded_and_fits_back(client: httpx.AsyncClient) -> None:
    request = {"n": 2000, "slope": -3.0, "intercept": 0.5, "noise_std": 0.2, "seed": 9}
    first = await client.post("/v1/datasets/linear", json=request)
    assert first.status_code == 200, first.text
    again = await client.post("/v1/datasets/linear", json=request)
    other = await client.post("/v1/datasets/linear", json={**request, "seed": 10})
    data = first.json()
    assert data == again.json()
    assert data["y"] != other.json()["y"]
    assert data["seed"] == 9
    x, y = np.array(data["x"]), np.array(data["y"])
    assert x.size == y.size == 2000
    assert x.min() >= 0.0 and x.max() < 1.0
    residual = y - (-3.0 * x + 0.5)
    assert residual.std() == pytest.approx(0.2, rel=0.1)

    # The two-click demo: post the data to the fit.
    fit = await client.post(
        "/v1/fits/linear", json={"x": data["x"], "y": data["y"], "learning_rate": 0.5}
    )
    body = fit.json()
    se = body["stats"]["std_errors"]
    assert abs(body["params"]["slope"] + 3.0) < 4 * se["slope"]
    assert abs(body["params"]["intercept"] - 0.5) < 4 * se["intercept"]


async def test_gaussian_dataset_without_a_seed_reports_one_that_replays(
    client: httpx.AsyncClient,
) -> None:
    drawn = (await client.post("/v1/datasets/gaussian", json={"n": 5000})).json()
    seed = drawn["seed"]
    replayed = (await client.post("/v1/datasets/gaussian", json={"n": 5000, "seed": seed})).json()
    assert replayed == drawn
    y = np.array(drawn["y"])
    assert y.mean() == pytest.approx(2.0, abs=0.1)  # the seed's N(2, 1)
    assert y.std() == pytest.approx(1.0, rel=0.05)


@pytest.mark.parametrize(
    ("path", "payload", "field"),
    [
        ("/v1/datasets/linear", {"n": 1}, "n"),
        ("/v1/datasets/linear", {"n": 10, "noise_std": -1.0}, "noise_std"),
        ("/v1/datasets/linear", {"n": "10"}, "n"),
        ("/v1/datasets/gaussian", {"n": 10, "std": 0}, "std"),
        ("/v1/datasets/gaussian", {"n": 10, "extra": 1}, "extra"),
        ("/v1/datasets/gaussian", {}, "n"),
    ],
)
async def test_invalid_dataset_requests_name_the_field(
    client: httpx.AsyncClient, path: str, payload: dict[str, object], field: str
) -> None:
    r = await client.post(path, json=payload)
    assert r.status_code == 422, r.text
    assert any(field in error["loc"] for error in r.json()["detail"])


@pytest.mark.parametrize(
    ("path", "payload", "field"),
    [
        ("/v1/datasets/linear", {"n": 36, "noise_std": 7.6e307, "seed": 14155}, "noise_std"),
        ("/v1/datasets/linear", {"n": 10, "slope": 1.7e308, "intercept": 1.7e308}, "slope"),
        ("/v1/datasets/gaussian", {"n": 50, "mean": 1e308, "std": 1e308}, "std"),
    ],
)
async def test_datasets_that_overflow_are_a_422_not_a_nan(
    client: httpx.AsyncClient, path: str, payload: dict[str, object], field: str
) -> None:
    """Found by the fuzzer: huge parameters made infinite values (sent as null)."""
    r = await client.post(path, json=payload)
    assert r.status_code == 422, r.text[:200]
    assert r.json()["detail"][0]["loc"] == ["body", field]
    assert "overflow" in r.json()["detail"][0]["msg"]


async def test_dataset_size_is_capped_by_a_setting() -> None:
    async with running_app(app_settings(max_dataset_points=50)) as c:
        r = await c.post("/v1/datasets/gaussian", json={"n": 51})
        assert r.status_code == 422
        assert "TAPEFIT_MAX_DATASET_POINTS" in r.json()["detail"][0]["msg"]


def _png(response: httpx.Response) -> Image.Image:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(response.content))
    image.load()
    return image


async def test_plots_are_pngs_of_the_seed_figures(client: httpx.AsyncClient) -> None:
    linear = _png(await client.post("/v1/plots/linear", json=LINEAR_EXAMPLE))
    assert linear.format == "PNG"
    assert linear.size == (1200, 400)
    pixels = np.asarray(linear.convert("RGB"), dtype=np.int32)
    red = (pixels[..., 0] > 200) & (pixels[..., 1] < 80) & (pixels[..., 2] < 80)
    blue = (pixels[..., 2] > 200) & (pixels[..., 0] < 80) & (pixels[..., 1] < 80)
    assert red[:, :600].sum() > 200  # the fitted line, on the left panel
    assert blue[:, :600].sum() > 100  # the data points
    assert blue[:, 600:].sum() > 200  # the loss curve, on the right panel

    gaussian = _png(await client.post("/v1/plots/gaussian", json=GAUSSIAN_EXAMPLE))
    assert gaussian.size == (1200, 400)
    pixels = np.asarray(gaussian.convert("RGB"), dtype=np.int32)

    def near(rgb: tuple[int, int, int]) -> Any:
        return np.abs(pixels - np.array(rgb)).max(axis=-1) <= 12

    # Two half-transparent histograms (matplotlib's C0 and C1 at alpha 0.5) on the left...
    assert near((143, 187, 217))[:, :600].sum() > 2000  # samples of the fitted normal
    assert near((255, 191, 134))[:, :600].sum() > 2000  # the data
    # ...and the loss curve ("b-") on the right, and nowhere else.
    curve = near((0, 0, 255))
    assert curve[:, 600:].sum() > 200 and curve[:, :600].sum() == 0


async def test_plots_are_deterministic_for_a_seed(client: httpx.AsyncClient) -> None:
    body = {**GAUSSIAN_EXAMPLE, "seed": 3}
    first = await client.post("/v1/plots/gaussian", json=body)
    second = await client.post("/v1/plots/gaussian", json=body)
    other = await client.post("/v1/plots/gaussian", json={**body, "seed": 4})
    assert first.content == second.content
    assert first.content != other.content  # other samples from the fitted distribution


async def test_plots_take_binary_bodies_and_validate_like_fits(client: httpx.AsyncClient) -> None:
    x, y = seed_linear_data(0, n=50_000)
    raw = np.concatenate([x, y]).astype("<f8").tobytes()
    r = await client.post(
        "/v1/plots/linear/binary",
        content=raw,
        headers={"content-type": "application/octet-stream"},
        params={"epochs": 200, "learning_rate": 0.5, "seed": 1},
    )
    assert _png(r).size == (1200, 400)
    bad = await client.post("/v1/plots/linear", json={"x": [1.0, 1.0], "y": [1.0, 2.0]})
    assert bad.status_code == 422
    assert any("x" in error["loc"] for error in bad.json()["detail"])
    diverged = await client.post(
        "/v1/plots/gaussian", json={**GAUSSIAN_EXAMPLE, "learning_rate": 50}
    )
    assert diverged.status_code == 422
    assert diverged.json()["stop_reason"] == "diverged"


async def test_plots_of_extreme_magnitudes_still_draw(client: httpx.AsyncClient) -> None:
    """Values near the float64 limits overflow inside matplotlib's scale arithmetic; the
    figure is drawn anyway, with no warning escaping (warnings are errors in the tests)."""
    y = (np.array([1.0, 3.0, 2.0, 5.0, 4.0]) * 1e150).tolist()
    r = await client.post("/v1/plots/gaussian", json={"y": y, "epochs": 20})
    assert _png(r).size == (1200, 400)
    x = [0.0, 1e-300, 2e-300, 3e-300]
    r = await client.post(
        "/v1/plots/linear", json={"x": x, "y": [1.0, 2.0, 2.5, 4.0], "epochs": 5, "seed": 0}
    )
    # Distinct but tiny x: their variance underflows, so no slope can be fitted (nor drawn).
    assert r.status_code == 422
    assert "underflows float64" in r.json()["detail"]


class _Figures:
    """The figures the plot routes draw, kept as they are rendered (``plots._png``)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from service import plots

        self.figures: list[Any] = []
        render = plots._png

        def keep(figure: Any) -> bytes:
            self.figures.append(figure)
            return render(figure)

        monkeypatch.setattr(plots, "_png", keep)

    def last_axes(self) -> list[Any]:
        return list(self.figures[-1].axes)


def _line(axes: Any, style: str) -> tuple[Any, Any]:
    """The data of the one line drawn in ``style`` ("b." points, "r" line, "b-" curve)."""
    color, marker, linestyle = {
        "b.": ("b", ".", "None"),
        "r": ("r", "None", "-"),
        "b-": ("b", "None", "-"),
    }[style]
    from matplotlib.colors import to_rgba

    found = [
        line
        for line in axes.get_lines()
        if to_rgba(line.get_color()) == to_rgba(color)
        and line.get_marker() == marker
        and line.get_linestyle() == linestyle
    ]
    assert len(found) == 1, [(line.get_color(), line.get_marker()) for line in axes.get_lines()]
    x, y = found[0].get_data()
    return np.asarray(x, dtype=float), np.asarray(y, dtype=float)


async def test_plots_draw_the_data_the_fit_and_its_residuals(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the panels show, read from the figure before it is rendered: the data points
    are the request's, the red line is the fit the fit route answers for the same request,
    the residual panel shows y - fit at the data, and the loss curve is the answer's
    history (x in the thousands, y around 1e7)."""
    figures = _Figures(monkeypatch)
    x = np.linspace(1_000.0, 9_000.0, 40)
    y = 1e7 + 0.5 * np.exp(-x / 3_000.0) + np.random.default_rng(11).normal(0, 1e-3, x.size)
    body = {
        "expression": "c + a*exp(-x/k)",
        "parameters": {"c": 9.9e6, "a": 1.0, "k": 2_000.0},
        "x": x.tolist(),
        "y": y.tolist(),
    }
    fit = (await client.post("/v1/fits/expression", json=body)).json()
    c, a, k = (fit["params"][name] for name in ("c", "a", "k"))
    _png(await client.post("/v1/plots/expression", json=body))
    data, residuals, loss = figures.last_axes()
    points = _line(data, "b.")
    np.testing.assert_array_equal(points[0], x)
    np.testing.assert_array_equal(points[1], y)
    grid, curve = _line(data, "r")
    assert grid.min() <= x.min() and grid.max() >= x.max()
    np.testing.assert_allclose(curve, c + a * np.exp(-grid / k), rtol=1e-12)
    at, shown = _line(residuals, "b.")
    np.testing.assert_array_equal(at, x)
    np.testing.assert_allclose(shown, y - (c + a * np.exp(-x / k)), rtol=1e-6, atol=1e-9)
    epochs, history = _line(loss, "b-")
    np.testing.assert_allclose(history, fit["loss_history"], rtol=1e-12)
    assert epochs[0] == 0 and len(epochs) == len(fit["loss_history"])

    linear = {"x": (x / 1000).tolist(), "y": (3.0 * x / 1000 + 1e4).tolist(), "seed": 5}
    linear |= {"epochs": 200, "learning_rate": 0.1}
    fit = (await client.post("/v1/fits/linear", json=linear)).json()
    _png(await client.post("/v1/plots/linear", json=linear))
    data, loss = figures.last_axes()
    np.testing.assert_array_equal(_line(data, "b.")[1], linear["y"])
    grid, line = _line(data, "r")
    slope, intercept = fit["params"]["slope"], fit["params"]["intercept"]
    np.testing.assert_allclose(line, slope * grid + intercept, rtol=1e-12)
    np.testing.assert_allclose(_line(loss, "b-")[1], fit["loss_history"], rtol=1e-12)

    samples = np.random.default_rng(12).normal(1e7, 0.1, 300)
    gaussian = {"y": samples.tolist(), "epochs": 300, "seed": 3}
    _png(await client.post("/v1/plots/gaussian", json=gaussian))
    hist, _ = figures.last_axes()
    patches = hist.patches
    # Two histograms of 30 bins over shared edges (bars at rwidth 0.9): the samples of the
    # fitted normal, then the data, whose bars are the data's own counts.
    assert len(patches) == 60
    widths = np.array([patch.get_width() for patch in patches[30:]]) / 0.9
    lefts = np.array([patch.get_x() for patch in patches[30:]]) - 0.05 * widths
    edges = np.append(lefts, lefts[-1] + widths[-1])
    counts, _ = np.histogram(samples, bins=edges)
    np.testing.assert_array_equal([patch.get_height() for patch in patches[30:]], counts)
    assert sum(patch.get_height() for patch in patches[:30]) == samples.size


def _filled(axes: Any) -> dict[str, tuple[Any, Any]]:
    """The bands drawn with fill_between, by legend label: (x, lower and upper edges as
    the polygon's y at each x, sorted)."""
    out = {}
    for collection in axes.collections:
        (path,) = collection.get_paths()
        vertices = path.vertices
        out[collection.get_label()] = (vertices[:, 0], vertices[:, 1])
    return out


async def test_plots_draw_the_bands_when_confidence_is_given(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With `confidence`, the line and the one-variable expression are drawn with their
    confidence and prediction bands: the same numbers `predict` answers at the plot's grid.
    Without it, no band (the figure the post draws)."""
    figures = _Figures(monkeypatch)
    rng = np.random.default_rng(13)
    x = np.linspace(1_000.0, 5_000.0, 30)
    cases = [
        ("linear", {"x": x.tolist(), "y": (0.2 * x + rng.normal(0, 30, x.size)).tolist()}),
        (
            "expression",
            {
                "expression": "a*exp(-k*x)",
                "parameters": {"a": 100.0, "k": 1e-4},
                "x": x.tolist(),
                "y": (150.0 * np.exp(-3e-4 * x) + rng.normal(0, 2, x.size)).tolist(),
            },
        ),
    ]
    for model, body in cases:
        if model == "linear":
            body |= {"optimizer": "newton"}
        _png(await client.post(f"/v1/plots/{model}", json=body))
        assert not figures.last_axes()[0].collections
        _png(await client.post(f"/v1/plots/{model}", json=body | {"confidence": 0.9}))
        bands = _filled(figures.last_axes()[0])
        assert set(bands) == {"90% prediction", "90% confidence"}
        grid = np.unique(bands["90% confidence"][0])
        fit = await client.post(
            f"/v1/fits/{model}",
            json=body | {"confidence": 0.9, "predict": {"x": grid.tolist()}},
        )
        prediction = fit.json()["prediction"]
        for label, (low, high) in (
            ("90% confidence", ("mean_lower", "mean_upper")),
            ("90% prediction", ("obs_lower", "obs_upper")),
        ):
            _, ys = bands[label]
            edges = np.concatenate([prediction[low], prediction[high]])
            # every vertex of the polygon is a band edge at some grid point
            assert np.allclose(np.sort(np.unique(ys)), np.sort(np.unique(edges)), rtol=1e-12)


async def test_plots_are_drawn_in_a_parser_process_as_in_a_thread(
    client: httpx.AsyncClient,
) -> None:
    """With parser processes, every plot is drawn in one (matplotlib and its garbage stay
    out of the server process), and its PNG is byte for byte the one a thread draws."""
    x = np.linspace(1_000.0, 9_000.0, 40)
    y = 1e7 + 0.5 * np.exp(-x / 3_000.0) + np.random.default_rng(13).normal(0, 1e-3, x.size)
    bodies = {
        "/v1/plots/expression": {
            "expression": "c + a*exp(-x/k)",
            "parameters": {"c": 9.9e6, "a": 1.0, "k": 2_000.0},
            "x": x.tolist(),
            "y": y.tolist(),
        },
        "/v1/plots/linear": LINEAR_EXAMPLE,
        "/v1/plots/gaussian": {**GAUSSIAN_EXAMPLE, "seed": 4},
    }
    in_thread = {
        path: (await client.post(path, json=body)).content for path, body in bodies.items()
    }
    async with running_app(app_settings(parse_processes=1)) as c:
        for path, body in bodies.items():
            r = await c.post(path, json=body)
            _png(r)
            assert r.content == in_thread[path], path
        metrics = (await c.get("/metrics")).text
    assert 'tapefit_draw_duration_seconds_count{where="process"} 3.0' in metrics
    assert 'tapefit_draw_duration_seconds_count{where="thread"}' not in metrics
