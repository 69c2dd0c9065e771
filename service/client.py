"""A typed Python client for tapefit, sync (:class:`Client`) and async (:class:`AsyncClient`).

::

    from service.client import Client

    with Client("http://localhost:8000") as tapefit:
        data = tapefit.linear_dataset(n=100, seed=1)
        fit = tapefit.fit_linear(data.x, data.y, optimizer="adam", learning_rate=0.05)
        print(fit.params.slope, fit.stats.std_errors.slope, fit.converged)

Every method returns the server's response model (pydantic, the same classes the server
validates against) or raises a :class:`TapefitError` subclass carrying the server's detail.
A 429 (busy) or 503 (warming up, draining) answer is retried after its ``Retry-After``
seconds, up to ``max_retries`` times. Options and array lengths are checked here first (a
typo fails at once, without a round trip, as :class:`InvalidArguments`). numpy arrays go over
the wire as ``.npy`` (no JSON encoding) unless the call carries weights or ``binary=False``.

It needs only httpx and pydantic (``pip install tapefit``, without the ``server`` extra);
numpy is used when you pass numpy arrays, and is not required otherwise.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

try:
    import numpy as np
except ImportError:  # numpy is optional: it is only needed to send numpy arrays
    np = None  # type: ignore[assignment]

from service.api.schemas import (
    CompareResponse,
    Dataset,
    EvaluateResponse,
    ExpressionBatchResponse,
    ExpressionFitResponse,
    GaussianBatchResponse,
    GaussianFitResponse,
    GaussianOptions,
    GlobalFitResponse,
    LinearBatchResponse,
    LinearFitResponse,
    LinearOptions,
    ModelList,
)

if TYPE_CHECKING:
    import numpy.typing as npt

Values: TypeAlias = "Sequence[float] | npt.NDArray[Any]"
ResponseT = TypeVar("ResponseT", bound=BaseModel)

__all__ = [
    "AsyncClient",
    "Client",
    "FitFailed",
    "InvalidArguments",
    "Overloaded",
    "Progress",
    "ServerError",
    "TapefitError",
    "Unavailable",
    "ValidationFailed",
]

# -- errors ---------------------------------------------------------------------------------


class TapefitError(Exception):
    """An error answer from the server: ``status`` and its ``detail``."""

    def __init__(self, status: int, detail: Any, body: Any = None) -> None:
        self.status = status
        self.detail = detail
        self.body = body
        super().__init__(f"{status}: {detail}")


class ValidationFailed(TapefitError):
    """422 with FastAPI's list of errors, each naming its field in ``loc``."""

    @property
    def fields(self) -> list[str]:
        return [
            str(error["loc"][1])
            for error in self.detail
            if isinstance(error, dict) and len(error.get("loc", ())) > 1
        ]


