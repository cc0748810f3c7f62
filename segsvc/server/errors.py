"""Domain errors -> gRPC status on the server side, with the one table from ``segsvc.wire``.

The servicer turns any exception into a status with ``abort``: a ``SegsvcError``
becomes its code from ``ERROR_CODES`` with its own message; anything else is
logged with its traceback and becomes INTERNAL with a generic message naming
the request id (internals never leak to callers). The error's class name
travels in the ``segsvc-error`` trailing metadata (and ``Error.kind`` in
streams), so the client can raise the very same class (``wire.error_from_status``).
"""

from __future__ import annotations

import logging
from typing import NoReturn

import grpc

from segsvc.errors import SegsvcError
from segsvc.wire import ERROR_CODES, ERROR_KIND_KEY, REQUEST_ID_KEY


MAX_ID_CHARS = 128
MAX_MESSAGE_CHARS = 1024  # trailers have a size limit; a client-sized message must not overflow it


def clean_text(text: str, limit: int = MAX_ID_CHARS) -> str:
    """Client text made safe for metadata and logs: printable ASCII, at most ``limit`` characters."""
    head = "".join(c if " " <= c <= "~" else "?" for c in text[: limit + 1])
    return head if len(text) <= limit else head[: limit - 3] + "..."


def status_of(exc: BaseException, request_id: str = "") -> tuple[grpc.StatusCode, str, str]:
    """``(code, message, kind)`` for an exception; unknown exceptions get a generic INTERNAL message."""
    for cls, code in ERROR_CODES:
        if isinstance(exc, cls):
            message = str(exc) or cls.__name__
            if len(message) > MAX_MESSAGE_CHARS:
                message = message[: MAX_MESSAGE_CHARS - 3] + "..."
            return code, message, type(exc).__name__
    where = f" (request id {request_id})" if request_id else ""
    return grpc.StatusCode.INTERNAL, f"internal server error{where}; see the server log", ""


def log_unexpected(logger: logging.Logger, exc: BaseException, request_id: str, method: str) -> None:
    """Log an exception that is not a domain error, with its traceback."""
    if not isinstance(exc, SegsvcError):
        logger.error(
            "%s failed unexpectedly", method, exc_info=exc, extra={"request_id": request_id, "method": method}
        )


async def abort(context: grpc.aio.ServicerContext, exc: BaseException, request_id: str, method: str,
                logger: logging.Logger) -> NoReturn:
    """End the RPC with the status for ``exc`` (logging unexpected ones)."""
    code, message, kind = status_of(exc, request_id)
    log_unexpected(logger, exc, request_id, method)
    context.set_trailing_metadata(((ERROR_KIND_KEY, kind), (REQUEST_ID_KEY, clean_text(request_id))))
    await context.abort(code, message)
