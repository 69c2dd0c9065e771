"""The peer to beat (issue #14): what a user who does not adopt tapefit writes in an afternoon,
FastAPI + pydantic + ``numpy.polyfit``. ``python -m bench.peer PORT`` serves it with the same
uvicorn configuration as ``python -m service`` (one worker, no access log, keep-alive 75 s,
uvicorn's automatic choice of event loop and HTTP parser)."""

from __future__ import annotations

import sys

import numpy as np
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

app = FastAPI()


class LinearFit(BaseModel):
    x: list[float]
    y: list[float]
    epochs: int = 1000
    learning_rate: float = 0.01


@app.post("/v1/fits/linear")
def fit_linear(body: LinearFit) -> dict[str, dict[str, float]]:
    slope, intercept = np.polyfit(body.x, body.y, 1)
    return {"params": {"slope": float(slope), "intercept": float(intercept)}}


def serve(peer: FastAPI) -> None:
    """Serve ``peer`` (with a ``/readyz``) on the port given as the first argument, with the
    same uvicorn configuration as ``python -m service``."""

    @peer.get("/readyz")
    def readyz() -> dict[str, str]:
        return {"status": "ready"}

    uvicorn.run(
        peer,
        host="127.0.0.1",
        port=int(sys.argv[1]),
        log_level="warning",
        access_log=False,
        timeout_keep_alive=75,
    )


if __name__ == "__main__":
    serve(app)
