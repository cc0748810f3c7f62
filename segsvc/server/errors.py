"""Domain errors -> gRPC status on the server side, with the one table from ``segsvc.wire``.

The servicer turns any exception into a status with ``abort``: a ``SegsvcError``
becomes its code from ``ERROR_CODES`` with its own message; anything else is
logged with its traceback and becomes INTERNAL with a generic message naming
the request id (internals never leak to callers). The error's class name
travels in the ``segsvc-error`` trailing metadata (and ``Error.kind`` in
streams), so the client can raise the very same class (``wire.error_from_status``).

Every status ``abort`` sends also carries a standard ``google.rpc.Status`` in the
``grpc-status-details-bin`` trailer (``grpc_status.rpc_status.from_call``
reads it in Python; every gRPC language has the same helper), so clients that
are not ours read the kind too: first the error's own details where it has any
(``PreconditionFailure`` for ``DatasetInvalid``), then an ``ErrorInfo`` with
``domain="segsvc.dev"``, ``reason`` the class name in UPPER_SNAKE_CASE
(``UNKNOWN_MODEL``, ``IMAGE_TOO_LARGE``; ``INTERNAL`` for unexpected errors)
and ``metadata={"requestId": ...}`` when the call has an id. Nothing else of
an unexpected error goes in. The whole Status stays under ``MAX_DETAILS_BYTES``.

A response over the server's message limit is a domain error too (``ResponseTooLarge``, from
``check_response_size``), raised by the adapters before gRPC would fail the call on its own with
RESOURCE_EXHAUSTED and no details.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Awaitable, Callable, NoReturn, Sequence, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from segsvc.errors import DatasetInvalid, ResponseTooLarge, SegsvcError
from segsvc.wire import DETAILS_KEY, ERROR_CODES, ERROR_DOMAIN, ERROR_KIND_KEY, REQUEST_ID_KEY, error_reason

T = TypeVar("T")


MAX_ID_CHARS = 128
# A client's deadline fires on its own clock first: the server's copy of it starts when the request arrives, so the
# client's cancellation reaches the server with that transit time still on the server's clock (6-7 ms on
# loopback, more across a network or on a loaded host).
DEADLINE_SLACK_S = 0.25
MAX_MESSAGE_CHARS = 1024  # one PreconditionFailure description (inside the details' own byte budget)
# The message's size in the grpc-message trailer, where gRPC percent-encodes every byte outside printable ASCII
# (and '%'): 12 bytes per emoji. Cut by characters alone, echoed non-ASCII text took the trailers over the
# client's metadata limit (8 KiB soft, 16 KiB hard) and the caller got RESOURCE_EXHAUSTED instead of the error.
MAX_MESSAGE_BYTES = 1024
# Clients refuse trailers over 8 KiB by default: the serialized Status (base64 on the wire) stays well below.
MAX_DETAILS_BYTES = 4096
_ANY_OVERHEAD_BYTES = 64  # at most what one detail's Any adds inside the Status (type URL, tags, lengths)


def _precondition_failure(exc: DatasetInvalid, budget: int) -> error_details_pb2.PreconditionFailure:
    """One violation per problem (kind, file, detail) while they fit in ``budget`` bytes; then one saying how many
    are left."""
    failure = error_details_pb2.PreconditionFailure()
    for kind, subject, description in exc.problems:
        failure.violations.add(type=kind, subject=subject, description=description[:MAX_MESSAGE_CHARS])
        if failure.ByteSize() > budget:
            break
    if failure.ByteSize() <= budget:
        return failure
    while failure.violations:
        del failure.violations[-1]
        left = len(exc.problems) - len(failure.violations)
        note = error_details_pb2.PreconditionFailure.Violation(
            type="truncated", subject="",
            description=f"{left} more problem(s) not shown; run `segsvc data check` on the dataset to see them all")
        if failure.ByteSize() + note.ByteSize() + 3 <= budget:  # + the field's tag and length
            failure.violations.append(note)
            break
    return failure


# Domain errors that carry structured details: the class -> its google.rpc detail message within a byte budget.
ERROR_DETAILS = ((DatasetInvalid, _precondition_failure),)


def error_info(kind: str, request_id: str = "") -> error_details_pb2.ErrorInfo:
    """The ``ErrorInfo`` of an error class name ("" for an unexpected error): reason, domain, request id."""
    metadata = {"requestId": clean_text(request_id)} if request_id else {}
    return error_details_pb2.ErrorInfo(reason=error_reason(kind), domain=ERROR_DOMAIN, metadata=metadata)


def status_details(exc: BaseException, code: grpc.StatusCode, message: str, request_id: str = "") -> bytes:
    """The serialized ``rpc_status`` (the ``grpc-status-details-bin`` trailer)."""
    return rpc_status(exc, code, message, request_id).SerializeToString()


def rpc_status(exc: BaseException, code: grpc.StatusCode, message: str, request_id: str = "") -> status_pb2.Status:
    """The ``google.rpc.Status`` of an error: the error's own details (if any), then its ``ErrorInfo``."""
    status = status_pb2.Status(code=code.value[0], message=message)
    info = any_pb2.Any()
    info.Pack(error_info(status_of(exc)[2], request_id))
    for cls, build in ERROR_DETAILS:
        if isinstance(exc, cls):
            budget = MAX_DETAILS_BYTES - status.ByteSize() - info.ByteSize() - 2 * _ANY_OVERHEAD_BYTES
            status.details.add().Pack(build(exc, budget))
            break
    status.details.append(info)
    return status


