"""POST /v1/fits/{linear,gaussian}: the reference post's two fits."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack
from typing import Any, Literal, TypeVar

import numpy as np
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel

from service.admission import Cost, fit_cost
from service.api.deps import SettingsDep, WorkerDep
from service.api.openapi import binary_body, json_only_body
from service.api.parsing import (
    Parsed,
    parse_gaussian,
    parse_gaussian_batch,
    parse_gaussian_binary,
    parse_linear,
    parse_linear_batch,
    parse_linear_binary,
)
from service.api.requests import BinaryParser, JsonParser, parse_request, unless_disconnected
from service.api.schemas import (
    GAUSSIAN_BATCH_EXAMPLE,
    GAUSSIAN_EXAMPLE,
    LINEAR_ADAM_EXAMPLE,
    LINEAR_BATCH_EXAMPLE,
    LINEAR_EXAMPLE,
    BatchOptions,
    ErrorDetail,
    FitFailure,
    GaussianBatchItem,
    GaussianBatchRequest,
    GaussianBatchResponse,
    GaussianFitRequest,
    GaussianFitResponse,
    GaussianOptions,
    GaussianParams,
    LinearBatchItem,
    LinearBatchRequest,
    LinearBatchResponse,
    LinearFitRequest,
    LinearFitResponse,
    LinearOptions,
    LinearParams,
    ValidationErrorBody,
)
from service.api.streaming import (
    EVENT_STREAM,
    EventStream,
    HoldingStream,
    fit_events,
    progress_step,
    wants_stream,
)
from service.api.streaming import EXAMPLE as STREAM_EXAMPLE
from service.settings import Settings
from service.worker import (
    BatchJob,
    FitError,
    FitResult,
    FitStats,
    FitWorker,
    GaussianJob,
    Job,
    LinearJob,
    Optimizer,
    Stopping,
    Training,
)

router = APIRouter(prefix="/v1/fits", tags=["fits"])

RequestT = TypeVar("RequestT", bound=BaseModel)
T = TypeVar("T")

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
    503: {"model": ErrorDetail, "description": "Warming up or shutting down; retry."},
}


async def fit_while_connected(
    request: Request, worker: FitWorker, job: Job, timeout_s: float | None
) -> FitResult:
    """The fit, abandoned if the client disconnects first."""
    return await unless_disconnected(request, worker.fit(job, timeout_s))


def _common(result: FitResult) -> dict[str, Any]:
    return {
        "loss_history": result.loss_history.tolist(),
        "history_every": result.history_every,
        "final_loss": result.final_loss,
        "epochs_run": result.epochs_run,
        "n": result.n,
        "stop_reason": result.stop_reason,
        "converged": result.converged,
        "warnings": list(result.warnings),
        "seed": result.seed,
        "stats": _stats(result.stats),
    }


def _stats(stats: FitStats) -> dict[str, Any]:
    """The engine's statistics in the response's shape (validated by the response model)."""
    names = stats.names
    correlation = stats.correlation
    closed, gap = stats.closed_form, stats.gap
    return {
        "parameters": list(names),
        "n_used": stats.n_used,
        "dof": stats.dof,
        "gradient_norm": stats.gradient_norm,
        "newton_step": stats.newton_step,
        "std_errors": dict(zip(names, stats.std_errors, strict=True)),
        "covariance": [list(row) for row in stats.covariance],
        "correlation": [[1.0, correlation], [correlation, 1.0]]
        if correlation is not None
        else [[None, None], [None, None]],
        "log_likelihood": stats.log_likelihood,
        "aic": stats.aic,
        "bic": stats.bic,
        "closed_form": None
        if closed is None
        else {"params": dict(zip(names, closed, strict=True)), "loss": stats.closed_form_loss},
        "gap": None
        if gap is None
        else {"params": dict(zip(names, gap[:2], strict=True)), "loss": gap[2]},
    } | (
        {"r_squared": stats.r_squared, "residual_std": stats.residual_std}
        if stats.names[0] == "slope"
        else {}
    )


def _training(body: LinearOptions | GaussianOptions) -> Training:
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
        "description": "The fit. With `Accept: text/event-stream`: server-sent events, "
        "`progress` ({epoch, loss}) every `progress_every` epochs, then `result` (this same "
        "JSON) or `error` (the 422 body); closing the connection stops the fit.",
        "content": {EVENT_STREAM: {"schema": {"type": "string"}, "example": STREAM_EXAMPLE}},
    },
}

OptionsT = TypeVar("OptionsT", LinearOptions, GaussianOptions)

#: Each model's body parsers (JSON, binary) and binary layout: the fits and the plots share them.
LINEAR_PARSERS = (parse_linear, parse_linear_binary)
GAUSSIAN_PARSERS = (parse_gaussian, parse_gaussian_binary)
LINEAR_LAYOUT = "shape (2, n): x then y"
GAUSSIAN_LAYOUT = "shape (n,): y"


async def _single_fit(
    request: Request,
    worker: FitWorker,
    settings: Settings,
    parsers: tuple[JsonParser[OptionsT], BinaryParser[OptionsT]],
    make_job: Callable[[Parsed[OptionsT]], Job],
    respond: Callable[[FitResult], BaseModel],
    json: bool = True,
) -> BaseModel | Response:
    """Admission, parsing, then the fit: answered as JSON, or streamed as server-sent events
    (the admission place is then held until the stream ends)."""
    async with AsyncExitStack() as resources:  # sees any exception, unless handed on
        ticket = await resources.enter_async_context(worker.admit())
        parsed = await parse_request(request, worker, settings, *parsers, ticket=ticket, json=json)
        body = parsed.request
        ticket.take_place(single_fit_cost(parsed))
        job = make_job(parsed)
        if wants_stream(request):
            every = progress_step(body.epochs, body.progress_every)
            events = fit_events(request, worker, job, body.timeout_s, every, respond)
            return EventStream(events, resources.pop_all())
        return respond(await fit_while_connected(request, worker, job, body.timeout_s))


def single_fit_cost(parsed: Parsed[LinearOptions] | Parsed[GaussianOptions]) -> Cost:
    """What a parsed single fit will cost (:mod:`service.admission`)."""
    body = parsed.request
    points = len(parsed.arrays["y"])
    arrays = sum(1 for name in ("x", "y", "weights") if parsed.arrays.get(name) is not None)
    history = body.epochs // body.history_step() + 1
    return fit_cost(points, arrays, body.epochs, history + body.epochs // 8)


def linear_job(parsed: Parsed[LinearOptions]) -> Job:
    body = parsed.request
    return LinearJob(
        x=parsed.arrays["x"],
        y=parsed.arrays["y"],
        training=_training(body),
        initial=(body.initial.slope, body.initial.intercept) if body.initial else None,
        seed=body.seed,
        weights=parsed.arrays.get("weights"),
    )


def gaussian_job(parsed: Parsed[GaussianOptions]) -> Job:
    body = parsed.request
    return GaussianJob(
        y=parsed.arrays["y"],
        training=_training(body),
        initial=(body.initial.mean, body.initial.std) if body.initial else None,
        reduction=body.reduction,
        seed=body.seed,
        weights=parsed.arrays.get("weights"),
    )


def linear_response(result: FitResult) -> LinearFitResponse:
    return LinearFitResponse(params=LinearParams(**result.params), **_common(result))


def gaussian_response(result: FitResult) -> GaussianFitResponse:
    return GaussianFitResponse(params=GaussianParams(**result.params), **_common(result))


@router.post(
    "/linear",
    response_model=LinearFitResponse,
    summary="Fit a line by gradient descent on the MSE",
    responses=SINGLE_FIT_RESPONSES,
    openapi_extra=json_only_body(
        LinearFitRequest,
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
)
async def fit_linear(request: Request, worker: WorkerDep, settings: SettingsDep) -> Any:
    """Fit y = slope·x + intercept to (x, y) with the post's GradientTape loop, minimizing the
    (weighted) mean squared error; returns the parameters, the loss history, and statistics
    (standard errors, R², AIC/BIC, the closed-form answer and the gap to it)."""
    return await _single_fit(request, worker, settings, LINEAR_PARSERS, linear_job, linear_response)


@router.post(
    "/gaussian",
    response_model=GaussianFitResponse,
    summary="Fit a normal distribution by maximum likelihood",
    responses=SINGLE_FIT_RESPONSES,
    openapi_extra=json_only_body(
        GaussianFitRequest,
        {
            "reference-post-data": {
                "summary": "Samples of N(2, 1) (reference-post-style data)",
                "value": GAUSSIAN_EXAMPLE,
            }
        },
    ),
)
async def fit_gaussian(request: Request, worker: WorkerDep, settings: SettingsDep) -> Any:
    """Fit N(mean, std²) to the samples y with the post's GradientTape loop, minimizing the
    (weighted) negative log-likelihood; returns the parameters, the loss history, and
    statistics (standard errors, log-likelihood, AIC/BIC, the closed form and the gap)."""
    return await _single_fit(
        request, worker, settings, GAUSSIAN_PARSERS, gaussian_job, gaussian_response
    )


BINARY_FIT_RESPONSES: dict[int | str, dict[str, Any]] = {
    **SINGLE_FIT_RESPONSES,
    415: {
        "model": ErrorDetail,
        "description": "Content-Type is not application/x-npy or application/octet-stream.",
    },
}


@router.post(
    "/linear/binary",
    response_model=LinearFitResponse,
    summary="Fit a line to binary data (.npy or raw floats)",
    responses=BINARY_FIT_RESPONSES,
    openapi_extra=binary_body(LinearOptions, LINEAR_LAYOUT, "POST /v1/fits/linear"),
)
async def fit_linear_binary(request: Request, worker: WorkerDep, settings: SettingsDep) -> Any:
    """`POST /v1/fits/linear` with the data as a binary body (no per-number parsing: numpy
    reads it as it is) and the options in the query string; the same answer."""
    return await _single_fit(
        request, worker, settings, LINEAR_PARSERS, linear_job, linear_response, json=False
    )


@router.post(
    "/gaussian/binary",
    response_model=GaussianFitResponse,
    summary="Fit a normal distribution to binary data (.npy or raw floats)",
    responses=BINARY_FIT_RESPONSES,
    openapi_extra=binary_body(GaussianOptions, GAUSSIAN_LAYOUT, "POST /v1/fits/gaussian"),
)
async def fit_gaussian_binary(request: Request, worker: WorkerDep, settings: SettingsDep) -> Any:
    """`POST /v1/fits/gaussian` with the samples as a binary body and the options in the
    query string; the same answer."""
    return await _single_fit(
        request, worker, settings, GAUSSIAN_PARSERS, gaussian_job, gaussian_response, json=False
    )


BATCH_RESPONSES: dict[int | str, dict[str, Any]] = {
    **FIT_RESPONSES,
    415: {"model": ErrorDetail, "description": "Content-Type is not application/json."},
    422: {
        "model": ValidationErrorBody,
        "description": "Invalid request, naming each field. A data set that cannot be fitted "
        "(diverged, constant data) is not a request error: its entry carries `error`.",
    },
}


BatchT = TypeVar("BatchT", bound=BatchOptions)


async def _fit_batch(
    request: Request,
    worker: FitWorker,
    settings: Settings,
    parse_json: JsonParser[BatchT],
    model: Literal["linear", "gaussian"],
    item: type[LinearBatchItem | GaussianBatchItem],
) -> Response:
    """Admission, parsing, the batch fit, and its answer, streamed entry by entry (a
    10,000-set answer with full histories is tens of MB of JSON: built whole, its
    ``json.dumps`` would hold the GIL, and the memory, for a second) while the admission
    ticket is held."""
    async with AsyncExitStack() as resources:
        ticket = await resources.enter_async_context(worker.admit())
        parsed = await parse_request(request, worker, settings, parse_json, ticket=ticket)
        body = parsed.request
        lengths = parsed.arrays["lengths"]
        sets, recorded = len(lengths), -(-body.epochs // body.history_every)
        arrays = 2 if parsed.arrays.get("x") is not None else 1
        ticket.take_place(
            fit_cost(int(lengths.sum()), arrays, body.epochs, sets * recorded, sets=sets)
        )
        job = BatchJob(
            model=model,
            lengths=lengths.astype(np.int64),
            x=parsed.arrays.get("x"),
            y=parsed.arrays["y"],
            learning_rate=body.learning_rate,
            epochs=body.epochs,
            initial=parsed.arrays["initial"],
            reduction=getattr(body, "reduction", "mean"),
            seed=body.seed,
            scaling=body.scaling,
            history_every=body.history_every,
        )
        results = await unless_disconnected(request, worker.fit_batch(job, body.timeout_s))
        answer = _batch_answer(model, results, item)
        return HoldingStream(answer, resources.pop_all(), media_type="application/json")


#: Batch entries per streamed piece of the answer.
ENTRIES_PER_PIECE = 64


def _batch_answer(
    model: Literal["linear", "gaussian"],
    results: list[FitResult | FitError],
    item: type[LinearBatchItem | GaussianBatchItem],
) -> Iterator[bytes]:
    """The batch response, serialized straight from plain data, a few entries at a time
    (the stream runs this generator in a thread): validating 10,000 nested response models
    would cost more than the fits (~75 µs each). The data come from the engine and
    :func:`_common`, the same as a single fit's (the tests validate batch answers against the
    response model). An entry with anything non-finite makes ``json.dumps`` refuse, and then
    the item model renders it (null, never NaN)."""
    failed = sum(isinstance(r, Exception) for r in results)
    head = {"model": model, "succeeded": len(results) - failed, "failed": failed}
    yield json.dumps(head, separators=(",", ":"))[:-1].encode() + b',"results":['
    piece: list[str] = []
    for i, r in enumerate(results):
        entry = (
            {"index": i, "result": None, "error": str(r)}
            if isinstance(r, Exception)
            else {
                "index": i,
                "result": {"model": model, "params": r.params, **_common(r)},
                "error": None,
            }
        )
        try:
            piece.append(json.dumps(entry, allow_nan=False, separators=(",", ":")))
        except ValueError:
            piece.append(item.model_validate(entry).model_dump_json())
        if len(piece) == ENTRIES_PER_PIECE:
            yield (b"," if i >= ENTRIES_PER_PIECE else b"") + ",".join(piece).encode()
            piece = []
    if piece:
        yield (b"," if len(results) > len(piece) else b"") + ",".join(piece).encode()
    yield b"]}"


@router.post(
    "/linear/batch",
    response_model=LinearBatchResponse,
    summary="Fit a line to many data sets at once",
    responses=BATCH_RESPONSES,
    openapi_extra=json_only_body(
        LinearBatchRequest,
        {
            "three-sets": {
                "summary": "Two lines and one constant-x set",
                "value": LINEAR_BATCH_EXAMPLE,
            }
        },
    ),
)
async def fit_linear_batch(request: Request, worker: WorkerDep, settings: SettingsDep) -> Response:
    """Fit y = slope·x + intercept to every data set in one vectorized GradientTape loop; the
    results come back in order, a set that cannot be fitted carrying an error instead."""
    return await _fit_batch(
        request, worker, settings, parse_linear_batch, "linear", LinearBatchItem
    )


@router.post(
    "/gaussian/batch",
    response_model=GaussianBatchResponse,
    summary="Fit normal distributions to many data sets at once",
    responses=BATCH_RESPONSES,
    openapi_extra=json_only_body(
        GaussianBatchRequest,
        {"two-sets": {"summary": "Two samples", "value": GAUSSIAN_BATCH_EXAMPLE}},
    ),
)
async def fit_gaussian_batch(
    request: Request, worker: WorkerDep, settings: SettingsDep
) -> Response:
    """Fit N(mean, std²) to every data set in one vectorized GradientTape loop; the results
    come back in order, a set that cannot be fitted carrying an error instead."""
    return await _fit_batch(
        request, worker, settings, parse_gaussian_batch, "gaussian", GaussianBatchItem
    )
