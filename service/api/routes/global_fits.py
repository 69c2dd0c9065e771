"""POST /v1/fits/expression/global: one expression over several data sets, some parameters
shared, as one least-squares problem (:mod:`service.fitting.global_fit`)."""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import asdict
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Request, Response

from service.admission import expression_cost
from service.api.deps import admission
from service.api.openapi import json_only_body
from service.api.parsing import GlobalPlan, parse_global
from service.api.routes.fits import FIT_RESPONSES
from service.api.schemas import GLOBAL_EXAMPLE, GlobalFitRequest, GlobalFitResponse
from service.fitting import bands, global_fit, inference, starts
from service.worker import FitDiverged

router = APIRouter(tags=["expressions"])


@router.post(
    "/v1/fits/expression/global",
    response_model=GlobalFitResponse,
    summary="Fit one expression to several data sets with shared parameters (a global fit)",
    responses=FIT_RESPONSES,
    openapi_extra=json_only_body(
        GlobalFitRequest,
        {"shared-rate": {"summary": "Two decays with one rate", "value": GLOBAL_EXAMPLE}},
    ),
)
async def fit_global(request: Request) -> Response:
    """The parameters in `shared` take one value for every set; the others are fitted per
    set. It is one least-squares problem over every set's residuals (Levenberg-Marquardt,
    the step solved block by block through the Schur complement on the shared parameters,
    the Jacobian exact), with its statistics: the covariance of all the parameters,
    shared-local blocks included."""
    async with admission(request) as admitted:
        parsed = await admitted.body(parse_global)
        body, plan = parsed.request, parsed.plan
        assert isinstance(body, GlobalFitRequest) and isinstance(plan, GlobalPlan)
        worker, expression = admitted.worker, plan.expression.expression
        points = sum(len(d.y) for d in body.datasets) * body.starts
        k = len(expression.parameters)
        cost = expression_cost(points, len(expression.variables), k, body.epochs, body.epochs)
        admitted.ticket.take_place(cost, worker.deadline_s(body.timeout_s))
        deadline = time.monotonic() + worker.deadline_s(body.timeout_s)
        answer = await asyncio.to_thread(_solve, body, plan, deadline)
    return Response(orjson.dumps(answer), media_type="application/json")


def _solve(body: GlobalFitRequest, plan: GlobalPlan, deadline: float) -> dict[str, Any]:
    expression = plan.expression.expression
    names = expression.parameters
    shared, local = list(plan.shared), list(plan.local)
    sets = []
    for d in body.datasets:
        columns = [d.x] if isinstance(d.x, list) else [d.x[v] for v in expression.variables]
        xs = [np.asarray(c, dtype=np.float64) for c in columns]
        w = None if d.weights is None else np.asarray(d.weights, dtype=np.float64)
        sets.append((xs, np.asarray(d.y, dtype=np.float64), w))
    problem = global_fit.Problem.of(bands.expression_curve(expression.tree), sets, shared, local)
    bounds = [plan.expression.bounds.get(name, (None, None)) for name in names]
    first = [plan.expression.given[name] for name in names]
    draws = starts.draw(first, bounds, body.starts, body.seed)

    def timed_out() -> bool:
        return time.monotonic() > deadline

    fits = []
    for row in draws:
        local_start = np.tile(row[local], (len(sets), 1))
        fits.append(
            global_fit.fit(problem, row[shared], local_start, bounds, body.epochs, timed_out)
        )
    runs = [(f.rss, f.converged) if math.isfinite(f.rss) else None for f in fits]
    if all(run is None for run in runs):
        raise FitDiverged(fits[0].iterations, 0.0, advice=FitDiverged.SELF_STEPPING)
    chosen, summary = starts.summarize(runs)
    return _answer(body, plan, fits[chosen], summary, timed_out())


def _answer(
    body: GlobalFitRequest,
    plan: GlobalPlan,
    found: global_fit.GlobalFit,
    summary: starts.Summary,
    timed_out: bool,
) -> dict[str, Any]:
    expression = plan.expression.expression
    names = expression.parameters
    shared_names = [names[i] for i in plan.shared]
    local_names = [names[i] for i in plan.local]
    keys = shared_names + [f"{n}[{i}]" for i in range(len(body.datasets)) for n in local_names]
    values = [*found.shared.tolist(), *found.local.ravel().tolist()]
    k = len(keys)
    warnings: list[str] = []
    if found.covariance is None:
        std_errors: list[float | None] = [None] * k
        covariance: list[list[float | None]] = [[None] * k for _ in range(k)]
        correlation = covariance
        warnings.append(inference.UNDEFINED)
    else:
        se = np.sqrt(np.diag(found.covariance))
        std_errors = [float(v) for v in se]
        covariance = found.covariance.tolist()
        with np.errstate(all="ignore"):
            correlation = (found.covariance / np.outer(se, se)).tolist()
    if not found.converged:
        warnings.append(
            f"not converged (stopped after {found.iterations} iterations): the parameters are "
            "not at the optimum; raise epochs or timeout_s"
        )
    total = sum(len(d.y) if d.weights is None else float(sum(d.weights)) for d in body.datasets)
    used = found.dof + k
    stop = "timeout" if timed_out else "step_tolerance" if found.converged else "max_epochs"
    return {
        "expression": expression.text,
        "named_model": plan.expression.named_model,
        "shared": dict(zip(shared_names, found.shared.tolist(), strict=True)),
        "datasets": [
            {"params": dict(zip(local_names, row, strict=True))} for row in found.local.tolist()
        ],
        "loss_history": (found.history / total).tolist(),
        "epochs_run": found.iterations,
        "stop_reason": stop,
        "converged": found.converged,
        "warnings": warnings,
        "stats": {
            "parameters": keys,
            "n_used": used,
            "dof": found.dof,
            "rss": found.rss,
            "residual_std": math.sqrt(found.rss / found.dof) if found.dof > 0 else None,
            "std_errors": dict(zip(keys, std_errors, strict=True)),
            "covariance": covariance,
            "correlation": correlation,
            "inference": inference.inference(keys, values, std_errors, found.dof, body.confidence),
            "starts": asdict(summary) if body.starts > 1 else None,
        },
    }