class InvalidArguments(ValidationFailed):
    """Raised before anything is sent: an option or the arrays would be refused. ``detail``
    has the server's 422 shape (``loc``, ``msg``, ``type``), so one ``except
    ValidationFailed`` handles both."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__(422, errors, {"detail": errors})


def _invalid(error: ValidationError) -> InvalidArguments:
    return InvalidArguments(
        [
            {"loc": ["body", *error["loc"]], "msg": error["msg"], "type": error["type"]}
            for error in error.errors(include_url=False, include_input=False)
        ]
    )


def _same_lengths(arrays: Mapping[str, Any], at: tuple[Any, ...] = ()) -> None:
    """Refuse arrays of different lengths, naming each field (the server would say 422)."""
    lengths = {name: len(values) for name, values in arrays.items() if values is not None}
    if len(set(lengths.values())) > 1:
        described = ", ".join(f"{name} has {n}" for name, n in lengths.items())
        raise InvalidArguments(
            [
                {
                    "loc": ["body", *at, name],
                    "msg": f"the arrays must have the same length ({described})",
                    "type": "length_mismatch",
                }
                for name, n in lengths.items()
                if n != next(iter(lengths.values()))  # those that differ from the first
            ]
        )


class FitFailed(TapefitError):
    """422 for a fit that cannot finish: it diverged (``stop_reason == "diverged"`` and the
    ``epoch``) or the data are degenerate."""

    @property
    def stop_reason(self) -> str | None:
        return self.body.get("stop_reason") if isinstance(self.body, dict) else None

    @property
    def epoch(self) -> int | None:
        return self.body.get("epoch") if isinstance(self.body, dict) else None


class Overloaded(TapefitError):
    """429: every fit slot is taken (raised once the retries are spent)."""

    def __init__(self, status: int, detail: Any, body: Any, retry_after: float) -> None:
        super().__init__(status, detail, body)
        self.retry_after = retry_after


class Unavailable(Overloaded):
    """503: the service is warming up or shutting down."""


class ServerError(TapefitError):
    """Any other error status."""


# -- the wire format, shared by both clients --------------------------------------------------


@dataclass(frozen=True)
class _Call:
    method: str
    path: str
    json: Any = None
    content: bytes | None = None
    params: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)

    def arguments(self) -> dict[str, Any]:
        return {
            "json": self.json,
            "content": self.content,
            "params": self.params or None,
            "headers": self.headers or None,
        }

    def request(self, http: httpx.Client | httpx.AsyncClient) -> httpx.Request:
        return http.build_request(self.method, self.path, **self.arguments())


@dataclass(frozen=True)
class Progress:
    """One progress event of a streamed fit: the loss after ``epoch`` updates."""

    epoch: int
    loss: float | None


def _is_array(values: Any) -> bool:
    return np is not None and isinstance(values, np.ndarray)


def _plain(value: Any) -> Any:
    """JSON-ready: numpy arrays and scalars become lists and floats; the rest as they are."""
    numpy = np is not None and isinstance(value, np.generic | np.ndarray)
    return value.tolist() if numpy else value


def _list(values: Values) -> list[float]:
    return _plain(values) if _is_array(values) else list(values)


def _npy(rows: list[Values]) -> bytes:
    array = np.asarray(rows[0] if len(rows) == 1 else np.stack(rows), dtype=np.float64)
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _fit_call(
    path: str,
    options_model: type[LinearOptions] | type[GaussianOptions],
    arrays: dict[str, Values],
    options: dict[str, Any],
    binary: bool,
    accept: str | None = None,
) -> _Call:
    """A fit-shaped request (fits and plots). numpy data without weights or sigma go as
    .npy."""
    per_point = {name: options.pop(name, None) for name in ("weights", "sigma")}
    _same_lengths({**arrays, **per_point})
    try:
        valid = options_model.model_validate({k: _plain(v) for k, v in options.items()})
    except ValidationError as error:
        raise _invalid(error) from None
    checked = valid.model_dump(mode="json", exclude_unset=True)
    headers = {"accept": accept} if accept else {}
    given = {name: values for name, values in per_point.items() if values is not None}
    as_npy = binary and not given and all(_is_array(v) for v in arrays.values())
    if as_npy:
        params = {name: json.dumps(value) for name, value in checked.items()}
        headers["content-type"] = "application/x-npy"
        return _Call(
            "POST",
            f"{path}/binary",
            content=_npy(list(arrays.values())),
            params=params,
            headers=headers,
        )
    body: dict[str, Any] = {name: _list(values) for name, values in (arrays | given).items()}
    return _Call("POST", path, json={**body, **checked}, headers=headers)


def _batch_call(
    model: str, datasets: Sequence[Mapping[str, Any]], options: dict[str, Any]
) -> _Call:
    """Each data set's arrays (x, y, initial...) may be lists or numpy arrays."""
    sets = [{name: _plain(value) for name, value in dataset.items()} for dataset in datasets]
    for i, dataset in enumerate(sets):
        _same_lengths({name: dataset.get(name) for name in ("x", "y")}, ("datasets", i))
    plain = {name: _plain(value) for name, value in options.items()}
    return _Call("POST", f"/v1/fits/{model}/batch", json={"datasets": sets, **plain})


