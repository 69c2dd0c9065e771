"""The reference post's figures as PNG bytes (matplotlib, Agg backend, no pyplot state).

Each call builds its own ``Figure`` on an Agg canvas, so renders in different threads do
not share state. Scatter plots show at most ``MAX_SCATTER`` points (evenly strided), so a
million-point fit still renders in well under a second.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, ParamSpec

import numpy as np
import numpy.typing as npt

from service.fitting.expression import Node, evaluate
from service.fitting.operations import NUMPY

if TYPE_CHECKING:  # matplotlib is imported on first render: it costs start-up time
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

Array = npt.NDArray[np.float64]
P = ParamSpec("P")
MAX_SCATTER = 20_000
#: Figure size in inches at ``DPI``: 1200 x 400 pixels.
SIZE, DPI = (12.0, 4.0), 100


def _figure() -> tuple[Figure, Axes, Axes]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=SIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    return figure, left, right


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    # No timestamps or version strings: the same fit draws the same bytes.
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def _quiet(draw: Callable[P, bytes]) -> Callable[P, bytes]:
    """Extreme values (near the float64 limits) overflow in matplotlib's scale and tick
    arithmetic; the figure is drawn all the same. (np.errstate is per thread.)"""

    @functools.wraps(draw)
    def quiet(*args: P.args, **kwargs: P.kwargs) -> bytes:
        with np.errstate(all="ignore"):
            return draw(*args, **kwargs)

    return quiet


def _strided(*arrays: Array) -> tuple[Array, ...]:
    step = max(1, -(-arrays[0].size // MAX_SCATTER))
    return tuple(a[::step] for a in arrays)


#: A fit's bands over a grid: (x, mean_lower, mean_upper, obs_lower, obs_upper, confidence),
#: NaN where undefined.
Band = tuple[Array, Array, Array, Array, Array, float]


def line_grid(x: Array) -> Array:
    """Where a line's plot draws it (and its bands): the data's range and 15% beyond."""
    lo, hi = float(x.min()), float(x.max())
    margin = 0.15 * (hi - lo)
    return np.linspace(lo - margin, hi + margin, 50)


def curve_grid(x: Array) -> Array:
    """Where an expression's plot draws its curve (and bands): the data's range."""
    return np.linspace(float(x.min()), float(x.max()), 400)


def _bands(axes: Axes, band: Band | None) -> None:
    """The prediction band (light) and the confidence band of the mean (darker)."""
    if band is None:
        return
    grid, mean_lower, mean_upper, obs_lower, obs_upper, confidence = band
    level = f"{100 * confidence:.4g}%"
    if np.isfinite(obs_lower).any():
        axes.fill_between(
            grid, obs_lower, obs_upper, color="tab:orange", alpha=0.2, label=f"{level} prediction"
        )
    if np.isfinite(mean_lower).any():
        axes.fill_between(
            grid, mean_lower, mean_upper, color="tab:red", alpha=0.3, label=f"{level} confidence"
        )


def _loss_curve(axes: Axes, history: Array, every: int, label: str) -> None:
    epochs = np.arange(history.size) * every
    axes.plot(epochs, history, "b-")
    axes.set(xlabel="Epochs", ylabel=label, title="Training loss")
    if history.size and history.min() > 0 and history.max() / history.min() > 100:
        axes.set_yscale("log")


@_quiet
def linear_png(
    x: Array,
    y: Array,
    slope: float,
    intercept: float,
    history: Array,
    every: int,
    band: Band | None = None,
) -> bytes:
    """Left: the data ('b.') with the fitted line ('r') and, if given, its bands; right: the
    loss curve."""
    figure, data_axes, loss_axes = _figure()
    grid = line_grid(x)
    _bands(data_axes, band)
    xs, ys = _strided(x, y)
    data_axes.plot(xs, ys, "b.", label="data")
    data_axes.plot(
        grid, slope * grid + intercept, "r", label=f"y = {slope:.4g}·x + {intercept:.4g}"
    )
    data_axes.set(xlabel="x", ylabel="y", title="Data and fitted line")
    data_axes.legend()
    _loss_curve(loss_axes, history, every, "Cost function\n(Mean Squared Error)")
    return _png(figure)


@_quiet
def gaussian_png(
    y: Array, samples: Array, mean: float, std: float, history: Array, every: int
) -> bytes:
    """Left: histograms of the data and of samples from the fitted N(mean, std²), as in the
    reference post's "training data vs. generated data"; right: the loss curve."""
    figure, hist_axes, loss_axes = _figure()
    bins = np.histogram_bin_edges(np.concatenate([y, samples]), bins=30).tolist()
    hist_axes.hist(
        samples, bins=bins, rwidth=0.9, alpha=0.5, label=f"N({mean:.4g}, {std:.4g}²) samples"
    )
    hist_axes.hist(y, bins=bins, rwidth=0.9, alpha=0.5, label="data")
    hist_axes.set(
        xlabel="y", ylabel="Count", title="Training data vs. generated data after fitting"
    )
    hist_axes.legend()
    _loss_curve(loss_axes, history, every, "Cost function\n(Negative Log-Likelihood)")
    return _png(figure)


def expression_figure(
    tree: Node,
    params: Sequence[float],
    xs: Sequence[Array],
    y: Array,
    history: Array,
    every: int,
    title: str,
    band: Band | None = None,
) -> bytes:
    """:func:`expression_png` of a fitted expression: its values at the data, and a smooth
    curve over the data's range (with its bands, if given) when it has one variable."""
    fitted = np.broadcast_to(evaluate(tree, params, xs, NUMPY), y.shape)
    curve = None
    if len(xs) == 1:
        grid = curve_grid(xs[0])
        curve = (grid, np.broadcast_to(evaluate(tree, params, [grid], NUMPY), grid.shape))
    return expression_png(xs[0], y, np.asarray(fitted), curve, history, every, title, band)


@_quiet
def expression_png(
    x: Array,
    y: Array,
    fitted: Array,
    curve: tuple[Array, Array] | None,
    history: Array,
    every: int,
    title: str,
    band: Band | None = None,
) -> bytes:
    """Left: the data and the fit (a smooth ``curve`` over the first variable, with its
    ``band``, or fitted against observed for several variables); middle: the residuals;
    right: the loss."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(15.0, 4.0), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    data_axes, residual_axes, loss_axes = figure.subplots(1, 3)
    xs, ys, fs = _strided(x, y, fitted)
    if curve is not None:
        _bands(data_axes, band)
        data_axes.plot(xs, ys, "b.", label="data")
        data_axes.plot(*curve, "r", label="fit")
        data_axes.set(xlabel="x", ylabel="y", title=title)
    else:
        data_axes.plot(fs, ys, "b.", label="data")
        data_axes.plot([fs.min(), fs.max()], [fs.min(), fs.max()], "r", label="y = fit")
        data_axes.set(xlabel="fitted", ylabel="observed", title=title)
    data_axes.legend()
    residual_axes.axhline(0.0, color="r")
    residual_axes.plot(xs if curve is not None else fs, ys - fs, "b.")
    residual_axes.set(
        xlabel="x" if curve is not None else "fitted", ylabel="residual", title="Residuals"
    )
    _loss_curve(loss_axes, history, every, "Mean squared residual")
    return _png(figure)
