"""The one table between domain errors and gRPC status codes, used in both directions.

The servicer turns any exception into a status with ``abort``: a ``SegsvcError``
becomes its code from ``ERROR_CODES`` with its own message; anything else is
logged with its traceback and becomes INTERNAL with a generic message naming
the request id (internals never leak to callers). The error's class name
travels in the ``segsvc-error`` trailing metadata (and ``Error.kind`` in
streams), so the client can raise the very same class; ``error_from_status``
does that mapping.
"""

from __future__ import annotations

import logging
from typing import NoReturn

import grpc

from segsvc import errors
from segsvc.errors import SegsvcError

ERROR_KIND_KEY = "segsvc-error"
REQUEST_ID_KEY = "x-request-id"

# Most specific first: the first matching row wins.
ERROR_CODES: tuple[tuple[type[SegsvcError], grpc.StatusCode], ...] = (
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.ArtifactError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.Cancelled, grpc.StatusCode.CANCELLED),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
)

_CODE_TO_ERROR: dict[grpc.StatusCode, type[SegsvcError]] = {code: cls for cls, code in ERROR_CODES}
_CODE_BY_VALUE: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}


def status_of(exc: BaseException, request_id: str = "") -> tuple[grpc.StatusCode, str, str]:
    """``(code, message, kind)`` for an exception; unknown exceptions get a generic INTERNAL message."""
    for cls, code in ERROR_CODES:
        if isinstance(exc, cls):
            return code, str(exc) or cls.__name__, type(exc).__name__
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
    context.set_trailing_metadata(((ERROR_KIND_KEY, kind), (REQUEST_ID_KEY, request_id)))
    await context.abort(code, message)


def code_of(value: int | grpc.StatusCode) -> grpc.StatusCode:
    if isinstance(value, grpc.StatusCode):
        return value
    return _CODE_BY_VALUE.get(int(value), grpc.StatusCode.UNKNOWN)


def error_from_status(code: int | grpc.StatusCode, message: str, kind: str = "") -> SegsvcError:
    """The domain error for a status: the named ``kind`` when it fits the code, else the code's class.

    Codes without a domain class (INTERNAL, UNKNOWN, ...) become a plain ``SegsvcError``.
    """
    status = code_of(code)
    base = _CODE_TO_ERROR.get(status)
    cls = getattr(errors, kind, None) if kind else None
    if not (isinstance(cls, type) and base is not None and issubclass(cls, base)):
        cls = base
    if cls is None:
        exc = SegsvcError(f"{status.name}: {message}")
    else:
        exc = cls(message)
    exc.code = status  # type: ignore[attr-defined]
    return exc
