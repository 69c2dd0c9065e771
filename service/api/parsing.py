"""Turning request bodies into validated requests plus numpy arrays.

These functions are pure and picklable: the worker runs them inline for small bodies and in a
separate parser process for large ones (pydantic holds the GIL for the whole of a large
parse, which would stall every other request on the event loop). This module must not import
TensorFlow or FastAPI, so that a parser process starts light.
"""

from __future__ import annotations

import io
import json
import math
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from itertools import chain
from typing import Any, Generic, TypeVar

import numpy as np
import numpy.typing as npt
import orjson
from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticCustomError

from service.api.schemas import (
    MAX_GLOBAL_PARAMETERS,
    CompareModel,
    CompareRequest,
    EvaluateRequest,
    ExpressionBatchOptions,
    ExpressionBatchRequest,
    ExpressionData,
    ExpressionFitRequest,
    GaussianDatasetRequest,
    GaussianParams,
    GlobalFitRequest,
    LinearDatasetRequest,
    LinearFitRequest,
    LinearParams,
    check_batch,
    check_batch_starts,
    constant_error,
    context_limit,
    length_error,
    points_error,
)
from service.fitting import catalog
from service.fitting.expression import (
    CONSTANTS,
    FUNCTIONS,
    MIB,
    CompileCost,
    Expression,
    ExpressionError,
    parse,
)

#: Binary bodies: raw little-endian floats (x then y for a line), or one NumPy .npy array.
OCTET_STREAM = "application/octet-stream"
NPY = "application/x-npy"
BINARY_MEDIA_TYPES = (OCTET_STREAM, NPY)
RAW_DTYPES: dict[str, np.dtype[Any]] = {"float64": np.dtype("<f8"), "float32": np.dtype("<f4")}

RequestT = TypeVar("RequestT", bound=BaseModel)

ErrorList = list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Parsed(Generic[RequestT]):
    """A validated request whose data arrays were moved out into float64 numpy arrays
    (``plan``: what a request needs beyond them, e.g. its parsed expression)."""

    request: RequestT
    arrays: dict[str, npt.NDArray[np.float64]]
    plan: Any = None


@dataclass(frozen=True, slots=True)
class Invalid:
    """Validation errors, already safe to render (no input echoed, ctx made JSON-safe)."""

    errors: ErrorList


#: Errors listed per array (the first ones; a count stands for the rest), and in all.
ERRORS_PER_ARRAY = 20
MAX_ERRORS = 100


def sanitize_errors(errors: Iterable[Any]) -> ErrorList:
    """pydantic/FastAPI error dicts without ``input``/``url`` and with JSON-safe ``ctx``; at
    most :data:`ERRORS_PER_ARRAY` for the elements of one array and :data:`MAX_ERRORS` in
    all, each cut followed by one ``more_errors`` entry that counts what it left out (a body
    of 100,000 strings where numbers belong gets a short answer)."""
    cleaned: ErrorList = []
    per_array: dict[tuple[Any, ...], int] = {}
    left_out = 0
    for error in errors:
        loc = [part if isinstance(part, int | str) else str(part) for part in error["loc"]]
        array = tuple(loc[:-1]) if loc and isinstance(loc[-1], int) else None
        if array is not None:
            per_array[array] = per_array.get(array, 0) + 1
            if per_array[array] > ERRORS_PER_ARRAY:
                continue
        if len(cleaned) >= MAX_ERRORS:
            left_out += 1
            continue
        item: dict[str, Any] = {"loc": loc, "msg": str(error["msg"]), "type": str(error["type"])}
        if error.get("ctx"):
            item["ctx"] = {str(k): _json_safe(v) for k, v in error["ctx"].items()}
        cleaned.append(item)
    for array, count in per_array.items():
        if count > ERRORS_PER_ARRAY:
            cleaned.append(_more(list(array), count - ERRORS_PER_ARRAY, "in this array"))
    if left_out:
        cleaned.append(_more([], left_out, "beyond the first ones"))
    return cleaned


def _more(loc: list[Any], count: int, where: str) -> dict[str, Any]:
    return {
        "loc": loc,
        "msg": f"and {count} more errors {where} (not listed)",
        "type": "more_errors",
        "ctx": {"count": count},
    }


def _json_safe(value: Any) -> Any:
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return str(value)


def _errors(exc: ValidationError, where: str) -> Invalid:
    errors = sanitize_errors(exc.errors(include_url=False, include_input=False))
    return Invalid([{**error, "loc": [where, *error["loc"]]} for error in errors])


def _too_many_numbers(body: bytes, arrays: int, context: dict[str, Any]) -> Invalid | None:
    """Refuse, before parsing, a body that holds more numbers than ``arrays`` arrays of
    TAPEFIT_MAX_POINTS could: parsing it would cost ~30 bytes per number for nothing. (Commas
    bound the count from above; one memchr-speed pass.)"""
    limit = context_limit(context, "max_points")
    if limit is None:
        return None
    numbers = body.count(b",") + 1
    if numbers <= arrays * limit + 64:
        return None
    return _invalid(
        ["body"],
        "too_many_points",
        f"the body holds about {numbers} numbers: more than {arrays} arrays of at most "
        f"{limit} points (TAPEFIT_MAX_POINTS) can hold",
    )


