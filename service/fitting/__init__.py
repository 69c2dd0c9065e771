"""The fitting engine: TensorFlow + numpy only (no HTTP, no pydantic).

Importing the package imports neither TensorFlow nor numpy: its plain ``options`` serve the
schemas, the parser process and the client, and everything else loads on first use.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

from service.fitting.options import ModelName, Reduction, StopReason

#: TensorFlow's oneDNN kernels, off before TensorFlow loads (read once, at its first op). They
#: serve float32 work; every fit here is float64, and their primitive cache kept ~800 MiB
#: after one 1e6-point expression fit, never given back (measured: RSS +945 MiB with them,
#: +153 MiB without, after the fit and malloc_trim). Fit times side by side: unchanged for
#: the small fits, the expressions and Newton; 10-20% slower for a 1e5-point line, whose
#: moments are one graph call (docs/performance.md). An operator's own setting wins.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

if TYPE_CHECKING:
    from service.fitting.loop import FitEngine, StopCheck
    from service.fitting.results import (
        DegenerateData,
        FitCancelled,
        FitDiverged,
        FitError,
        FitResult,
    )
    from service.fitting.runtime import configure_threads

#: What loads numpy or TensorFlow, and from where.
_ENGINE = {
    "FitEngine": "service.fitting.loop",
    "StopCheck": "service.fitting.loop",
    "configure_threads": "service.fitting.runtime",
    **dict.fromkeys(
        ("DegenerateData", "FitCancelled", "FitDiverged", "FitError", "FitResult"),
        "service.fitting.results",
    ),
}


def __getattr__(name: str) -> Any:
    if name in _ENGINE:
        return getattr(importlib.import_module(_ENGINE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
