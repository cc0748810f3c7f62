"""The wire conventions both ends share: the status table, metadata keys and label-map decoding.

The server maps domain errors to status codes with ``ERROR_CODES`` and names
the error class in the ``segsvc-error`` trailing metadata; the client turns a
status back into the same domain error with ``error_from_status``
(tritonclient's ``get_error_grpc``). This module needs only grpc, NumPy and
the generated messages, so ``import segsvc.client`` loads no torch and no OpenCV.
"""

from __future__ import annotations

import io

import grpc
import numpy as np

from segsvc import errors
from segsvc.errors import InvalidArgument, InvalidImage, SegsvcError
from segsvc.v1 import segmentation_pb2 as pb

ERROR_KIND_KEY = "segsvc-error"
REQUEST_ID_KEY = "x-request-id"

# Most specific first: the first matching row wins.
ERROR_CODES: tuple[tuple[type[SegsvcError], grpc.StatusCode], ...] = (
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.ArtifactError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.Cancelled, grpc.StatusCode.CANCELLED),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
)

_CODE_TO_ERROR: dict[grpc.StatusCode, type[SegsvcError]] = {code: cls for cls, code in ERROR_CODES}
_CODE_BY_VALUE: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}


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


def error_from_rpc(exc: grpc.RpcError) -> SegsvcError:
    """The domain error a failed call stands for (reads the ``segsvc-error`` trailer)."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = (exc.details() if hasattr(exc, "details") else None) or str(exc)
    kind = ""
    trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    for key, value in trailing or ():
        if key == ERROR_KIND_KEY:
            kind = str(value)
    return error_from_status(code, details, kind)


def labels_from_proto(msg: pb.LabelMap) -> np.ndarray:
    """The ``H x W`` label array of a raw or PNG ``LabelMap``."""
    h, w = int(msg.height), int(msg.width)
    if msg.encoding == pb.OUTPUT_ENCODING_RAW_UINT8:
        return np.frombuffer(msg.data, np.uint8).reshape(h, w)
    if msg.encoding == pb.OUTPUT_ENCODING_RAW_UINT16:
        return np.frombuffer(msg.data, "<u2").reshape(h, w).astype(np.uint16)
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