def _expression_call(
    path: str,
    x: Values | Mapping[str, Values],
    y: Values,
    expression: str | None,
    model: str | None,
    parameters: Mapping[str, float] | None,
    options: dict[str, Any],
) -> _Call:
    """An expression fit (``x``: one array, or named arrays for several variables)."""
    body: dict[str, Any] = {"x": _xs(x), "y": _plain(y)}
    body |= {k: _plain(v) for k, v in options.items()}
    return _Call("POST", path, json=body | _expression_model(expression, model, parameters))


def _expression_batch_call(
    datasets: Sequence[Mapping[str, Any]],
    expression: str | None,
    model: str | None,
    parameters: Mapping[str, float] | None,
    options: dict[str, Any],
) -> _Call:
    """An expression batch: each data set's x (one array or named arrays), y, and optional
    weights or sigma, and parameters (its own starting values)."""
    sets = []
    for dataset in datasets:
        one: dict[str, Any] = {"x": _xs(dataset["x"]), "y": _plain(dataset["y"])}
        for name in ("weights", "sigma"):
            if dataset.get(name) is not None:
                one[name] = _plain(dataset[name])
        if dataset.get("parameters") is not None:
            one["parameters"] = {k: float(v) for k, v in dataset["parameters"].items()}
        sets.append(one)
    body: dict[str, Any] = {"datasets": sets, **{k: _plain(v) for k, v in options.items()}}
    body |= _expression_model(expression, model, parameters)
    return _Call("POST", "/v1/fits/expression/batch", json=body)


def _compare_call(
    x: Values | Mapping[str, Values],
    y: Values,
    models: Sequence[Mapping[str, Any]],
    options: dict[str, Any],
) -> _Call:
    """A comparison: one data set, several models (``{"expression", "parameters"}``,
    ``{"model": named}`` or ``{"model": "linear"}``)."""
    body: dict[str, Any] = {"x": _xs(x), "y": _plain(y), "models": [dict(m) for m in models]}
    body |= {k: _plain(v) for k, v in options.items()}
    return _Call("POST", "/v1/fits/compare", json=body)


def _evaluate_call(
    x: Values | Mapping[str, Values],
    params: Mapping[str, float],
    expression: str | None,
    model: str | None,
    options: dict[str, Any],
) -> _Call:
    """A stored fit's model at new x (``covariance``, ``residual_variance``, ``dof`` and
    ``confidence`` among the options)."""
    body: dict[str, Any] = {"x": _xs(x), "params": {k: float(v) for k, v in params.items()}}
    body |= {k: _plain(v) for k, v in options.items()}
    body |= {k: v for k, v in (("expression", expression), ("model", model)) if v is not None}
    return _Call("POST", "/v1/evaluate", json=body)


def _global_call(
    datasets: Sequence[Mapping[str, Any]],
    expression: str | None,
    model: str | None,
    parameters: Mapping[str, float] | None,
    shared: Sequence[str],
    options: dict[str, Any],
) -> _Call:
    """A global fit: each data set's x (one array or named arrays), y, and optional weights
    or sigma; the ``shared`` parameters common to all."""
    sets = []
    for dataset in datasets:
        one: dict[str, Any] = {"x": _xs(dataset["x"]), "y": _plain(dataset["y"])}
        for name in ("weights", "sigma"):
            if dataset.get(name) is not None:
                one[name] = _plain(dataset[name])
        sets.append(one)
    body: dict[str, Any] = {"datasets": sets, "shared": list(shared)}
    body |= {k: _plain(v) for k, v in options.items()}
    body |= _expression_model(expression, model, parameters)
    return _Call("POST", "/v1/fits/expression/global", json=body)


