"""Structured logs: one JSON object per line (or a text line), with the request id when there is one.

Request-scoped fields (``request_id``, ``method``, ``model``, ``version``,
``code``, ``ms``, ``peer``) are passed as ``extra=`` and become top-level keys.
"""

from __future__ import annotations

import json
import logging
import sys
import time

FIELDS = ("request_id", "method", "model", "version", "code", "ms", "peer", "batch_size")


class JsonFormatter(logging.Formatter):
    """``{"ts": ..., "level": ..., "logger": ..., "msg": ..., <request fields>, "exc": ...}``."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in FIELDS:
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """``<time> <level> <logger>: <message> key=value ...``: the request fields that JSON lines carry, so that
    text logs can be traced by request id too (their values were made log-safe where they were set)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (the base class's name)
        fields = " ".join(f"{key}={getattr(record, key)}" for key in FIELDS if hasattr(record, key))
        line = super().formatMessage(record)
        return f"{line} {fields}" if fields else line


def configure_logging(level: str = "INFO", json_lines: bool = True) -> None:
    """Send segsvc's (and grpc's) logs to stderr, as JSON lines or plain text."""
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
