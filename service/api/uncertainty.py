"""What a fit's answer says of its uncertainty beyond the fit: what the request asked
(confidence, absolute_sigma), and the model at new x with its bands (``predict`` and the
plots)."""

from __future__ import annotations

from typing import Any

import numpy as np

from service.api.schemas import Predict
from service.fitting import bands, inference
from service.worker import FitResult


def reporting(body: Any) -> inference.Reporting:
    """What a parsed body (any fit's) asks of its answer's uncertainty."""
    return inference.Reporting(body.confidence, getattr(body, "absolute_sigma", False))


def plotted_band(
    curve: bands.Curve, result: FitResult, body: Any, grid: Any
) -> tuple[Any, ...] | None:
    """The bands a plot draws over ``grid``: only when the request gave ``confidence``."""
    if "confidence" not in body.model_fields_set:
        return None
    values = fitted_bands(curve, result, reporting(body), [grid])
    columns = [
        np.array([np.nan if v is None else v for v in values[name]], dtype=np.float64)
        for name in ("mean_lower", "mean_upper", "obs_lower", "obs_upper")
    ]
    return (grid, *columns, body.confidence)


def prediction(
    curve: bands.Curve,
    result: FitResult,
    asked: inference.Reporting,
    predict: Predict | None,
    likelihood: bool = False,
) -> dict[str, Any] | None:
    """A fit's ``prediction``: its model at ``predict``'s x, with the bands (None without)."""
    if predict is None:
        return None
    xs = [np.asarray(column, dtype=np.float64) for column in predict.columns()]
    return {"x": predict.x, **fitted_bands(curve, result, asked, xs, likelihood)}


def fitted_bands(
    curve: bands.Curve,
    result: FitResult,
    asked: inference.Reporting,
    xs: list[Any],
    likelihood: bool = False,
) -> dict[str, list[float | None]]:
    """A fit's model at ``xs`` with its confidence and prediction bands."""
    stats = result.stats
    return bands.at_fit(
        curve,
        list(result.params.values()),
        xs,
        stats.covariance,
        None if likelihood else stats.residual_std,
        asked.dof(stats.dof, likelihood),
        asked.confidence,
        asked.absolute_sigma,
    )
