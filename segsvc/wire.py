"""The wire conventions both ends share: the status table, metadata keys and label-map decoding.

The server maps domain errors to status codes with ``ERROR_CODES`` and names
the error class in the ``segsvc-error`` trailing metadata; the client turns a
status back into the same domain error with ``error_from_status``
(tritonclient's ``get_error_grpc``). Every error status also carries a standard
``google.rpc.ErrorInfo`` detail (``grpc-status-details-bin``) so clients in any
language can read the error kind: its ``domain`` is ``ERROR_DOMAIN`` and its
``reason`` the class name in UPPER_SNAKE_CASE (``UnknownModel`` ->
``UNKNOWN_MODEL``; AIP-193), ``INTERNAL`` for unexpected errors; ``metadata``
holds the ``requestId`` when there is one. The client prefers that reason and
falls back to the ``segsvc-error`` trailer (older servers). This module needs
only grpc, NumPy and the generated messages, so ``import segsvc.client`` loads
no torch and no OpenCV.
"""

from __future__ import annotations

import io
import re

import grpc
import numpy as np
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

from segsvc import errors
from segsvc.errors import InvalidArgument, InvalidImage, SegsvcError
from segsvc.v1 import segmentation_pb2 as pb

ERROR_KIND_KEY = "segsvc-error"
REQUEST_ID_KEY = "x-request-id"
DETAILS_KEY = "grpc-status-details-bin"  # a serialized google.rpc.Status (grpc_status.rpc_status reads it)
ERROR_DOMAIN = "segsvc.dev"  # google.rpc.ErrorInfo.domain of every segsvc error
INTERNAL_REASON = "INTERNAL"  # google.rpc.ErrorInfo.reason of an unexpected (non-domain) error

# Most specific first: the first matching row wins.
ERROR_CODES: tuple[tuple[type[SegsvcError], grpc.StatusCode], ...] = (
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.ArtifactError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.ExportError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.Cancelled, grpc.StatusCode.CANCELLED),
    (errors.JobFailed, grpc.StatusCode.ABORTED),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.Unimplemented, grpc.StatusCode.UNIMPLEMENTED),
)

_CODE_TO_ERROR: dict[grpc.StatusCode, type[SegsvcError]] = {code: cls for cls, code in ERROR_CODES}
_CODE_BY_VALUE: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}


def code_of(value: int | grpc.StatusCode) -> grpc.StatusCode:
    if isinstance(value, grpc.StatusCode):
        return value
    return _CODE_BY_VALUE.get(int(value), grpc.StatusCode.UNKNOWN)


def error_reason(kind: str) -> str:
    """The ``ErrorInfo.reason`` of an error class name: ``ImageTooLarge`` -> ``IMAGE_TOO_LARGE``, "" -> INTERNAL."""
    if not kind:
        return INTERNAL_REASON
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", kind).upper()


def _domain_classes() -> dict[str, type[SegsvcError]]:
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, SegsvcError)]
    return {name: c for c in classes for name in (c.__name__, error_reason(c.__name__))}


# Class names and reasons -> classes; a test checks that no two classes share a reason.
_ERROR_CLASSES = _domain_classes()


def _code_of_class(cls: type[SegsvcError]) -> grpc.StatusCode | None:
    """The code a server sends for ``cls``: its first row in ``ERROR_CODES`` (as ``server.errors`` maps it)."""
    return next((code for row, code in ERROR_CODES if issubclass(cls, row)), None)


def error_from_status(code: int | grpc.StatusCode, message: str, kind: str = "") -> SegsvcError:
    """The domain error for a status: the named ``kind`` when it fits the code, else the code's class.

    ``kind`` is a class name (``segsvc-error``, ``Error.kind``) or an ``ErrorInfo``
    reason (``UNKNOWN_MODEL``). Codes without a domain class (INTERNAL, UNKNOWN,
    ...) become a plain ``SegsvcError``.
    """
    status = code_of(code)
    cls = _ERROR_CLASSES.get(kind) if kind else None
    if cls is None or _code_of_class(cls) != status:  # a kind that does not fit the code is not trusted
        cls = _CODE_TO_ERROR.get(status)
    if cls is None:
        exc = SegsvcError(f"{status.name}: {message}")
    else:
        exc = cls(message)
    exc.code = status  # type: ignore[attr-defined]
    return exc


def error_info_of(trailing) -> error_details_pb2.ErrorInfo | None:  # type: ignore[no-untyped-def]
    """The segsvc ``ErrorInfo`` in a call's ``grpc-status-details-bin`` trailer, if there is one."""
    for key, value in trailing or ():
        if key != DETAILS_KEY or not isinstance(value, bytes):
            continue
        try:
            status = status_pb2.Status.FromString(value)
        except DecodeError:
            return None
        info = error_details_pb2.ErrorInfo()
        for detail in status.details:
            if detail.Unpack(info) and info.domain == ERROR_DOMAIN:
                return info
    return None


# gRPC's own refusal of a message over a size limit (grpc-core's message size filter): which end, which way, sizes
_OVER_LIMIT = re.compile(r"\b(CLIENT|SERVER): (Sent|Received) message larger than max \((\d+) vs\. (\d+)\)")


