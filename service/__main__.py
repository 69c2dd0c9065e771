"""``python -m service``: serve tapefit with uvicorn, configured from ``TAPEFIT_*``."""

from __future__ import annotations

import logging
import logging.config
import os
import sys
import threading
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn

from service.logs import capture_native_stderr, logging_config
from service.processes import name_process
from service.settings import Settings, get_settings

if TYPE_CHECKING:
    from service.worker import FitWorker

log = logging.getLogger("service")


class DrainingServer(uvicorn.Server):
    """uvicorn, with a drain phase on SIGTERM/SIGINT.

    The first signal turns /readyz and new fits to 503 at once while the listener stays open
    for ``drain_s`` seconds (load balancers see the pod leave); then uvicorn's own graceful
    shutdown closes the listener and gives in-flight requests ``timeout_graceful_shutdown``
    seconds. A second signal skips the drain.
    """

    def __init__(self, config: uvicorn.Config, worker: FitWorker, drain_s: float) -> None:
        super().__init__(config)
        self.worker = worker
        self.drain_s = drain_s
        self._drain_timer: threading.Timer | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_timer is not None or self.drain_s <= 0:
            super().handle_exit(sig, frame)
            return
        self.worker.begin_drain()
        log.info("draining before shutdown", extra={"signal": sig, "drain_s": self.drain_s})
        self._drain_timer = threading.Timer(self.drain_s, super().handle_exit, (sig, None))
        self._drain_timer.daemon = True
        self._drain_timer.start()


def build_server(settings: Settings) -> DrainingServer:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's own INFO lines
    from service import tracing
    from service.app import create_app  # imports TensorFlow: after logging is set up

    tracing.configure("tapefit-server")  # only if OTEL_EXPORTER_OTLP_*ENDPOINT asks for it

    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=logging_config(settings.log_level),
        access_log=False,  # service.api.observe.ObservedRequests writes one JSON line per request
        timeout_graceful_shutdown=int(settings.shutdown_grace_s),
        timeout_keep_alive=max(1, round(settings.keep_alive_s)),
        workers=1,  # scale with replicas: TensorFlow is not fork-safe
    )
    return DrainingServer(config, app.state.worker, settings.shutdown_drain_s)


#: How long a thread may hold the GIL while others wait for it (CPython's default is 5 ms).
#: Fit, parse and serialization threads do Python work; with several of them the event loop
#: would wait up to that long at every await, and a probe crosses several.
SWITCH_INTERVAL_S = 0.001


def main() -> None:
    settings = get_settings()
    name_process("tapefit-server")
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    logging.config.dictConfig(logging_config(settings.log_level))
    capture_native_stderr()  # before TensorFlow is imported: its C++ lines become JSON too
    try:
        build_server(settings).run()
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown
        raise SystemExit(130) from None  # 128 + SIGINT, as a shell reports it, no traceback


if __name__ == "__main__":
    main()
