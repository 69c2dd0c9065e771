"""The fitting engine: TensorFlow + numpy only (no HTTP, no pydantic)."""

from service.fitting.loop import FitEngine, Reduction, StopCheck
from service.fitting.results import (
    DegenerateData,
    FitCancelled,
    FitDiverged,
    FitError,
    FitResult,
    ModelName,
    StopReason,
)
from service.fitting.runtime import configure_threads

__all__ = [
    "DegenerateData",
    "FitCancelled",
    "FitDiverged",
    "FitEngine",
    "FitError",
    "FitResult",
    "ModelName",
    "Reduction",
    "StopCheck",
    "StopReason",
    "configure_threads",
]