def parse_json(
    model: type[RequestT], array_fields: tuple[str, ...], body: bytes, context: dict[str, Any]
) -> Parsed[RequestT] | Invalid:
    """A JSON body of ``model``, its ``array_fields`` (and weights) taken out as arrays."""
    if array_fields and (refused := _too_many_numbers(body, len(array_fields) + 1, context)):
        return refused  # the arrays, and their weights
    try:
        request = model.model_validate_json(body, context=context)
    except ValidationError as exc:
        return _errors(exc, "body")
    if getattr(request, "weights", None) is not None:
        array_fields = (*array_fields, "weights")
    arrays = {name: np.asarray(getattr(request, name), dtype=np.float64) for name in array_fields}
    # Drop the big lists so the request pickles cheaply out of a parser process.
    slim = request.model_copy(update={name: [] for name in array_fields})
    return Parsed(slim, arrays)


def parse_linear_dataset(
    body: bytes, context: dict[str, Any]
) -> Parsed[LinearDatasetRequest] | Invalid:
    return parse_json(LinearDatasetRequest, (), body, context)


def parse_gaussian_dataset(
    body: bytes, context: dict[str, Any]
) -> Parsed[GaussianDatasetRequest] | Invalid:
    return parse_json(GaussianDatasetRequest, (), body, context)


def parse_batch(
    model: type[RequestT], names: tuple[str, ...], k: int, body: bytes, context: dict[str, Any]
) -> Parsed[RequestT] | Invalid:
    """Batches: every set's arrays laid end to end, plus "lengths" and "initial" ([B, k], NaN
    rows where a set gave none)."""
    if refused := _too_many_numbers(body, len(names) + 2, context):  # + lengths, initial
        return refused
    try:
        request = model.model_validate_json(body, context=context)
    except ValidationError as exc:
        return _errors(exc, "body")
    datasets = getattr(request, "datasets")  # noqa: B009  (typed per model)
    lengths = np.array([len(getattr(d, names[0])) for d in datasets], dtype=np.int64)
    total = int(lengths.sum())
    arrays = {
        name: np.fromiter(
            chain.from_iterable(getattr(d, name) for d in datasets), np.float64, count=total
        )
        for name in names
    }
    arrays["lengths"] = lengths.astype(np.float64)
    initial = np.full((len(datasets), k), np.nan)
    for i, d in enumerate(datasets):
        if d.initial is not None:
            initial[i] = tuple(d.initial.model_dump().values())
    arrays["initial"] = initial
    return Parsed(request.model_copy(update={"datasets": []}), arrays)


# -- binary bodies ------------------------------------------------------------------------


def _error(loc: list[str | int], error: PydanticCustomError) -> dict[str, Any]:
    item: dict[str, Any] = {"loc": loc, "msg": error.message(), "type": error.type}
    if error.context:
        item["ctx"] = {k: _json_safe(v) for k, v in error.context.items()}
    return item


def _invalid(loc: list[str | int], kind: str, message: str) -> Invalid:
    return Invalid([_error(loc, PydanticCustomError(kind, message))])


def _query_values(query: Mapping[str, str]) -> dict[str, Any]:
    """Query strings as JSON values where they parse ("0.1" -> 0.1, '{"mean": 1}' -> dict)."""
    values: dict[str, Any] = {}
    for key, raw in query.items():
        try:
            values[key] = json.loads(raw)
        except (ValueError, RecursionError):  # not JSON, or nested past any real option
            values[key] = raw
    return values


