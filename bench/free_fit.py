"""A diagnostic, never a server to run: tapefit with each fit computed once and its result
reused for every later request of the same model, size and training (the bench posts one
body over and over). Everything else runs as in ``python -m service``: admission, parsing,
the worker, metrics, middleware, the answer. Against the peer it shows what everything but
the fit costs. ``python -m bench.free_fit PORT``."""

from __future__ import annotations

import os
import sys
from typing import Any

from service.fitting import loop


def _reusing_fits() -> None:
    fit = loop.FitEngine.fit
    results: dict[tuple[Any, ...], Any] = {}

    def reused(self: loop.FitEngine, model: Any, *data: Any, **options: Any) -> Any:
        key = (str(model), len(data[0]), options.get("epochs"), options.get("learning_rate"))
        if key not in results:
            results[key] = fit(self, model, *data, **options)
        return results[key]

    loop.FitEngine.fit = reused  # type: ignore[method-assign]


if __name__ == "__main__":
    os.environ["TAPEFIT_PORT"] = sys.argv[1]
    os.environ["TAPEFIT_HOST"] = "127.0.0.1"
    os.environ.setdefault("TAPEFIT_LOG_LEVEL", "warning")
    os.environ["TAPEFIT_FIT_PROCESSES"] = "0"  # the fits are reused here, on the event loop
    _reusing_fits()
    from service.__main__ import main

    main()