def _xs(x: Values | Mapping[str, Values]) -> Any:
    return {name: _plain(v) for name, v in x.items()} if isinstance(x, Mapping) else _plain(x)


def _expression_model(
    expression: str | None, model: str | None, parameters: Mapping[str, float] | None
) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if expression is not None:
        body["expression"] = expression
    if model is not None:
        body["model"] = model
    if parameters is not None:
        body["parameters"] = {name: float(value) for name, value in parameters.items()}
    return body


def _dataset_call(model: str, options: dict[str, Any]) -> _Call:
    return _Call("POST", f"/v1/datasets/{model}", json=options)


def _error(response: httpx.Response) -> TapefitError:
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    detail = body.get("detail", body) if isinstance(body, dict) else body
    status = response.status_code
    if status in (429, 503):
        retry_after = float(response.headers.get("retry-after", "1"))
        kind = Overloaded if status == 429 else Unavailable
        return kind(status, detail, body, retry_after)
    if status == 422:
        return (ValidationFailed if isinstance(detail, list) else FitFailed)(status, detail, body)
    return ServerError(status, detail, body)


class _Events:
    """Server-sent events, line by line."""

    def __init__(self) -> None:
        self.name = "message"
        self.data: list[str] = []

    def feed(self, line: str) -> tuple[str, str] | None:
        if not line:
            if not self.data:
                return None
            event = (self.name, "\n".join(self.data))
            self.name, self.data = "message", []
            return event
        key, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if key == "event":
            self.name = value
        elif key == "data":
            self.data.append(value)
        return None


def _event(name: str, data: str, model: type[ResponseT]) -> Progress | ResponseT:
    if name == "progress":
        payload = json.loads(data)
        return Progress(epoch=int(payload["epoch"]), loss=payload["loss"])
    if name == "result":
        return model.model_validate_json(data)
    body = json.loads(data)
    raise FitFailed(422, body.get("detail"), body)


class _Base:
    """What both clients share: settings, retry policy and how each call is built."""

    def __init__(
        self, timeout: float, max_retries: int, max_retry_wait: float, binary: bool
    ) -> None:
        self._timeout = httpx.Timeout(timeout, connect=min(timeout, 10.0))
        self._max_retries = max_retries
        self._max_retry_wait = max_retry_wait
        self._binary = binary

    def _wait_or_raise(self, response: httpx.Response, attempt: int) -> float:
        """Seconds to wait before retrying a failed ``response``; raises its error instead
        unless it is a 429/503 with retries left."""
        error = _error(response)
        if not isinstance(error, Overloaded) or attempt >= self._max_retries:
            raise error
        return min(error.retry_after, self._max_retry_wait)

    def _linear(
        self, path: str, x: Values, y: Values, options: dict[str, Any], accept: str | None = None
    ) -> _Call:
        return _fit_call(path, LinearOptions, {"x": x, "y": y}, options, self._binary, accept)

    def _gaussian(
        self, path: str, y: Values, options: dict[str, Any], accept: str | None = None
    ) -> _Call:
        return _fit_call(path, GaussianOptions, {"y": y}, options, self._binary, accept)


# -- the clients ---------------------------------------------------------------------------------


