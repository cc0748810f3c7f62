"""Python client of the segsvc gRPC server.

``SegmentationClient.segment`` sends one image (a path, encoded bytes or a
uint8 array) and returns a ``LabelMap``; ``segment_many`` sends many over one
``SegmentStream`` with a progress bar (on a terminal) and returns the results in input order.
Failures come back as the server's domain errors (``InvalidImage``,
``ImageTooLarge``, ``UnknownModel``, ``Overloaded``, ...), not as ``RpcError``.

Example:
    >>> with SegmentationClient("localhost:50051") as client:  # doctest: +SKIP
    ...     result = client.segment("street.png", model="camvid-unet")
    ...     cv2.imwrite("mask.png", result.mask)
    ...     rgb = result.overlay("street.png")
"""

from __future__ import annotations

import logging
import numbers
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Iterator, Sequence, Union

import grpc
import numpy as np
from google.longrunning import operations_pb2, operations_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from segsvc.config import check_request_tiling  # dataclasses only: no torch
from segsvc.datasets.content import archive_format, file_chunks, folder_tar_names, local_files, tar_stream
from segsvc.errors import (
    DatasetInvalid, DeadlineExceeded, FailedPrecondition, InvalidArgument, InvalidImage, NotFound, SegsvcError,
    Unavailable,
)
from segsvc.jobclient import (
    JobHandle, JobStatus, TrainingJobHandle, TrainingStatus, handle_for, local_images, path_list, upload_files,
)
from segsvc.model_names import parse_model_ref
from segsvc.palette import colorize, overlay
from segsvc.progress import progress_bar
from segsvc.v1 import segmentation_pb2 as pb
from segsvc.v1 import datasets_pb2 as datasets_pb
from segsvc.v1 import datasets_pb2_grpc as datasets_grpc
from segsvc.v1 import jobs_pb2 as jobs_pb
from segsvc.v1 import jobs_pb2_grpc as jobs_grpc
from segsvc.v1 import segmentation_pb2_grpc as pb_grpc
from segsvc.v1 import training_pb2 as tpb
from segsvc.v1 import training_pb2_grpc as training_grpc
from segsvc.wire import error_from_rpc, error_from_status, labels_from_proto, over_limit

log = logging.getLogger("segsvc.client")

STARTING_POLL_S = 0.1  # how often wait_for_server asks a server that is still loading its models

ImageInput = Union[str, os.PathLike, bytes, np.ndarray]

ENCODINGS = {"raw": pb.OUTPUT_ENCODING_UNSPECIFIED, "png": pb.OUTPUT_ENCODING_PNG}
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")


def no_images(paths: Sequence[str | os.PathLike]) -> InvalidArgument:
    """The error for inputs that hold no image file: what was looked for, and where, as the user typed it."""
    return InvalidArgument(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {', '.join(map(os.fspath, paths))}")


@dataclass(frozen=True)
class Timings:
    """Server-side timings of one request, in milliseconds."""

    queue_ms: float
    inference_ms: float
    total_ms: float
    batch_size: int


@dataclass(frozen=True, eq=False)
class LabelMap:
    """The segmentation of one image.

    Attributes:
        mask: ``H x W`` class ids (uint8, or uint16 for more than 256 classes).
        class_names: names indexed by class id.
        palette: ``K x 3`` uint8 RGB colours indexed by class id.
        model, version: what produced it.
        request_id: the request's id.
        timings: where the server spent the time.
        confidence: ``H x W`` uint8 max-softmax (round(255 p)) when asked for.
        class_counts: pixels per class name when asked for.
    """

    mask: np.ndarray
    class_names: tuple[str, ...]
    palette: np.ndarray
    model: str
    version: int
    request_id: str
    timings: Timings
    confidence: np.ndarray | None = None
    class_counts: dict[str, int] | None = None

    def colorize(self) -> np.ndarray:
        """RGB ``H x W x 3`` image of the mask in the model's palette."""
        return colorize(self.mask, self.palette)

    def overlay(self, image: ImageInput, alpha: float = 0.5) -> np.ndarray:
        """RGB image: ``image`` (array, bytes or path) with the class colours blended over it."""
        return overlay(_as_array(image), self.mask, self.palette, alpha)


def _model_field(model: Any) -> str:
    """A request's model name ("" for None: the server's only model), or ``InvalidArgument`` naming it."""
    if model is not None and not isinstance(model, str):
        raise InvalidArgument(f"model must be a model name (str), got {model!r}")
    return model or ""


def _text_field(value: Any, what: str) -> str:
    """A request's string field, or ``InvalidArgument`` naming it (protobuf's bare TypeError, "bad argument type
    for built-in operation", names neither the argument nor the value)."""
    if not isinstance(value, str):
        raise InvalidArgument(f"{what} must be a str, got {value!r}")
    return value


def _text_list(values: Any, what: str) -> list[str]:
    """A request's repeated string field, each item checked as by ``_text_field``; a ``str`` itself is refused
    (as a list it would be its characters, one per item)."""
    if isinstance(values, str):
        raise InvalidArgument(f"{what} is a list of str, got one str {values!r}: pass [{values!r}] for one")
    if not isinstance(values, Iterable):
        raise InvalidArgument(f"{what} is a list of str, got {type(values).__name__}")
    return [_text_field(v, f"each of {what}") for v in values]


def _version_field(version: Any) -> int:
    """A request's model version (0 for None: the default version), checked before it reaches a uint32 field
    (protobuf's bare ValueError or TypeError there)."""
    if version is None:
        return 0
    if isinstance(version, bool) or not isinstance(version, numbers.Integral) or not 0 <= version < 1 << 32:
        raise InvalidArgument(f"version must be a positive integer (None or 0: the default version), got {version!r}")
    return int(version)


def _model_fields(model: Any, version: Any) -> dict[str, Any]:
    """A request's ``model`` and ``version`` fields, ``InvalidArgument`` naming what is wrong.

    ``model`` may carry its version as the command line's ``--model`` does: ``"NAME:VERSION"``
    (``parse_model_ref``; a model name cannot hold ':'). A ``version`` given too must be the same one.
    """
    name, version = _model_field(model), _version_field(version)
    if ":" not in name:
        return {"model": name, "version": version}
    name, named = parse_model_ref(name)
    named = _version_field(named)
    if version and version != named:
        raise InvalidArgument(f"model {model!r} names version {named}, and version={version} another: give the "
                              f"version once")
    return {"model": name, "version": named}


def _image_list(images: Any) -> list:
    """The images of ``segment_many`` as a list; ``InvalidArgument`` for one image given alone.

    Taken as a list, one image is many wrong ones: a path's characters ("cannot read image 's'"), the ints of
    encoded bytes, the rows of an ``H x W x C`` array (each sent as a ``W x C`` grey image, answered without a
    word). A stack of images (an ``N x H x W x C`` array) is taken image by image.
    """
    if isinstance(images, np.ndarray) and images.ndim <= 3:
        raise InvalidArgument(f"segment_many takes a list of images, got one array of shape {images.shape}: pass "
                              "[image], or call segment() for one image (a stack of grey images: list(stack))")
    if isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview)):
        shown = repr(os.fspath(images)) if isinstance(images, (str, os.PathLike)) else f"{len(images)} bytes"
        raise InvalidArgument(f"segment_many takes a list of images, got one {type(images).__name__} ({shown}): "
                              "pass [image], or call segment() for one image")
    if not isinstance(images, Iterable):
        raise InvalidArgument(f"segment_many takes a list of images, got {type(images).__name__}")
    return list(images)


