"""POST /v1/datasets/{linear,gaussian}: the reference post's synthetic data, seeded."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Response
from fastapi.exceptions import RequestValidationError

from service.api.deps import parsed_body
from service.api.openapi import json_only_body
from service.api.parsing import Parsed, parse_gaussian_dataset, parse_linear_dataset
from service.api.schemas import (
    GAUSSIAN_DATASET_EXAMPLE,
    LINEAR_DATASET_EXAMPLE,
    Dataset,
    ErrorDetail,
    GaussianDatasetRequest,
    LinearDatasetRequest,
    ValidationErrorBody,
)
from service.worker import gaussian_data, linear_data

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

#: The validated bodies (no admission: making a data set is cheap and bounded by its limits).
LinearDatasetBody = Annotated[
    Parsed[LinearDatasetRequest], Depends(parsed_body(parse_linear_dataset))
]
GaussianDatasetBody = Annotated[
    Parsed[GaussianDatasetRequest], Depends(parsed_body(parse_gaussian_dataset))
]

RESPONSES: dict[int | str, dict[str, Any]] = {
    415: {"model": ErrorDetail, "description": "Content-Type is not application/json."},
    422: {
        "model": ValidationErrorBody,
        "description": "Invalid request, naming each field (also: parameters so large that "
        "the values overflow float64).",
    },
}


def _seed(seed: int | None) -> int:
    return random.getrandbits(63) if seed is None else seed


def _json(x: Any, y: Any, seed: int) -> bytes | None:
    """The response body, or None when the values overflow float64. Serialized here, in a
    worker thread: a 100,000-point answer never blocks the event loop."""
    if not np.all(np.isfinite(y)):
        return None
    return json.dumps({"x": x.tolist(), "y": y.tolist(), "seed": seed}).encode()


def _answer(body: bytes | None, fields: dict[str, float]) -> Response:
    if body is None:
        # Name the parameter of largest magnitude: it is what drove the values past float64.
        field = max(fields, key=lambda name: abs(fields[name]))
        raise RequestValidationError(
            [
                {
                    "loc": ["body", field],
                    "msg": "the generated values overflow float64; choose smaller parameters",
                    "type": "overflow",
                }
            ]
        )
    return Response(body, media_type="application/json")


@router.post(
    "/linear",
    response_model=Dataset,
    summary="Noisy points along a line, as in the reference post",
    responses=RESPONSES,
    openapi_extra=json_only_body(
        LinearDatasetRequest,
        {
            "seed": {
                "summary": "The reference post's data: y = x + 2, noise 0.15",
                "value": LINEAR_DATASET_EXAMPLE,
            }
        },
    ),
)
async def linear_dataset(parsed: LinearDatasetBody) -> Response:
    """x ~ U(0, 1) and y = slope·x + intercept + N(0, noise_std²): post the answer to
    `/v1/fits/linear` to fit it."""
    body = parsed.request
    seed = _seed(body.seed)

    def make() -> bytes | None:
        x, y = linear_data(body.n, body.slope, body.intercept, body.noise_std, seed)
        return _json(x, y, seed)

    fields = {"slope": body.slope, "intercept": body.intercept, "noise_std": 10 * body.noise_std}
    return _answer(await asyncio.to_thread(make), fields)


@router.post(
    "/gaussian",
    response_model=Dataset,
    summary="Normally distributed samples, as in the reference post",
    responses=RESPONSES,
    openapi_extra=json_only_body(
        GaussianDatasetRequest,
        {
            "seed": {
                "summary": "The reference post's data: N(2, 1), 1000 samples",
                "value": GAUSSIAN_DATASET_EXAMPLE,
            }
        },
    ),
)
async def gaussian_dataset(parsed: GaussianDatasetBody) -> Response:
    """y ~ N(mean, std²) (and x ~ U(0, 1), which the reference post plots y against): post
    `{"y": ...}` to `/v1/fits/gaussian` to fit it."""
    body = parsed.request
    seed = _seed(body.seed)

    def make() -> bytes | None:
        x, y = gaussian_data(body.n, body.mean, body.std, seed)
        return _json(x, y, seed)

    return _answer(await asyncio.to_thread(make), {"mean": body.mean, "std": 10 * body.std})
