"""service.client checks its arguments before sending, with typed errors naming the fields,
and takes numpy arrays anywhere an array goes (no server: a mock transport records requests)."""

from __future__ import annotations

import io
import json

import httpx
import numpy as np
import pytest

from service.client import Client, InvalidArguments, ServerError, ValidationFailed


def _recording() -> tuple[Client, list[httpx.Request]]:
    sent: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(500, json={"detail": "recorded, not served"})

    return Client("http://tapefit", transport=httpx.MockTransport(answer), max_retries=0), sent


def test_mismatched_lengths_are_refused_before_sending_naming_the_fields() -> None:
    client, sent = _recording()
    with pytest.raises(InvalidArguments) as error:
        client.fit_linear([1.0, 2.0, 3.0], [1.0, 2.0])
    assert error.value.fields == ["y"]
    assert "x has 3, y has 2" in error.value.detail[0]["msg"]
    with pytest.raises(InvalidArguments) as weights:
        client.fit_gaussian(np.arange(4.0), weights=[1.0, 1.0])
    assert weights.value.fields == ["weights"]
    with pytest.raises(InvalidArguments) as batch:
        client.fit_linear_batch([{"x": [1.0, 2.0], "y": [1.0, 2.0]}, {"x": [1.0], "y": [1, 2]}])
    assert batch.value.detail[0]["loc"] == ["body", "datasets", 1, "y"]
    assert sent == []


def test_bad_options_are_typed_errors_shaped_like_the_servers_422() -> None:
    client, sent = _recording()
    with pytest.raises(ValidationFailed) as error:  # one except clause for both sides
        client.fit_gaussian([1.0, 2.0, 3.0], learning_rate=-1.0, optimiser="adam")
    assert isinstance(error.value, InvalidArguments)
    assert error.value.status == 422
    assert sorted(error.value.fields) == ["learning_rate", "optimiser"]
    assert all(set(item) == {"loc", "msg", "type"} for item in error.value.detail)
    assert sent == []


def test_numpy_arrays_and_scalars_go_anywhere_an_array_or_number_goes() -> None:
    client, sent = _recording()
    xs = np.linspace(0.0, 1.0, 8).reshape(2, 4)
    datasets = [{"x": x, "y": 2 * x + 1, "initial": {"slope": np.float64(1.5)}} for x in xs]
    with pytest.raises(Exception, match="recorded"):
        client.fit_linear_batch(datasets, epochs=np.int64(10), learning_rate=np.float32(0.5))
    body = json.loads(sent[0].content)
    assert body["datasets"][1]["x"] == xs[1].tolist()
    assert body["datasets"][0]["initial"] == {"slope": 1.5}
    assert (body["epochs"], body["learning_rate"]) == (10, 0.5)
    with pytest.raises(Exception, match="recorded"):
        client.fit_gaussian(np.arange(5.0), epochs=np.int64(3))
    assert sent[1].url.path == "/v1/fits/gaussian/binary"
    assert sent[1].headers["content-type"] == "application/x-npy"
    assert np.load(io.BytesIO(sent[1].content)).tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert sent[1].url.params["epochs"] == "3"


def test_sigma_travels_as_json_and_is_checked_like_weights() -> None:
    """sigma is a per-point array like weights: its length is checked before sending, and
    numpy data with sigma go as JSON (the .npy body has no place for it)."""
    client, sent = _recording()
    with pytest.raises(InvalidArguments) as error:
        client.fit_linear([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], sigma=[1.0, 1.0])
    assert error.value.fields == ["sigma"]
    assert sent == []
    with pytest.raises(ServerError):
        client.fit_linear(np.arange(3.0), np.arange(3.0), sigma=np.ones(3), absolute_sigma=True)
    body = json.loads(sent[-1].content)
    assert sent[-1].url.path == "/v1/fits/linear"
    assert body["sigma"] == [1.0, 1.0, 1.0] and body["absolute_sigma"] is True
    with pytest.raises(ServerError):
        client.fit_expression_batch(
            [{"x": [1.0, 2.0], "y": [1.0, 2.0], "sigma": np.array([0.5, 0.5])}],
            "a*x",
            {"a": 1.0},
            confidence=0.9,
        )
    body = json.loads(sent[-1].content)
    assert body["datasets"][0]["sigma"] == [0.5, 0.5] and body["confidence"] == 0.9