def clean_text(text: str, limit: int = MAX_ID_CHARS) -> str:
    """Client text made safe for metadata and logs: printable ASCII, at most ``limit`` characters."""
    head = "".join(c if " " <= c <= "~" else "?" for c in text[: limit + 1])
    return head if len(text) <= limit else head[: limit - 3] + "..."


def request_id_of(given: str, context: grpc.aio.ServicerContext) -> str:
    """The caller's id (cleaned: it goes into trailers and logs), else its ``x-request-id`` metadata, else a
    new one: every failure a caller reports can then be found in the server's log."""
    if given:
        return clean_text(given)
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and value:
            return clean_text(str(value))
    return uuid.uuid4().hex[:16]


def status_of(exc: BaseException, request_id: str = "") -> tuple[grpc.StatusCode, str, str]:
    """``(code, message, kind)`` for an exception; unknown exceptions get a generic INTERNAL message."""
    for cls, code in ERROR_CODES:
        if isinstance(exc, cls):
            return code, fit_message(str(exc) or cls.__name__), type(exc).__name__
    where = f" (request id {request_id})" if request_id else ""
    return grpc.StatusCode.INTERNAL, f"internal server error{where}; see the server log", ""


def _wire_bytes(char: str) -> int:
    """Bytes of one character in ``grpc-message``: printable ASCII as is, anything else percent-encoded UTF-8."""
    if " " <= char <= "~" and char != "%":
        return 1
    return 3 * len(char.encode("utf-8", "replace"))


def fit_message(message: str, limit: int = MAX_MESSAGE_BYTES) -> str:
    """``message``, cut (ending in "...") to at most ``limit`` bytes as the ``grpc-message`` trailer carries it."""
    if len(message) <= limit and message.isascii() and message.isprintable() and "%" not in message:
        return message
    sizes = [_wire_bytes(c) for c in message]
    if sum(sizes) <= limit:
        return message
    used, end = 0, 0
    while used + sizes[end] <= limit - 3:
        used += sizes[end]
        end += 1
    return message[:end] + "..."


def check_response_size(size: int, limit: int, remedies: Sequence[str], *, detail: str = "",
                        at_least: bool = False) -> None:
    """Refuse a response of ``size`` bytes over the server's message ``limit`` with ``ResponseTooLarge``.

    Unchecked, gRPC fails such a call itself once the work is done: RESOURCE_EXHAUSTED ("Sent message larger
    than max") without details, which clients read as "overloaded, retry", and it ends a whole stream.
    ``at_least``: ``size`` is a bound known before the work (raw outputs), not the encoded message;
    ``remedies``: what the caller can change, most effective first.
    """
    if size <= limit:
        return
    amount = f"would be at least {size} bytes" if at_least else f"is {size} bytes"
    raise ResponseTooLarge(
        f"the response {amount}{detail}, over the server's limit of {limit} bytes per message; to fit it, "
        + "".join(f"{r}, " for r in remedies) + "or raise the server's limit (segsvc serve --max-message-mb)")