class Client(_Base):
    """Blocking client. Use as a context manager, or call :meth:`close`."""

    def __init__(
        self,
        base_url: str = "http://localhost:8000",
        *,
        timeout: float = 120.0,
        max_retries: int = 3,
        max_retry_wait: float = 30.0,
        binary: bool = True,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(timeout, max_retries, max_retry_wait, binary)
        self._http = httpx.Client(base_url=base_url, timeout=self._timeout, transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def fit_linear(self, x: Values, y: Values, **options: Any) -> LinearFitResponse:
        return self._model(self._linear("/v1/fits/linear", x, y, options), LinearFitResponse)

    def fit_gaussian(self, y: Values, **options: Any) -> GaussianFitResponse:
        return self._model(self._gaussian("/v1/fits/gaussian", y, options), GaussianFitResponse)

    def fit_linear_batch(
        self, datasets: Sequence[Mapping[str, Any]], **options: Any
    ) -> LinearBatchResponse:
        return self._model(_batch_call("linear", datasets, options), LinearBatchResponse)

    def fit_gaussian_batch(
        self, datasets: Sequence[Mapping[str, Any]], **options: Any
    ) -> GaussianBatchResponse:
        return self._model(_batch_call("gaussian", datasets, options), GaussianBatchResponse)

    def stream_linear(
        self, x: Values, y: Values, **options: Any
    ) -> Iterator[Progress | LinearFitResponse]:
        call = self._linear("/v1/fits/linear", x, y, options, STREAM)
        return self._stream(call, LinearFitResponse)

    def stream_gaussian(
        self, y: Values, **options: Any
    ) -> Iterator[Progress | GaussianFitResponse]:
        call = self._gaussian("/v1/fits/gaussian", y, options, STREAM)
        return self._stream(call, GaussianFitResponse)

    def plot_linear(self, x: Values, y: Values, **options: Any) -> bytes:
        """PNG bytes."""
        return self._send(self._linear("/v1/plots/linear", x, y, options)).content

    def plot_gaussian(self, y: Values, **options: Any) -> bytes:
        """PNG bytes."""
        return self._send(self._gaussian("/v1/plots/gaussian", y, options)).content

    def fit_expression(
        self,
        x: Values | Mapping[str, Values],
        y: Values,
        expression: str | None = None,
        parameters: Mapping[str, float] | None = None,
        *,
        model: str | None = None,
        **options: Any,
    ) -> ExpressionFitResponse:
        """Fit ``expression`` (or the named ``model``) from ``parameters``' starting values."""
        call = _expression_call("/v1/fits/expression", x, y, expression, model, parameters, options)
        return self._model(call, ExpressionFitResponse)

    def fit_expression_batch(
        self,
        datasets: Sequence[Mapping[str, Any]],
        expression: str | None = None,
        parameters: Mapping[str, float] | None = None,
        *,
        model: str | None = None,
        **options: Any,
    ) -> ExpressionBatchResponse:
        """Fit ``expression`` (or the named ``model``) to every data set in one call; each
        set is ``{"x", "y", "weights"? or "sigma"?, "parameters"?}``."""
        call = _expression_batch_call(datasets, expression, model, parameters, options)
        return self._model(call, ExpressionBatchResponse)

    def plot_expression(
        self,
        x: Values | Mapping[str, Values],
        y: Values,
        expression: str | None = None,
        parameters: Mapping[str, float] | None = None,
        *,
        model: str | None = None,
        **options: Any,
    ) -> bytes:
        """PNG bytes: data and fit, residuals, loss."""
        call = _expression_call(
            "/v1/plots/expression", x, y, expression, model, parameters, options
        )
        return self._send(call).content

    def fit_expression_global(
        self,
        datasets: Sequence[Mapping[str, Any]],
        expression: str | None = None,
        parameters: Mapping[str, float] | None = None,
        *,
        shared: Sequence[str],
        model: str | None = None,
        **options: Any,
    ) -> GlobalFitResponse:
        """One expression over every data set, the ``shared`` parameters common to all and
        the others each set's own, as one least-squares problem."""
        call = _global_call(datasets, expression, model, parameters, shared, options)
        return self._model(call, GlobalFitResponse)

    def compare(
        self,
        x: Values | Mapping[str, Values],
        y: Values,
        models: Sequence[Mapping[str, Any]],
        **options: Any,
    ) -> CompareResponse:
        """Fit ``models`` to one data set and rank them (AICc, Akaike weights, BIC; F-tests
        for the ``nested`` pairs)."""
        return self._model(_compare_call(x, y, models, options), CompareResponse)

    def evaluate(
        self,
        x: Values | Mapping[str, Values],
        params: Mapping[str, float],
        expression: str | None = None,
        *,
        model: str | None = None,
        **options: Any,
    ) -> EvaluateResponse:
        """A stored fit's model at ``x``, with its bands given its ``covariance``."""
        call = _evaluate_call(x, params, expression, model, options)
        return self._model(call, EvaluateResponse)

    def models(self) -> ModelList:
        """The named models."""
        return self._model(_Call("GET", "/v1/models"), ModelList)

    def linear_dataset(self, n: int, **options: Any) -> Dataset:
        return self._model(_dataset_call("linear", {"n": n, **options}), Dataset)

    def gaussian_dataset(self, n: int, **options: Any) -> Dataset:
        return self._model(_dataset_call("gaussian", {"n": n, **options}), Dataset)

    def ready(self) -> bool:
        return self._http.get("/readyz").status_code == 200

    def _model(self, call: _Call, model: type[ResponseT]) -> ResponseT:
        return model.model_validate_json(self._send(call).content)

    def _send(self, call: _Call) -> httpx.Response:
        for attempt in itertools.count():
            response = self._http.send(call.request(self._http))
            if response.is_success:
                break
            time.sleep(self._wait_or_raise(response, attempt))
        return response

    def _stream(self, call: _Call, model: type[ResponseT]) -> Iterator[Progress | ResponseT]:
        for attempt in itertools.count():
            with self._http.stream(call.method, call.path, **call.arguments()) as response:
                if response.is_success:
                    events = _Events()
                    for line in response.iter_lines():
                        if (parsed := events.feed(line)) is not None:
                            yield _event(*parsed, model)
                    return
                response.read()
            time.sleep(self._wait_or_raise(response, attempt))


class AsyncClient(_Base):
    """The same methods as :class:`Client`, as coroutines (streams as async iterators)."""

    def __init__(
        self,
        base_url: str = "http://localhost:8000",
        *,
        timeout: float = 120.0,
        max_retries: int = 3,
        max_retry_wait: float = 30.0,
        binary: bool = True,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(timeout, max_retries, max_retry_wait, binary)
        self._http = httpx.AsyncClient(
            base_url=base_url, timeout=self._timeout, transport=transport
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def fit_linear(self, x: Values, y: Values, **options: Any) -> LinearFitResponse:
        call = self._linear("/v1/fits/linear", x, y, options)
        return await self._model(call, LinearFitResponse)

    async def fit_gaussian(self, y: Values, **options: Any) -> GaussianFitResponse:
        call = self._gaussian("/v1/fits/gaussian", y, options)
        return await self._model(call, GaussianFitResponse)

    async def fit_linear_batch(
        self, datasets: Sequence[Mapping[str, Any]], **options: Any
    ) -> LinearBatchResponse:
        return await self._model(_batch_call("linear", datasets, options), LinearBatchResponse)

    async def fit_gaussian_batch(
        self, datasets: Sequence[Mapping[str, Any]], **options: Any
    ) -> GaussianBatchResponse:
        return await self._model(_batch_call("gaussian", datasets, options), GaussianBatchResponse)

    def stream_linear(
        self, x: Values, y: Values, **options: Any
    ) -> AsyncIterator[Progress | LinearFitResponse]:
        call = self._linear("/v1/fits/linear", x, y, options, STREAM)
        return self._stream(call, LinearFitResponse)

    def stream_gaussian(
        self, y: Values, **options: Any
    ) -> AsyncIterator[Progress | GaussianFitResponse]:
        call = self._gaussian("/v1/fits/gaussian", y, options, STREAM)
        return self._stream(call, GaussianFitResponse)

    async def plot_linear(self, x: Values, y: Values, **options: Any) -> bytes:
        return (await self._send(self._linear("/v1/plots/linear", x, y, options))).content

    async def plot_gaussian(self, y: Values, **options: Any) -> bytes:
        return (await self._send(self._gaussian("/v1/plots/gaussian", y, options))).content

    async def fit_expression(
        self,
        x: Values | Mapping[str, Values],
        y: Values,
        expression: str | None = None,
        parameters: Mapping[str, float] | None = None,
        *,
        model: str | None = None,
        **options: Any,
    ) -> ExpressionFitResponse:
        """Fit ``expression`` (or the named ``model``) from ``parameters``' starting values."""
        call = _expression_call("/v1/fits/expression", x, y, expression, model, parameters, options)
        return await self._model(call, ExpressionFitResponse)

    async def fit_expression_batch(
        self,
        datasets: Sequence[Mapping[str, Any]],
        expression: str | None = None,
        parameters: Mapping[str, float] | None = None,
        *,
        model: str | None = None,
        **options: Any,
    ) -> ExpressionBatchResponse:
        """As :meth:`Client.fit_expression_batch`."""
        call = _expression_batch_call(datasets, expression, model, parameters, options)
        return await self._model(call, ExpressionBatchResponse)

    async def plot_expression(
        self,
        x: Values | Mapping[str, Values],
        y: Values,
        expression: str | None = None,
        parameters: Mapping[str, float] | None = None,
        *,
        model: str | None = None,
        **options: Any,
    ) -> bytes:
        call = _expression_call(
            "/v1/plots/expression", x, y, expression, model, parameters, options
        )
        return (await self._send(call)).content

    async def fit_expression_global(
        self,
        datasets: Sequence[Mapping[str, Any]],
        expression: str | None = None,
        parameters: Mapping[str, float] | None = None,
        *,
        shared: Sequence[str],
        model: str | None = None,
        **options: Any,
    ) -> GlobalFitResponse:
        """As :meth:`Client.fit_expression_global`."""
        call = _global_call(datasets, expression, model, parameters, shared, options)
        return await self._model(call, GlobalFitResponse)

    async def compare(
        self,
        x: Values | Mapping[str, Values],
        y: Values,
        models: Sequence[Mapping[str, Any]],
        **options: Any,
    ) -> CompareResponse:
        """As :meth:`Client.compare`."""
        return await self._model(_compare_call(x, y, models, options), CompareResponse)

    async def evaluate(
        self,
        x: Values | Mapping[str, Values],
        params: Mapping[str, float],
        expression: str | None = None,
        *,
        model: str | None = None,
        **options: Any,
    ) -> EvaluateResponse:
        """As :meth:`Client.evaluate`."""
        call = _evaluate_call(x, params, expression, model, options)
        return await self._model(call, EvaluateResponse)

    async def models(self) -> ModelList:
        return await self._model(_Call("GET", "/v1/models"), ModelList)

    async def linear_dataset(self, n: int, **options: Any) -> Dataset:
        return await self._model(_dataset_call("linear", {"n": n, **options}), Dataset)

    async def gaussian_dataset(self, n: int, **options: Any) -> Dataset:
        return await self._model(_dataset_call("gaussian", {"n": n, **options}), Dataset)

    async def ready(self) -> bool:
        return (await self._http.get("/readyz")).status_code == 200

    async def _model(self, call: _Call, model: type[ResponseT]) -> ResponseT:
        return model.model_validate_json((await self._send(call)).content)

    async def _send(self, call: _Call) -> httpx.Response:
        for attempt in itertools.count():
            response = await self._http.send(call.request(self._http))
            if response.is_success:
                break
            await asyncio.sleep(self._wait_or_raise(response, attempt))
        return response

    async def _stream(
        self, call: _Call, model: type[ResponseT]
    ) -> AsyncIterator[Progress | ResponseT]:
        for attempt in itertools.count():
            async with self._http.stream(call.method, call.path, **call.arguments()) as response:
                if response.is_success:
                    events = _Events()
                    async for line in response.aiter_lines():
                        if (parsed := events.feed(line)) is not None:
                            yield _event(*parsed, model)
                    return
                await response.aread()
            await asyncio.sleep(self._wait_or_raise(response, attempt))


STREAM = "text/event-stream"
