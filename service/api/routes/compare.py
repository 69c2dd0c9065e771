"""POST /v1/fits/compare: several models fitted to one data set, ranked by AICc, with
F-tests for the nested pairs the caller names."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from scipy import special

from service.api.deps import Admitted, admission
from service.api.models import BUILT_IN
from service.api.openapi import json_only_body
from service.api.parsing import Parsed, parse_compare
from service.api.routes.expressions import _job, expression_response
from service.api.routes.fits import FIT_RESPONSES, fit_answer, fit_job, single_fit_cost
from service.api.schemas import COMPARE_EXAMPLE, CompareRequest, CompareResponse
from service.api.uncertainty import reporting
from service.worker import FitError, FitResult

router = APIRouter(prefix="/v1/fits", tags=["fits"])
LINEAR = BUILT_IN["linear"]


@router.post(
    "/compare",
    response_model=CompareResponse,
    summary="Fit several models to one data set and rank them (AICc, Akaike weights, F-tests)",
    responses=FIT_RESPONSES,
    openapi_extra=json_only_body(
        CompareRequest,
        {"polynomials": {"summary": "A line against two polynomials", "value": COMPARE_EXAMPLE}},
    ),
)
async def compare(request: Request) -> Response:
    """Each model is fitted to the same data (`x`, `y`, `weights` or `sigma`) as its own fit
    would be, one after another in this request; `fits` holds each full answer. `ranking`
    orders them by AICc (the small-sample AIC) with Akaike weights and BIC; each `nested` pair
    [restricted, full] gets an F-test. A model that cannot be fitted answers 422 naming it."""
    async with admission(request) as admitted:
        parsed = await admitted.body(parse_compare)
        answers = [await _fit(admitted, one, i) for i, one in enumerate(parsed.plan)]
    body = parsed.request
    assert isinstance(body, CompareRequest)
    return Response(orjson.dumps(_compared(answers, body)), media_type="application/json")


async def _fit(admitted: Admitted, parsed: Parsed[Any], i: int) -> dict[str, Any]:
    """Model ``i``'s fit and its full answer, as its own route would give them."""
    worker, body = admitted.worker, parsed.request
    try:
        if parsed.plan is None:  # the line
            admitted.ticket.take_place(
                single_fit_cost(LINEAR, parsed, worker), worker.deadline_s(body.timeout_s)
            )
            result: FitResult = await admitted.caller.unless_gone(
                worker.fit(fit_job(LINEAR, parsed), body.timeout_s, ticket=admitted.ticket)
            )
            return dict(orjson.loads(fit_answer(LINEAR, result, reporting(body))))
        plan, job = await _job(parsed, admitted, worker)
        start = dict(zip(plan.expression.parameters, job.initial or (), strict=True))
        result = await admitted.caller.unless_gone(
            worker.fit(job, body.timeout_s, ticket=admitted.ticket)
        )
        return expression_response(plan, start, result, reporting(body)).model_dump(mode="json")
    except FitError as error:
        raise RequestValidationError(
            [{"loc": ["body", "models", i], "msg": str(error), "type": "fit_failed"}]
        ) from None


def _compared(fits: list[dict[str, Any]], body: CompareRequest) -> dict[str, Any]:
    """The ranking by AICc and the F-tests, from the fits' answers."""
    aicc = []
    for fit in fits:
        stats = fit["stats"]
        k, n, aic = len(stats["parameters"]), stats["n_used"], stats["aic"]
        aicc.append(
            aic + 2.0 * k * (k + 1) / (n - k - 1) if aic is not None and n > k + 1 else None
        )
    finite = [a for a in aicc if a is not None]
    best = min(finite) if finite else None
    weights = [None if a is None or best is None else math.exp(-0.5 * (a - best)) for a in aicc]
    total = sum(w for w in weights if w is not None)  # >= 1: the best model's weight is 1
    order = sorted(range(len(fits)), key=lambda i: (aicc[i] is None, aicc[i] or 0.0, i))
    ranking = [
        {
            "index": i,
            "aicc": aicc[i],
            "bic": fits[i]["stats"]["bic"],
            "delta_aicc": None if aicc[i] is None or best is None else aicc[i] - best,
            "akaike_weight": None if (w := weights[i]) is None else w / total,
        }
        for i in order
    ]
    f_tests = [
        _f_test(fits[r]["stats"], fits[f]["stats"]) | {"restricted": r, "full": f}
        for r, f in body.nested or ()
    ]
    return {"ranking": ranking, "f_tests": f_tests, "fits": fits}


def _rss(stats: dict[str, Any]) -> float | None:
    """Σw·r²: an expression's answer has it; a line's is residual_std²·dof."""
    if "rss" in stats:
        return stats["rss"]  # type: ignore[no-any-return]
    std, dof = stats["residual_std"], stats["dof"]
    return None if std is None or dof <= 0 else std * std * dof


def _f_test(restricted: dict[str, Any], full: dict[str, Any]) -> dict[str, Any]:
    """statsmodels' compare_f_test: ((rss_r - rss_f)/(dof_r - dof_f)) / (rss_f/dof_f)."""
    rss_r, rss_f, dof_f = _rss(restricted), _rss(full), full["dof"]
    extra = restricted["dof"] - dof_f
    if rss_r is None or rss_f is None or extra <= 0 or dof_f <= 0 or rss_f <= 0.0:
        return {"f": None, "p_value": None}
    f = (rss_r - rss_f) / extra / (rss_f / dof_f)
    p = float(special.fdtrc(extra, dof_f, max(f, 0.0)))
    return {"f": f if math.isfinite(f) else None, "p_value": p if np.isfinite(p) else None}
