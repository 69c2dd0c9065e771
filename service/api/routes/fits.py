"""POST /v1/fits/{model}: fit any model of :mod:`service.api.models`, one data set (JSON,
server-sent events, or a binary body) or many at once."""

from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Request, Response

from service import tracing
from service.admission import Cost, fit_cost
from service.api.deps import Admitted, admission
from service.api.models import HttpModel
from service.api.openapi import binary_body, json_only_body
from service.api.parsing import NPY, Parsed
from service.api.report import EXAMPLE as REPORT_EXAMPLE
from service.api.report import TEXT, report
from service.api.schemas import ErrorDetail, FitFailure, Predict, ValidationErrorBody
from service.api.streaming import (
    EVENT_STREAM,
    EventStream,
    HoldingStream,
    batch_pieces,
    fit_events,
    progress_step,
)
from service.api.streaming import EXAMPLE as STREAM_EXAMPLE
from service.api.uncertainty import prediction, reporting
from service.fitting import inference
from service.worker import (
    BatchJob,
    BatchResults,
    FitJob,
    FitResult,
    FitStats,
    FitWorker,
    Optimizer,
    Stopping,
    Training,
)

FIT_RESPONSES: dict[int | str, dict[str, Any]] = {
    413: {"model": ErrorDetail, "description": "Body larger than TAPEFIT_MAX_BODY_BYTES."},
    415: {
        "model": ErrorDetail,
        "description": "Content-Type is not application/json. (For compatibility, this path "
        "also takes the binary bodies of its `/binary` twin.)",
    },
    422: {
        "model": ValidationErrorBody | FitFailure,
        "description": "Invalid request (a list naming each field), or a fit that cannot "
        'finish (a sentence): diverged (lower learning_rate; with `"stop_reason": '
        '"diverged"` and the epoch) or degenerate data.',
    },
    429: {
        "model": ErrorDetail,
        "description": "Every fit slot and queue place is taken; retry after the "
        "Retry-After header's seconds.",
    },
    503: {
        "model": ErrorDetail,
        "description": "Warming up or shutting down, or (expression fits) the deadline came "
        "while the model was still compiling (the compile goes on and is kept); retry after "
        "the Retry-After header's seconds.",
    },
}


def _common(
    result: FitResult, model: HttpModel, asked: inference.Reporting, predict: Predict | None
) -> dict[str, Any]:
    """The fields every fit answer shares; the history stays a numpy array (orjson writes it
    as the same bytes as the list of its floats, 40% faster)."""
    stats = result.stats
    likelihood = model.distribution == "normal"
    dof = asked.dof(stats.dof, likelihood)
    return {
        "loss_history": np.ascontiguousarray(result.loss_history),
        "history_every": result.history_every,
        "final_loss": result.final_loss,
        "epochs_run": result.epochs_run,
        "n": result.n,
        "stop_reason": result.stop_reason,
        "converged": result.converged,
        "warnings": [*result.warnings, *inference.undefined_warnings(stats.std_errors, dof)],
        "seed": result.seed,
        "stats": _stats(stats, model) | _uncertainty(result, model, asked, dof),
        "prediction": prediction(model.curve, result, asked, predict, likelihood),
    }


def _uncertainty(
    result: FitResult, model: HttpModel, asked: inference.Reporting, dof: int | None
) -> dict[str, Any]:
    """The parameter table, and (least squares) the chi-square test of a known sigma."""
    stats = result.stats
    out: dict[str, Any] = {
        "inference": inference.inference(
            stats.names, list(result.params.values()), stats.std_errors, dof, asked.confidence
        )
    }
    if model.has_stat("chi2"):
        known = asked.absolute_sigma
        chi2, p = inference.chi_square(stats.rss, stats.dof) if known else (None, None)
        out |= {"chi2": chi2, "chi2_p_value": p}
    return out


def _stats(stats: FitStats, model: HttpModel) -> dict[str, Any]:
    """The engine's statistics in the response's shape (validated by the response model)."""
    names = stats.names
    closed, gap = stats.closed_form, stats.gap
    extra = {
        name: getattr(stats, name) for name in ("r_squared", "residual_std") if model.has_stat(name)
    }
    return {
        "parameters": list(names),
        "n_used": stats.n_used,
        "dof": stats.dof,
        "gradient_norm": stats.gradient_norm,
        "newton_step": stats.newton_step,
        "std_errors": dict(zip(names, stats.std_errors, strict=True)),
        "covariance": [list(row) for row in stats.covariance],
        "correlation": [list(row) for row in stats.correlation],
        "log_likelihood": stats.log_likelihood,
        "aic": stats.aic,
        "bic": stats.bic,
        "closed_form": None
        if closed is None
        else {"params": dict(zip(names, closed, strict=True)), "loss": stats.closed_form_loss},
        "gap": None
        if gap is None
        else {"params": dict(zip(names, gap[0], strict=True)), "loss": gap[1]},
    } | extra


