"""Domain errors -> gRPC status on the server side, with the one table from ``segsvc.wire``.

The servicer turns any exception into a status with ``abort``: a ``SegsvcError``
becomes its code from ``ERROR_CODES`` with its own message; anything else is
logged with its traceback and becomes INTERNAL with a generic message naming
the request id (internals never leak to callers). The error's class name
travels in the ``segsvc-error`` trailing metadata (and ``Error.kind`` in
streams), so the client can raise the very same class (``wire.error_from_status``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable, NoReturn, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from segsvc.errors import DatasetInvalid, SegsvcError
from segsvc.wire import ERROR_CODES, ERROR_KIND_KEY, REQUEST_ID_KEY

T = TypeVar("T")


MAX_ID_CHARS = 128
MAX_MESSAGE_CHARS = 1024  # trailers have a size limit; a client-sized message must not overflow it
DETAILS_KEY = "grpc-status-details-bin"  # a google.rpc.Status (grpc_status.rpc_status reads it)
# Clients refuse trailers over 8 KiB by default: the details (base64 on the wire) stay well below.
MAX_DETAILS_BYTES = 4096


def _precondition_failure(exc: DatasetInvalid) -> error_details_pb2.PreconditionFailure:
    """One violation per problem (kind, file, detail), as many as fit; then one saying how many are left."""
    failure = error_details_pb2.PreconditionFailure()
    for i, (kind, subject, description) in enumerate(exc.problems):
        failure.violations.add(type=kind, subject=subject, description=description[:MAX_MESSAGE_CHARS])
        if failure.ByteSize() > MAX_DETAILS_BYTES:
            del failure.violations[-1]
            left = len(exc.problems) - i
            failure.violations.add(type="truncated", subject="",
                                   description=f"{left} more problem(s) not shown; run `segsvc data check` on the "
                                               f"dataset to see them all")
            break
    return failure


# Domain errors that carry structured details: the class -> its google.rpc detail message.
ERROR_DETAILS = ((DatasetInvalid, _precondition_failure),)


def status_details(exc: BaseException, code: grpc.StatusCode, message: str) -> bytes | None:
    """The serialized ``google.rpc.Status`` with the error's details, for errors that have any."""
    for cls, build in ERROR_DETAILS:
        if isinstance(exc, cls):
            detail = any_pb2.Any()
            detail.Pack(build(exc))
            return status_pb2.Status(code=code.value[0], message=message, details=[detail]).SerializeToString()
    return None


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
    trailers: tuple[tuple[str, str | bytes], ...] = ((ERROR_KIND_KEY, kind), (REQUEST_ID_KEY, clean_text(request_id)))
    details = status_details(exc, code, message)
    if details is not None:
        trailers += ((DETAILS_KEY, details),)
    context.set_trailing_metadata(trailers)
    await context.abort(code, message)


async def guarded(method: str, context: grpc.aio.ServicerContext, work: Callable[[], Awaitable[T]],
                  logger: logging.Logger) -> T:
    """``await work()``; any error ends the RPC with its status (``abort``), cancellation passes through."""
    try:
        return await work()
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        await abort(context, exc, "", method, logger)