def _decode(
    body: bytes, media: str, dtype_name: object, rows: int, epochs: object, context: dict[str, Any]
) -> npt.NDArray[np.float64] | Invalid:
    """The body as a float64 array of shape (rows, n). The size is known from the .npy header
    (or the length) and checked against the limits before anything is allocated."""
    if media == NPY:
        view = _npy_view(body, rows)
    else:
        dtype = RAW_DTYPES.get(str(dtype_name))
        if dtype is None:
            return _invalid(["query", "dtype"], "dtype", 'dtype must be "float64" or "float32"')
        if len(body) % (dtype.itemsize * rows):
            return _invalid(
                ["body"],
                "raw_length",
                f"the body must hold {rows} equal runs of little-endian {dtype.name} values "
                f"({dtype.itemsize * rows}-byte multiples), got {len(body)} bytes",
            )
        view = np.frombuffer(body, dtype=dtype)
    if isinstance(view, Invalid):
        return view
    if (error := points_error(view.size // rows, epochs, context)) is not None:
        return Invalid([_error(["body"], error)])
    return view.astype(np.float64).reshape(rows, -1)


def _npy_view(body: bytes, rows: int) -> npt.NDArray[Any] | Invalid:
    """The .npy payload as an array viewing ``body``, of shape (n,) for one row or
    (rows, n)."""
    view = _npy_array(body)
    if isinstance(view, Invalid):
        return view
    expected = "(n,)" if rows == 1 else f"({rows}, n)"
    if view.ndim != (1 if rows == 1 else 2) or (rows > 1 and view.shape[0] != rows):
        return _invalid(
            ["body"], "npy_shape", f"the .npy array must have shape {expected}, not {view.shape}"
        )
    return view


def _npy_array(body: bytes) -> npt.NDArray[Any] | Invalid:
    """The .npy payload as an array viewing ``body``, after checking the header: a real
    dtype, and exactly the bytes its shape needs (a header may claim anything)."""
    stream = io.BytesIO(body)
    try:
        version = np.lib.format.read_magic(stream)
        shape, fortran, dtype = (
            np.lib.format.read_array_header_1_0(stream)
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0(stream)
        )
    except (ValueError, OSError, EOFError) as exc:
        return _invalid(["body"], "npy_invalid", f"not a readable .npy array: {str(exc)[:200]}")
    except (TypeError, SyntaxError, MemoryError, RecursionError):
        # literal_eval of a hostile header (deep nesting raises MemoryError)
        return _invalid(["body"], "npy_invalid", "not a readable .npy array: bad header")
    if not all(type(d) is int and d >= 0 for d in shape):
        return _invalid(
            ["body"], "npy_invalid", "not a readable .npy array: its shape must be sizes >= 0"
        )
    if dtype.hasobject or dtype.kind not in "fiu":
        return _invalid(["body"], "npy_dtype", "the .npy array must hold real numbers")
    count = math.prod(shape)
    payload = len(body) - stream.tell()
    if payload != count * dtype.itemsize:
        return _invalid(
            ["body"],
            "npy_length",
            f"the .npy header promises {count} values of {dtype.itemsize} bytes, but "
            f"{payload} bytes follow it",
        )
    view = np.frombuffer(body, dtype=dtype, offset=stream.tell())
    return view.reshape(shape, order="F" if fortran else "C")


def _check_array(
    values: npt.NDArray[np.float64],
    name: str,
    epochs: object,
    context: dict[str, Any],
    *,
    distinct: bool,
) -> dict[str, Any] | None:
    if values.size < 2:
        return _error(
            ["body", name],
            PydanticCustomError(
                "too_short",
                "at least 2 points are needed, got {count}",
                {"count": int(values.size)},
            ),
        )
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        return _error(
            ["body", name, int(bad[0])],
            PydanticCustomError("finite_number", "Input should be a finite number"),
        )
    error = points_error(int(values.size), epochs, context) or (
        constant_error(bool(np.all(values == values[0])), name) if distinct else None
    )
    return _error(["body", name], error) if error is not None else None


def parse_binary(
    options_model: type[RequestT],
    names: tuple[str, ...],
    distinct: tuple[bool, ...],
    body: bytes,
    media: str,
    query: Mapping[str, str],
    context: dict[str, Any],
) -> Parsed[RequestT] | Invalid:
    values = _query_values(query)
    if media == NPY and "dtype" in values:
        return _invalid(
            ["query", "dtype"],
            "dtype_with_npy",
            "dtype applies to application/octet-stream bodies only: a .npy array states its "
            "own dtype",
        )
    dtype_name = values.pop("dtype", "float64")
    try:
        options = options_model.model_validate(values, context=context)
    except ValidationError as exc:
        return _errors(exc, "query")
    epochs = getattr(options, "epochs", None)
    decoded = _decode(body, media, dtype_name, len(names), epochs, context)
    if isinstance(decoded, Invalid):
        return decoded
    errors = [
        error
        for name, row, must_vary in zip(names, decoded, distinct, strict=True)
        if (error := _check_array(row, name, epochs, context, distinct=must_vary)) is not None
    ]
    if errors:
        return Invalid(errors)
    return Parsed(
        options, {name: np.ascontiguousarray(row) for name, row in zip(names, decoded, strict=True)}
    )


def parse_batch_binary(
    options_model: type[RequestT],
    names: tuple[str, ...],
    k: int,
    body: bytes,
    media: str,
    query: Mapping[str, str],
    context: dict[str, Any],
) -> Parsed[RequestT] | Invalid:
    """A batch as one .npy array of shape (sets, len(names), n) (one name: (sets, n) too),
    the options in the query string (``media`` is application/x-npy: the route takes nothing
    else); the same arrays as :func:`parse_batch`, every set starting like a single fit. The
    limits of a JSON batch apply, checked on the header's shape before any conversion."""
    try:
        options = options_model.model_validate(_query_values(query), context=context)
    except ValidationError as exc:
        return _errors(exc, "query")
    epochs, every = getattr(options, "epochs", None), getattr(options, "history_every", None)
    data = _npy_sets(body, names, epochs, every, context)
    if isinstance(data, Invalid):
        return data
    sets, _, n = data.shape
    arrays = {name: data[:, a, :].reshape(-1) for a, name in enumerate(names)}
    arrays["lengths"] = np.full(sets, float(n))
    arrays["initial"] = np.full((sets, k), np.nan)
    return Parsed(options, arrays)


def _npy_sets(
    body: bytes, rows: tuple[str, ...], epochs: object, every: object, context: dict[str, Any]
) -> npt.NDArray[np.float64] | Invalid:
    """A binary batch's .npy array as float64 of shape (sets, len(rows), n), each set's
    ``rows`` (one row: (sets, n) too), after what :func:`check_batch` says of a JSON batch
    of as many sets and points (checked on the header's shape before any conversion), and
    every value finite (the first that is not is named)."""
    view = _npy_array(body)
    if isinstance(view, Invalid):
        return view
    if view.ndim == 2 and len(rows) == 1:
        view = view[:, None, :]
    if view.ndim != 3 or view.shape[1] != len(rows) or view.shape[0] < 1:
        expected = f"(sets, {len(rows)}, n)" + (" or (sets, n)" if len(rows) == 1 else "")
        return _invalid(
            ["body"],
            "npy_shape",
            f"the .npy array must have shape {expected}: each set's {', '.join(rows)}; "
            f"not {view.shape}",
        )
    sets, _, n = view.shape
    if n < 2:
        return _invalid(["body"], "too_short", f"at least 2 points are needed, got {n}")
    try:
        check_batch(sets, sets * n, epochs, every, context)
    except PydanticCustomError as error:
        return Invalid([_error(["body"], error)])
    data = view.astype(np.float64)
    bad = np.argwhere(~np.isfinite(data))
    if bad.size:
        i, a, j = (int(v) for v in bad[0])
        return Invalid(
            [
                _error(
                    ["body", "datasets", i, rows[a], j],
                    PydanticCustomError("finite_number", "Input should be a finite number"),
                )
            ]
        )
    return data


def warm() -> bool:
    """Touch the parsers once (used to start a parser process ahead of traffic)."""
    return isinstance(parse_json(LinearFitRequest, ("x", "y"), b"{}", {}), Invalid)


# -- expressions ----------------------------------------------------------------------------

#: Most predictors (named x arrays) of one expression fit.
MAX_VARIABLES = 16
#: Up to this many points, an expression fit's x and y are also read from the body's decimal
#: text in extended precision, for its statistics (one more pass over the body: ~1 µs a
#: number).
EXACT_MAX_POINTS = 100_000


@dataclass(frozen=True, slots=True)
class ExpressionPlan:
    """What a parsed expression fit needs beyond its options and arrays: the expression, the
    named model (if any), the starting values given (a named model's others are guessed
    later) and the bounds."""

    expression: Expression
    named_model: str | None
    given: dict[str, float]
    bounds: dict[str, tuple[float | None, float | None]]


def parse_expression(
    body: bytes, context: dict[str, Any]
) -> Parsed[ExpressionFitRequest] | Invalid:
    """An expression fit: the schema, then the rules JSON Schema cannot state (the
    expression's allow-list, names, lengths, bounds, the work limit), each error located."""
    if refused := _too_many_numbers(body, MAX_VARIABLES + 2, context):
        return refused
    try:
        request = ExpressionFitRequest.model_validate_json(body, context=context)
    except ValidationError as exc:
        return _errors(exc, "body")
    variables = request.variables()
    columns = [request.x] if isinstance(request.x, list) else list(request.x.values())
    errors = _expression_data_errors(request, variables, columns, context, request.epochs)
    plan = None
    if not errors:
        n = len(request.y)
        used = n if request.weights is None else sum(1 for w in request.weights if w > 0)
        plan = _expression_plan(request, variables, n, used, context, errors)
    if plan is not None and request.loss != "linear" and request.starts > 1:
        errors.append(
            _error(
                ["body", "loss"],
                PydanticCustomError(
                    "loss_with_starts",
                    "a robust loss is fitted from one start: give starts 1 (or fit the best "
                    "start's parameters with the loss)",
                ),
            )
        )
        plan = None
    predict = request.predict
    if plan is not None and predict is not None:
        wanted = plan.expression.variables
        if predict.variables() != wanted:
            errors.append(
                _error(
                    ["body", "predict", "x"],
                    PydanticCustomError(
                        "predict_variables",
                        "predict's x must name the fit's variables ({names}), in that order",
                        {"names": ", ".join(wanted)},
                    ),
                )
            )
            plan = None
    if plan is None:
        return Invalid(errors)
    arrays = {
        f"x:{name}": np.asarray(column, dtype=np.float64)
        for name, column in zip(variables, columns, strict=True)
    }
    arrays["y"] = np.asarray(request.y, dtype=np.float64)
    if request.weights is not None:
        arrays["weights"] = np.asarray(request.weights, dtype=np.float64)
    if len(request.y) <= EXACT_MAX_POINTS:
        arrays |= _exact_columns(body, variables)
    slim = request.model_copy(update={"x": [], "y": [], "weights": None})
    return Parsed(slim, arrays, plan)


def parse_expression_batch(
    body: bytes, context: dict[str, Any]
) -> Parsed[ExpressionBatchRequest] | Invalid:
    """An expression batch: the rules of a single expression fit, each data set's located at
    ``["body", "datasets", i, ...]``, and the batch's limits. A set with fewer points than
    parameters is not a request error: its entry answers why. The arrays: each variable's
    and y's values laid end to end, "lengths", "weights" (1 where a set has none) and
    "initial" ([B, k], NaN where neither the shared nor the set's parameters give one)."""
    if refused := _too_many_numbers(body, MAX_VARIABLES + 3, context):
        return refused
    try:
        request = ExpressionBatchRequest.model_validate_json(body, context=context)
    except ValidationError as exc:
        return _errors(exc, "body")
    datasets = request.datasets
    variables = datasets[0].variables()
    lengths = [len(d.y) for d in datasets]
    try:
        check_batch(len(datasets), sum(lengths), request.epochs, request.history_step(), context)
    except PydanticCustomError as error:
        return Invalid([_error(["body", "datasets"], error)])
    try:
        check_batch_starts(len(datasets), sum(lengths), request.starts, context)
    except PydanticCustomError as error:
        return Invalid([_error(["body", "starts"], error)])
    errors = _datasets_errors(datasets, variables, context)
    plan = None
    if not errors:
        plan = _expression_plan(request, variables, max(lengths), None, context, errors)
    if plan is None:
        return Invalid(errors)
    initial = _batch_starts(plan, [d.parameters or {} for d in datasets], errors)
    if initial is None:
        return Invalid(errors)
    arrays = {
        f"x:{name}": np.fromiter(
            chain.from_iterable(d.x if isinstance(d.x, list) else d.x[name] for d in datasets),
            np.float64,
        )
        for name in variables
    }
    arrays["y"] = np.fromiter(chain.from_iterable(d.y for d in datasets), np.float64)
    arrays["weights"] = np.fromiter(
        chain.from_iterable(d.weights or [1.0] * len(d.y) for d in datasets), np.float64
    )
    arrays["weighted"] = np.array([d.weights is not None for d in datasets], np.float64)
    arrays["lengths"] = np.array(lengths, np.float64)
    arrays["initial"] = initial
    if sum(lengths) <= EXACT_MAX_POINTS:  # read again where the statistics need it
        arrays["exact:body"] = np.frombuffer(body, dtype=np.uint8)
    return Parsed(request.model_copy(update={"datasets": []}), arrays, plan)


def parse_expression_batch_binary(
    body: bytes, media: str, query: Mapping[str, str], context: dict[str, Any]
) -> Parsed[ExpressionBatchOptions] | Invalid:
    """An expression batch as one .npy array of shape (sets, variables + 1, n): each set's
    variables (in the order of ``variables``) then y, every set of one length; the options
    in the query string. The same arrays as :func:`parse_expression_batch`."""
    try:
        options = ExpressionBatchOptions.model_validate(_query_values(query), context=context)
    except ValidationError as exc:
        return _errors(exc, "query")
    variables = tuple(options.variables)
    data = _npy_sets(body, (*variables, "y"), options.epochs, options.history_step(), context)
    if isinstance(data, Invalid):
        return data
    sets, _, n = data.shape
    try:
        check_batch_starts(sets, sets * n, options.starts, context)
    except PydanticCustomError as error:
        return Invalid([_error(["query", "starts"], error)])
    errors: ErrorList = []
    for name in variables:
        if not name.isidentifier() or name in FUNCTIONS or name in CONSTANTS:
            errors.append(
                _error(
                    ["query", "variables"],
                    PydanticCustomError(
                        "variable_name",
                        "a variable name must be an identifier and not a function or "
                        "constant: {name}",
                        {"name": name},
                    ),
                )
            )
    plan = None if errors else _expression_plan(options, variables, n, None, context, errors)
    if plan is None:  # the model's fields came in the query string
        return Invalid([e | {"loc": ["query", *e["loc"][1:]]} for e in errors])
    initial = _batch_starts(plan, [{}] * sets, errors)
    if initial is None:
        return Invalid(errors)
    arrays = {f"x:{name}": data[:, a, :].reshape(-1) for a, name in enumerate(variables)}
    arrays["y"] = data[:, -1, :].reshape(-1)
    arrays["weights"] = np.ones(sets * n)
    arrays["weighted"] = np.zeros(sets)
    arrays["lengths"] = np.full(sets, float(n))
    arrays["initial"] = initial
    return Parsed(options, arrays, plan)


def _batch_starts(
    plan: ExpressionPlan, own: list[dict[str, float]], errors: ErrorList
) -> npt.NDArray[np.float64] | None:
    """Each set's starting values ([B, k], NaN where neither the shared nor the set's own
    give one: a named model's guess); None with ``errors`` filled in."""
    names = plan.expression.parameters
    initial = np.full((len(own), len(names)), np.nan)
    for i, given in enumerate(own):
        if unknown := sorted(set(given) - set(names)):
            errors.append(
                _error(
                    ["body", "datasets", i, "parameters"],
                    PydanticCustomError(
                        "unknown_parameter",
                        "no parameter {names}; the parameters are {known}",
                        {"names": ", ".join(unknown), "known": ", ".join(names)},
                    ),
                )
            )
            continue
        start = plan.given | given
        initial[i] = [start.get(name, math.nan) for name in names]
    return None if errors else initial


class ExactDecimals:
    """A batch's data sets read again from the body's decimal text in extended precision,
    on first demand and once: the statistics ask for a set's only where float64's rounding
    of its data could move them (:func:`~service.fitting.models.expression.stats_of_rows`),
    so a batch of noisy data never pays this pass (~0.3 µs a number: 4-5x orjson's parse of
    the whole body). Thread-safe; the body is valid JSON (the schema accepted it)."""

    def __init__(self, body: bytes, variables: tuple[str, ...]) -> None:
        self._body: bytes | None = body
        self._variables = variables
        self._sets: list[tuple[npt.NDArray[Any], ...]] | None = None
        self._lock = threading.Lock()

    def of(self, i: int) -> Callable[[], tuple[npt.NDArray[Any], ...]]:
        """Set ``i``'s variables and y, when called."""
        return partial(self.read, i)

    def read(self, i: int) -> tuple[npt.NDArray[Any], ...]:
        with self._lock:
            if self._sets is None:
                assert self._body is not None
                # Each number as its text, then converted by numpy (exactly, as strtold):
                # 2.5x faster than a longdouble object per number.
                document = json.loads(self._body, parse_float=_text, parse_int=_text)
                self._body = None
                self._sets = [
                    tuple(
                        np.array(column, dtype=np.longdouble)
                        for column in (*_columns(d["x"], self._variables), d["y"])
                    )
                    for d in document["datasets"]
                ]
            return self._sets[i]


def _text(number: str) -> str:
    """A number's decimal text, kept as it is. A Python function, not ``str``: each call
    passes through the interpreter, where a thread waiting for the GIL (the event loop) can
    take it; a C callable would let ``json.loads`` hold it for the whole body."""
    return number


def _columns(x: Any, variables: tuple[str, ...]) -> list[Any]:
    """The variables' arrays of a set's ``x`` (a list for one variable, else by name)."""
    return [x] if isinstance(x, list) else [x[name] for name in variables]


def _exact_columns(body: bytes, variables: tuple[str, ...]) -> dict[str, npt.NDArray[Any]]:
    """x and y as numpy ``longdouble`` straight from their decimal text (float64 would round
    each value first). The body is valid JSON: the schema accepted it."""
    document = json.loads(body, parse_float=_text, parse_int=_text)  # numpy converts, exactly
    columns = _columns(document["x"], variables)
    exact = {
        f"exact:x:{name}": np.array(column, dtype=np.longdouble)
        for name, column in zip(variables, columns, strict=True)
    }
    exact["exact:y"] = np.array(document["y"], dtype=np.longdouble)
    return exact


def _datasets_errors(
    datasets: list[Any], variables: tuple[str, ...], context: dict[str, Any]
) -> ErrorList:
    """Each data set of a batch or a global fit checked as a single fit's data, located at
    ``["body", "datasets", i, ...]``: the variables of the first, lengths, weights."""
    errors: ErrorList = []
    for i, d in enumerate(datasets):
        at: list[str | int] = ["body", "datasets", i]
        if d.variables() != variables:
            errors.append(
                _error(
                    [*at, "x"],
                    PydanticCustomError(
                        "variables",
                        "every data set needs the variables of the first: {names}",
                        {"names": ", ".join(variables)},
                    ),
                )
            )
            continue
        columns = [d.x] if isinstance(d.x, list) else list(d.x.values())
        errors += _expression_data_errors(d, variables, columns, context, None, at)
    return errors


def _expression_data_errors(
    request: ExpressionData,
    variables: tuple[str, ...],
    columns: list[list[float]],
    context: dict[str, Any],
    epochs: int | None,
    at: list[str | int] | None = None,
) -> ErrorList:
    """One data set's errors, located under ``at`` (the body, or a batch's set); with
    ``epochs``, its points against the work limit too."""
    errors: ErrorList = []
    at = ["body"] if at is None else at
    n = len(request.y)
    if not variables or len(variables) > MAX_VARIABLES:
        errors.append(
            _error(
                [*at, "x"],
                PydanticCustomError(
                    "variables", "x needs 1 to {limit} variables", {"limit": MAX_VARIABLES}
                ),
            )
        )
    for name, column in zip(variables, columns, strict=True):
        where: list[str | int] = [*at, "x"] if isinstance(request.x, list) else [*at, "x", name]
        if not name.isidentifier() or name in FUNCTIONS or name in CONSTANTS:
            errors.append(
                _error(
                    where,
                    PydanticCustomError(
                        "variable_name",
                        "a variable name must be an identifier and not a function or constant: "
                        "{name}",
                        {"name": name},
                    ),
                )
            )
        elif (error := length_error(len(column), n, first="x", second="y")) is not None:
            errors.append(_error([*at, "y"], error))
    if request.weights is not None:
        if error := length_error(n, len(request.weights), first="y", second="weights"):
            errors.append(_error([*at, "weights"], error))
        elif sum(1 for w in request.weights if w > 0) < 2:
            errors.append(
                _error(
                    [*at, "weights"],
                    PydanticCustomError(
                        "too_few_weights", "at least 2 points need a positive weight"
                    ),
                )
            )
    if epochs is not None and (error := points_error(n, epochs, context)) is not None:
        errors.append(_error([*at, "y"], error))
    return errors


def _expression_plan(
    request: ExpressionFitRequest
    | ExpressionBatchRequest
    | ExpressionBatchOptions
    | GlobalFitRequest,
    variables: tuple[str, ...],
    n: int,
    used: int | None,
    context: dict[str, Any],
    errors: ErrorList,
) -> ExpressionPlan | None:
    """The parsed expression and its start, or None with ``errors`` filled in. ``n``: the
    points of the (largest) data set, against the work limit (times the starts of a
    multi-start fit: each start fits them); ``used``: its points with a positive weight,
    against the parameters (None: a batch checks each set's)."""
    n *= request.starts
    given = dict(request.parameters or {})
    if (request.expression is None) == (request.model is None):
        errors.append(
            _error(
                ["body", "expression"],
                PydanticCustomError(
                    "expression_or_model", "give either an expression or a named model"
                ),
            )
        )
        return None
    if request.model is not None:
        named = catalog.BY_NAME[request.model]
        text, names = named.expression, list(named.parameters)
        unknown = sorted(set(given) - set(names))
        if unknown:
            errors.append(
                _error(
                    ["body", "parameters"],
                    PydanticCustomError(
                        "unknown_parameter",
                        "{model} has no parameter {names}; its parameters are {known}",
                        {
                            "model": named.name,
                            "names": ", ".join(unknown),
                            "known": ", ".join(names),
                        },
                    ),
                )
            )
            return None
    else:
        if request.parameters is None:
            errors.append(
                _error(
                    ["body", "parameters"],
                    PydanticCustomError(
                        "missing",
                        "parameters (the starting value of each) are required with an expression",
                    ),
                )
            )
            return None
        text, names = str(request.expression), list(given)
    try:
        expression = parse(text, variables, names)
    except ExpressionError as error:
        loc = (
            "parameters"
            if error.kind in ("too_many_parameters", "reserved_name", "no_parameters")
            else "expression"
        )
        errors.append(
            _error(
                ["body", loc],
                PydanticCustomError(f"expression_{error.kind}", "{reason}", {"reason": str(error)}),
            )
        )
        return None
    limit = context_limit(context, "max_expression_complexity")
    if limit is not None and expression.complexity > limit:
        errors.append(
            _error(
                ["body", "expression"],
                PydanticCustomError(
                    "expression_too_complex",
                    "parameters x nodes = {k} x {nodes} = {complexity} exceeds {limit} "
                    "(TAPEFIT_MAX_EXPRESSION_COMPLEXITY): compiling its fit would take about "
                    "{seconds} s and {mib} MiB; write it with fewer parameters or fewer "
                    "operations",
                    {
                        "k": len(names),
                        "nodes": expression.complexity // len(names),
                        "complexity": expression.complexity,
                        "limit": limit,
                        "seconds": round(CompileCost.seconds(expression)),
                        "mib": round(CompileCost.peak_bytes(expression) / MIB),
                    },
                ),
            )
        )
        return None
    limit = context_limit(context, "max_expression_work")
    if limit is not None and n * len(names) > limit:
        errors.append(
            _error(
                ["body"],
                PydanticCustomError(
                    "too_much_expression_work",
                    "points x parameters (x starts) = {work} exceeds {limit} "
                    "(TAPEFIT_MAX_EXPRESSION_WORK)",
                    {"work": n * len(names), "limit": limit},
                ),
            )
        )
        return None
    if used is not None and used < len(names):
        errors.append(
            _error(
                ["body", "y"],
                PydanticCustomError(
                    "too_few_points",
                    "{points} points (with a positive weight) cannot determine {count} "
                    "parameters: give at least {count}",
                    {"points": used, "count": len(names)},
                ),
            )
        )
        return None
    bounds = dict(request.bounds or {})
    for name, (low, high) in bounds.items():
        problem = None
        if name not in names:
            problem = f"{name} is not a parameter"
        elif low is not None and high is not None and not low < high:
            problem = "the lower bound must be below the upper one"
        elif name in given and not (
            (low is None or given[name] >= low) and (high is None or given[name] <= high)
        ):
            problem = "the starting value is outside the bounds"
        if problem is not None:
            errors.append(
                _error(
                    ["body", "bounds", name],
                    PydanticCustomError("bounds", "{problem}", {"problem": problem}),
                )
            )
    if errors:
        return None
    return ExpressionPlan(expression, request.model, given, bounds)


# -- evaluation ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EvaluatePlan:
    """What ``POST /v1/evaluate`` evaluates: a built-in model by name (``expression`` None),
    or an expression (a named model's, or written), with the parameters in covariance order."""

    model: str | None
    expression: Expression | None
    names: tuple[str, ...]
    variables: tuple[str, ...]


#: The parameters of the built-in models, in their order.
_BUILT_IN_PARAMETERS = {
    "linear": tuple(LinearParams.model_fields),
    "gaussian": tuple(GaussianParams.model_fields),
}


def parse_evaluate(body: bytes, context: dict[str, Any]) -> Parsed[EvaluateRequest] | Invalid:
    """An evaluation: the schema, then the model resolved (its parameters named, the
    expression parsed), each error located."""
    if refused := _too_many_numbers(body, MAX_VARIABLES, context):
        return refused
    try:
        request = EvaluateRequest.model_validate_json(body, context=context)
    except ValidationError as exc:
        return _errors(exc, "body")
    plan = _evaluate_plan(request)
    if isinstance(plan, Invalid):
        return plan
    columns = [request.x] if isinstance(request.x, list) else list(request.x.values())
    arrays = {
        f"x:{name}": np.asarray(column, dtype=np.float64)
        for name, column in zip(plan.variables, columns, strict=True)
    }
    return Parsed(request, arrays, plan)


def _evaluate_plan(request: EvaluateRequest) -> EvaluatePlan | Invalid:
    variables = ("x",) if isinstance(request.x, list) else tuple(request.x)
    if (request.expression is None) == (request.model is None):
        return _invalid(
            ["body", "expression"], "expression_or_model", "give either an expression or a model"
        )
    order = tuple(request.parameters or request.params)
    if request.model is not None:
        if request.model in _BUILT_IN_PARAMETERS:
            names, text = _BUILT_IN_PARAMETERS[request.model], None
        elif request.model in catalog.BY_NAME:
            named = catalog.BY_NAME[request.model]
            names, text = tuple(named.parameters), named.expression
        else:
            known = ", ".join((*_BUILT_IN_PARAMETERS, *catalog.NAMES))
            return _invalid(
                ["body", "model"],
                "unknown_model",
                f"no model {request.model!r}; the models are {known}",
            )
        if variables != ("x",):
            return _invalid(["body", "x"], "variables", f"{request.model} takes one variable, x")
        names = order if set(order) == set(names) else names
    else:
        names, text = order, request.expression
    if set(request.params) != set(names) or len(order) != len(names) or set(order) != set(names):
        where = "parameters" if request.parameters is not None else "params"
        return _invalid(
            ["body", where],
            "parameters_mismatch",
            "params must give every "
            f"parameter of the model once ({', '.join(names)}), and `parameters` "
            "(if given) name the same ones",
        )
    expression = None
    if text is not None:
        try:
            expression = parse(text, variables, names)
        except ExpressionError as error:
            about_names = error.kind in ("unknown_name", "unused_parameter", "no_parameters")
            where = "params" if about_names or error.kind == "too_many_parameters" else "expression"
            message = str(error).replace("to parameters (with a starting value)", "to params")
            return _invalid(["body", where], f"expression_{error.kind}", message)
    if request.covariance is not None and len(request.covariance) != len(names):
        return _invalid(
            ["body", "covariance"],
            "covariance_shape",
            f"the covariance must be "
            f"{len(names)} x {len(names)} (one row and column per parameter)",
        )
    return EvaluatePlan(request.model, expression, names, variables)


# -- comparison ---------------------------------------------------------------------------------


def parse_compare(body: bytes, context: dict[str, Any]) -> Parsed[CompareRequest] | Invalid:
    """A comparison: the schema, then each model's fit parsed as its own request would be (an
    expression fit, or a line by Newton's method), its errors located at ``models[i]``, and
    the nested pairs checked. The plan is the list of the models' parsed fits."""
    if refused := _too_many_numbers(body, MAX_VARIABLES + 2, context):
        return refused
    try:
        request = CompareRequest.model_validate_json(body, context=context)
    except ValidationError as exc:
        return _errors(exc, "body")
    data = {"x": request.x, "y": request.y, "weights": request.weights}
    shared = {
        "confidence": request.confidence,
        "absolute_sigma": request.absolute_sigma,
        "epochs": request.epochs,
        "timeout_s": request.timeout_s,
    }
    fits: list[Parsed[Any]] = []
    for i, model in enumerate(request.models):
        one: Parsed[Any] | Invalid
        given = model.model_dump(exclude_none=True)
        if model.model == "linear":
            if set(given) != {"model"}:
                return _invalid(
                    ["body", "models", i],
                    "linear_options",
                    'the line is {"model": "linear"} alone (its fit is exact: no start, no bounds)',
                )
            one = parse_json(
                LinearFitRequest,
                ("x", "y"),
                orjson.dumps(data | shared | {"optimizer": "newton", "seed": 0}),
                context,
            )
        else:
            one = parse_expression(orjson.dumps(data | shared | given), context)
        if isinstance(one, Invalid):
            return Invalid([_located(error, i) for error in one.errors])
        fits.append(one)
    for j, (restricted, full) in enumerate(request.nested or ()):
        problem = None
        if restricted >= len(fits) or full >= len(fits):
            problem = f"indices must be below {len(fits)}, the number of models"
        elif _parameter_count(fits[restricted]) >= _parameter_count(fits[full]):
            problem = "the restricted model must have fewer parameters than the full one"
        if problem is not None:
            return _invalid(["body", "nested", j], "nested", problem)
    arrays = {"y": np.asarray(request.y, dtype=np.float64)}
    slim = request.model_copy(update={"x": [], "y": [], "weights": None})
    return Parsed(slim, arrays, fits)


_MODEL_FIELDS = frozenset(CompareModel.model_fields)


def _located(error: dict[str, Any], i: int) -> dict[str, Any]:
    """A model's parse error, located in the comparison: its own fields under models[i]."""
    loc = list(error["loc"])
    if len(loc) >= 2 and loc[0] == "body" and loc[1] in _MODEL_FIELDS:
        loc = ["body", "models", i, *loc[1:]]
    return error | {"loc": loc}


def _parameter_count(parsed: Parsed[Any]) -> int:
    plan = parsed.plan
    return len(LinearParams.model_fields) if plan is None else len(plan.expression.parameters)


# -- global fits --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GlobalPlan:
    """A global fit's expression and start, and which of its parameters are shared."""

    expression: ExpressionPlan
    shared: tuple[int, ...]
    local: tuple[int, ...]


def parse_global(body: bytes, context: dict[str, Any]) -> Parsed[GlobalFitRequest] | Invalid:
    """A global fit: each set checked as a batch's, the expression planned against all the
    points (times the starts), the shared names checked, and the size of θ bounded."""
    if refused := _too_many_numbers(body, MAX_VARIABLES + 2, context):
        return refused
    try:
        request = GlobalFitRequest.model_validate_json(body, context=context)
    except ValidationError as exc:
        return _errors(exc, "body")
    datasets = request.datasets
    variables = datasets[0].variables()
    points = sum(len(d.y) for d in datasets)
    try:  # the batch's limits on sets and points (one loss history: every = epochs)
        check_batch(len(datasets), points, request.epochs, request.epochs, context)
    except PydanticCustomError as error:
        return Invalid([_error(["body", "datasets"], error)])
    errors = _datasets_errors(datasets, variables, context)
    plan = None
    if not errors:
        plan = _expression_plan(request, variables, points, None, context, errors)
    if plan is None:
        return Invalid(errors)
    names = plan.expression.parameters
    for j, name in enumerate(request.shared):
        if name not in names:
            return _invalid(
                ["body", "shared", j], "unknown_parameter", f"{name} is not a parameter"
            )
    if len(plan.given) < len(names):
        return _invalid(
            ["body", "parameters"], "missing", "a global fit needs every starting value"
        )
    shared = tuple(i for i, name in enumerate(names) if name in request.shared)
    local = tuple(i for i in range(len(names)) if i not in shared)
    size = len(shared) + len(datasets) * len(local)
    used = sum(
        len(d.y) if d.weights is None else sum(1 for w in d.weights if w > 0) for d in datasets
    )
    if size > MAX_GLOBAL_PARAMETERS or used <= size:
        problem = (
            f"shared + sets x locals = {size} parameters: at most {MAX_GLOBAL_PARAMETERS}"
            if size > MAX_GLOBAL_PARAMETERS
            else f"{used} points (with a positive weight) cannot determine {size} parameters"
        )
        return _invalid(["body", "datasets"], "too_many_parameters", problem)
    return Parsed(request, {}, GlobalPlan(plan, shared, local))
