"""The least a TensorFlow fitting service does per request, to split the gap to the peer
(:mod:`bench.peer`) into what TensorFlow costs and what tapefit's features cost: FastAPI +
pydantic + the line's moments in numpy + one XLA-compiled ``GradientTape`` loop of
``epochs`` steps on the standardized moments. No statistics, loss history, admission,
deadlines, metrics, request ids or compression. ``python -m bench.tf_peer PORT`` serves it
with the peer's uvicorn configuration."""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import tensorflow as tf
from fastapi import FastAPI

from bench.peer import LinearFit, serve

app = FastAPI()


def _descend(controls: Any) -> Any:
    """Gradient descent on the standardized line's MSE, 1 - 2·m·r + m² + b², from (0, 0)."""
    r, learning_rate, epochs = controls[0], controls[1], tf.cast(controls[2], tf.int32)

    def step(i: Any, p: Any) -> Any:
        with tf.GradientTape() as tape:
            tape.watch(p)
            loss = 1.0 - 2.0 * p[0] * r + p[0] * p[0] + p[1] * p[1]
        return i + 1, p - learning_rate * tape.gradient(loss, p)

    start = [tf.constant(0), tf.zeros([2], tf.float64)]
    return tf.while_loop(lambda i, p: i < epochs, step, start)[1]


_call = tf.function(
    _descend, jit_compile=True, input_signature=[tf.TensorSpec([3], tf.float64)]
).get_concrete_function()


@app.post("/v1/fits/linear")
async def fit_linear(body: LinearFit) -> dict[str, dict[str, float]]:
    x, y = np.asarray(body.x), np.asarray(body.y)
    dx, dy = x - x.mean(), y - y.mean()
    sx, sy = np.sqrt(dx @ dx / x.size), np.sqrt(dy @ dy / x.size)
    controls = [(dx @ dy / x.size) / (sx * sy), body.learning_rate, body.epochs]
    m, b = _call(tf.constant(controls, tf.float64)).numpy()
    slope = m * sy / sx
    return {
        "params": {"slope": float(slope), "intercept": float(y.mean() + sy * b - slope * x.mean())}
    }


if __name__ == "__main__":
    serve(app)