def cancellation_code(remaining_s: float | None) -> grpc.StatusCode:
    """Why a call was cancelled under the server, from the time its deadline still had (``None``: no deadline).

    A cancellation within ``DEADLINE_SLACK_S`` of the deadline is the client's deadline expiring, not the client
    hanging up: counted as CANCELLED, client deadlines would show up as cancellations in the metrics.
    """
    if remaining_s is not None and remaining_s <= DEADLINE_SLACK_S:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


def log_unexpected(logger: logging.Logger, exc: BaseException, request_id: str, method: str) -> None:
    """Log an exception that is not a domain error, with its traceback."""
    if not isinstance(exc, SegsvcError):
        logger.error(
            "%s failed unexpectedly", method, exc_info=exc, extra={"request_id": request_id, "method": method}
        )


async def abort(context: grpc.aio.ServicerContext, exc: BaseException, request_id: str, method: str,
                logger: logging.Logger) -> NoReturn:
    """End the RPC with the status for ``exc`` (logging unexpected ones) under ``request_id``; without one, the
    caller's ``x-request-id`` or a new id, so that an INTERNAL answer always names an id found in the log."""
    request_id = request_id or request_id_of("", context)
    code, message, kind = status_of(exc, request_id)
    log_unexpected(logger, exc, request_id, method)
    context.set_trailing_metadata(((ERROR_KIND_KEY, kind), (REQUEST_ID_KEY, clean_text(request_id)),
                                   (DETAILS_KEY, status_details(exc, code, message, request_id))))
    await context.abort(code, message)


Refused = Callable[[str, str], None]
"""Counts a call refused before any servicer ran: ``(method, status code name)``."""


def not_counted(method: str, code: str) -> None:
    """The default ``Refused``: count nothing (a server without metrics)."""


async def refuse(context: grpc.aio.ServicerContext, exc: SegsvcError, method: str, logger: logging.Logger,
                 on_refused: Refused, level: int = logging.INFO) -> NoReturn:
    """End a call refused before any servicer ran (auth, admission) as every other error, after counting it and
    logging one line: no servicer would, so these calls were missing from the metrics and the logs. The line
    holds the reason and the peer, never the caller's token."""
    request_id = request_id_of("", context)
    code = status_of(exc)[0].name
    on_refused(method, code)
    logger.log(level, "%s %s: %s", method, code, exc, extra={
        "request_id": request_id, "method": method, "model": "-", "code": code, "peer": clean_text(context.peer())})
    await abort(context, exc, request_id, method, logger)


def refusing_handler(response_streaming: bool, exc: SegsvcError, method: str, logger: logging.Logger,
                     on_refused: Refused, level: int = logging.INFO) -> grpc.RpcMethodHandler:
    """A handler that only ends the call with ``refuse(exc)``, before reading anything: it takes the request as a
    stream it never reads, whatever the method's own shape. (With a unary-request shape gRPC first waits for the
    request message, so a caller that sent none, or held it back, got no refusal until its deadline, or ever.)
    The auth interceptor's and the drain gate's refusals."""

    async def refused(_requests, context: grpc.aio.ServicerContext) -> None:  # type: ignore[no-untyped-def]
        await refuse(context, exc, method, logger, on_refused, level)

    if response_streaming:
        return grpc.stream_stream_rpc_method_handler(refused)
    return grpc.stream_unary_rpc_method_handler(refused)


async def guarded(method: str, context: grpc.aio.ServicerContext, work: Callable[[], Awaitable[T]],
                  logger: logging.Logger, request_id: str = "") -> T:
    """``await work()``; any error ends the RPC with its status (``abort``, under ``request_id``: by default the
    caller's ``x-request-id`` or a new one), cancellation passes through."""
    try:
        return await work()
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        await abort(context, exc, request_id, method, logger)
