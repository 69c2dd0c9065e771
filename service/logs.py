"""JSON logs: one line per request with its X-Request-ID, and the same format for all loggers."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

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
