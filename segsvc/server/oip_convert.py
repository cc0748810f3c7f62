"""Open Inference Protocol messages <-> the inference core's arguments and numpy arrays.

What segsvc serves over the protocol (``ModelMetadata`` says the same):

- inputs, exactly one per request:
  ``image``  BYTES ``[N]``: encoded PNG/JPEG/TIFF/BMP/WebP images, all of one size;
  ``pixels`` UINT8 ``[N, H, W, C]`` (C 1, 3 or 4: grey, RGB, RGBA; always 4-D, so a forgotten batch
  dimension is refused rather than read as N grey images): raw pixels, row-major. ``ModelMetadata``
  declares ``[-1, -1, -1, C]`` with the model's own channel count (what perf_analyzer generates); the
  other counts are converted as ``Segment`` converts them.
  Either in ``inputs[0].contents`` or in ``raw_input_contents`` (what tritonclient sends).
- outputs: ``labels`` UINT8 ``[N, H, W]`` (UINT16 above 256 classes) and ``confidence``
  UINT8 ``[N, H, W]`` (round(255 x the top softmax probability)); a request that names no
  output gets both, as the protocol says ("all outputs specified in the model config"), one
  that names some gets those. Always in ``raw_output_contents``, which is what tritonclient
  reads; an output's ``binary_data`` parameter (HTTP-bridged clients) is accepted and
  changes nothing.
- request parameters (optional): ``tile_size`` (int), ``tile_overlap`` (double) and
  ``flip_tta`` (bool) override the model's inference contract; ``timeout`` (int,
  microseconds, as tritonclient sends it; 0: none) bounds the call like a gRPC deadline;
  ``priority`` (a non-negative int, as tritonclient sends it) is accepted and ignored:
  segsvc's two batcher lanes (``Priority``) put batch jobs below every interactive call,
  and every protocol request is interactive. Sequence batching's ``sequence_id``,
  ``sequence_start`` and ``sequence_end`` are refused: every request stands alone.
- model names: required (``model_name``); an empty one is refused, except by ``ModelReady``
  (not ready) and ``ModelStatistics`` (every model), as the protocol says.
- model versions: ``""`` and ``"-1"`` (Triton's spelling) mean the default version.

Like ``convert.py``, functions here are pure (no I/O, no event loop); every malformed
tensor raises ``InvalidArgument`` naming the problem, before anything is decoded. The
declared sizes come first: images over the pixel limit are refused from their shape or
header before any value is read, and outputs over the server's message limit
(``check_outputs_size``, N x H x W bytes per output) before any image is decoded.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from segsvc.errors import InvalidArgument, InvalidImage
from segsvc.inference.batcher import BatchingConfig
from segsvc.inference.codec import check_pixels
from segsvc.inference.engine import InferenceOptions
from segsvc.inference.manager import ModelStatus, VersionState
from segsvc.inference.predictor import labels_dtype
from segsvc.inference.service import EncodedImage, ImageSource, RawPixels, Segmentation
from segsvc.inference.statistics import Duration, StatisticsSnapshot
from segsvc.models.artifact import Manifest
from segsvc.server.errors import check_response_size
from segsvc.server.oip_pb import grpc_service_pb2 as pb
from segsvc.server.oip_pb import model_config_pb2 as mc

IMAGE, PIXELS = "image", "pixels"
LABELS, CONFIDENCE = "labels", "confidence"
INPUTS_HELP = "'image' (BYTES [N], encoded images) or 'pixels' (UINT8 [N, H, W, C])"
PLATFORM = "segsvc"
# Triton's names: "model_repository(unload_dependents)" as tritonclient always sends unload_dependents
EXTENSIONS = ("model_repository", "model_repository(unload_dependents)", "model_configuration", "statistics",
              "parameters")
SEQUENCE_PARAMETERS = ("sequence_id", "sequence_start", "sequence_end")  # what tritonclient sends for sequence_id
PARAMETERS_HELP = ("tile_size (int), tile_overlap (double), flip_tta (bool), timeout (int, microseconds, 0: none), "
                   "priority (int, ignored)")
DEFAULT_VERSION = "-1"  # like the empty string: Triton's "default version" (the newest loaded)
DATATYPES = {np.dtype(np.uint8): "UINT8", np.dtype(np.uint16): "UINT16"}
_VERSION = re.compile(r"[1-9][0-9]{0,17}")
LENGTH_PREFIX_BYTES = 4  # a raw BYTES element: its length as uint32 little-endian, then its bytes
PIXEL_CHANNELS = (1, 3, 4)  # grey, RGB, RGBA (alpha dropped): what codec.raw_image takes


@dataclass(frozen=True, eq=False)
class InferCall:
    """What one ``ModelInfer`` request asks of the core: the images (all ``size``, height x width), the options,
    the outputs in order."""

    sources: tuple[ImageSource, ...]
    size: tuple[int, int]
    options: InferenceOptions
    outputs: tuple[str, ...]
    timeout_s: float | None = None


def model_name(text: str) -> str:
    """A request's model name, which the protocol requires: an empty one is refused, not read as "the one loaded
    model" as on ``segsvc.v1`` (``ModelReady`` answers it not ready, ``ModelStatistics`` reads it as every model;
    a request that worked while one model was loaded would serve whichever that is, then fail once two are)."""
    if not text:
        raise InvalidArgument("the request's model name is empty: every Open Inference Protocol request names its "
                              "model (RepositoryIndex lists them)")
    return text


def version_of(text: str) -> int | None:
    """A protocol version string -> the model version (``""`` or ``"-1"``: the default version, None)."""
    if not text or text == DEFAULT_VERSION:
        return None
    if not _VERSION.fullmatch(text):
        raise InvalidArgument(f"model version must be a positive integer, or empty or -1 (the default), "
                              f"got {text[:32]!r}")
    return int(text)


def _value(param) -> object:  # type: ignore[no-untyped-def]
    """The value an ``InferParameter`` or ``ModelRepositoryParameter`` holds (None when unset)."""
    which = param.WhichOneof("parameter_choice")
    return getattr(param, which) if which else None


def _request_parameters(params: Mapping) -> tuple[dict, float | None]:
    """``(InferenceOptions keyword arguments, timeout_s)`` of the request's parameters (``timeout`` 0: None;
    ``priority`` is checked and dropped)."""
    kwargs: dict = {}
    timeout_s = None
    sequence = [key for key in SEQUENCE_PARAMETERS if key in params]
    if sequence:  # tritonclient sends all three once sequence_id is set: name the one the caller chose
        raise InvalidArgument(f"request parameter {sequence[0]!r} is not supported: segsvc has no sequence "
                              "batching (every request stands alone); leave sequence_id, sequence_start and "
                              "sequence_end unset")
    for key in params:
        value = _value(params[key])
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if key == "tile_size" and is_int:
            kwargs["tile_size"] = value
        elif key == "tile_overlap" and (is_int or isinstance(value, float)):
            kwargs["tile_overlap"] = float(value)  # type: ignore[arg-type]
        elif key == "flip_tta" and isinstance(value, bool):
            kwargs["flip_tta"] = value
        elif key == "timeout" and is_int and value >= 0:  # type: ignore[operator]
            timeout_s = value / 1e6 if value else None  # type: ignore[operator]
        elif key == "priority" and is_int and value >= 0:  # type: ignore[operator]
            pass  # every protocol request runs in the interactive lane
        elif key in ("tile_size", "tile_overlap", "flip_tta", "timeout", "priority"):
            raise InvalidArgument(f"request parameter {key!r} has the wrong type or value ({value!r}); "
                                  f"expected {PARAMETERS_HELP}")
        else:
            raise InvalidArgument(f"request parameter {key[:64]!r} is not supported; supported: {PARAMETERS_HELP}")
    return kwargs, timeout_s


def _requested_outputs(outputs: Sequence) -> tuple[str, ...]:
    """The outputs named, in order; none named: every output the model declares."""
    names: list[str] = []
    for out in outputs:
        if out.name not in (LABELS, CONFIDENCE):
            raise InvalidArgument(f"unknown output {out.name[:64]!r}; outputs: 'labels', 'confidence'")
        if out.name in names:
            raise InvalidArgument(f"output {out.name!r} is requested twice")
        unsupported = sorted(k[:64] for k in out.parameters if k != "binary_data")  # gRPC outputs are always raw
        if unsupported:
            raise InvalidArgument(f"output {out.name!r}: parameters {unsupported[:4]} are not supported")
        names.append(out.name)
    return tuple(names) or (LABELS, CONFIDENCE)


def infer_call(request: pb.ModelInferRequest, max_images: int, max_pixels: int) -> InferCall:
    """Validate a ``ModelInferRequest`` and turn it into image sources and options (nothing decoded).

    The images' count and size (``max_pixels`` each) are checked from the shape or the headers before any
    pixel value is read or converted."""
    kwargs, timeout_s = _request_parameters(request.parameters)
    outputs = _requested_outputs(request.outputs)
    try:
        options = InferenceOptions(confidence=CONFIDENCE in outputs, **kwargs)
    except InvalidArgument as exc:
        raise InvalidArgument(f"request parameters: {exc}") from None
    if len(request.inputs) != 1:
        names = [t.name[:64] for t in request.inputs][:4]
        raise InvalidArgument(f"ModelInfer takes exactly one input, {INPUTS_HELP}; got {len(request.inputs)}: {names}")
    tensor = request.inputs[0]
    raw = None
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise InvalidArgument(f"raw_input_contents has {len(request.raw_input_contents)} entries for 1 input")
        if tensor.contents.ListFields():
            raise InvalidArgument(f"input {tensor.name[:64]!r} has data in both contents and raw_input_contents")
        raw = request.raw_input_contents[0]
    if tensor.parameters:
        raise InvalidArgument(f"input {tensor.name[:64]!r}: parameters {sorted(tensor.parameters)[:4]} are not "
                              "supported (shared memory is not available)")
    if tensor.name == IMAGE:
        sources, size = _encoded_images(tensor, raw, max_images, max_pixels)
    elif tensor.name == PIXELS:
        sources, size = _raw_pixels(tensor, raw, max_images, max_pixels)
    else:
        raise InvalidArgument(f"unknown input {tensor.name[:64]!r}; inputs: {INPUTS_HELP}")
    return InferCall(sources, size, options, outputs, timeout_s)


def _check_pixels(name: str, height: int, width: int, max_pixels: int) -> None:
    try:
        check_pixels(height, width, max_pixels)
    except InvalidImage as exc:
        raise type(exc)(f"input {name!r}: {exc}") from None


def _batch_size(tensor, ranks: tuple[int, ...], expected: str, max_images: int) -> int:  # type: ignore[no-untyped-def]
    shape = list(tensor.shape)
    if len(shape) not in ranks or any(d < 1 for d in shape):
        raise InvalidArgument(f"input {tensor.name!r} must have shape {expected} with positive sizes, got {shape[:8]}")
    if shape[0] > max_images:
        raise InvalidArgument(f"input {tensor.name!r} holds {shape[0]} images; at most {max_images} per request "
                              "(--max-stream-in-flight, or --max-queue where lower): split the batch")
    return shape[0]


def _only_field(tensor, field: str) -> None:  # type: ignore[no-untyped-def]
    used = [f.name for f, _ in tensor.contents.ListFields() if f.name != field]
    if used:
        raise InvalidArgument(f"input {tensor.name!r} ({tensor.datatype}) carries its data in contents.{field} "
                              f"or raw_input_contents, not in {used[0]}")


def _encoded_images(tensor, raw: bytes | None, max_images: int,  # type: ignore[no-untyped-def]
                    max_pixels: int) -> tuple[tuple[ImageSource, ...], tuple[int, int]]:
    if tensor.datatype != "BYTES":
        raise InvalidArgument(f"input 'image' must be BYTES (encoded images), got {tensor.datatype[:16]!r}; "
                              "send raw pixels as input 'pixels' (UINT8)")
    n = _batch_size(tensor, (1,), "[N]", max_images)
    if raw is None:
        _only_field(tensor, "bytes_contents")
        items = list(tensor.contents.bytes_contents)
    else:
        items = _split_bytes(raw, n)
    if len(items) != n:
        raise InvalidArgument(f"input 'image' has shape [{n}] but holds {len(items)} elements")
    sources = tuple(EncodedImage(bytes(item)) for item in items)
    sizes = []
    for i, source in enumerate(sources):  # headers only: a bad or oversized image is refused before decoding
        try:
            sizes.append(source.peek())
        except InvalidImage as exc:
            raise type(exc)(f"input 'image' element {i}: {exc}") from None
    if len(set(sizes)) > 1:
        (h0, w0), (h1, w1) = sizes[0], next(s for s in sizes if s != sizes[0])
        raise InvalidArgument(f"the images of input 'image' must share one size (outputs are [N, H, W] tensors), "
                              f"got {w0}x{h0} and {w1}x{h1}: send them in separate requests")
    _check_pixels(IMAGE, *sizes[0], max_pixels)
    return sources, sizes[0]


def _split_bytes(raw: bytes, n: int) -> list[memoryview]:
    """The elements of a raw BYTES tensor (each a 4-byte little-endian length, then the bytes)."""
    view, items, offset = memoryview(raw), [], 0
    while offset < len(view):
        if len(items) == n:
            raise InvalidArgument(f"raw contents of input 'image' hold more than the {n} elements of its shape")
        if offset + LENGTH_PREFIX_BYTES > len(view):
            raise InvalidArgument(f"raw contents of input 'image' end inside the length of element {len(items)}")
        size = int.from_bytes(view[offset:offset + LENGTH_PREFIX_BYTES], "little")
        offset += LENGTH_PREFIX_BYTES
        if offset + size > len(view):
            raise InvalidArgument(f"raw contents of input 'image': element {len(items)} declares {size} bytes, "
                                  f"{len(view) - offset} remain")
        items.append(view[offset:offset + size])
        offset += size
    return items


def _raw_pixels(tensor, raw: bytes | None, max_images: int,  # type: ignore[no-untyped-def]
                max_pixels: int) -> tuple[tuple[ImageSource, ...], tuple[int, int]]:
    if tensor.datatype != "UINT8":
        raise InvalidArgument(f"input 'pixels' must be UINT8, got {tensor.datatype[:16]!r}; "
                              "send encoded images as input 'image' (BYTES)")
    shape = [int(d) for d in tensor.shape]
    if len(shape) == 3 and all(d > 0 for d in shape):  # 3-D is ambiguous: never guessed
        hint = (f"add the batch dimension: [1, {shape[0]}, {shape[1]}, {shape[2]}]" if shape[2] in PIXEL_CHANNELS
                else f"for grey images add the channel dimension: [{shape[0]}, {shape[1]}, {shape[2]}, 1]")
        raise InvalidArgument(f"input 'pixels' must have shape [N, H, W, C], got {shape}; {hint}")
    n = _batch_size(tensor, (4,), "[N, H, W, C]", max_images)
    _check_pixels(PIXELS, shape[1], shape[2], max_pixels)  # from the shape: before any value is read
    if shape[3] not in PIXEL_CHANNELS:  # else each image failed in the core, counted there
        raise InvalidArgument(f"input 'pixels' must have 1, 3 or 4 channels (grey, RGB, RGBA), got shape {shape}")
    expected = math.prod(shape)  # Python ints: no overflow
    if raw is None:
        _only_field(tensor, "uint_contents")
        values = tensor.contents.uint_contents
        if len(values) != expected:
            raise InvalidArgument(f"input 'pixels' of shape {shape} needs {expected} values, got {len(values)}")
        array = np.fromiter(values, np.uint32, len(values))
        if array.size and int(array.max()) > 255:
            raise InvalidArgument("input 'pixels' is UINT8 but holds values above 255")
        data = array.astype(np.uint8).tobytes()
    else:
        data = raw
        if len(data) != expected:
            raise InvalidArgument(f"input 'pixels' of shape {shape} needs {expected} bytes (UINT8, row-major), "
                                  f"raw_input_contents holds {len(data)}")
    step = expected // n
    return tuple(RawPixels(data[i * step:(i + 1) * step], shape[1:]) for i in range(n)), (shape[1], shape[2])


def _remedies(images: int, outputs: Sequence[str]) -> list[str]:
    """What a caller can change so that the response fits, most effective first."""
    remedies = ["request only the 'labels' output (drop 'confidence')"] if CONFIDENCE in outputs else []
    if images > 1:
        remedies.append("send fewer images per request")
    return remedies + ["send smaller images (or tiles of them)"]


def check_outputs_size(call: InferCall, labels: np.dtype, max_bytes: int) -> None:
    """Refuse, before any work, a request whose raw outputs alone exceed the server's message limit.

    Every output is an ``[N, H, W]`` tensor of ``labels`` (the model's label type) or UINT8 (confidence)."""
    n, (height, width) = len(call.sources), call.size
    dtypes = [np.dtype(labels) if name == LABELS else np.dtype(np.uint8) for name in call.outputs]
    parts = [f"{name!r} {DATATYPES[dtype]} [{n}, {height}, {width}]" for name, dtype in zip(call.outputs, dtypes)]
    check_response_size(sum(n * height * width * dtype.itemsize for dtype in dtypes), max_bytes,
                        _remedies(n, call.outputs), detail=f" (outputs {', '.join(parts)})", at_least=True)


def infer_response(request_id: str, segs: Sequence[Segmentation], outputs: Sequence[str],
                   max_bytes: int) -> pb.ModelInferResponse:
    """The outputs of one request's images, stacked to ``[N, H, W]``, in ``raw_output_contents``; a response over
    ``max_bytes`` (the server's message limit) raises ``ResponseTooLarge``.

    Each output's bytes are made once, as ``Segment`` makes its label map's (``np.stack`` then ``tobytes``
    copied them twice), and the size is counted, not serialised (upb's ``ByteSize`` encodes the whole message): the
    default outputs, labels and confidence, cost no more than ``Segment`` with ``return_confidence``.
    """
    first = segs[0]
    response = pb.ModelInferResponse(model_name=first.model, model_version=str(first.version), id=request_id)
    columns = [[s.output.labels if name == LABELS else s.output.confidence for s in segs] for name in outputs]
    for name, arrays in zip(outputs, columns):
        dtype, shape = _tensor_of(arrays)
        response.outputs.add(name=name, datatype=DATATYPES[dtype], shape=shape)
    size = response.ByteSize()  # before the raw contents are in: cheap
    for arrays in columns:
        data = b"".join(np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")) for a in arrays)  # one copy
        size += _bytes_field_size(len(data))
        response.raw_output_contents.append(data)
    check_response_size(size, max_bytes, _remedies(len(segs), outputs))
    return response


def _tensor_of(arrays: Sequence[np.ndarray | None]) -> tuple[np.dtype, list[int]]:
    """The dtype and ``[N, H, W]`` shape of one output of a request's images (all the same size)."""
    first = arrays[0]
    if first is None or any(a is None or a.shape != first.shape or a.dtype != first.dtype for a in arrays):
        raise RuntimeError("the images of one request have outputs of different sizes or types, or none")
    return first.dtype, [len(arrays), *first.shape]


def _bytes_field_size(length: int) -> int:
    """Encoded size of one ``raw_output_contents`` element of ``length`` bytes: tag, length varint, bytes."""
    return 1 + max(1, (length.bit_length() + 6) // 7) + length


def model_metadata(name: str, versions: Sequence[int], manifest: Manifest) -> pb.ModelMetadataResponse:
    """Inputs and outputs of a model version; -1 marks a size that each request chooses."""
    tensor = pb.ModelMetadataResponse.TensorMetadata
    labels = DATATYPES[labels_dtype(manifest.spec.num_classes)]
    return pb.ModelMetadataResponse(
        name=name, versions=[str(v) for v in versions], platform=PLATFORM,
        inputs=[tensor(name=IMAGE, datatype="BYTES", shape=[-1]),
                tensor(name=PIXELS, datatype="UINT8", shape=[-1, -1, -1, manifest.input.channels])],
        outputs=[tensor(name=LABELS, datatype=labels, shape=[-1, -1, -1]),
                 tensor(name=CONFIDENCE, datatype="UINT8", shape=[-1, -1, -1])],
    )


def model_config(name: str, versions: Sequence[int], manifest: Manifest, *, backend: str, device: str,
                 batching: BatchingConfig, max_images: int) -> mc.ModelConfig:
    """The version's configuration in Triton's terms, as perf_analyzer and model-analyzer read it.

    The first dimension of every tensor is the batch (``max_batch_size``: the images one
    ``ModelInfer`` may carry), so ``dims`` leave it out, as in ``config.pbtxt``. Both inputs
    are ``optional``: a request sends exactly one of them. The dynamic batcher is described
    when batching is on: its batches fill to ``preferred_batch_size`` or flush after
    ``max_queue_delay_microseconds``. ``parameters["classes"]`` holds the class names in
    label order, as JSON.
    """
    labels = mc.DataType.Value("TYPE_" + DATATYPES[labels_dtype(manifest.spec.num_classes)])
    kind, _, index = device.partition(":")
    group = mc.ModelInstanceGroup
    instances = (group(name=f"{name}_0", count=1, kind=group.KIND_GPU, gpus=[int(index or 0)]) if kind == "cuda"
                 else group(name=f"{name}_0", count=1, kind=group.KIND_CPU))
    config = mc.ModelConfig(
        name=name, platform=PLATFORM, backend=backend, max_batch_size=max_images,
        version_policy=mc.ModelVersionPolicy(specific=mc.ModelVersionPolicy.Specific(versions=list(versions))),
        input=[mc.ModelInput(name=IMAGE, data_type=mc.TYPE_STRING, dims=[], optional=True),
               mc.ModelInput(name=PIXELS, data_type=mc.TYPE_UINT8, format=mc.ModelInput.FORMAT_NHWC,
                             dims=[-1, -1, manifest.input.channels], optional=True)],
        output=[mc.ModelOutput(name=LABELS, data_type=labels, dims=[-1, -1]),
                mc.ModelOutput(name=CONFIDENCE, data_type=mc.TYPE_UINT8, dims=[-1, -1])],
        instance_group=[instances],
        parameters={"classes": mc.ModelParameter(string_value=json.dumps(list(manifest.class_names)))},
    )
    if batching.enabled:
        config.dynamic_batching.CopyFrom(mc.ModelDynamicBatching(
            preferred_batch_size=[batching.max_batch_size],
            max_queue_delay_microseconds=round(batching.max_delay_s * 1e6),
            default_queue_policy=mc.ModelQueuePolicy(max_queue_size=batching.max_queue_size)))
    return config


def _duration(d: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=d.count, ns=d.ns)


def model_statistics(name: str, version: int, stats: StatisticsSnapshot) -> pb.ModelStatistics:
    """One loaded version's ``ModelStatistics`` (``segsvc.inference.statistics`` says what each figure counts).

    Unlike the protocol, which counts ``success`` and ``fail`` per request, segsvc counts per image: a
    ``ModelInfer`` of N images adds N (as do N ``Segment`` calls), since the core sees images, not requests."""
    return pb.ModelStatistics(
        name=name, version=str(version), last_inference=stats.last_inference_ms,
        inference_count=stats.inference_count, execution_count=stats.execution_count,
        inference_stats=pb.InferStatistics(
            success=_duration(stats.success), fail=_duration(stats.fail), queue=_duration(stats.queue),
            compute_input=_duration(stats.compute_input), compute_infer=_duration(stats.compute_infer),
            compute_output=_duration(stats.compute_output)),
        batch_stats=[pb.InferBatchStatistics(batch_size=size, compute_infer=_duration(b.compute_infer),
                                             compute_output=_duration(b.compute_output))
                     for size, b in sorted(stats.batches.items())],
    )


_INDEX_STATES = {VersionState.READY: "READY", VersionState.LOADING: "LOADING",
                 VersionState.AVAILABLE: "UNAVAILABLE", VersionState.FAILED: "UNAVAILABLE"}


def repository_index(statuses: Sequence[ModelStatus], ready_only: bool) -> pb.RepositoryIndexResponse:
    """One entry per model version on disk or loaded, with Triton's state names (and why one is unavailable)."""
    response = pb.RepositoryIndexResponse()
    for status in statuses:
        for v in status.version_status:
            if ready_only and v.state != VersionState.READY:
                continue
            reason = v.reason or ("not loaded" if v.state == VersionState.AVAILABLE else "")
            response.models.add(name=status.name, version=str(v.version), state=_INDEX_STATES[v.state], reason=reason)
    return response


def check_repository_request(repository_name: str, parameters: Mapping, allowed: tuple[str, ...] = ()) -> None:
    """Refuse what segsvc's one repository cannot do: a named repository, config overrides, file uploads."""
    if repository_name:
        raise InvalidArgument(f"repository_name {repository_name[:64]!r}: segsvc serves one model repository; "
                              "leave it empty")
    unknown = sorted(k[:64] for k in parameters if k not in allowed)
    if unknown:
        raise InvalidArgument(f"parameters {unknown[:4]} are not supported: segsvc loads models as they are "
                              "in its repository (no config override, no file upload)")
