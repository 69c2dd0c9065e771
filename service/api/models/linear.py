"""The line over HTTP: y = slope·x + intercept."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from service.api.models import HttpModel, Operation
from service.api.parsing import Parsed
from service.api.schemas import (
    LINEAR_ADAM_EXAMPLE,
    LINEAR_BATCH_EXAMPLE,
    LINEAR_EXAMPLE,
    BatchOptions,
    LinearBatchItem,
    LinearBatchRequest,
    LinearBatchResponse,
    LinearFitRequest,
    LinearFitResponse,
    LinearOptions,
    LinearParams,
)
from service.api.uncertainty import plotted_band
from service.fitting import bands
from service.plots import line_grid, linear_png
from service.worker import FitResult


def draw(parsed: Parsed[Any], result: FitResult) -> Callable[[], bytes]:
    params, x = result.params, parsed.arrays["x"]
    return partial(
        linear_png,
        x,
        parsed.arrays["y"],
        params["slope"],
        params["intercept"],
        result.loss_history,
        result.history_every,
        plotted_band(bands.line, result, parsed.request, line_grid(x)),
    )


LINEAR = HttpModel(
    name="linear",
    data=("x", "y"),
    must_vary=(True, False),
    request=LinearFitRequest,
    options=LinearOptions,
    batch_request=LinearBatchRequest,
    batch_options=BatchOptions,
    params=LinearParams,
    response=LinearFitResponse,
    batch_item=LinearBatchItem,
    batch_response=LinearBatchResponse,
    binary_layout="shape (2, n): x then y",
    batch_layout="shape (sets, 2, n): each set's x then y",
    fit=Operation(
        "Fit a line by gradient descent on the MSE",
        """Fit y = slope·x + intercept to (x, y) with the post's GradientTape loop, minimizing the
        (weighted) mean squared error; returns the parameters, the loss history, and statistics
        (standard errors, R², AIC/BIC, the closed-form answer and the gap to it).""",
        {
            "reference-post-data": {
                "summary": "Noisy line y = x + 2 (reference-post-style data)",
                "value": LINEAR_EXAMPLE,
            },
            "adam-early-stop": {
                "summary": "Adam with early stopping and weights",
                "value": LINEAR_ADAM_EXAMPLE,
            },
        },
    ),
    fit_binary=Operation(
        "Fit a line to binary data (.npy or raw floats)",
        """`POST /v1/fits/linear` with the data as a binary body (no per-number parsing: numpy
        reads it as it is) and the options in the query string; the same answer.""",
    ),
    batch=Operation(
        "Fit a line to many data sets at once",
        """Fit y = slope·x + intercept to every data set in one vectorized GradientTape loop; the
        results come back in order, a set that cannot be fitted carrying an error instead.""",
        {
            "three-sets": {
                "summary": "Two lines and one constant-x set",
                "value": LINEAR_BATCH_EXAMPLE,
            }
        },
    ),
    batch_binary=Operation(
        "Fit a line to many data sets of one length, sent as one .npy array",
        """`POST /v1/fits/linear/batch` with the data sets as one `application/x-npy` array of
        shape (sets, 2, n), each set's x then y: no per-number parsing (numpy reads it as
        it is). The options go in the query string; each set starts like a single fit (set i
        with seed `seed + i`). The same answer.""",
    ),
    plot=Operation(
        "Fit a line, then plot the data, the line and the loss curve (PNG)",
        """The same body as `POST /v1/fits/linear`. Left: the data ('b.') and the fitted line
        ('r'), as in the post; right: the loss per epoch. The same request with the same seed draws
        the same bytes.""",
        {"reference-post-data": {"summary": "Noisy line y = x + 2", "value": LINEAR_EXAMPLE}},
    ),
    plot_binary=Operation(
        "Plot a line fitted to binary data (.npy or raw floats)",
        """`POST /v1/plots/linear` with the data as a binary body and the options in the query
        string; the same PNG.""",
    ),
    draw=draw,
    model_options=("absolute_sigma",),
)
