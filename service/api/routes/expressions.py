"""POST /v1/fits/expression: any model written down (or named), by least squares; GET
/v1/models: the named models."""

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, replace
from functools import cache, partial
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response

from service.admission import Cost, expression_cost
from service.api.deps import Admitted, admission
from service.api.openapi import binary_body, json_only_body
from service.api.parsing import (
    NPY,
    ExactDecimals,
    ExpressionPlan,
    Parsed,
    parse_expression,
    parse_expression_batch,
    parse_expression_batch_binary,
)
from service.api.report import TEXT, report
from service.api.routes.fits import (
    BATCH_BINARY_RESPONSES,
    BATCH_RESPONSES,
    SINGLE_FIT_RESPONSES,
)
from service.api.schemas import (
    EXPRESSION_BATCH_EXAMPLE,
    EXPRESSION_EXAMPLE,
    NAMED_MODEL_EXAMPLE,
    ExpressionBatchOptions,
    ExpressionBatchRequest,
    ExpressionBatchResponse,
    ExpressionFitRequest,
    ExpressionFitResponse,
    ExpressionStats,
    Inference,
    ModelDescription,
    ModelList,
    Predict,
    Prediction,
    Starts,
)
from service.api.streaming import (
    EventStream,
    HoldingStream,
    batch_pieces,
    fit_events,
    progress_step,
)
from service.api.uncertainty import plotted_band, prediction, reporting
from service.fitting import bands, catalog, inference, profile, robust, starts
from service.fitting.expression import CompileCost
from service.fitting.guesses import guess
from service.plots import curve_grid, expression_figure
from service.worker import (
    FitDiverged,
    FitError,
    FitJob,
    FitResult,
    FitWorker,
    Optimizer,
    SetData,
    SetsJob,
    Stopping,
    Training,
)

router = APIRouter(tags=["expressions"])


@router.post(
    "/v1/fits/expression",
    response_model=ExpressionFitResponse,
    summary="Fit any model you write down (or a named one) by least squares",
    responses=SINGLE_FIT_RESPONSES,
    openapi_extra=json_only_body(
        ExpressionFitRequest,
        {
            "nist-misra1a": {
                "summary": "NIST's Misra1a from its first start",
                "value": EXPRESSION_EXAMPLE,
            },
            "named-model": {
                "summary": "A named model, starting values guessed",
                "value": NAMED_MODEL_EXAMPLE,
            },
        },
    ),
)
async def fit_expression(request: Request) -> Any:
    """Fit y = f(x; parameters): the expression is parsed with an allow-list (never
    evaluated by Python), compiled once into an XLA loop (cached; new data lengths reuse it),
    and fitted by Levenberg-Marquardt with the exact Jacobian by forward-mode autodiff.
    Returns the parameters, the loss history and statistics in NIST's convention (standard
    errors from s²·(JᵀWJ)⁻¹, the residual sum of squares in extended precision)."""
    async with admission(request) as admitted:
        return await _fit(admitted, await admitted.body(parse_expression))


async def _fit(admitted: Admitted, parsed: Parsed[ExpressionFitRequest]) -> Any:
    body = parsed.request
    worker, caller = admitted.worker, admitted.caller
    plan, job = await _job(parsed, admitted, worker)
    start = dict(zip(plan.expression.parameters, job.initial or (), strict=True))
    found: starts.Summary | None = None
    robustly: robust.RobustFit | None = None

    def respond(result: FitResult) -> ExpressionFitResponse:
        answer = expression_response(plan, start, result, reporting(body), body.predict)
        if body.intervals == "profile":
            answer = profiled(answer, plan, job.data, job.weights, result, body.confidence)
        if found is not None:
            answer = with_starts(answer, found)
        if robustly is not None:
            answer = with_robust(answer, plan, job, body, robustly)
        return answer

    if body.starts > 1:  # every start in one batched call, answered as JSON
        chosen, result, found = await _multi_start(admitted, body, plan, job)
        start = dict(zip(plan.expression.parameters, chosen, strict=True))
    elif body.loss != "linear":  # reweighted to the robust optimum, then fitted there
        robustly, result = await _robust(admitted, body, plan, job)
    elif caller.wants_events:
        every = progress_step(body.epochs, body.progress_every)
        events = fit_events(
            caller.gone, worker, job, body.timeout_s, every, lambda r: respond(r).model_dump_json()
        )
        return EventStream(events, admitted.hand_over())
    else:
        result = await caller.unless_gone(worker.fit(job, body.timeout_s, ticket=admitted.ticket))
    # (profile intervals are a batch of re-optimizations: off the event loop)
    answer = await asyncio.to_thread(respond, result)
    if caller.wants_report:
        return Response(report(answer.model_dump(mode="json")), media_type=TEXT)
    return answer


