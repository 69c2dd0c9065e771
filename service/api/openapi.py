"""OpenAPI for routes that read their body themselves.

The fit routes parse their JSON off the event loop (see :mod:`service.worker`), so FastAPI
does not see a body parameter. Their request schemas are declared here instead: the route
gets an ``openapi_extra`` request body referring to a component, and the components are
merged into the generated document.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

REF = "#/components/schemas/{model}"


def json_body(model: type[BaseModel], examples: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``openapi_extra`` declaring a required JSON body of ``model`` with named examples."""
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


def install_openapi(app: FastAPI, body_models: list[type[BaseModel]]) -> None:
    """Generate the document once, with ``body_models`` (and what they use) as components."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
            tags=app.openapi_tags,
        )
        _, defs = models_json_schema(
            [(model, "validation") for model in body_models], ref_template=REF
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name, definition in defs.get("$defs", {}).items():
            components.setdefault(name, definition)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