def _as_array(image: ImageInput) -> np.ndarray:
    if isinstance(image, np.ndarray):
        return image
    from segsvc.inference.codec import decode_image  # OpenCV, only when an overlay needs the image

    data = _read(image) if isinstance(image, (str, os.PathLike)) else image
    return decode_image(data, max_pixels=1 << 40)


def _attach_image(request: pb.SegmentRequest, image: ImageInput) -> None:
    """Put an image path, encoded bytes or uint8 array into ``request``."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise InvalidImage(f"arrays must be uint8, got {image.dtype}")
        request.raw.data = np.ascontiguousarray(image).tobytes()
        request.raw.shape.extend(image.shape)
    elif isinstance(image, (bytes, bytearray, memoryview)):
        request.image = bytes(image)
    elif isinstance(image, (str, os.PathLike)):
        request.image = _read(image)
    else:
        raise InvalidArgument(f"images are paths, encoded bytes or uint8 arrays, got {type(image).__name__}")


def _read(path: str | os.PathLike) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"cannot read image {os.fspath(path)!r}: {exc.strerror or exc}") from None


def _readable_size(path: Path) -> int:
    """The size of a local file to upload, opened to be sure it can be read; ``InvalidArgument`` naming it."""
    try:
        with open(path, "rb") as f:
            return os.fstat(f.fileno()).st_size
    except OSError as exc:
        raise InvalidArgument(f"cannot read {os.fspath(path)}: {exc.strerror or type(exc).__name__}") from None


def image_files(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Expand folders, recursively, to the image files they hold (sorted); keep files as given (``paths``: one
    path or a list)."""
    return [path for path, _ in named_image_files(paths)]


def named_image_files(paths: str | os.PathLike | Iterable[str | os.PathLike],
                      skip: str | os.PathLike | None = None) -> list[tuple[Path, PurePosixPath]]:
    """``image_files`` with each file's name: its path under the folder named, or its own name.

    Folders are walked recursively, as ``segsvc batch`` walks them, so that outputs named
    after these paths keep the folders' layout and an image in a subfolder is never skipped.
    A walk leaves out the folder ``skip`` (an output folder inside an input folder: its
    masks are not inputs).

    Raises:
        InvalidArgument: a path that does not exist, or a folder inside ``skip`` (all its images would be
            left out, and outputs written there read back as inputs).
    """
    skipped = Path(skip).resolve() if skip is not None else None
    out: list[tuple[Path, PurePosixPath]] = []
    for p in map(Path, path_list(paths, "paths")):
        if p.is_dir() and skipped is not None and p.resolve().is_relative_to(skipped):
            raise InvalidArgument(f"the output folder {os.fspath(skip)} holds the input folder {p}: outputs written "
                                  "there would be read as inputs by the next run; write them to another folder")
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()
                           and not (skipped and f.resolve().is_relative_to(skipped)))
            out.extend((f, PurePosixPath(f.relative_to(p).as_posix())) for f in found)
        elif p.exists():
            out.append((p, PurePosixPath(p.name)))
        else:
            raise InvalidArgument(f"{p} does not exist")
    return out