def profiled(
    answer: ExpressionFitResponse,
    plan: ExpressionPlan,
    data: tuple[Any, ...],
    weights: Any,
    result: FitResult,
    confidence: float,
) -> ExpressionFitResponse:
    """The answer with profile-likelihood intervals in its parameter table."""
    s, names = result.stats, plan.expression.parameters
    table = answer.stats.inference
    warnings = list(answer.warnings)
    rows = {name: row.model_copy() for name, row in table.parameters.items()}
    if s.dof <= 0 or s.rss is None or not s.rss > 0.0:
        warnings.append(
            "profile intervals need residual degrees of freedom and a nonzero residual sum "
            "of squares: the intervals are null"
        )
        sides = [(profile.Side(None, False), profile.Side(None, False))] * len(names)
    else:
        *xs, y = data
        sides = profile.intervals(
            bands.expression_curve(plan.expression.tree),
            xs,
            y,
            weights,
            [result.params[name] for name in names],
            s.std_errors,
            s.rss,
            s.dof,
            confidence,
            bounds=[plan.bounds.get(name, (None, None)) for name in names],
        )
    for name, (lower, upper) in zip(names, sides, strict=True):
        rows[name] = rows[name].model_copy(
            update={
                "lower": lower.value,
                "upper": upper.value,
                "lower_found": lower.found,
                "upper_found": upper.found,
            }
        )
        for end, word in ((lower, "below"), (upper, "above")):
            if not end.found and s.dof > 0:
                warnings.append(
                    f"the profile of {name} is too flat to bound it {word} at confidence "
                    f"{confidence:g}: the data do not constrain it on that side (its interval "
                    "end is null)"
                )
    inference = table.model_copy(update={"method": "profile", "dof": s.dof, "parameters": rows})
    stats = answer.stats.model_copy(update={"inference": inference})
    return answer.model_copy(update={"stats": stats, "warnings": warnings})


async def _robust(
    admitted: Admitted, body: ExpressionFitRequest, plan: ExpressionPlan, job: FitJob
) -> tuple[robust.RobustFit, FitResult]:
    """The robust fit (iteratively reweighted, in a thread, within the fit's deadline), then
    the weighted least-squares fit at its final weights, from its parameters: the answer."""
    worker, names = admitted.worker, plan.expression.parameters
    deadline = time.monotonic() + worker.deadline_s(body.timeout_s)
    *xs, y = job.data
    assert job.initial is not None
    found = await asyncio.to_thread(
        robust.fit,
        bands.expression_curve(plan.expression.tree),
        xs,
        y,
        job.weights,
        job.initial,
        body.loss,
        body.f_scale,
        [plan.bounds.get(name, (None, None)) for name in names],
        body.epochs,
        lambda: time.monotonic() > deadline,
    )
    if not math.isfinite(found.cost) or not np.all(np.isfinite(found.params)):
        raise FitDiverged(found.iterations, body.learning_rate, advice=FitDiverged.SELF_STEPPING)
    weights = found.weights if job.weights is None else job.weights * found.weights
    polish = replace(job, initial=tuple(found.params.tolist()), weights=weights)
    result = await admitted.caller.unless_gone(
        worker.fit(polish, body.timeout_s, ticket=admitted.ticket)
    )
    return found, result


