"""Messages <-> numpy arrays and dataclasses: the only place that reads or builds ``*_pb2`` objects.

Functions here are pure (no I/O, no event loop), so the servicer can run the
heavy ones (decoding, PNG encoding) on its I/O threads.
"""

from __future__ import annotations

import asyncio
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

import grpc
import numpy as np
from google.longrunning import operations_pb2
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2, status_pb2

from segsvc.config import MAX_TILE_OVERLAP
from segsvc.errors import InvalidArgument, InvalidImage
from segsvc.inference.codec import encode_png, overlay
from segsvc.inference.engine import InferenceOptions, Output
from segsvc.inference.manager import ModelStatus
from segsvc.inference.service import EncodedImage, ImageSource, RawPixels, Segmentation
from segsvc.jobs.batch import JobRequest
from segsvc.jobs.staging import UploadSummary
from segsvc.jobs.store import Job
from segsvc.models.artifact import Manifest
from segsvc.v1 import jobs_pb2 as jobs_pb
from segsvc.v1 import segmentation_pb2 as pb
from segsvc.wire import ERROR_DOMAIN

ENCODINGS = {
    pb.OUTPUT_ENCODING_UNSPECIFIED: "raw",
    pb.OUTPUT_ENCODING_RAW_UINT8: "raw_uint8",
    pb.OUTPUT_ENCODING_RAW_UINT16: "raw_uint16",
    pb.OUTPUT_ENCODING_PNG: "png",
    pb.OUTPUT_ENCODING_OVERLAY_PNG: "overlay_png",
}
DEFAULT_OVERLAY_ALPHA = 0.5


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
    # unset tiling, overlap or flip_tta: None, i.e. the model manifest's default (InferenceOptions.resolve)
    tile_size: int | None = None
    overlap: float | None = None
    if msg.HasField("tiling"):
        tile_size = int(msg.tiling.tile_size)
        if msg.tiling.HasField("overlap"):
            overlap = float(msg.tiling.overlap)
            if not math.isfinite(overlap):
                raise InvalidArgument(
                    f"options.tiling.overlap must be a fraction in [0, {MAX_TILE_OVERLAP}], got {overlap}")
    try:
        options = InferenceOptions(
            tile_size=tile_size,
            tile_overlap=overlap,
            flip_tta=bool(msg.flip_tta) if msg.HasField("flip_tta") else None,
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


def error_response(request_id: str, kind: str, status: status_pb2.Status) -> pb.SegmentResponse:
    """A stream response that reports one request's failure: its ``google.rpc.Status`` and error class."""
    error = pb.Error(code=status.code, message=status.message, kind=kind, status=status)
    return pb.SegmentResponse(request_id=request_id, error=error)


def model_info(status: ModelStatus) -> pb.ModelInfo:
    """``ModelInfo`` of a status; the manifest's fields stay empty when its manifest could not be read."""
    info = pb.ModelInfo(
        name=status.name,
        version=status.version,
        versions=list(status.versions),
        loaded_versions=list(status.loaded_versions),
        default_version=status.default_version,
        default_pinned=status.default_pinned,
        ready=status.ready,
        output_stride=status.output_stride,
        device=status.device,
        version_status=[  # VersionState.FAILED -> VERSION_STATE_FAILED, ...
            pb.VersionStatus(version=s.version, state=pb.VersionState.Value(f"VERSION_STATE_{s.state.value}"),
                             reason=s.reason)
            for s in status.version_status
        ],
    )
    m = status.manifest
    if m is None:
        return info
    metrics = {k: float(v) for k, v in m.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    info.MergeFrom(pb.ModelInfo(
        arch=m.spec.arch,
        num_classes=m.spec.num_classes,
        class_names=list(m.class_names),
        palette=[pb.Color(r=r, g=g, b=b) for r, g, b in m.palette],
        input=pb.InputSpec(channels=m.input.channels, mean=list(m.input.mean), std=list(m.input.std)),
        ignore_index=-1 if m.ignore_index is None else m.ignore_index,
        metrics=metrics,
        created_at=m.created_at,
    ))
    return info


# -- jobs and long-running operations ------------------------------------------------
JOB_NAME_PREFIX = "jobs/"
MAX_FAILURES_IN_RESPONSE = 1000  # older stored results; new ones hold outputs.FAILURES_SHOWN (failures.jsonl: all)
_JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_JOB_STATES = {
    "QUEUED": jobs_pb.JOB_STATE_QUEUED, "RUNNING": jobs_pb.JOB_STATE_RUNNING,
    "SUCCEEDED": jobs_pb.JOB_STATE_SUCCEEDED, "FAILED": jobs_pb.JOB_STATE_FAILED,
    "CANCELLED": jobs_pb.JOB_STATE_CANCELLED,
}


def job_id_of(name: str) -> str:
    """``jobs/<id>`` or a bare id -> the id (INVALID_ARGUMENT for anything else)."""
    job_id = name[len(JOB_NAME_PREFIX):] if name.startswith(JOB_NAME_PREFIX) else name
    if not _JOB_ID.fullmatch(job_id):
        raise InvalidArgument(f"operation name must be 'jobs/<job id>', got {name[:80]!r}")
    return job_id


def job_request_from_proto(msg: jobs_pb.SubmitSegmentationJobRequest) -> JobRequest:
    options, fmt = options_from_proto(msg.options)
    which = msg.inputs.WhichOneof("source")
    alpha = float(msg.outputs.overlay_alpha) or fmt.overlay_alpha
    if not math.isfinite(alpha):
        raise InvalidArgument(f"outputs.overlay_alpha must be in (0, 1], got {alpha}")
    return JobRequest(
        model=msg.model, version=int(msg.version),
        paths=tuple(msg.inputs.paths.paths) if which == "paths" else (),
        upload_id=msg.inputs.upload_id if which == "upload_id" else "",
        options=options, color=bool(msg.outputs.color),
        overlay=bool(msg.outputs.overlay) or fmt.encoding == pb.OUTPUT_ENCODING_OVERLAY_PNG,
        overlay_alpha=alpha,
    )


def _timestamp(seconds: float | None) -> Timestamp | None:
    if seconds is None:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def job_metadata(job: Job) -> jobs_pb.JobMetadata:
    progress = job.progress or {}
    return jobs_pb.JobMetadata(
        job_id=job.id, kind=job.kind, state=_JOB_STATES[job.state], total=job.total, done=job.done,
        failed=job.failed, skipped=job.skipped, images_per_second=float(progress.get("images_per_s") or 0.0),
        eta_seconds=float(progress.get("eta_s") or 0.0), model=str(job.spec.get("model", "")),
        model_version=int(job.spec.get("version", 0)), create_time=_timestamp(job.created_at),
        start_time=_timestamp(job.started_at), update_time=_timestamp(job.updated_at),
        end_time=_timestamp(job.finished_at), request_id=job.request_id or "",
        cancel_requested=job.cancel_requested,
        # a finished job is no longer paused, whatever its last progress said
        paused_reason="" if job.finished else str(progress.get("paused_reason") or ""),
    )


def job_result(result: dict) -> jobs_pb.SegmentationJobResult:
    failures = result.get("failures") or []
    return jobs_pb.SegmentationJobResult(
        output_location=result["output_location"], total=result["total"], done=result["done"],
        failed=result["failed"], skipped=result["skipped"],
        class_pixel_totals={str(k): int(v) for k, v in result["class_pixel_totals"].items()},
        failures=[jobs_pb.ItemFailure(input=f["input"], reason=f.get("reason") or "")
                  for f in failures[:MAX_FAILURES_IN_RESPONSE]],
        results_file=result["results_file"], summary_file=result["summary_file"],
        elapsed_seconds=float(result["elapsed_seconds"]), images_per_second=float(result["images_per_second"]),
        failures_truncated=bool(result.get("failures_truncated")) or len(failures) > MAX_FAILURES_IN_RESPONSE,
        failures_file=result.get("failures_file", ""),
    )


def job_error(code: grpc.StatusCode, message: str, job: Job) -> status_pb2.Status:
    """A finished job's ``Operation.error``: the code, the message and a ``google.rpc.ErrorInfo``.

    The ``ErrorInfo`` (reason ``JOB_CANCELLED`` or ``JOB_FAILED``, domain ``segsvc.dev``,
    metadata ``jobId``) lets clients in any language tell the two apart without parsing text.
    """
    status = status_pb2.Status(code=code.value[0], message=message)
    reason = "JOB_CANCELLED" if code == grpc.StatusCode.CANCELLED else "JOB_FAILED"
    status.details.add().Pack(error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN,
                                                          metadata={"jobId": job.id}))
    return status


def operation(job: Job) -> operations_pb2.Operation:
    """A job as a ``google.longrunning.Operation`` (cancelled jobs carry CANCELLED, as the standard says)."""
    op = operations_pb2.Operation(name=JOB_NAME_PREFIX + job.id, done=job.finished)
    op.metadata.Pack(job_metadata(job))
    if job.state == "SUCCEEDED":
        op.response.Pack(job_result(job.result or {}))
    elif job.state == "CANCELLED":
        op.error.CopyFrom(job_error(grpc.StatusCode.CANCELLED,
                                    f"cancelled after {job.done} of {job.total} images; their outputs are kept", job))
    elif job.state == "FAILED":
        op.error.CopyFrom(job_error(grpc.StatusCode.ABORTED, job.error or "failed", job))
    return op


def upload_response(summary: UploadSummary) -> jobs_pb.UploadImagesResponse:
    return jobs_pb.UploadImagesResponse(
        upload_id=summary.upload_id, total_bytes=summary.total_bytes,
        files=[jobs_pb.UploadedFile(name=f.name, size=f.size, sha256=f.sha256) for f in summary.files],
    )


FILE_CHUNK_BYTES = 1 << 20


async def file_chunks(files: list[tuple[str, Path]]) -> AsyncIterator[jobs_pb.FileChunk]:
    """Stream ``(relative path, path)`` files as ``FileChunk``s of up to 1 MiB, reading on a thread."""
    for rel, path in files:
        offset = 0
        with await asyncio.to_thread(open, path, "rb") as f:
            while True:
                data = await asyncio.to_thread(f.read, FILE_CHUNK_BYTES)
                last = len(data) < FILE_CHUNK_BYTES
                yield jobs_pb.FileChunk(path=rel, offset=offset, data=data, last=last)
                offset += len(data)
                if last:
                    break