UPLOAD_FORMATS = {"tar": datasets_pb.UPLOAD_FORMAT_TAR, "zip": datasets_pb.UPLOAD_FORMAT_ZIP,
                  "pairs": datasets_pb.UPLOAD_FORMAT_PAIRS}
DATASET_SOURCES = {datasets_pb.DATASET_SOURCE_REGISTERED: "register", datasets_pb.DATASET_SOURCE_UPLOADED: "upload"}
def dataset_error(exc: grpc.RpcError, call: str = "") -> SegsvcError:
    """``error_from_rpc``, plus the problem list a ``DatasetInvalid`` carries in its status details."""
    error = error_from_rpc(exc, call)
    if isinstance(error, DatasetInvalid):
        from google.rpc import error_details_pb2
        from grpc_status import rpc_status

        try:
            status = rpc_status.from_call(exc)  # type: ignore[arg-type]
        except ValueError:  # details that do not match the call's status: keep the message only
            status = None
        failure = error_details_pb2.PreconditionFailure()
        for detail in status.details if status is not None else ():
            if detail.Unpack(failure):
                error.problems += tuple((v.type, v.subject, v.description) for v in failure.violations)
    return error


def _accepts_connections(address: str, timeout_s: float = 2.0) -> bool | None:
    """Whether ``host:port`` accepts a TCP connection (None: ``address`` is not of that form)."""
    host, sep, port = address.removeprefix("dns:///").rpartition(":")
    if not sep or not host or not port.isdigit():
        return None
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError:
        return False
    return True


def _broken_stream(exc: grpc.RpcError, answered: int, total: int, deadline_s: float | None) -> SegsvcError:
    """The error of a ``SegmentStream`` that ended before every image had its answer: what was answered, and
    for a deadline, which one passed and what to change."""
    error = error_from_rpc(exc, "SegmentStream")
    if isinstance(error, DeadlineExceeded) and deadline_s is not None:
        error.args = (f"{error}: {deadline_s:g} s, the deadline of the whole stream, passed (timeout_s; "
                      "segsvc segment --timeout-s); give a longer one, or fewer images per call",)
    if answered:  # say what the caller has, and that the rest has no result
        error.args = (f"the stream broke off after {answered} of {total} images: {error}",)
    return error


