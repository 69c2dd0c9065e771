"""The custom-model peer to beat (issue #32): FastAPI + pydantic + scipy ``curve_fit``,
hard-coded to NIST's Misra1a, y = b1·(1 - exp(-b2·x)), answering its parameters and
standard errors. ``python -m bench.curve_fit_peer PORT`` serves it with the same uvicorn
configuration as ``python -m service`` (:func:`bench.peer.serve`)."""

from __future__ import annotations

import numpy as np
from fastapi import FastAPI
from pydantic import BaseModel
from scipy.optimize import curve_fit

from bench.peer import serve

app = FastAPI()


class Misra1a(BaseModel):
    x: list[float]
    y: list[float]
    parameters: dict[str, float]


def _model(x: np.ndarray, b1: float, b2: float) -> np.ndarray:
    return np.asarray(b1 * (1.0 - np.exp(-b2 * x)))


@app.post("/v1/fits/expression")
def fit(body: Misra1a) -> dict[str, dict[str, float]]:
    p0 = [body.parameters["b1"], body.parameters["b2"]]
    popt, pcov = curve_fit(_model, np.asarray(body.x), np.asarray(body.y), p0=p0)
    se = np.sqrt(np.diag(pcov))
    return {
        "params": {"b1": float(popt[0]), "b2": float(popt[1])},
        "std_errors": {"b1": float(se[0]), "b2": float(se[1])},
    }


if __name__ == "__main__":
    serve(app)