def over_limit(what: str, size: int, limit: int, client_side: bool) -> SegsvcError:
    """``ImageTooLarge`` for a request, ``ResponseTooLarge`` for a response, naming the limit and how to raise it.

    The hint names what the side that refused can set: a client's limit is the library's argument and the
    command line's flag (a user of ``segsvc segment`` has no ``max_message_bytes`` to raise), the server's
    is ``segsvc serve``'s flag.
    """
    whose, raise_it = (("this client's limit", "raise this client's limit (SegmentationClient(max_message_bytes=...), "
                                               "or segsvc segment --max-message-mb)") if client_side else
                       ("the server's limit", "raise the server's limit (segsvc serve --max-message-mb)"))
    if what == "request":
        return errors.ImageTooLarge(f"the request is {size} bytes, over {whose} of {limit} bytes per message; send "
                                    f"a smaller image, or encoded (PNG, JPEG) rather than a raw array, or {raise_it}")
    return errors.ResponseTooLarge(f"the response is {size} bytes, over {whose} of {limit} bytes per message; ask "
                                   f"for encoding='png', leave out confidence, send a smaller image, or {raise_it}")


def _size_refusal(code: grpc.StatusCode, details: str) -> SegsvcError | None:
    """gRPC's own refusal of a message over a size limit (RESOURCE_EXHAUSTED, no segsvc details), which the
    table would make ``Overloaded`` ("back off and retry"): the same call always fails, so it is the caller's
    to change, and the error says which limit (this client's or the server's). None for any other status."""
    found = _OVER_LIMIT.search(details) if code == grpc.StatusCode.RESOURCE_EXHAUSTED else None
    if found is None:
        return None
    side, way, size, limit = found.groups()
    what = "request" if (side, way) in (("CLIENT", "Sent"), ("SERVER", "Received")) else "response"
    error = over_limit(what, int(size), int(limit), client_side=side == "CLIENT")
    error.code = code  # type: ignore[attr-defined]
    return error


def no_details(code: grpc.StatusCode, call: str = "") -> str:
    """The message of a status that came with none: its code, and the call when known.

    Never ``str(exc)``: the repr of grpc's ``_InactiveRpcError`` (``<_InactiveRpcError of RPC that terminated
    with: status = ... debug_error_string = ...>``) names the transport, not the problem.
    """
    return f"{call or 'the call'} ended with status {code.name} and no message"


def error_from_rpc(exc: grpc.RpcError, call: str = "") -> SegsvcError:
    """The domain error a failed call stands for: its ``ErrorInfo`` reason, else the ``segsvc-error`` trailer.

    ``call`` names the call (``GetOperation``) in the message of a status that has none (``no_details``).
    """
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    code = code_of(code) if isinstance(code, (int, grpc.StatusCode)) else grpc.StatusCode.UNKNOWN
    details = (exc.details() if hasattr(exc, "details") else None) or no_details(code, call)
    kind = ""
    trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    for key, value in trailing or ():
        if key == ERROR_KIND_KEY:
            kind = str(value)
    info = error_info_of(trailing)
    if info is not None and info.reason in _ERROR_CLASSES:
        kind = info.reason
    if not kind and (refused := _size_refusal(code, details)) is not None:
        return refused
    return error_from_status(code, details, kind)


def labels_from_proto(msg: pb.LabelMap) -> np.ndarray:
    """The ``H x W`` label array of a raw or PNG ``LabelMap``.

    Raises:
        InvalidImage: a raw map whose bytes are not ``H * W`` labels (numpy's reshape would raise ValueError),
            or a PNG that does not decode to ``H x W``.
    """
    h, w = int(msg.height), int(msg.width)
    raw = {pb.OUTPUT_ENCODING_RAW_UINT8: np.dtype(np.uint8), pb.OUTPUT_ENCODING_RAW_UINT16: np.dtype("<u2")}
    if msg.encoding in raw:
        dtype = raw[msg.encoding]
        if len(msg.data) != h * w * dtype.itemsize:
            raise InvalidImage(f"raw label map is {len(msg.data)} bytes; a {h}x{w} map of {dtype.itemsize}-byte "
                               f"labels, as the response says, is {h * w * dtype.itemsize}")
        labels = np.frombuffer(msg.data, dtype).reshape(h, w)
        return labels.astype(np.uint16) if dtype.itemsize == 2 else labels
    if msg.encoding == pb.OUTPUT_ENCODING_PNG:
        labels = decode_png_labels(msg.data)
        if labels.shape != (h, w):
            raise InvalidImage(f"PNG label map is {labels.shape}, the response says {(h, w)}")
        return labels
    raise InvalidArgument(f"a LabelMap with encoding {msg.encoding} holds no labels")


def decode_png_labels(data: bytes) -> np.ndarray:
    """Decode an 8- or 16-bit single-channel PNG label map, keeping its exact values (Pillow)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format != "PNG" or img.mode not in ("L", "I;16", "I;16B", "I"):
                raise InvalidImage(f"a label map must be a single-channel PNG, got {img.format} {img.mode}")
            labels = np.array(img)
    except (UnidentifiedImageError, OSError, ValueError):
        raise InvalidImage("PNG label map could not be decoded") from None
    return labels.astype(np.uint16) if labels.dtype != np.uint8 else labels
