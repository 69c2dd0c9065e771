"""OpenAPI for routes that read their body themselves.

The fit routes parse their JSON off the event loop (see :mod:`service.worker`), so FastAPI
does not see a body parameter. Their request schemas are declared here instead: the route
gets an ``openapi_extra`` request body referring to a component, and the components are
merged into the generated document. Binary bodies have operations of their own
(``…/binary``), so that a generated client offers the query options only where they are
valid.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

REF = "#/components/schemas/{model}"


BINARY = {"type": "string", "format": "binary"}


# These run once, at import (in route decorators): mutmut switches mutants at call time, so it
# could never select them. tests/api/test_binary.py and test_http_manners.py check what they make.
# pragma: no mutate start
def binary_body(
    options: type[BaseModel], layout: str, json_path: str, *, raw: bool = True
) -> dict[str, Any]:
    """``openapi_extra`` for the binary twin of a JSON fit: the data as a binary body, the
    other fields (those of ``options``) in the query string; with ``raw``, raw floats too."""
    described = {"schema": BINARY}
    content = {"application/x-npy": described}
    description = f"`application/x-npy`: one array of {layout}. "
    if raw:
        content = {"application/octet-stream": described, **content}
        description += (
            "`application/octet-stream`: the same values as raw little-endian floats (`dtype` "
            "from the query). "
        )
    return {
        "requestBody": {
            "required": True,
            "description": description
            + f"Every other field of `{json_path}` goes in the query string.",
            "content": content,
        },
        "parameters": _query_parameters(options),
    }


def json_only_body(model: type[BaseModel], examples: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``openapi_extra`` for a required JSON body of ``model`` with named examples."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {"$ref": REF.format(model=model.__name__)},
                    "examples": examples,
                }
            },
        }
    }


#: Query parameters whose values are JSON text (objects and lists), with an example each.
JSON_TEXT = {
    "initial": '{"slope": 0, "intercept": 0}',
    "parameters": '{"a": 1000, "k": 0.001}',
    "bounds": '{"k": [0, null]}',
    "variables": '["x1", "x2"]',
}


def _query_parameters(options: type[BaseModel]) -> list[dict[str, Any]]:
    parameters: list[dict[str, Any]] = []
    properties = options.model_json_schema(ref_template=REF)["properties"]
    for name, field in options.model_fields.items():
        schema = dict(properties[name])
        description = schema.pop("description", field.description or "")
        schema.pop("title", None)
        schema.pop("examples", None)
        # No "default" in the query schema: Swagger UI would pre-fill it and send it along
        # with JSON bodies too. The default is the JSON field's, stated in its description.
        default = schema.pop("default", None)
        if default is not None:
            description += f" Default: {default}."
        if name in JSON_TEXT:
            schema = {"type": "string"}
            description += f" As JSON text, e.g. {JSON_TEXT[name]}."
        parameters.append(
            {
                "name": name,
                "in": "query",
                "required": False,
                "description": description,
                "schema": schema,
            }
        )
    parameters.append(
        {
            "name": "dtype",
            "in": "query",
            "required": False,
            "description": "application/octet-stream only: the raw values' type (default float64).",
            "schema": {"type": "string", "enum": ["float64", "float32"]},
        }
    )
    return parameters


# pragma: no mutate end


def install_openapi(
    app: FastAPI, body_models: list[type[BaseModel]], limits: dict[int, int] | None = None
) -> None:
    """Generate the document once, with ``body_models`` (and what they use) as components;
    ``limits`` replaces schema maxima (a static bound -> the limit this server enforces, so
    that the document states the configured TAPEFIT_MAX_EPOCHS, not the absolute cap)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
            tags=app.openapi_tags,
            servers=app.servers,
            contact=app.contact,
            license_info=app.license_info,
        )
        _, defs = models_json_schema(
            [(model, "validation") for model in body_models], ref_template=REF
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name, definition in defs.get("$defs", {}).items():
            components.setdefault(name, definition)
        _replace_maxima(schema, limits or {})
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _replace_maxima(node: Any, limits: dict[int, int]) -> None:
    if isinstance(node, dict):
        if node.get("maximum") in limits:
            node["maximum"] = limits[node["maximum"]]
        for value in node.values():
            _replace_maxima(value, limits)
    elif isinstance(node, list):
        for value in node:
            _replace_maxima(value, limits)
