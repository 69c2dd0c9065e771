"""POST /v1/evaluate: a fitted model at new x, with its bands, from a stored fit's numbers
(no refitting)."""

from __future__ import annotations

import asyncio
from typing import Annotated

import numpy as np
import orjson
from fastapi import APIRouter, Depends, Response

from service.api.deps import parsed_body
from service.api.models import BUILT_IN
from service.api.openapi import json_only_body
from service.api.parsing import EvaluatePlan, Parsed, parse_evaluate
from service.api.schemas import (
    EVALUATE_EXAMPLE,
    ErrorDetail,
    EvaluateRequest,
    EvaluateResponse,
    ValidationErrorBody,
)
from service.fitting import bands

router = APIRouter(tags=["evaluate"])

#: The validated body (no admission: evaluating is one pass over the points, bounded by
#: TAPEFIT_MAX_POINTS, and runs in a thread).
EvaluateBody = Annotated[Parsed[EvaluateRequest], Depends(parsed_body(parse_evaluate))]


def _answer(parsed: Parsed[EvaluateRequest]) -> bytes:
    body, plan = parsed.request, parsed.plan
    assert isinstance(plan, EvaluatePlan)
    if plan.expression is None:
        assert plan.model is not None
        curve: bands.Curve = BUILT_IN[plan.model].curve
        order = tuple(BUILT_IN[plan.model].params.model_fields)
    else:
        curve, order = bands.expression_curve(plan.expression.tree), plan.expression.parameters
    # The curve takes the model's order; the covariance comes in the caller's.
    at = [plan.names.index(name) for name in order]
    covariance = None if body.covariance is None else np.array(body.covariance)[np.ix_(at, at)]
    values = bands.predict(
        curve,
        [body.params[name] for name in order],
        [parsed.arrays[f"x:{name}"] for name in plan.variables],
        covariance,
        body.residual_variance,
        body.dof,
        body.confidence,
    )
    answer = {
        "model": plan.model,
        "expression": None if plan.expression is None else plan.expression.text,
        "parameters": list(plan.names),
        "prediction": {"x": body.x, **values},
    }
    return orjson.dumps(answer)


@router.post(
    "/v1/evaluate",
    response_model=EvaluateResponse,
    summary="Evaluate a fitted model at new x, with its confidence and prediction bands",
    responses={
        415: {"model": ErrorDetail, "description": "Content-Type is not application/json."},
        422: {"model": ValidationErrorBody, "description": "Invalid request, naming the field."},
    },
    openapi_extra=json_only_body(
        EvaluateRequest,
        {"misra1a": {"summary": "NIST's Misra1a, fitted", "value": EVALUATE_EXAMPLE}},
    ),
)
async def evaluate(parsed: EvaluateBody) -> Response:
    """What `predict` in a fit answers, from a fit you stored: its `params`, and for the
    bands its `stats.covariance`, `stats.residual_std`² and `stats.dof`. The band of the mean
    is f ± q·sqrt(J·C·Jᵀ) with the exact Jacobian J; the band of a new observation adds the
    residual variance. Without a covariance the bounds are null."""
    return Response(await asyncio.to_thread(_answer, parsed), media_type="application/json")
