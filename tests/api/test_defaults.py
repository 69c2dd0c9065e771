"""Defaults as behaviour: a request with options omitted gets exactly the answer of the same
request with every default the OpenAPI document advertises spelled out.

The defaults are read from the served document (what /docs and generated clients show), not
from a list kept here, so a new field cannot be forgotten and a default that the code path
does not honour fails."""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np
import pytest

pytestmark = pytest.mark.anyio

RNG = np.random.default_rng(11)
X = RNG.uniform(100.0, 110.0, 40)
LINE = {"x": X.tolist(), "y": (3.0 * X - 7.0 + RNG.normal(0, 0.5, 40)).tolist(), "seed": 3}
SAMPLES = {"y": RNG.normal(5.0, 2.0, 60).tolist()}
SETS = {
    "datasets": [
        {"x": [0.0, 1.0, 2.0, 3.0], "y": [1.0, 2.9, 5.2, 7.1]},
        {"x": [10.0, 11.0, 12.5], "y": [-1.0, -3.1, -6.0]},
    ],
    "seed": 3,
}
GAUSSIAN_SETS = {"datasets": [{"y": [1.0, 2.0, 4.0]}, {"y": [10.0, 10.5, 9.0, 11.0]}]}

CASES = [
    ("/v1/fits/linear", "LinearFitRequest", LINE),
    ("/v1/fits/gaussian", "GaussianFitRequest", SAMPLES),
    ("/v1/fits/linear/batch", "LinearBatchRequest", SETS),
    ("/v1/fits/gaussian/batch", "GaussianBatchRequest", GAUSSIAN_SETS),
    ("/v1/datasets/linear", "LinearDatasetRequest", {"n": 20, "seed": 4}),
    ("/v1/datasets/gaussian", "GaussianDatasetRequest", {"n": 20, "seed": 4}),
]


def advertised_defaults(document: dict[str, Any], component: str) -> dict[str, Any]:
    properties = document["components"]["schemas"][component]["properties"]
    return {name: spec["default"] for name, spec in properties.items() if "default" in spec}


@pytest.mark.parametrize(("url", "component", "body"), CASES, ids=[c[1] for c in CASES])
async def test_omitted_options_equal_their_advertised_defaults(
    client: httpx.AsyncClient, url: str, component: str, body: dict[str, Any]
) -> None:
    document = (await client.get("/openapi.json")).json()
    defaults = advertised_defaults(document, component)
    assert defaults, component
    spelled = {**defaults, **body}  # the data (and seed) as given, every option explicit
    first = await client.post(url, json=body)
    second = await client.post(url, json=spelled)
    assert first.status_code == second.status_code == 200, (first.text, second.text)
    assert first.json() == second.json()


async def test_every_option_has_an_advertised_default(client: httpx.AsyncClient) -> None:
    """Each optional field documents its default (else the test above could not hold it)."""
    document = (await client.get("/openapi.json")).json()
    for _, component, _ in CASES:
        schema = document["components"]["schemas"][component]
        optional = set(schema["properties"]) - set(schema.get("required", []))
        assert optional <= set(advertised_defaults(document, component)), component


async def test_the_documented_defaults_are_the_readme_ones(client: httpx.AsyncClient) -> None:
    """The numbers the README and /docs promise, as served."""
    document = (await client.get("/openapi.json")).json()
    linear = advertised_defaults(document, "LinearFitRequest")
    expected = {
        "learning_rate": 0.1,
        "epochs": 1000,
        "optimizer": "sgd",
        "scaling": "standardize",
        "momentum": 0.9,
        "beta_1": 0.9,
        "beta_2": 0.999,
        "epsilon": 1e-7,
        "patience": 10,
        "tolerance": None,
        "gradient_tolerance": None,
        "history_every": None,
        "progress_every": None,
    }
    assert {k: linear[k] for k in expected} == expected
    assert advertised_defaults(document, "GaussianFitRequest")["reduction"] == "mean"
    dataset = advertised_defaults(document, "LinearDatasetRequest")
    assert (dataset["slope"], dataset["intercept"], dataset["noise_std"]) == (1.0, 2.0, 0.15)
