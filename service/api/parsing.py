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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticCustomError

from service.api.schemas import (
    GaussianDatasetRequest,
    LinearDatasetRequest,
    LinearFitRequest,
    constant_error,
    context_limit,
    points_error,
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
    """A validated request whose data arrays were moved out into float64 numpy arrays."""

    request: RequestT
    arrays: dict[str, npt.NDArray[np.float64]]


@dataclass(frozen=True, slots=True)
class Invalid:
    """Validation errors, already safe to render (no input echoed, ctx made JSON-safe)."""

    errors: ErrorList


def sanitize_errors(errors: Iterable[Any]) -> ErrorList:
    """pydantic/FastAPI error dicts without ``input``/``url`` and with JSON-safe ``ctx``."""
    cleaned: ErrorList = []
    for error in errors:
        item: dict[str, Any] = {
            "loc": [part if isinstance(part, int | str) else str(part) for part in error["loc"]],
            "msg": str(error["msg"]),
            "type": str(error["type"]),
        }
        if error.get("ctx"):
            item["ctx"] = {str(k): _json_safe(v) for k, v in error["ctx"].items()}
        cleaned.append(item)
    return cleaned


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
    arrays = {
        name: np.fromiter((v for d in datasets for v in getattr(d, name)), dtype=np.float64)
        for name in names
    }
    arrays["lengths"] = np.array([len(getattr(d, names[0])) for d in datasets], dtype=np.float64)
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
    """The .npy payload as an array viewing ``body``, after checking the header: a real
    dtype, the expected shape, and exactly the bytes that shape needs (a header may claim
    anything)."""
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
    if dtype.hasobject or dtype.kind not in "fiu":
        return _invalid(["body"], "npy_dtype", "the .npy array must hold real numbers")
    expected = "(n,)" if rows == 1 else f"({rows}, n)"
    if len(shape) != (1 if rows == 1 else 2) or (rows > 1 and shape[0] != rows):
        return _invalid(
            ["body"], "npy_shape", f"the .npy array must have shape {expected}, not {shape}"
        )
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


def warm() -> bool:
    """Touch the parsers once (used to start a parser process ahead of traffic)."""
    return isinstance(parse_json(LinearFitRequest, ("x", "y"), b"{}", {}), Invalid)
