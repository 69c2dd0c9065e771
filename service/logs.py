"""JSON logs: one line per request with its X-Request-ID, and the same format for all loggers."""

from __future__ import annotations

import logging
import os
import re
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
                    logger.log(native_level(text), text)

    threading.Thread(target=relay, name="native-stderr", daemon=True).start()


#: absl's line prefix: severity (Info, Warning, Error, Fatal), then the date (I0000 00:00...).
_ABSL = re.compile(r"[IWEF]\d{4} ")
#: TensorFlow's start-up notes, printed without a prefix.
_START_UP = (
    "WARNING: All log messages before absl::InitializeLog()",
    "oneDNN custom operations",
    "To enable the following instructions",
    "This TensorFlow",
)


def native_level(line: str) -> int:
    """The level of a line native code wrote: TensorFlow's and absl's start-up chatter (an
    info or warning prefix, or the oneDNN and CPU-feature notes) at DEBUG, so that a newcomer
    does not read it as the service's own; their errors at ERROR; anything else at INFO."""
    if _ABSL.match(line):
        return logging.ERROR if line[0] in "EF" else logging.DEBUG
    if line.startswith(_START_UP) or "cpu_feature_guard" in line:
        return logging.DEBUG
    return logging.INFO


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