class SegmentationClient:
    """A connection to a segsvc server.

    Args:
        address: ``host:port``.
        token: bearer token, sent as ``authorization: Bearer <token>`` (surrounding whitespace, such as a
            token file's newline, is left out).
        root_certificates: PEM CA bundle for TLS; with ``tls=True`` and no bundle
            the system roots are used. Without either, the channel is plaintext.
        tls: use TLS.
        timeout_s: default deadline of each call (None: no deadline).
        max_message_bytes: largest message sent or received.
    """

    def __init__(
        self,
        address: str,
        token: str | None = None,
        *,
        root_certificates: bytes | None = None,
        tls: bool = False,
        timeout_s: float | None = 60.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        if token:  # a token file's newline would make every call fail with "INTERNAL: Invalid metadata"
            token = token.strip()
            if not token.isascii() or not token.isprintable() or any(c.isspace() for c in token):
                raise InvalidArgument("a token is printable ASCII without whitespace (as in the server's "
                                      "--token-file); this one is not")
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        self._tls = tls or root_certificates is not None
        if self._tls:
            creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self._channel = grpc.secure_channel(address, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(address, options=options)
        self.address = address
        self.timeout_s = timeout_s
        self.max_message_bytes = max_message_bytes
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._stub = pb_grpc.SegmentationServiceStub(self._channel)
        self._jobs = jobs_grpc.JobServiceStub(self._channel)
        self._ops = operations_pb2_grpc.OperationsStub(self._channel)
        self._datasets = datasets_grpc.DatasetServiceStub(self._channel)
        self._training = training_grpc.TrainingServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._closed = False

    def close(self) -> None:
        self._closed = True
        self._channel.close()

    def _check_open(self) -> None:
        """``FailedPrecondition`` for a call on a closed client (grpc's own words: "ValueError: Cannot invoke RPC
        on closed channel!", from deep inside the call)."""
        if self._closed:
            raise self._closed_error()

    def _closed_error(self) -> FailedPrecondition:
        return FailedPrecondition(f"this client of {self.address} is closed (close(), or the end of its with "
                                  "block): make a new SegmentationClient for more calls")

    def wait_for_server(self, timeout_s: float) -> None:
        """Block until a server listens and takes calls (one just started may not listen yet, and
        answers UNAVAILABLE while it loads its models).

        Raises:
            Unavailable: nothing accepted a connection at ``address`` within ``timeout_s``, or
                the server there was still starting (or draining) when it ran out.
        """
        self._check_open()
        deadline = time.monotonic() + timeout_s
        states: list[grpc.ChannelConnectivity] = []
        record = states.append
        self._channel.subscribe(record)
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout_s)
        except grpc.FutureTimeoutError:
            raise self._no_connection(timeout_s, grpc.ChannelConnectivity.TRANSIENT_FAILURE in states) from None
        finally:
            self._channel.unsubscribe(record)
        while True:  # a cheap call tells "starting" (UNAVAILABLE from the server's gate) from "ready"
            left = deadline - time.monotonic()
            try:
                self._stub.ListModels(pb.ListModelsRequest(), timeout=max(left, 0.5), metadata=self._metadata)
                return
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    return  # it answers; the caller's own call gets its own error (a missing token, ...)
                if left <= 0:
                    raise Unavailable(f"the server at {self.address} was still starting after {timeout_s:g} s: "
                                      f"{exc.details()}") from None
            time.sleep(min(STARTING_POLL_S, max(left, 0.0)))

    def _no_connection(self, timeout_s: float, failed: bool) -> Unavailable:
        """Why no connection was made: nothing listens, or something does and the handshake fails (TLS at one end).

        ``failed``: the channel's connection attempts failed (rather than still running when the time ran out).
        """
        if not failed or not _accepts_connections(self.address):
            return Unavailable(f"no server answered at {self.address} within {timeout_s:g} s: "
                               "is 'segsvc serve' running there?")
        if self._tls:
            hint = ("a server without TLS needs a plaintext client (no tls or root_certificates; segsvc commands: "
                    "no --tls or --tls-ca), and one with TLS a certificate this client trusts (--tls-ca)")
        else:
            hint = ("a server with TLS (segsvc serve --tls-cert) needs a TLS client (tls=True or root_certificates; "
                    "segsvc commands: --tls or --tls-ca)")
        return Unavailable(f"something listens at {self.address} but no gRPC connection was made within "
                           f"{timeout_s:g} s; {hint}")

    def __enter__(self) -> "SegmentationClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _call(self, stub, method: str, request, timeout_s: float | None = None):  # type: ignore[no-untyped-def]
        """``stub.method(request)`` with this client's deadline and token; a failure as its domain error."""
        self._check_open()
        try:
            return getattr(stub, method)(request, timeout=timeout_s if timeout_s is not None else self.timeout_s,
                                         metadata=self._metadata)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, method) from None
        except ValueError:  # closed by another thread since the check: grpc's "Cannot invoke RPC on closed channel!"
            if self._closed:
                raise self._closed_error() from None
            raise

    def _check_request_size(self, request: pb.SegmentRequest) -> None:
        """Refuse, before sending, a request gRPC would refuse as RESOURCE_EXHAUSTED (and end a whole stream with)."""
        size = request.ByteSize()
        if size > self.max_message_bytes:
            raise over_limit("request", size, self.max_message_bytes, client_side=True)

    # -- segmentation -------------------------------------------------------------------
    @staticmethod
    def build_request(image: ImageInput, **options: Any) -> pb.SegmentRequest:
        """The ``SegmentRequest`` for an image path, encoded bytes or uint8 array (options: ``request_template``)."""
        request = SegmentationClient.request_template(**options)
        _attach_image(request, image)
        return request

    @staticmethod
    def request_template(
        *,
        model: str | None = None,
        version: int | None = None,
        encoding: str = "raw",
        confidence: bool = False,
        class_counts: bool = False,
        tile_size: int | None = None,
        tile_overlap: float | None = None,
        flip_tta: bool | None = None,
        request_id: str = "",
    ) -> pb.SegmentRequest:
        """A ``SegmentRequest`` with these options and no image yet (their errors come before any image's).

        ``tile_size``, ``tile_overlap`` and ``flip_tta`` left ``None`` use the model's
        defaults from its manifest; ``tile_size=0`` and ``flip_tta=False`` turn them off.
        ``tile_overlap`` needs an explicit ``tile_size`` (segsvc.v1 sends the overlap
        with the tile size: it cannot override only the manifest's overlap). An option out of range
        (``tile_size`` 0 or 16..16384, ``tile_overlap`` in [0, 0.75], ``flip_tta`` a bool) raises
        ``InvalidArgument`` naming it, in the server's words.
        """
        if encoding not in ENCODINGS:
            raise InvalidArgument(f"encoding must be one of {sorted(ENCODINGS)}, got {encoding!r}")
        if tile_overlap is not None and tile_size is None:
            raise InvalidArgument(
                "tile_overlap needs tile_size: segsvc.v1 sends an overlap only with an explicit tile size; "
                "pass tile_size too (the model's tile size is in its manifest), or leave both unset for the "
                "model's defaults")
        flip_tta = bool(flip_tta) if isinstance(flip_tta, np.bool_) else flip_tta
        check_request_tiling(tile_size, tile_overlap, flip_tta)
        options = pb.SegmentOptions(
            encoding=ENCODINGS[encoding], return_confidence=confidence, return_class_counts=class_counts,
        )
        if flip_tta is not None:
            options.flip_tta = bool(flip_tta)
        if tile_size is not None:
            options.tiling.SetInParent()
            options.tiling.tile_size = int(tile_size)
            if tile_overlap is not None:
                options.tiling.overlap = float(tile_overlap)
        return pb.SegmentRequest(request_id=request_id, **_model_fields(model, version),
                                 options=options)

    @staticmethod
    def _label_map(response: pb.SegmentResponse) -> LabelMap:
        if response.HasField("error"):
            raise error_from_status(response.error.code, response.error.message, response.error.kind)
        mask = labels_from_proto(response.labels)
        if not mask.flags.writeable:  # a raw map is a view of the response's bytes: give callers their own array
            mask = mask.copy()
        h, w = mask.shape
        names = tuple(response.class_names)
        confidence = None
        if response.confidence:
            confidence = np.frombuffer(response.confidence, np.uint8).reshape(h, w).copy()
        counts = None
        if len(response.class_pixel_counts):
            counts = {name: int(c) for name, c in zip(names, response.class_pixel_counts)}
        t = response.timings
        return LabelMap(
            mask=mask,
            class_names=names,
            palette=np.frombuffer(response.palette, np.uint8).reshape(-1, 3),
            model=response.model,
            version=int(response.model_version),
            request_id=response.request_id,
            timings=Timings(t.queue_ms, t.inference_ms, t.total_ms, int(t.batch_size)),
            confidence=confidence,
            class_counts=counts,
        )

    def segment(self, image: ImageInput, *, timeout_s: float | None = None, **options: Any) -> LabelMap:
        """Segment one image (path, encoded bytes, or uint8 ``HxW``/``HxWxC`` array).

        Options: ``model``, ``version``, ``encoding`` ("raw" or "png" on the wire),
        ``confidence``, ``class_counts``, ``tile_size``, ``tile_overlap``,
        ``flip_tta``, ``request_id``.
        """
        request = self.build_request(image, **options)
        self._check_request_size(request)
        return self._label_map(self._call(self._stub, "Segment", request, timeout_s))

    def segment_many(
        self,
        images: Sequence[ImageInput] | Iterable[ImageInput],
        *,
        progress: bool = True,
        return_exceptions: bool = False,
        timeout_s: float | None = None,
        on_result: Callable[[int, LabelMap | SegsvcError], None] | None = None,
        **options: Any,
    ) -> list[LabelMap | SegsvcError]:
        """Segment many images over one stream; results in input order.

        With ``return_exceptions`` a failed image's entry is its error; otherwise
        the first failure (in input order) is raised after the stream ends.
        ``timeout_s`` (default: the client's) is the deadline of the whole stream.
        ``on_result(index, result_or_error)`` is called in this thread as each
        image's answer arrives (images that could not be sent: once the stream
        ends), so a caller keeps what was answered before a stream that breaks
        off (deadline, server stopped) raises its error.
        """
        if "request_id" in options:
            raise InvalidArgument("segment_many numbers its requests itself (their request_id is the image's "
                                  "index): request_id is not one of its options")
        template = self.request_template(**options)  # a bad option fails here, before any call
        items = _image_list(images)
        self._check_open()
        results: list[LabelMap | SegsvcError | None] = [None] * len(items)
        unsent: list[int] = []  # images the client could not send, in gRPC's request thread
        bar = progress_bar(progress, total=len(items), unit="img", desc="segment")

        def requests() -> Iterator[pb.SegmentRequest]:
            for i, image in enumerate(items):
                # an image that cannot be sent is its own error: raised here, in gRPC's request thread, it
                # would cancel the whole stream with "Exception iterating requests!"
                request = pb.SegmentRequest()
                request.CopyFrom(template)
                request.request_id = str(i)
                try:
                    _attach_image(request, image)
                    self._check_request_size(request)
                except SegsvcError as exc:
                    results[i] = exc
                    unsent.append(i)
                    bar.update(1)
                    continue
                yield request

        answered = 0
        stream = None
        deadline_s = timeout_s if timeout_s is not None else self.timeout_s
        try:
            stream = self._stub.SegmentStream(requests(), timeout=deadline_s, metadata=self._metadata)
            for response in stream:
                index = int(response.request_id)
                try:
                    results[index] = self._label_map(response)
                except SegsvcError as exc:
                    results[index] = exc
                answered += 1
                bar.update(1)
                if on_result is not None:
                    on_result(index, results[index])  # type: ignore[arg-type]
        except grpc.RpcError as exc:
            if not items or any(r is None for r in results):
                raise _broken_stream(exc, answered, len(items), deadline_s) from None
            # every image has its answer (a server that ended the call with an error after its last response,
            # a deadline that passed as the stream closed): the error takes nothing from the caller
            log.info("SegmentStream ended with an error after every image was answered; results kept: %s",
                     error_from_rpc(exc, "SegmentStream"))
        finally:
            bar.close()
            if stream is not None:
                stream.cancel()  # no-op once it ended; else (on_result raised, Ctrl-C) the server stops too
        if on_result is not None:
            for i in unsent:
                on_result(i, results[i])  # type: ignore[arg-type]
        missing = [i for i, r in enumerate(results) if r is None]
        if missing:
            raise SegsvcError(f"the stream ended without results for {len(missing)} images (first: #{missing[0]})")
        if not return_exceptions:
            for r in results:
                if isinstance(r, SegsvcError):
                    raise r
        return results  # type: ignore[return-value]

    # -- batch jobs ---------------------------------------------------------------------
    def _ops_call(self, method: str, request, timeout_s: float | None = None):
        return self._call(self._ops, method, request, timeout_s)

    def _job_call(self, method: str, request, timeout_s: float | None = None):
        return self._call(self._jobs, method, request, timeout_s)

    def _job_stream(self, method: str, request) -> Iterator:
        self._check_open()
        return getattr(self._jobs, method)(request, metadata=self._metadata)

    def upload_images(self, paths: str | os.PathLike | Sequence[str | os.PathLike]) -> str:
        """Upload image files (or one folder, keeping relative paths; one path or a list) for a job; returns the
        upload id."""
        files, root = local_images(paths)
        for file in files:  # a file it cannot read is named before any call
            _readable_size(file)
        response = self._local_upload(self._jobs.UploadImages, upload_files(files, root), lambda: None, None,
                                      error_from_rpc)
        return response.upload_id

    def submit_job(
        self,
        inputs: str | os.PathLike | Sequence[str | os.PathLike] = (),
        *,
        upload: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
        model: str | None = None,
        version: int | None = None,
        request_id: str = "",
        color: bool = False,
        overlay: bool = False,
        overlay_alpha: float = 0.0,
        confidence: bool = False,
        tile_size: int | None = None,
        tile_overlap: float | None = None,
        flip_tta: bool | None = None,
    ) -> JobHandle:
        """Start a batch job over server paths (``inputs``, relative to its data root) or local files (``upload``).

        Each is one path or a list of them. The model version is pinned at submission; ``request_id`` makes a
        retry return the same job. Returns at once with a handle: ``.wait(progress=True)``,
        ``.result()``, ``.cancel()``, ``.fetch(dest)``.
        """
        inputs = [os.fspath(p) for p in path_list(inputs, "inputs")]
        upload = path_list(upload, "upload") if upload is not None else None
        if bool(inputs) == bool(upload):
            raise InvalidArgument("give server paths (inputs) or local files to upload (upload), not both")
        options = self.build_request(b"", confidence=confidence, tile_size=tile_size, tile_overlap=tile_overlap,
                                     flip_tta=flip_tta).options
        request = jobs_pb.SubmitSegmentationJobRequest(
            request_id=request_id, **_model_fields(model, version), options=options,
            outputs=jobs_pb.JobOutputOptions(color=color, overlay=overlay, overlay_alpha=overlay_alpha),
        )
        if upload:
            request.inputs.upload_id = self.upload_images(upload)
        else:
            request.inputs.paths.paths.extend(inputs)
        return JobHandle(self, self._job_call("SubmitSegmentationJob", request))

    def job(self, name: str) -> JobHandle:
        """A handle on an existing job (``jobs/<id>`` or the id): a ``TrainingJobHandle`` for training jobs."""
        name = _text_field(name, "job name")
        name = name if name.startswith("jobs/") else f"jobs/{name}"
        return handle_for(self, self._ops_call("GetOperation", operations_pb2.GetOperationRequest(name=name)))

    # -- training jobs ------------------------------------------------------------------
    def _training_stream(self, method: str, request) -> Iterator:
        self._check_open()
        return getattr(self._training, method)(request, metadata=self._metadata)

    def submit_training_job(
        self,
        dataset: str,
        *,
        recipe: str = "",
        recipe_yaml: str = "",
        overrides: str | Sequence[str] = (),
        base_model: str = "",
        model_name: str = "",
        max_time_min: float | None = None,
        epochs: int | None = None,
        device: str = "auto",
        nproc_per_node: int = 1,
        promote: str = "gate",
        gate_margin: float = 0.0,
        request_id: str = "",
    ) -> TrainingJobHandle:
        """Train on a registered dataset on the server, evaluate, gate and publish (a long-running operation).

        ``recipe`` names a recipe of the server's ``training/recipes`` (or give
        ``recipe_yaml``); ``base_model`` ("NAME" or "NAME:VERSION") fine-tunes a
        served model; ``promote`` is ``gate`` (default: the default only when it
        beats the current one by ``gate_margin`` mIoU), ``always`` or ``never``.
        Returns at once: ``.wait(progress=True)``, ``.result()`` (verdict and
        comparison table), ``.cancel()``, ``.fetch(dest)``.
        """
        policies = {"gate": tpb.PROMOTE_POLICY_GATE, "always": tpb.PROMOTE_POLICY_ALWAYS,
                    "never": tpb.PROMOTE_POLICY_NEVER}
        if promote not in policies:
            raise InvalidArgument(f"promote must be one of {sorted(policies)}, got {promote!r}")
        if max_time_min is not None and epochs is not None:
            raise InvalidArgument("give one budget: max_time_min or epochs")
        request = tpb.SubmitTrainingJobRequest(
            request_id=request_id, dataset=_text_field(dataset, "dataset"), recipe=recipe, recipe_yaml=recipe_yaml,
            overrides=_text_list([overrides] if isinstance(overrides, str) else overrides, "overrides"),
            base_model=_text_field(base_model, "base_model"), model_name=_text_field(model_name, "model_name"),
            device=device, nproc_per_node=nproc_per_node,
            promote=policies[promote], gate_margin=gate_margin,
        )
        if max_time_min is not None:
            request.max_time_min = max_time_min
        elif epochs is not None:
            request.epochs = epochs
        return TrainingJobHandle(self, self._call(self._training, "SubmitTrainingJob", request))

    def list_jobs(self, filter: str = "", page_size: int = 50) -> Iterator[JobStatus | TrainingStatus]:
        """Every job (oldest first), fetched page by page; ``filter`` e.g. ``"state=RUNNING"``."""
        token, seen = "", set()
        while True:
            response = self._ops_call("ListOperations", operations_pb2.ListOperationsRequest(
                name="jobs", filter=filter, page_size=page_size, page_token=token))
            for op in response.operations:
                yield handle_for(self, op).status(refresh=False)
            token = response.next_page_token
            if not token:
                return
            if token in seen:  # a server that hands back a page token again would be listed for ever
                raise SegsvcError(f"the server sent the page token {token[:40]!r} twice while listing jobs: "
                                  "stopped there (the jobs above were listed)")
            seen.add(token)

    # -- datasets -----------------------------------------------------------------------
    def _local_upload(self, method: Callable, messages: Iterator, reading: Callable[[], Path | None],
                      timeout_s: float | None, to_error: Callable[[grpc.RpcError], SegsvcError]):
        """Call a client-streaming ``method`` whose ``messages`` read local files (``reading()``: the one being
        read, where known; an ``OSError`` from ``open`` names its file itself).

        A file that fails while it is read (removed, unreadable, changed size) would raise in gRPC's request
        thread: UNKNOWN "Exception iterating requests!" with a traceback on stderr, naming nothing. Here it
        cancels the call instead (the server keeps nothing of it) and is raised as an ``InvalidArgument``
        naming the file.
        """
        self._check_open()
        failed: list[SegsvcError] = []
        started = threading.Event()
        calls: list[Any] = []

        def guarded() -> Iterator:
            try:
                yield from messages
                return
            except OSError as exc:
                file = exc.filename or reading()
                failed.append(InvalidArgument(f"cannot read {os.fspath(file) if file else 'a file to upload'}: "
                                              f"{exc.strerror or type(exc).__name__}"))
            except SegsvcError as exc:  # tar_stream: a file changed size while it was packed
                failed.append(exc)
            started.wait()
            calls[0].cancel()  # before this iterator ends: an ended stream would be a complete upload

        call = method.future(guarded(), timeout=timeout_s, metadata=self._metadata)
        calls.append(call)
        started.set()
        try:
            return call.result()
        except (grpc.RpcError, grpc.FutureCancelledError) as exc:
            if failed:
                raise failed[0] from None
            if isinstance(exc, grpc.RpcError):
                raise to_error(exc) from None
            raise
        finally:
            call.cancel()  # no-op once it ended; else (Ctrl-C) the server stops too

    def _dataset_call(self, method: str, request, timeout_s: float | None = None):
        self._check_open()
        try:
            return getattr(self._datasets, method)(request, timeout=timeout_s, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise dataset_error(exc, method) from None

    def upload_dataset(
        self,
        path: str | os.PathLike,
        name: str,
        *,
        format: str | None = None,
        dataset_yaml: str = "",
        class_names: Sequence[str] = (),
        sha256: str = "",
        progress: bool = False,
        timeout_s: float | None = None,
    ) -> datasets_pb.Dataset:
        """Upload a dataset: a local folder or a ``.tar[.gz|.bz2|.xz]``, ``.tgz`` or ``.zip`` archive.

        A folder is packed as a tar stream on the fly (``format="tar"``, the
        default) or sent file by file (``format="pairs"``); hidden files are left
        out (``segsvc.datasets.content``). ``dataset_yaml`` (text) or ``class_names``
        describe a folder that has no ``dataset.yaml``; ``sha256`` is the expected
        content hash. No deadline unless ``timeout_s``: the server validates every
        file before it answers. Raises ``DatasetInvalid`` (``.problems``: every
        problem found) when the dataset fails its check.
        """
        name, class_names = _text_field(name, "name"), _text_list(class_names, "class_names")
        path = Path(path)
        fmt = format or ("tar" if path.is_dir() else archive_format(path))
        if fmt not in UPLOAD_FORMATS or (path.is_dir() and fmt == "zip") or (not path.is_dir() and fmt == "pairs"):
            raise InvalidArgument(f"upload {os.fspath(path)!r} as {fmt!r}: folders go as tar or pairs, "
                                  f"archive files as tar or zip")
        files = local_files(path) if path.is_dir() else [("", path)]
        if path.is_dir() and fmt == "tar":
            files = folder_tar_names(files)  # rooted at the folder even when its only entry is a folder
        total = sum(_readable_size(file) for _, file in files)  # a file it cannot read is named before any call
        bar = progress_bar(progress, total=total, unit="B", unit_scale=True, desc=f"upload {name}")
        metadata = datasets_pb.UploadDatasetMetadata(name=name, format=UPLOAD_FORMATS[fmt], dataset_yaml=dataset_yaml,
                                                     class_names=class_names, sha256=sha256)

        reading: list[Path] = [path]  # the file being read, for an error that names none

        def packed() -> Iterator[tuple[str, Path]]:
            for rel, file in files:
                reading[0] = file
                yield rel, file

        def messages() -> Iterator[datasets_pb.UploadDatasetRequest]:
            yield datasets_pb.UploadDatasetRequest(metadata=metadata)
            if path.is_dir() and fmt == "tar":
                for data in tar_stream(packed(), on_bytes=bar.update):
                    yield datasets_pb.UploadDatasetRequest(chunk=datasets_pb.DatasetChunk(data=data))
                return
            for rel, file in packed():
                for data, last in file_chunks(file):
                    bar.update(len(data))
                    yield datasets_pb.UploadDatasetRequest(chunk=datasets_pb.DatasetChunk(name=rel, data=data,
                                                                                           last=last))

        try:
            return self._local_upload(self._datasets.UploadDataset, messages(), lambda: reading[0], timeout_s,
                                      dataset_error)
        finally:
            bar.close()

    def register_dataset(self, path: str | os.PathLike, name: str = "",
                         timeout_s: float | None = None) -> datasets_pb.Dataset:
        """Register a folder under the server's ``--data-root`` (relative to it) as a dataset."""
        path = os.fspath(path) if isinstance(path, os.PathLike) else _text_field(path, "path")
        request = datasets_pb.RegisterDatasetRequest(path=path, name=_text_field(name, "name"))
        return self._dataset_call("RegisterDataset", request, timeout_s)

    def list_datasets(self) -> list[datasets_pb.Dataset]:
        return list(self._dataset_call("ListDatasets", datasets_pb.ListDatasetsRequest(), self.timeout_s).datasets)

    def get_dataset(self, name: str) -> datasets_pb.Dataset:
        """A dataset by name, content hash or a unique hash prefix."""
        request = datasets_pb.GetDatasetRequest(name=_text_field(name, "name"))
        return self._dataset_call("GetDataset", request, self.timeout_s)

    def delete_dataset(self, name: str) -> datasets_pb.Dataset:
        """Forget a dataset (its uploaded files go too); returns what it was."""
        request = datasets_pb.DeleteDatasetRequest(name=_text_field(name, "name"))
        return self._dataset_call("DeleteDataset", request, self.timeout_s).dataset

    # -- models and health --------------------------------------------------------------
    def list_models(self) -> list[pb.ModelInfo]:
        return list(self._call(self._stub, "ListModels", pb.ListModelsRequest()).models)

    def get_model(self, model: str, version: int | None = None) -> pb.ModelInfo:
        request = pb.GetModelRequest(**_model_fields(model, version))
        return self._call(self._stub, "GetModel", request)

    def load_model(self, model: str, version: int | None = None, timeout_s: float | None = None) -> pb.ModelInfo:
        request = pb.LoadModelRequest(**_model_fields(model, version))
        return self._call(self._stub, "LoadModel", request, timeout_s)

    def unload_model(self, model: str, version: int | None = None) -> list[int]:
        request = pb.UnloadModelRequest(**_model_fields(model, version))
        response = self._call(self._stub, "UnloadModel", request)
        return list(response.unloaded_versions)

    def set_default_version(self, model: str, version: int | None) -> pb.ModelInfo:
        request = pb.SetDefaultVersionRequest(**_model_fields(model, version))
        return self._call(self._stub, "SetDefaultVersion", request)

    def health(self, service: str = "", timeout_s: float = 5.0) -> str:
        """``"SERVING"``, ``"NOT_SERVING"``, ... for the server (or one service).

        The health protocol answers NOT_FOUND, with no message, for a service it has no status for: raised as
        ``NotFound`` naming the service.
        """
        request = health_pb2.HealthCheckRequest(service=_text_field(service, "service"))
        self._check_open()
        try:
            response = self._health.Check(request, timeout=timeout_s)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND and not exc.details():
                error = NotFound(f"no health status for service {service!r}: the server has one for '' (itself), "
                                 "its gRPC services and segsvc.model.<name> (each model)")
                error.code = grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]  # as error_from_status sets it
                raise error from None
            raise error_from_rpc(exc, "Check") from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def wait_until_serving(self, timeout_s: float = 60.0, poll_s: float = 0.2) -> None:
        """Block until health says SERVING; raises ``Unavailable`` after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                last = self.health(timeout_s=max(0.1, min(2.0, deadline - time.monotonic())))
                if last == "SERVING":
                    return
            except SegsvcError as exc:
                last = str(exc)
            time.sleep(poll_s)
        raise Unavailable(f"{self.address} is not SERVING after {timeout_s:.0f} s (last: {last})")
