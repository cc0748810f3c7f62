"""Structured logs: one JSON object per line (or a text line), with the request id when there is one.

Request-scoped fields (``request_id``, ``method``, ``model``, ``version``,
``code``, ``ms``, ``peer``) are passed as ``extra=`` and become top-level keys.
Every line on stderr is a log record: Python warnings (torch's, NumPy's) are
logged too, under ``py.warnings``, instead of being printed as raw text.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from typing import Any

from segsvc.config import LOG_LEVELS
from segsvc.errors import InvalidArgument

FIELDS = ("request_id", "method", "model", "version", "code", "ms", "peer", "batch_size")


class JsonFormatter(logging.Formatter):
    """``{"ts": ..., "level": ..., "logger": ..., "msg": ..., <request fields>, "exc": ..., "stack": ...}``.

    Always one strict JSON object: a message whose arguments do not fit its format keeps the format and the
    arguments (``logging`` would print a traceback to stderr instead), and a non-finite number becomes text
    (``json`` would write ``NaN``, which is not JSON).
    """

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": _message(record),
        }
        for key in FIELDS:
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        try:
            return json.dumps(entry, default=_text, allow_nan=False)
        except ValueError:  # a NaN or an infinity somewhere in the fields
            return json.dumps(_finite(entry), default=_text, allow_nan=False)


def _message(record: logging.LogRecord) -> str:
    """``record.getMessage()``, or its format and arguments side by side when they do not fit together."""
    try:
        return record.getMessage()
    except Exception as exc:
        return f"{_text(record.msg)} (arguments {_text(record.args)} do not fit it: {type(exc).__name__})"


def _text(value: object) -> str:
    """``str(value)`` for JSON, even for an object whose ``__str__`` fails."""
    try:
        return str(value)
    except Exception:
        return f"<{type(value).__name__}>"


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float written as text ("nan", "inf")."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _finite(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


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
    """Send segsvc's (and grpc's) logs, and Python's warnings, to stderr, as JSON lines or plain text.

    Raises:
        InvalidArgument: ``level`` is not one of ``LOG_LEVELS`` (``logging`` raised a bare ``ValueError``), checked
            before any handler changes.
    """
    if not isinstance(level, str) or level.upper() not in LOG_LEVELS:
        raise InvalidArgument(f"log level must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.captureWarnings(True)  # else warnings.showwarning prints raw lines between the JSON ones