def fit_answer(
    model: HttpModel,
    result: FitResult,
    asked: inference.Reporting,
    predict: Predict | None = None,
) -> bytes:
    """The fit's JSON answer, serialized once straight from plain data: building the response
    model, then FastAPI validating and serializing it again, cost more than a small fit. The
    data are the engine's, in the response model's field order (the tests validate answers
    against it); NaN and infinities become null, as pydantic writes them."""
    with tracing.span("serialize"):
        answer = {
            "model": model.name,
            "params": result.params,
            **_common(result, model, asked, predict),
        }
        return orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY)


def _training(body: Any) -> Training:
    """The training options of a parsed single-fit body (any model's)."""
    return Training(
        learning_rate=body.learning_rate,
        epochs=body.epochs,
        optimizer=Optimizer(
            body.optimizer,
            momentum=body.momentum,
            beta_1=body.beta_1,
            beta_2=body.beta_2,
            epsilon=body.epsilon,
        ),
        stopping=Stopping(
            tolerance=body.tolerance,
            patience=body.patience,
            gradient_tolerance=body.gradient_tolerance,
        ),
        scaling=body.scaling,
        history_every=body.history_step(),
    )


SINGLE_FIT_RESPONSES: dict[int | str, dict[str, Any]] = {
    **FIT_RESPONSES,
    200: {
        "description": "The fit. With `Accept: text/plain`: the fit report, every number "
        "as in the JSON (a table like statsmodels' summary() or lmfit's fit_report()). "
        "With `Accept: text/event-stream`: server-sent events, "
        "`progress` ({epoch, loss}) every `progress_every` epochs, then `result` (this same "
        "JSON) or `error` (the 422 body); closing the connection stops the fit.",
        "content": {
            EVENT_STREAM: {"schema": {"type": "string"}, "example": STREAM_EXAMPLE},
            TEXT: {"schema": {"type": "string"}, "example": REPORT_EXAMPLE},
        },
    },
}


def single_fit_cost(model: HttpModel, parsed: Parsed[Any], worker: FitWorker) -> Cost:
    """What a parsed single fit will cost (:mod:`service.admission`)."""
    body = parsed.request
    points = len(parsed.arrays[model.data[0]])
    arrays = len(model.data) + (parsed.arrays.get("weights") is not None)
    history = body.epochs // body.history_step() + 1
    return fit_cost(
        points,
        arrays,
        body.epochs,
        history + body.epochs // 8,
        epochs_per_call=worker.settings.epochs_per_call,
    )


def fit_job(model: HttpModel, parsed: Parsed[Any]) -> FitJob:
    body = parsed.request
    return FitJob(
        model=model.name,
        data=tuple(parsed.arrays[name] for name in model.data),
        training=_training(body),
        initial=tuple(body.initial.model_dump().values()) if body.initial else None,
        seed=body.seed,
        weights=parsed.arrays.get("weights"),
        options=model.options_of(body),
    )


async def _single_fit(
    model: HttpModel, admitted: Admitted, parsed: Parsed[Any]
) -> Response | EventStream:
    """The fit, after admission and parsing (the dependencies): answered as JSON, or streamed
    as server-sent events (the admission ticket is then held until the stream ends)."""
    body = parsed.request
    worker, caller = admitted.worker, admitted.caller
    admitted.ticket.take_place(
        single_fit_cost(model, parsed, worker), worker.deadline_s(body.timeout_s)
    )
    job = fit_job(model, parsed)
    predict = getattr(body, "predict", None)  # JSON bodies only (not the binary twin's query)

    def respond(result: FitResult) -> str:
        return fit_answer(model, result, reporting(body), predict).decode()

    if caller.wants_events:
        every = progress_step(body.epochs, body.progress_every)
        events = fit_events(caller.gone, worker, job, body.timeout_s, every, respond)
        return EventStream(events, admitted.hand_over())
    fit = worker.fit(job, body.timeout_s, ticket=admitted.ticket)
    # A fit expected to take well under a millisecond runs on the event loop: no watcher.
    result = await (fit if worker.inline(admitted.ticket) else caller.unless_gone(fit))
    answer = fit_answer(model, result, reporting(body), predict)
    if caller.wants_report:
        return Response(report(orjson.loads(answer)), media_type=TEXT)
    return Response(answer, media_type="application/json")


BINARY_FIT_RESPONSES: dict[int | str, dict[str, Any]] = {
    **SINGLE_FIT_RESPONSES,
    415: {
        "model": ErrorDetail,
        "description": "Content-Type is not application/x-npy or application/octet-stream.",
    },
}


