"""Messages <-> numpy arrays and dataclasses: the only place that reads or builds ``*_pb2`` objects.

Functions here are pure (no I/O, no event loop), so the servicer can run the
heavy ones (decoding, PNG encoding) on its I/O threads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from segsvc.errors import InvalidArgument, InvalidImage
from segsvc.inference.codec import encode_png, overlay
from segsvc.inference.engine import InferenceOptions, Output
from segsvc.inference.manager import ModelStatus
from segsvc.inference.service import EncodedImage, ImageSource, RawPixels, Segmentation
from segsvc.models.artifact import Manifest
from segsvc.v1 import segmentation_pb2 as pb

ENCODINGS = {
    pb.OUTPUT_ENCODING_UNSPECIFIED: "raw",
    pb.OUTPUT_ENCODING_RAW_UINT8: "raw_uint8",
    pb.OUTPUT_ENCODING_RAW_UINT16: "raw_uint16",
    pb.OUTPUT_ENCODING_PNG: "png",
    pb.OUTPUT_ENCODING_OVERLAY_PNG: "overlay_png",
}
DEFAULT_OVERLAY_ALPHA = 0.5
DEFAULT_TILE_OVERLAP = 0.25


@dataclass(frozen=True)
class OutputFormat:
    """How the label map goes back: an ``OutputEncoding`` value and the overlay opacity."""

    encoding: int = pb.OUTPUT_ENCODING_UNSPECIFIED
    overlay_alpha: float = DEFAULT_OVERLAY_ALPHA

    def check(self, manifest: Manifest) -> None:
        """Refuse encodings the model's label range does not fit (uint8 above 256 classes)."""
        if self.encoding == pb.OUTPUT_ENCODING_RAW_UINT8 and manifest.spec.num_classes > 256:
            raise InvalidArgument(
                f"OUTPUT_ENCODING_RAW_UINT8 cannot hold the {manifest.spec.num_classes} classes of model "
                f"{manifest.name!r}; use OUTPUT_ENCODING_RAW_UINT16 or OUTPUT_ENCODING_PNG"
            )


def options_from_proto(msg: pb.SegmentOptions) -> tuple[InferenceOptions, OutputFormat]:
    """Validate ``SegmentOptions`` (INVALID_ARGUMENT naming the bad field)."""
    if msg.encoding not in ENCODINGS:
        raise InvalidArgument(f"options.encoding {msg.encoding} is not an OutputEncoding value")
    alpha = float(msg.overlay_alpha) or DEFAULT_OVERLAY_ALPHA
    if not (math.isfinite(alpha) and 0.0 < alpha <= 1.0):
        raise InvalidArgument(f"options.overlay_alpha must be in (0, 1], got {msg.overlay_alpha}")
    tile_size, overlap = 0, DEFAULT_TILE_OVERLAP
    if msg.HasField("tiling"):
        tile_size = int(msg.tiling.tile_size)
        if msg.tiling.HasField("overlap"):
            overlap = float(msg.tiling.overlap)
        if not math.isfinite(overlap):
            raise InvalidArgument(f"options.tiling.overlap must be a fraction in [0, 1), got {overlap}")
    try:
        options = InferenceOptions(
            tile_size=tile_size,
            tile_overlap=overlap,
            flip_tta=bool(msg.flip_tta),
            confidence=bool(msg.return_confidence),
            class_counts=bool(msg.return_class_counts),
        )
    except InvalidArgument as exc:
        raise InvalidArgument(f"options.tiling: {exc}") from None
    return options, OutputFormat(int(msg.encoding), alpha)


def image_source(request: pb.SegmentRequest) -> ImageSource:
    """The request's ``image`` bytes or ``raw`` pixels (decoded later, on an I/O thread)."""
    which = request.WhichOneof("input")
    if which == "image":
        return EncodedImage(request.image)
    if which == "raw":
        return RawPixels(request.raw.data, tuple(request.raw.shape))
    raise InvalidImage("the request has no image: set `image` (encoded bytes) or `raw` (uint8 pixels and shape)")


def _label_map(image: np.ndarray, output: Output, fmt: OutputFormat, manifest: Manifest) -> pb.LabelMap:
    labels = output.labels
    h, w = labels.shape
    enc = fmt.encoding
    if enc == pb.OUTPUT_ENCODING_UNSPECIFIED:
        enc = pb.OUTPUT_ENCODING_RAW_UINT8 if labels.dtype == np.uint8 else pb.OUTPUT_ENCODING_RAW_UINT16
    if enc == pb.OUTPUT_ENCODING_RAW_UINT8:
        data = np.ascontiguousarray(labels, dtype=np.uint8).tobytes()
    elif enc == pb.OUTPUT_ENCODING_RAW_UINT16:
        data = np.ascontiguousarray(labels, dtype="<u2").tobytes()
    elif enc == pb.OUTPUT_ENCODING_PNG:
        data = encode_png(labels)
    else:
        data = encode_png(overlay(image, labels, manifest.palette, fmt.overlay_alpha))
    return pb.LabelMap(encoding=enc, data=data, height=h, width=w)


def segment_response(request_id: str, seg: Segmentation, fmt: OutputFormat) -> pb.SegmentResponse:
    """Build the response of one image (encodes PNGs when asked; run it off the event loop)."""
    output, manifest = seg.output, seg.manifest
    response = pb.SegmentResponse(
        request_id=request_id,
        labels=_label_map(seg.image, output, fmt, manifest),
        class_names=list(manifest.class_names),
        palette=bytes(c for rgb in manifest.palette for c in rgb),
        model=seg.model,
        model_version=seg.version,
        timings=pb.Timings(queue_ms=seg.queue_s * 1e3, inference_ms=seg.run_s * 1e3, batch_size=seg.batch_size),
    )
    if output.confidence is not None:
        response.confidence = np.ascontiguousarray(output.confidence).tobytes()
    if output.class_counts is not None:
        response.class_pixel_counts.extend(int(c) for c in output.class_counts)
    return response


def error_response(request_id: str, code: int, message: str, kind: str) -> pb.SegmentResponse:
    """A stream response that reports one request's failure."""
    return pb.SegmentResponse(request_id=request_id, error=pb.Error(code=code, message=message, kind=kind))


def model_info(status: ModelStatus) -> pb.ModelInfo:
    m = status.manifest
    metrics = {k: float(v) for k, v in m.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return pb.ModelInfo(
        name=status.name,
        version=status.version,
        versions=list(status.versions),
        loaded_versions=list(status.loaded_versions),
        default_version=status.default_version,
        default_pinned=status.default_pinned,
        ready=status.ready,
        arch=m.spec.arch,
        num_classes=m.spec.num_classes,
        class_names=list(m.class_names),
        palette=[pb.Color(r=r, g=g, b=b) for r, g, b in m.palette],
        input=pb.InputSpec(channels=m.input.channels, mean=list(m.input.mean), std=list(m.input.std)),
        ignore_index=-1 if m.ignore_index is None else m.ignore_index,
        metrics=metrics,
        created_at=m.created_at,
        output_stride=status.output_stride,
        device=status.device,
    )