def with_robust(
    answer: ExpressionFitResponse,
    plan: ExpressionPlan,
    job: FitJob,
    body: ExpressionFitRequest,
    found: robust.RobustFit,
) -> ExpressionFitResponse:
    """A robust fit's answer: scipy's covariance for robust losses (and the table from it),
    the robust cost, the points down-weighted, and why to read the covariance with care."""
    names = list(plan.expression.parameters)
    *xs, y = job.data
    params = [answer.params[name] for name in names]
    covariance = robust.covariance(
        bands.expression_curve(plan.expression.tree),
        xs,
        y,
        job.weights,
        params,
        body.loss,
        body.f_scale,
        body.absolute_sigma,
    )
    stats, k = answer.stats, len(names)
    warnings = [
        *answer.warnings,
        f"a robust loss ({body.loss}): the covariance is approximate (scipy's convention: "
        "(2·cost/(n - p))·(J_sᵀJ_s)⁻¹ with J scaled by √(rho' + 2zrho''))",
    ]
    if not found.converged:
        warnings.append(
            f"the reweighting stopped after {found.iterations} iterations without converging"
        )
    if covariance is None:
        std_errors: list[float | None] = [None] * k
        rows: list[list[float | None]] = [[None] * k for _ in range(k)]
        correlation = rows
    else:
        se = np.sqrt(np.diag(covariance))
        std_errors = [float(v) for v in se]
        rows = covariance.tolist()
        correlation = (covariance / np.outer(se, se)).tolist()
    asked = reporting(body)
    table = inference.inference(names, params, std_errors, asked.dof(stats.dof), body.confidence)
    if covariance is None:
        warnings.extend(inference.undefined_warnings(std_errors, asked.dof(stats.dof)))
    update = {
        "std_errors": dict(zip(names, std_errors, strict=True)),
        "covariance": rows,
        "correlation": correlation,
        "inference": Inference.model_validate(table),
        "robust_cost": found.cost,
        "downweighted": int(np.count_nonzero(found.weights < robust.DOWNWEIGHTED)),
    }
    prediction = answer.prediction
    if body.predict is not None:  # its bands from this covariance too
        columns = [np.asarray(c, dtype=np.float64) for c in body.predict.columns()]
        values = bands.at_fit(
            bands.expression_curve(plan.expression.tree),
            params,
            columns,
            rows,
            stats.residual_std,
            asked.dof(stats.dof),
            body.confidence,
            body.absolute_sigma,
        )
        prediction = Prediction.model_validate({"x": body.predict.x, **values})
    return answer.model_copy(
        update={
            "stats": stats.model_copy(update=update),
            "warnings": warnings,
            "converged": answer.converged and found.converged,
            "prediction": prediction,
        }
    )


def with_starts(answer: ExpressionFitResponse, found: starts.Summary) -> ExpressionFitResponse:
    """The answer with its multi-start summary in ``stats.starts``."""
    stats = answer.stats.model_copy(update={"starts": Starts(**asdict(found))})
    return answer.model_copy(update={"stats": stats})


