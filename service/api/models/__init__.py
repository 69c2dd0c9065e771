"""Each model's HTTP face, in one place: :class:`HttpModel`.

The routes (:mod:`service.api.routes.fits`, :mod:`service.api.routes.plots`) are made from
these descriptions, for every model alike: ``POST /v1/fits/{name}`` (JSON, or server-sent
events), ``/v1/fits/{name}/binary``, ``/v1/fits/{name}/batch`` (and its ``/binary`` twin),
``/v1/plots/{name}`` and
``/v1/plots/{name}/binary``. A model's engine side is its spec (:mod:`service.fitting.models`);
its HTTP side is its request and response schemas (:mod:`service.api.schemas`), how it is
drawn, and the words and examples of its operations, here.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache, partial
from typing import Any, Literal

from pydantic import BaseModel

from service.api.parsing import (
    Invalid,
    Parsed,
    parse_batch,
    parse_batch_binary,
    parse_binary,
    parse_json,
)
from service.fitting import bands
from service.fitting.bands import Curve
from service.worker import FitResult

Examples = dict[str, dict[str, Any]]
JsonParser = Callable[[bytes, dict[str, Any]], "Parsed[Any] | Invalid"]
BinaryParser = Callable[[bytes, str, Mapping[str, str], dict[str, Any]], "Parsed[Any] | Invalid"]


@dataclass(frozen=True, slots=True)
class Operation:
    """What /docs and generated clients show for one operation."""

    summary: str
    #: Written like a docstring (indented continuation lines), shown like one.
    description: str
    examples: Examples = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "description", inspect.cleandoc(self.description))


@dataclass(frozen=True, slots=True)
class HttpModel:
    """One model over HTTP (see the module's docstring)."""

    #: The engine's model name (its spec), and the URL path segment.
    name: str
    #: The body's arrays, in the spec's order, and which of them must not be constant.
    data: tuple[str, ...]
    must_vary: tuple[bool, ...]
    #: Schemas: the JSON body; the same without the data (the binary twin's query); the
    #: batch body; the parameters and the answers.
    request: type[BaseModel]
    options: type[BaseModel]
    batch_request: type[BaseModel]
    #: The batch body without the data sets (the binary batch's query).
    batch_options: type[BaseModel]
    params: type[BaseModel]
    response: type[BaseModel]
    batch_item: type[BaseModel]
    batch_response: type[BaseModel]
    #: The binary bodies' arrays, in words: one set, and a batch.
    binary_layout: str
    batch_layout: str
    fit: Operation
    fit_binary: Operation
    batch: Operation
    batch_binary: Operation
    plot: Operation
    plot_binary: Operation
    #: The drawing of a fit's PNG: (the parsed request, the result) -> a picklable call that
    #: draws it (it runs in a parser process).
    draw: Callable[[Parsed[Any], FitResult], Callable[[], bytes]]
    #: Request fields that are the spec's model options (e.g. the Gaussian's reduction).
    model_options: tuple[str, ...] = ()
    #: The model at new x, with its Jacobian (``predict``, ``POST /v1/evaluate``).
    curve: Curve = bands.line
    #: The parameter table's distribution: Student's t for least squares (n_used - k degrees
    #: of freedom), the normal for maximum likelihood (which has no observation band).
    distribution: Literal["t", "normal"] = "t"

    @property
    def parse_json(self) -> JsonParser:
        """The JSON body's parser (picklable: it may run in a parser process)."""
        return partial(parse_json, self.request, self.data)

    @property
    def parse_binary(self) -> BinaryParser:
        return partial(parse_binary, self.options, self.data, self.must_vary)

    @property
    def parse_batch(self) -> JsonParser:
        return partial(parse_batch, self.batch_request, self.data, len(self.params.model_fields))

    @property
    def parse_batch_binary(self) -> BinaryParser:
        return partial(
            parse_batch_binary, self.batch_options, self.data, len(self.params.model_fields)
        )

    def options_of(self, body: BaseModel) -> dict[str, Any]:
        """The spec's model options from a parsed body (those it has: a batch of lines
        takes no ``absolute_sigma``)."""
        return {name: getattr(body, name) for name in self.model_options if hasattr(body, name)}

    def has_stat(self, name: str) -> bool:
        """Whether this model's answer reports statistic ``name`` (e.g. r_squared)."""
        return name in _stat_names(self.response)


@cache
def _stat_names(response: type[BaseModel]) -> frozenset[str]:
    """The statistics a response model reports (read once: a batch asks 10,000 times)."""
    stats = response.model_fields["stats"].annotation
    return frozenset(getattr(stats, "model_fields", {}) if isinstance(stats, type) else ())


def _registry() -> dict[str, HttpModel]:
    from service.api.models.gaussian import GAUSSIAN
    from service.api.models.linear import LINEAR

    return {model.name: model for model in (LINEAR, GAUSSIAN)}


#: The built-in models, by name.
BUILT_IN: Mapping[str, HttpModel] = _registry()

__all__ = ["BUILT_IN", "HttpModel", "Operation"]
