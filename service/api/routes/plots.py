"""POST /v1/plots/{model}: fit, then draw the model's figures as PNG."""

from collections.abc import Iterable
from typing import Any

from fastapi import APIRouter, Request, Response

from service.api.deps import Admitted, admission
from service.api.models import HttpModel
from service.api.openapi import binary_body, json_only_body
from service.api.parsing import Parsed
from service.api.routes.fits import (
    BINARY_FIT_RESPONSES,
    FIT_RESPONSES,
    fit_job,
    single_fit_cost,
)

PNG = "image/png"
RESPONSES: dict[int | str, dict[str, Any]] = {
    **FIT_RESPONSES,
    200: {
        "description": "A 1200x400 PNG: the reference post's figure and the loss curve.",
        "content": {PNG: {"schema": {"type": "string", "format": "binary"}}},
    },
}


async def _plot(model: HttpModel, admitted: Admitted, parsed: Parsed[Any]) -> Response:
    """The fit as for `/v1/fits`, then the model's drawing in a parser process; the
    admission place is held until the PNG is drawn."""
    worker, caller = admitted.worker, admitted.caller
    timeout_s = worker.deadline_s(parsed.request.timeout_s)
    admitted.ticket.take_place(single_fit_cost(model, parsed, worker), timeout_s)
    job = fit_job(model, parsed)
    result = await caller.unless_gone(
        worker.fit(job, parsed.request.timeout_s, ticket=admitted.ticket)
    )
    png = await admitted.draw(model.draw(parsed, result))
    return Response(png, media_type=PNG)


def router(models: Iterable[HttpModel]) -> APIRouter:
    """The plot routes of every model: JSON, then binary."""
    models = list(models)
    plots = APIRouter(prefix="/v1/plots", tags=["plots"])
    for model in models:
        _add_plot(plots, model, binary=False)
    for model in models:
        _add_plot(plots, model, binary=True)
    return plots


def _add_plot(plots: APIRouter, model: HttpModel, binary: bool) -> None:
    async def plot(request: Request) -> Response:
        async with admission(request) as admitted:
            parsed = await admitted.body(model.parse_json, model.parse_binary, json=not binary)
            return await _plot(model, admitted, parsed)

    operation = model.plot_binary if binary else model.plot
    plots.add_api_route(
        f"/{model.name}" + ("/binary" if binary else ""),
        plot,
        methods=["POST"],
        name=f"plot_{model.name}" + ("_binary" if binary else ""),
        response_class=Response,
        summary=operation.summary,
        description=operation.description,
        responses={**RESPONSES, 415: BINARY_FIT_RESPONSES[415]} if binary else RESPONSES,
        openapi_extra=binary_body(
            model.options, model.binary_layout, f"POST /v1/plots/{model.name}"
        )
        if binary
        else json_only_body(model.request, operation.examples),
    )