BATCH_RESPONSES: dict[int | str, dict[str, Any]] = {
    **FIT_RESPONSES,
    415: {"model": ErrorDetail, "description": "Content-Type is not application/json."},
    422: {
        "model": ValidationErrorBody,
        "description": "Invalid request, naming each field. A data set that cannot be fitted "
        "(diverged, constant data) is not a request error: its entry carries `error`.",
    },
}


BATCH_BINARY_RESPONSES: dict[int | str, dict[str, Any]] = {
    **BATCH_RESPONSES,
    415: {"model": ErrorDetail, "description": "Content-Type is not application/x-npy."},
}


async def _fit_batch(model: HttpModel, admitted: Admitted, parsed: Parsed[Any]) -> HoldingStream:
    """The batch fit, and its answer, streamed entry by entry (a 10,000-set answer with full
    histories is tens of MB of JSON: built whole, its ``json.dumps`` would hold the GIL, and
    the memory, for a second) while the admission ticket is held."""
    body = parsed.request
    worker, caller = admitted.worker, admitted.caller
    lengths = parsed.arrays["lengths"]
    sets, recorded = len(lengths), -(-body.epochs // body.history_every)
    points = int(lengths.sum())
    cost = fit_cost(points, len(model.data), body.epochs, sets * recorded, sets=sets)
    admitted.ticket.take_place(cost, worker.deadline_s(body.timeout_s))
    job = BatchJob(
        model=model.name,
        lengths=lengths.astype(np.int64),
        data=tuple(parsed.arrays[name] for name in model.data),
        learning_rate=body.learning_rate,
        epochs=body.epochs,
        initial=parsed.arrays["initial"],
        options=model.options_of(body),
        seed=body.seed,
        scaling=body.scaling,
        history_every=body.history_every,
    )
    results = await caller.unless_gone(worker.fit_batch(job, body.timeout_s, admitted.ticket))
    answer = _batch_answer(model, results, reporting(body))
    return HoldingStream(answer, admitted.hand_over(), media_type="application/json")


def _batch_answer(
    model: HttpModel, results: BatchResults, asked: inference.Reporting
) -> Iterator[bytes]:
    """The batch response, serialized straight from the engine's arrays and streamed. Each
    entry is what :func:`_common` writes for a single fit (a test holds them equal entry by
    entry), built column by column: validating 10,000 nested response models would cost
    more than the fits, and so would reading each set's statistics one by one."""
    failed = len(results.errors)
    head = {"model": model.name, "succeeded": len(results) - failed, "failed": failed}
    fitted = iter(_fitted_entries(model, results, asked))

    def entry(i: int) -> dict[str, Any]:  # called in order
        error = results.errors.get(i)
        if error is not None:
            return {"index": i, "result": None, "error": str(error)}
        return {"index": i, "result": next(fitted), "error": None}

    return batch_pieces(head, len(results), entry)


def _fitted_entries(
    model: HttpModel, results: BatchResults, asked: inference.Reporting
) -> Iterator[dict[str, Any]]:
    """The ``result`` of every fitted set, in order: :func:`_common` from columns."""
    f = results.fitted
    if f is None:
        return
    s = f.stats
    names, k = list(s.names), len(s.names)
    histories = np.ascontiguousarray(f.losses.T)
    params, final, n = f.params.tolist(), f.final_loss.tolist(), s.n.tolist()
    converged = s.converged.tolist()
    gradient_norm, newton_step = s.gradient_norm.tolist(), s.newton_step.tolist()
    std_errors, covariance, correlation = (
        s.std_errors.tolist(),
        s.covariance.tolist(),
        s.correlation.tolist(),
    )
    loglik, aic, bic = s.log_likelihood.tolist(), s.aic.tolist(), s.bic.tolist()
    closed_ok, closed, closed_loss = (
        s.closed_ok.tolist(),
        s.closed_form.tolist(),
        s.closed_form_loss.tolist(),
    )
    gap_ok, gap, gap_loss = s.gap_ok.tolist(), s.gap_params.tolist(), s.gap_loss.tolist()
    extras = {
        name: [None] * len(n) if (values := getattr(s, name)) is None else values.tolist()
        for name in ("r_squared", "residual_std")
        if model.has_stat(name)
    }
    if model.has_stat("chi2"):  # batches of the built-in models take no absolute_sigma
        extras |= {"chi2": [None] * len(n), "chi2_p_value": [None] * len(n)}
    likelihood = model.distribution == "normal"
    dofs = [asked.dof(n_j - k, likelihood) for n_j in n]
    tables = inference.tables(
        f.params, s.std_errors, None if likelihood else np.array(dofs), asked.confidence
    )
    method = "normal" if likelihood else "t"
    for j, i in enumerate(f.sets.tolist()):
        undefined = inference.undefined_warnings(std_errors[j], dofs[j])  # NaN: undefined
        stats = {
            "parameters": names,
            "n_used": n[j],
            "dof": n[j] - k,
            "gradient_norm": gradient_norm[j],
            "newton_step": newton_step[j],
            "std_errors": dict(zip(names, std_errors[j], strict=True)),
            "covariance": covariance[j],
            "correlation": correlation[j],
            "log_likelihood": loglik[j],
            "aic": aic[j],
            "bic": bic[j],
            "closed_form": {
                "params": dict(zip(names, closed[j], strict=True)),
                "loss": closed_loss[j],
            }
            if closed_ok[j]
            else None,
            "gap": {"params": dict(zip(names, gap[j], strict=True)), "loss": gap_loss[j]}
            if gap_ok[j]
            else None,
        }
        for name, values in extras.items():
            stats[name] = values[j]
        stats["inference"] = {
            "confidence": asked.confidence,
            "method": method,
            "dof": dofs[j],
            "parameters": tables.row(j, names),
        }
        yield {
            "model": model.name,
            "params": dict(zip(names, params[j], strict=True)),
            "loss_history": histories[j],
            "history_every": f.history_every,
            "final_loss": final[j],
            "epochs_run": f.epochs_run,
            "n": n[j],
            "stop_reason": f.stop,
            "converged": converged[j],
            "warnings": ([] if converged[j] else list(results[i].warnings)) + undefined,
            "seed": f.seeds[j],
            "stats": stats,
            "prediction": None,
        }


def router(models: Iterable[HttpModel]) -> APIRouter:
    """The fit routes of every model: JSON, binary, batch (in that order, model by model)."""
    models = list(models)
    fits = APIRouter(prefix="/v1/fits", tags=["fits"])
    for model in models:
        _add_fit(fits, model)
    for model in models:
        _add_fit_binary(fits, model)
    for model in models:
        _add_batch(fits, model)
    for model in models:
        _add_batch(fits, model, binary=True)
    return fits


def _single_fit_endpoint(model: HttpModel, json: bool) -> Callable[[Request], Awaitable[Any]]:
    """The route function of a single fit: JSON (also taking binary bodies), or binary only."""

    async def fit(request: Request) -> Any:
        async with admission(request) as admitted:
            parsed = await admitted.body(model.parse_json, model.parse_binary, json=json)
            return await _single_fit(model, admitted, parsed)

    return fit


def _add_fit(fits: APIRouter, model: HttpModel) -> None:
    fits.add_api_route(
        f"/{model.name}",
        _single_fit_endpoint(model, json=True),
        methods=["POST"],
        name=f"fit_{model.name}",
        response_model=model.response,
        summary=model.fit.summary,
        description=model.fit.description,
        responses=SINGLE_FIT_RESPONSES,
        openapi_extra=json_only_body(model.request, model.fit.examples),
    )


def _add_fit_binary(fits: APIRouter, model: HttpModel) -> None:
    fits.add_api_route(
        f"/{model.name}/binary",
        _single_fit_endpoint(model, json=False),
        methods=["POST"],
        name=f"fit_{model.name}_binary",
        response_model=model.response,
        summary=model.fit_binary.summary,
        description=model.fit_binary.description,
        responses=BINARY_FIT_RESPONSES,
        openapi_extra=binary_body(
            model.options, model.binary_layout, f"POST /v1/fits/{model.name}"
        ),
    )


def _add_batch(fits: APIRouter, model: HttpModel, binary: bool = False) -> None:
    """The batch route: a JSON body, or (``binary``) one .npy array with the options in the
    query string."""
    parsers = (model.parse_batch, model.parse_batch_binary) if binary else (model.parse_batch,)

    async def fit_batch(request: Request) -> Any:
        async with admission(request) as admitted:
            # The sets' lengths come from the array's shape: raw values have none.
            parsed = await admitted.body(*parsers, json=not binary, binary_types=(NPY,))
            return await _fit_batch(model, admitted, parsed)

    path = f"/{model.name}/batch"
    operation = model.batch_binary if binary else model.batch
    fits.add_api_route(
        path + ("/binary" if binary else ""),
        fit_batch,
        methods=["POST"],
        name=f"fit_{model.name}_batch" + ("_binary" if binary else ""),
        response_model=model.batch_response,
        summary=operation.summary,
        description=operation.description,
        responses=BATCH_BINARY_RESPONSES if binary else BATCH_RESPONSES,
        openapi_extra=binary_body(
            model.batch_options, model.batch_layout, f"POST /v1/fits{path}", raw=False
        )
        if binary
        else json_only_body(model.batch_request, model.batch.examples),
    )