async def _multi_start(
    admitted: Admitted, body: ExpressionFitRequest, plan: ExpressionPlan, job: FitJob
) -> tuple[list[float], FitResult, starts.Summary]:
    """The fit from ``body.starts`` starts (the job's first) as one batch of identical data
    sets in one compiled loop: the start and result answered, and what the runs found."""
    worker, expression = admitted.worker, plan.expression
    names = expression.parameters
    bounds = [plan.bounds.get(name, (None, None)) for name in names]
    assert job.initial is not None
    draws = starts.draw(job.initial, bounds, body.starts, body.seed).tolist()
    exact = job.options.get("exact")
    own = None if exact is None else {"exact": exact}
    sets = tuple(SetData(job.data, tuple(row), weights=job.weights, options=own) for row in draws)
    options = {k: v for k, v in job.options.items() if k != "exact"}
    explore = replace(job.training, epochs=min(job.training.epochs, starts.EXPLORE_EPOCHS))
    sets_job = SetsJob(model="expression", sets=sets, training=explore, options=options)
    points, variables = job.data[-1].size, len(expression.variables)
    history = body.starts * (body.epochs // body.history_step() + 1)
    cost = expression_cost(points * body.starts, variables, len(names), body.epochs, history)
    if not worker.sets_compiled(sets_job):  # its loop compiles first, on the fit thread
        cost = Cost(bytes=cost.bytes + CompileCost.peak_bytes(expression), seconds=cost.seconds)
    admitted.ticket.take_place(cost, worker.deadline_s(body.timeout_s))
    results = await admitted.caller.unless_gone(
        worker.fit_sets(sets_job, body.timeout_s, admitted.ticket)
    )
    lowest = starts.lowest(results)
    if lowest is not None:
        run = results[lowest]
        assert isinstance(run, FitResult)
        if not run.converged and run.epochs_run < job.training.epochs:  # continued alone
            again = replace(job, initial=tuple(run.params[name] for name in names))
            with contextlib.suppress(FitError):  # a continuation that fails keeps the run
                results[lowest] = await admitted.caller.unless_gone(
                    worker.fit(again, body.timeout_s, ticket=admitted.ticket)
                )
    chosen, summary = starts.best(results)
    result = results[chosen]
    assert isinstance(result, FitResult)
    return draws[chosen], result, summary


async def _job(
    parsed: Parsed[ExpressionFitRequest], admitted: Admitted, worker: FitWorker
) -> tuple[ExpressionPlan, FitJob]:
    """Guess a named model's missing starting values (in a thread: a periodogram can take
    milliseconds), make the job, and admit it: a fit place, or, if it must compile first,
    its memory only."""
    body, plan = parsed.request, parsed.plan
    assert isinstance(plan, ExpressionPlan)
    expression = plan.expression
    xs = tuple(parsed.arrays[f"x:{name}"] for name in expression.variables)
    y = parsed.arrays["y"]
    k = len(expression.parameters)
    start = dict(plan.given)
    if len(start) < k:  # a named model: guess the others
        assert plan.named_model is not None
        guessed = await asyncio.to_thread(guess, plan.named_model, xs[0], y)
        start = {name: start.get(name, guessed[name]) for name in expression.parameters}
    initial = tuple(_within(start[name], plan.bounds.get(name)) for name in expression.parameters)
    job = FitJob(
        model="expression",
        data=(*xs, y),
        training=_training(body),
        initial=initial,
        weights=parsed.arrays.get("weights"),
        options={
            "expression": expression,
            "bounds": plan.bounds,
            "exact": _exact(parsed),
            "absolute_sigma": body.absolute_sigma,
        },
    )
    history = body.epochs // body.history_step() + 1
    cost = expression_cost(y.size, len(xs), k, body.epochs, history)
    if worker.runs_apart(job):
        # It will wait for a compile thread, or the numpy loop's first-fit thread (each
        # bounded by its own queue, 429 past it), not for a fit slot: it holds its memory
        # but no fit place, so cached fits are never crowded out by a flood of new
        # expressions.
        admitted.ticket.charge_bytes(cost.bytes)
    else:
        admitted.ticket.take_place(cost, worker.deadline_s(body.timeout_s))
    return plan, job


def _exact(parsed: Parsed[ExpressionFitRequest]) -> tuple[Any, ...] | None:
    """The variables and y in extended precision, if the parser read them so."""
    plan = parsed.plan
    assert isinstance(plan, ExpressionPlan)
    names = [f"exact:x:{name}" for name in plan.expression.variables] + ["exact:y"]
    if not all(name in parsed.arrays for name in names):
        return None
    return tuple(parsed.arrays[name] for name in names)


def _within(value: float, bound: tuple[float | None, float | None] | None) -> float:
    if bound is None:
        return value
    low, high = bound
    value = value if low is None else max(low, value)
    return value if high is None else min(high, value)


def expression_response(
    plan: ExpressionPlan,
    start: dict[str, float],
    result: FitResult,
    asked: inference.Reporting,
    predict: Predict | None = None,
    rows: dict[str, dict[str, float | None]] | None = None,
) -> ExpressionFitResponse:
    """A fit's answer; ``rows``: its parameter table, if its batch computed them all at
    once (:func:`_tables`)."""
    s = result.stats
    names = list(s.names)
    dof = asked.dof(s.dof)
    warnings = [*result.warnings, *inference.undefined_warnings(s.std_errors, dof)]
    chi2, chi2_p = inference.chi_square(s.rss, s.dof) if asked.absolute_sigma else (None, None)
    for name, (low, high) in plan.bounds.items():
        value = result.params[name]
        if any(
            b is not None and math.isclose(value, b, rel_tol=1e-9, abs_tol=1e-300)
            for b in (low, high)
        ):
            warnings.append(
                f"{name} ended on its bound ({value:.15g}): its standard error assumes it is "
                "free, and the optimum may lie beyond"
            )
    return ExpressionFitResponse(
        expression=plan.expression.text,
        named_model=plan.named_model,
        params=result.params,
        start=start,
        loss_history=result.loss_history.tolist(),
        history_every=result.history_every,
        final_loss=result.final_loss,
        epochs_run=result.epochs_run,
        n=result.n,
        stop_reason=result.stop_reason,
        converged=result.converged,
        warnings=warnings,
        stats=ExpressionStats(
            parameters=names,
            n_used=s.n_used,
            dof=s.dof,
            std_errors=dict(zip(names, s.std_errors, strict=True)),
            covariance=[list(row) for row in s.covariance],
            correlation=[list(row) for row in s.correlation],
            rss=s.rss,
            residual_std=s.residual_std,
            r_squared=s.r_squared,
            log_likelihood=s.log_likelihood,
            aic=s.aic,
            bic=s.bic,
            gradient_norm=s.gradient_norm,
            newton_step=s.newton_step,
            inference=Inference.model_validate(
                inference.inference(
                    names, list(result.params.values()), s.std_errors, dof, asked.confidence, rows
                )
            ),
            chi2=chi2,
            chi2_p_value=chi2_p,
        ),
        prediction=prediction(bands.expression_curve(plan.expression.tree), result, asked, predict),
    )


@router.post(
    "/v1/fits/expression/batch",
    response_model=ExpressionBatchResponse,
    summary="Fit one expression (or named model) to many data sets in one compiled loop",
    responses=BATCH_RESPONSES,
    openapi_extra=json_only_body(
        ExpressionBatchRequest,
        {
            "decays": {
                "summary": "Two decays, one with its own start",
                "value": EXPRESSION_BATCH_EXAMPLE,
            }
        },
    ),
)
async def fit_expression_batch(request: Request) -> Any:
    """Every data set is a row of one compiled Levenberg-Marquardt loop (or SGD, momentum,
    Adam): each with its own status, stopping rules and damping, so a set that diverges or
    cannot be determined fails alone, in its entry. Each `result` is what `POST
    /v1/fits/expression` answers for that set alone. Streamed entry by entry."""
    async with admission(request) as admitted:
        return await _fit_sets(admitted, await admitted.body(parse_expression_batch))


@router.post(
    "/v1/fits/expression/batch/binary",
    response_model=ExpressionBatchResponse,
    summary="The expression batch with its data as one .npy array",
    responses=BATCH_BINARY_RESPONSES,
    openapi_extra=binary_body(
        ExpressionBatchOptions,
        "shape (sets, variables + 1, n): each set's variables (in the order of `variables`), "
        "then its y",
        "POST /v1/fits/expression/batch",
        raw=False,
    ),
)
async def fit_expression_batch_binary(request: Request) -> Any:
    """As `POST /v1/fits/expression/batch`, every set of one length, the data decoded by
    numpy (no per-number Python objects): the options in the query string, `parameters` and
    `bounds` as JSON text. The answer is the JSON batch's."""
    async with admission(request) as admitted:
        parsed = await admitted.body(
            parse_expression_batch, parse_expression_batch_binary, json=False, binary_types=(NPY,)
        )
        return await _fit_sets(admitted, parsed)


async def _fit_sets(
    admitted: Admitted, parsed: Parsed[ExpressionBatchRequest] | Parsed[ExpressionBatchOptions]
) -> HoldingStream:
    """The batch fit, admitted for its points, iterations and a compile; its answer streamed
    while the admission ticket is held."""
    body, plan = parsed.request, parsed.plan
    assert isinstance(plan, ExpressionPlan)
    expression, worker = plan.expression, admitted.worker
    sets, firsts = await _sets(parsed, plan)
    count = body.starts  # each set's starts: rows of one loop, set i's from seed + i
    names, rows = expression.parameters, sets
    if count > 1:
        bounds = [plan.bounds.get(name, (None, None)) for name in names]
        rows = tuple(
            replace(one, initial=tuple(row))
            for i, one in enumerate(sets)
            for row in starts.draw(one.initial, bounds, count, body.seed + i).tolist()
        )
    points, k = int(parsed.arrays["lengths"].sum()) * count, len(names)
    history = len(rows) * (body.epochs // body.history_step() + 1)
    cost = expression_cost(points, len(expression.variables), k, body.epochs, history, len(rows))
    job = SetsJob(
        model="expression",
        sets=rows,
        training=_training(body),
        options={
            "expression": expression,
            "bounds": plan.bounds,
            "absolute_sigma": body.absolute_sigma,
        },
    )
    if not worker.sets_compiled(job):  # its loop compiles first, on the fit thread
        cost = Cost(bytes=cost.bytes + CompileCost.peak_bytes(expression), seconds=cost.seconds)
    admitted.ticket.take_place(cost, worker.deadline_s(body.timeout_s))
    results = await admitted.caller.unless_gone(
        worker.fit_sets(job, body.timeout_s, admitted.ticket)
    )
    found: list[starts.Summary | None] | None = None
    if count > 1:  # each set's best run, and what its runs found
        runs, results, found = results, [], []
        for i in range(len(sets)):
            try:
                chosen, summary = starts.best(runs[i * count : (i + 1) * count])
            except FitError as error:
                results.append(error)
                found.append(None)
                continue
            results.append(runs[i * count + chosen])
            firsts[i] = dict(zip(names, rows[i * count + chosen].initial, strict=True))
            found.append(summary)
    profile_of = sets if body.intervals == "profile" else None
    answer = _sets_answer(plan, firsts, results, reporting(body), profile_of, found)
    return HoldingStream(answer, admitted.hand_over(), media_type="application/json")


async def _sets(
    parsed: Parsed[ExpressionBatchRequest] | Parsed[ExpressionBatchOptions], plan: ExpressionPlan
) -> tuple[tuple[SetData, ...], list[dict[str, float]]]:
    """Each set's arrays, weights and start (a named model's missing values guessed from
    the set's data, in a thread), clipped into the bounds."""
    arrays, expression = parsed.arrays, plan.expression
    cuts = np.cumsum(parsed.arrays["lengths"].astype(np.int64))[:-1]

    def split(name: str) -> list[Any]:
        return np.split(arrays[name], cuts)

    xs = list(zip(*(split(f"x:{name}") for name in expression.variables), strict=True))
    ys, weights = split("y"), split("weights")
    exact = None
    if "exact:body" in arrays:  # read where the statistics need it
        exact = ExactDecimals(arrays["exact:body"].tobytes(), expression.variables)
    names = expression.parameters

    def starts() -> list[dict[str, float]]:
        out = []
        for i, row in enumerate(arrays["initial"]):
            start = {name: float(v) for name, v in zip(names, row, strict=True) if math.isfinite(v)}
            if len(start) < len(names):  # a named model: guess the others
                assert plan.named_model is not None
                guessed = guess(plan.named_model, xs[i][0], ys[i])
                start = {name: start.get(name, guessed[name]) for name in names}
            out.append({name: _within(start[name], plan.bounds.get(name)) for name in names})
        return out

    given = await asyncio.to_thread(starts)
    sets = tuple(
        SetData(
            (*xs[i], ys[i]),
            tuple(given[i].values()),
            weights=weights[i] if arrays["weighted"][i] else None,
            options=None if exact is None else {"exact": exact.of(i)},
        )
        for i in range(len(ys))
    )
    return sets, given


def _training(
    body: ExpressionFitRequest | ExpressionBatchRequest | ExpressionBatchOptions,
) -> Training:
    return Training(
        learning_rate=body.learning_rate,
        epochs=body.epochs,
        optimizer=Optimizer(body.optimizer),
        stopping=Stopping(
            tolerance=body.tolerance,
            patience=body.patience,
            gradient_tolerance=body.gradient_tolerance,
        ),
        scaling="none",
        history_every=body.history_step(),
    )


def _sets_answer(
    plan: ExpressionPlan,
    firsts: list[dict[str, float]],
    results: list[FitResult | FitError],
    asked: inference.Reporting,
    profile_of: tuple[SetData, ...] | None = None,
    found: list[starts.Summary | None] | None = None,
) -> Iterator[bytes]:
    """The batch answer, streamed; each result is what a single fit of its set answers (with
    profile intervals, given the sets' data: computed entry by entry as the answer streams,
    in the response's thread; with a multi-start's summaries)."""
    failed = sum(isinstance(r, FitError) for r in results)
    head = {
        "model": "expression",
        "expression": plan.expression.text,
        "named_model": plan.named_model,
        "succeeded": len(results) - failed,
        "failed": failed,
    }

    # Computed with the first entry, in the answer's thread (not on the event loop).
    table = cache(partial(_tables, results, asked))

    def entry(i: int) -> dict[str, Any]:
        result = results[i]
        if isinstance(result, FitError):
            return {"index": i, "result": None, "error": str(result)}
        rows = table()(i, result.stats.names)
        answer = expression_response(plan, firsts[i], result, asked, rows=rows)
        if profile_of is not None:
            one = profile_of[i]
            answer = profiled(answer, plan, one.data, one.weights, result, asked.confidence)
        if found is not None and (summary := found[i]) is not None:
            answer = with_starts(answer, summary)
        return {"index": i, "result": answer.model_dump(mode="json"), "error": None}

    return batch_pieces(head, len(results), entry)


def _tables(
    results: list[FitResult | FitError], asked: inference.Reporting
) -> Callable[[int, Sequence[str]], dict[str, dict[str, float | None]]]:
    """Every fitted set's parameter table, computed at once as [B, k] arrays (the same
    arithmetic as one fit's, element by element: 0.4 of a 10,000-set answer's 0.7 s went to
    one table at a time); set ``i``'s rows by parameter name."""
    fitted = {i: r for i, r in enumerate(results) if isinstance(r, FitResult)}
    where = {i: j for j, i in enumerate(fitted)}
    done = list(fitted.values())  # at least one: an entry asks
    estimates = np.array([list(r.params.values()) for r in done], dtype=np.float64)
    errors = np.array(
        [[math.nan if e is None else e for e in r.stats.std_errors] for r in done],
        dtype=np.float64,
    )
    dofs = [asked.dof(r.stats.dof) for r in done]
    tables = inference.tables(
        estimates, errors, None if dofs[0] is None else np.array(dofs), asked.confidence
    )
    return lambda i, names: tables.row(where[i], names)


@router.get(
    "/v1/models",
    response_model=ModelList,
    summary="The named models: expression, parameters and their meaning",
)
async def models() -> ModelList:
    """Each named model a fit may ask for (`"model": name` in `POST /v1/fits/expression`),
    with its expression and what each parameter means; their starting values are guessed
    from the data when not given."""
    return ModelList(
        models=[
            ModelDescription(
                name=m.name,
                expression=m.expression,
                parameters=dict(m.meaning),
                description=m.description,
            )
            for m in catalog.NAMED_MODELS
        ]
    )


PNG = "image/png"


@router.post(
    "/v1/plots/expression",
    response_class=Response,
    summary="Fit an expression, then plot the data and fit, the residuals and the loss (PNG)",
    responses={
        **SINGLE_FIT_RESPONSES,
        200: {
            "description": "A 1500x400 PNG: data and fit, residuals, loss curve.",
            "content": {PNG: {"schema": {"type": "string", "format": "binary"}}},
        },
    },
    openapi_extra=json_only_body(
        ExpressionFitRequest,
        {"named-model": {"summary": "A named model", "value": NAMED_MODEL_EXAMPLE}},
    ),
)
async def plot_expression(request: Request) -> Response:
    """The same body as `POST /v1/fits/expression`. Left: the data and the fitted curve
    (one variable) or observed against fitted (several); middle: the residuals; right: the
    loss per iteration."""
    async with admission(request) as admitted:
        parsed = await admitted.body(parse_expression)
        worker, caller = admitted.worker, admitted.caller
        plan, job = await _job(parsed, admitted, worker)
        result = await caller.unless_gone(
            worker.fit(job, parsed.request.timeout_s, ticket=admitted.ticket)
        )
        png = await admitted.draw(
            _drawing(plan, job, result, parsed.request)
        )  # the place held meanwhile
    return Response(png, media_type=PNG)


def _drawing(
    plan: ExpressionPlan, job: FitJob, result: FitResult, body: ExpressionFitRequest
) -> Callable[[], bytes]:
    *xs, y = job.data
    band = None
    if len(xs) == 1:
        curve = bands.expression_curve(plan.expression.tree)
        band = plotted_band(curve, result, body, curve_grid(xs[0]))
    params = [result.params[name] for name in plan.expression.parameters]
    title = plan.named_model or plan.expression.text
    title = title if len(title) <= 60 else title[:57] + "..."
    return partial(
        expression_figure,
        plan.expression.tree,
        params,
        xs,
        y,
        result.loss_history,
        result.history_every,
        title,
        band,
    )
