"""Turning request bodies into validated requests plus numpy arrays.

These functions are pure and picklable: the worker runs them inline for small bodies and in a
separate parser process for large ones (pydantic holds the GIL for the whole of a large
parse, which would stall every other request on the event loop). This module must not import
TensorFlow or FastAPI, so that a parser process starts light.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ValidationError

from service.api.schemas import GaussianFitRequest, LinearFitRequest

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


def _parse(
    model: type[RequestT], array_fields: tuple[str, ...], body: bytes, context: dict[str, Any]
) -> Parsed[RequestT] | Invalid:
    try:
        request = model.model_validate_json(body, context=context)
    except ValidationError as exc:
        return Invalid(sanitize_errors(exc.errors(include_url=False, include_input=False)))
    arrays = {name: np.asarray(getattr(request, name), dtype=np.float64) for name in array_fields}
    # Drop the big lists so the request pickles cheaply out of a parser process.
    slim = request.model_copy(update={name: [] for name in array_fields})
    return Parsed(slim, arrays)


def parse_linear(body: bytes, context: dict[str, Any]) -> Parsed[LinearFitRequest] | Invalid:
    return _parse(LinearFitRequest, ("x", "y"), body, context)


def parse_gaussian(body: bytes, context: dict[str, Any]) -> Parsed[GaussianFitRequest] | Invalid:
    return _parse(GaussianFitRequest, ("y",), body, context)


def warm() -> bool:
    """Touch the parsers once (used to start a parser process ahead of traffic)."""
    return isinstance(parse_linear(b"{}", {}), Invalid)
