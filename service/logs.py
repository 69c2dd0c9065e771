"""JSON logs: one line per request with its X-Request-ID, and the same format for all loggers."""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

ACCESS_LOGGER = "service.access"


NATIVE_LOGGER = "stderr"


def capture_native_stderr() -> None:
    """Send whatever native code writes to file descriptor 2 (TensorFlow's and absl's C++
    logging, which ignores TF_CPP_MIN_LOG_LEVEL for its start-up lines) through the JSON
    logger, one record per line, so that every line the service prints is JSON."""
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    logger = logging.getLogger(NATIVE_LOGGER)

    def relay() -> None:
        with os.fdopen(read_end, "r", errors="replace") as lines:
            for line in lines:
                if text := line.rstrip():
                    logger.info(text)

    threading.Thread(target=relay, name="native-stderr", daemon=True).start()


class PlainRecord(logging.Filter):
    """Drop uvicorn's ``color_message`` (the message again, with ANSI colour escapes)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.__dict__.pop("color_message", None)
        return True


def logging_config(level: str) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` mapping: every record as one JSON object on stdout."""
    level = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {
            "request_id": {
                "()": "asgi_correlation_id.CorrelationIdFilter",
                "default_value": None,
            },
            "plain": {"()": "service.logs.PlainRecord"},
        },
        "formatters": {
            "json": {
                "()": "pythonjsonlogger.json.JsonFormatter",
                "fmt": "%(levelname)s %(name)s %(message)s",
                "rename_fields": {
                    "levelname": "level",
                    "name": "logger",
                    "correlation_id": "request_id",
                },
                "timestamp": "time",
            }
        },
        "handlers": {
            "stdout": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stdout",
                "formatter": "json",
                "filters": ["request_id", "plain"],
            }
        },
        "loggers": {
            "uvicorn": {"level": level},
            "uvicorn.error": {"level": level},
            "uvicorn.access": {"level": "WARNING"},  # replaced by service.access
            "service": {"level": level},
        },
        "root": {"handlers": ["stdout"], "level": level},
    }


def valid_request_id(value: str) -> bool:
    """Accept a client's X-Request-ID if it is short printable ASCII without spaces."""
    return 0 < len(value) <= 128 and value.isascii() and value.isprintable() and " " not in value


class AccessLogMiddleware:
    """Logs one line per HTTP request: method, path, status, duration (request id via filter)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.log = logging.getLogger(ACCESS_LOGGER)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            client = scope.get("client")
            self.log.info(
                "request",
                extra={
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "duration_ms": round((time.perf_counter() - start) * 1000, 3),
                    "client": f"{client[0]}:{client[1]}" if client else None,
                },
            )
