"""The normal distribution over HTTP: N(mean, std²)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from service.api.models import HttpModel, Operation
from service.api.parsing import Parsed
from service.api.schemas import (
    GAUSSIAN_BATCH_EXAMPLE,
    GAUSSIAN_EXAMPLE,
    GaussianBatchItem,
    GaussianBatchOptions,
    GaussianBatchRequest,
    GaussianBatchResponse,
    GaussianFitRequest,
    GaussianFitResponse,
    GaussianOptions,
    GaussianParams,
)
from service.fitting import bands
from service.plots import gaussian_png
from service.worker import FitResult, gaussian_samples


def draw(parsed: Parsed[Any], result: FitResult) -> Callable[[], bytes]:
    y = parsed.arrays["y"]
    mean, std = result.params["mean"], result.params["std"]
    samples = gaussian_samples(y.size, mean, std, parsed.request.seed or 0)
    return partial(gaussian_png, y, samples, mean, std, result.loss_history, result.history_every)


GAUSSIAN = HttpModel(
    name="gaussian",
    data=("y",),
    must_vary=(True,),
    request=GaussianFitRequest,
    options=GaussianOptions,
    batch_request=GaussianBatchRequest,
    batch_options=GaussianBatchOptions,
    params=GaussianParams,
    response=GaussianFitResponse,
    batch_item=GaussianBatchItem,
    batch_response=GaussianBatchResponse,
    binary_layout="shape (n,): y",
    batch_layout="shape (sets, n): each set's y (or (sets, 1, n))",
    fit=Operation(
        "Fit a normal distribution by maximum likelihood",
        """Fit N(mean, std²) to the samples y with the post's GradientTape loop, minimizing the
        (weighted) negative log-likelihood; returns the parameters, the loss history, and
        statistics (standard errors, log-likelihood, AIC/BIC, the closed form and the gap).""",
        {
            "reference-post-data": {
                "summary": "Samples of N(2, 1) (reference-post-style data)",
                "value": GAUSSIAN_EXAMPLE,
            }
        },
    ),
    fit_binary=Operation(
        "Fit a normal distribution to binary data (.npy or raw floats)",
        """`POST /v1/fits/gaussian` with the samples as a binary body and the options in the
        query string; the same answer.""",
    ),
    batch=Operation(
        "Fit normal distributions to many data sets at once",
        """Fit N(mean, std²) to every data set in one vectorized GradientTape loop; the results
        come back in order, a set that cannot be fitted carrying an error instead.""",
        {"two-sets": {"summary": "Two samples", "value": GAUSSIAN_BATCH_EXAMPLE}},
    ),
    batch_binary=Operation(
        "Fit a normal distribution to many data sets of one length, sent as one .npy array",
        """`POST /v1/fits/gaussian/batch` with the data sets as one `application/x-npy` array of
        shape (sets, n), each set's y: no per-number parsing (numpy reads it as
        it is). The options go in the query string; each set starts like a single fit (set i
        with seed `seed + i`). The same answer.""",
    ),
    plot=Operation(
        "Fit a normal distribution, then plot data vs. fitted samples and the loss (PNG)",
        "The same body as `POST /v1/fits/gaussian`. Left: histograms of the data and of as many\n"
        "samples from the fitted N(mean, std²) (drawn with `seed`, default 0), as in the "
        "reference post's\n"
        '"training data vs. generated data"; right: the loss per epoch.',
        {"reference-post-data": {"summary": "Samples of N(2, 1)", "value": GAUSSIAN_EXAMPLE}},
    ),
    plot_binary=Operation(
        "Plot a normal distribution fitted to binary data (.npy or raw floats)",
        """`POST /v1/plots/gaussian` with the samples as a binary body and the options in the
        query string; the same PNG.""",
    ),
    draw=draw,
    model_options=("reduction",),
    curve=bands.normal_density,
    distribution="normal",
)
