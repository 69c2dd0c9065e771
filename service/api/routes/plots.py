"""POST /v1/plots/{linear,gaussian}: fit, then draw the reference post's figures as PNG."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Request, Response

from service.api.deps import SettingsDep, WorkerDep
from service.api.openapi import binary_body, json_only_body
from service.api.parsing import (
    Parsed,
)
from service.api.requests import BinaryParser, JsonParser, parse_request
from service.api.routes.fits import (
    BINARY_FIT_RESPONSES,
    FIT_RESPONSES,
    GAUSSIAN_LAYOUT,
    GAUSSIAN_PARSERS,
    LINEAR_LAYOUT,
    LINEAR_PARSERS,
    fit_while_connected,
    gaussian_job,
    linear_job,
    single_fit_cost,
)
from service.api.schemas import (
    GAUSSIAN_EXAMPLE,
    LINEAR_EXAMPLE,
    GaussianFitRequest,
    GaussianOptions,
    LinearFitRequest,
    LinearOptions,
)
from service.plots import gaussian_png, linear_png
from service.settings import Settings
from service.worker import FitResult, FitWorker, Job, gaussian_samples

router = APIRouter(prefix="/v1/plots", tags=["plots"])

PNG = "image/png"
RESPONSES: dict[int | str, dict[str, Any]] = {
    **FIT_RESPONSES,
    200: {
        "description": "A 1200x400 PNG: the reference post's figure and the loss curve.",
        "content": {PNG: {"schema": {"type": "string", "format": "binary"}}},
    },
}


OptionsT = TypeVar("OptionsT", LinearOptions, GaussianOptions)


async def _plot(
    request: Request,
    worker: FitWorker,
    settings: Settings,
    parsers: tuple[JsonParser[OptionsT], BinaryParser[OptionsT]],
    make_job: Callable[[Parsed[OptionsT]], Job],
    draw: Callable[[Parsed[OptionsT], FitResult], bytes],
    json: bool = True,
) -> Response:
    """Admission, parsing and the fit as for `/v1/fits`, then ``draw`` in a thread; the
    admission place is held until the PNG is drawn."""
    async with worker.admit() as ticket:
        parsed = await parse_request(request, worker, settings, *parsers, ticket=ticket, json=json)
        ticket.take_place(single_fit_cost(parsed))
        job = make_job(parsed)
        result = await fit_while_connected(request, worker, job, parsed.request.timeout_s)
        png = await asyncio.to_thread(draw, parsed, result)
    return Response(png, media_type=PNG)


def _draw_linear(parsed: Parsed[LinearOptions], result: FitResult) -> bytes:
    params = result.params
    return linear_png(
        parsed.arrays["x"],
        parsed.arrays["y"],
        params["slope"],
        params["intercept"],
        result.loss_history,
        result.history_every,
    )


def _draw_gaussian(parsed: Parsed[GaussianOptions], result: FitResult) -> bytes:
    y = parsed.arrays["y"]
    mean, std = result.params["mean"], result.params["std"]
    samples = gaussian_samples(y.size, mean, std, parsed.request.seed or 0)
    return gaussian_png(y, samples, mean, std, result.loss_history, result.history_every)


@router.post(
    "/linear",
    response_class=Response,
    summary="Fit a line, then plot the data, the line and the loss curve (PNG)",
    responses=RESPONSES,
    openapi_extra=json_only_body(
        LinearFitRequest,
        {"reference-post-data": {"summary": "Noisy line y = x + 2", "value": LINEAR_EXAMPLE}},
    ),
)
async def plot_linear(request: Request, worker: WorkerDep, settings: SettingsDep) -> Response:
    """The same body as `POST /v1/fits/linear`. Left: the data ('b.') and the fitted line
    ('r'), as in the post; right: the loss per epoch. The same request with the same seed draws
    the same bytes."""
    return await _plot(request, worker, settings, LINEAR_PARSERS, linear_job, _draw_linear)


@router.post(
    "/gaussian",
    response_class=Response,
    summary="Fit a normal distribution, then plot data vs. fitted samples and the loss (PNG)",
    responses=RESPONSES,
    openapi_extra=json_only_body(
        GaussianFitRequest,
        {"reference-post-data": {"summary": "Samples of N(2, 1)", "value": GAUSSIAN_EXAMPLE}},
    ),
)
async def plot_gaussian(request: Request, worker: WorkerDep, settings: SettingsDep) -> Response:
    """The same body as `POST /v1/fits/gaussian`. Left: histograms of the data and of as many
    samples from the fitted N(mean, std²) (drawn with `seed`, default 0), as in the reference post's
    "training data vs. generated data"; right: the loss per epoch."""
    return await _plot(request, worker, settings, GAUSSIAN_PARSERS, gaussian_job, _draw_gaussian)


@router.post(
    "/linear/binary",
    response_class=Response,
    summary="Plot a line fitted to binary data (.npy or raw floats)",
    responses={**RESPONSES, 415: BINARY_FIT_RESPONSES[415]},
    openapi_extra=binary_body(LinearOptions, LINEAR_LAYOUT, "POST /v1/plots/linear"),
)
async def plot_linear_binary(
    request: Request, worker: WorkerDep, settings: SettingsDep
) -> Response:
    """`POST /v1/plots/linear` with the data as a binary body and the options in the query
    string; the same PNG."""
    return await _plot(
        request, worker, settings, LINEAR_PARSERS, linear_job, _draw_linear, json=False
    )


@router.post(
    "/gaussian/binary",
    response_class=Response,
    summary="Plot a normal distribution fitted to binary data (.npy or raw floats)",
    responses={**RESPONSES, 415: BINARY_FIT_RESPONSES[415]},
    openapi_extra=binary_body(GaussianOptions, GAUSSIAN_LAYOUT, "POST /v1/plots/gaussian"),
)
async def plot_gaussian_binary(
    request: Request, worker: WorkerDep, settings: SettingsDep
) -> Response:
    """`POST /v1/plots/gaussian` with the samples as a binary body and the options in the
    query string; the same PNG."""
    return await _plot(
        request, worker, settings, GAUSSIAN_PARSERS, gaussian_job, _draw_gaussian, json=False
    )
