"""The ``segsvc.v1.SegmentationService`` implementation on ``grpc.aio``: a thin adapter.

A ``Segment`` call turns the request into arguments (``convert``), calls the
protocol-free ``InferenceService.segment`` (lease, prepare on an I/O thread,
batch, await), and encodes the response on an I/O thread. ``SegmentStream``
runs the same call for many requests of one stream at once (bounded by
``max_stream_in_flight``), answering in completion order with each response's
``request_id``. Admission and drain are the app's ``DrainGate``; every failure
goes through ``server.errors``. No response exceeds the server's message limit:
one whose raw label map and confidence alone would is refused before decoding,
an encoded one (PNG) once it is built, with ``ResponseTooLarge`` (in a stream,
that item's response carries it and the stream goes on).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable

import grpc

from segsvc.inference.codec import check_pixels
from segsvc.inference.engine import InferenceOptions
from segsvc.inference.manager import ModelManager
from segsvc.inference.predictor import labels_dtype
from segsvc.inference.service import ImageSource, InferenceService
from segsvc.models.artifact import Manifest
from segsvc.server import convert
from segsvc.server.config import LimitsConfig
from segsvc.server.errors import (abort, cancellation_code, check_response_size, clean_text, log_unexpected,
                                  request_id_of, rpc_status, status_of)
from segsvc.server.metrics import ServerMetrics
from segsvc.v1 import segmentation_pb2 as pb
from segsvc.v1 import segmentation_pb2_grpc as pb_grpc

log = logging.getLogger("segsvc.server")


@dataclass
class _Call:
    """What is known about one request, for its metrics and its log line.

    ``request_id`` is the log-safe copy (logs, trailers, ErrorInfo); ``reply_id`` is the caller's id exactly
    as sent, which the response echoes so that a caller can match it (empty: echo ``request_id``).
    """

    method: str
    request_id: str
    started: float
    reply_id: str = ""
    model: str = "-"
    version: int = 0
    queue_s: float | None = None
    run_s: float | None = None


class _PeekedOnce:
    """An image source whose header is read once: the response-size check and the core share the size."""

    def __init__(self, source: ImageSource) -> None:
        self._source = source
        self._size: tuple[int, int] | None = None
        self._peeked = False

    def peek(self) -> tuple[int, int] | None:
        if not self._peeked:
            self._size, self._peeked = self._source.peek(), True
        return self._size

    def load(self, max_pixels: int):  # type: ignore[no-untyped-def]
        return self._source.load(max_pixels)


_RAW_ENCODINGS = (pb.OUTPUT_ENCODING_UNSPECIFIED, pb.OUTPUT_ENCODING_RAW_UINT8, pb.OUTPUT_ENCODING_RAW_UINT16)


def _raw_label_bytes(fmt: convert.OutputFormat, manifest: Manifest) -> int:
    """Bytes per pixel of the label map as sent (0 for a PNG, whose size is known only once encoded)."""
    if fmt.encoding == pb.OUTPUT_ENCODING_UNSPECIFIED:
        return labels_dtype(manifest.spec.num_classes).itemsize
    return {pb.OUTPUT_ENCODING_RAW_UINT8: 1, pb.OUTPUT_ENCODING_RAW_UINT16: 2}.get(fmt.encoding, 0)


def _remedies(fmt: convert.OutputFormat, options: InferenceOptions) -> list[str]:
    """What a caller can change so that the response fits, most effective first."""
    remedies = ["drop return_confidence"] if options.confidence else []
    if fmt.encoding in _RAW_ENCODINGS:
        remedies.append("ask for OUTPUT_ENCODING_PNG labels")
    elif fmt.encoding == pb.OUTPUT_ENCODING_OVERLAY_PNG:
        remedies.append("ask for OUTPUT_ENCODING_PNG labels instead of the overlay")
    return remedies + ["send a smaller image (or tiles of it)"]


class SegmentationServicer(pb_grpc.SegmentationServiceServicer):
    """Serves segmentation through an ``InferenceService`` and model management from its manager.

    Args:
        service: the protocol-free inference core.
        limits: stream limits.
        metrics: where request metrics go.
    """

    def __init__(self, service: InferenceService, limits: LimitsConfig, metrics: ServerMetrics) -> None:
        self._service = service
        self._manager: ModelManager = service.manager
        self._limits = limits
        self._metrics = metrics

    # -- bookkeeping -------------------------------------------------------------
    def _finish(self, call: _Call, code: str) -> None:
        total_s = time.perf_counter() - call.started
        self._metrics.observe_request(call.method, call.model, code, total_s, call.queue_s, call.run_s)
        log.info(
            "%s %s", call.method, code,
            extra={"request_id": call.request_id, "method": call.method, "model": call.model,
                   "version": call.version, "code": code, "ms": round(total_s * 1e3, 2)},
        )

    async def _handle(self, method: str, request_id: str, context: grpc.aio.ServicerContext,
                      work: Callable[[_Call], Awaitable], reply_id: str = ""):
        """Run ``work``; map its failure to a status (the one place unary RPCs fail)."""
        call = _Call(method, request_id, time.perf_counter(), reply_id)
        try:
            response = await work(call)
        except asyncio.CancelledError:
            self._finish(call, cancellation_code(context.time_remaining()).name)
            raise
        except Exception as exc:
            self._finish(call, status_of(exc)[0].name)
            await abort(context, exc, call.request_id, method, log)
        self._finish(call, "OK")
        return response

    # -- segmentation ---------------------------------------------------------------
    async def Segment(self, request: pb.SegmentRequest, context: grpc.aio.ServicerContext) -> pb.SegmentResponse:
        deadline = self._deadline(context)
        return await self._handle(
            "Segment", request_id_of(request.request_id, context), context,
            lambda call: self._segment(request, deadline, call), reply_id=request.request_id,
        )

    @staticmethod
    def _deadline(context: grpc.aio.ServicerContext) -> float | None:
        """The call's deadline on the event loop's clock (None: no deadline)."""
        remaining = context.time_remaining()
        if remaining is None:
            return None
        return asyncio.get_running_loop().time() + remaining

    async def _segment(self, request: pb.SegmentRequest, deadline: float | None, call: _Call) -> pb.SegmentResponse:
        options, fmt = convert.options_from_proto(request.options)
        source = _PeekedOnce(convert.image_source(request))

        def on_lease(name: str, version: int, manifest: Manifest) -> None:
            call.model, call.version = name, version
            fmt.check(manifest)
            self._check_raw_size(source, manifest, fmt, options)

        seg = await self._service.segment(
            source, model=request.model or None, version=request.version or None,
            options=options, deadline=deadline, on_lease=on_lease,
        )
        call.queue_s, call.run_s = seg.queue_s, seg.run_s
        response = await self._service.run_io(convert.segment_response, call.reply_id or call.request_id, seg,
                                                 fmt)
        response.timings.total_ms = (time.perf_counter() - call.started) * 1e3
        check_response_size(response.ByteSize(), self._limits.max_message_bytes, _remedies(fmt, options))
        return response

    def _check_raw_size(self, source: _PeekedOnce, manifest: Manifest, fmt: convert.OutputFormat,
                        options: InferenceOptions) -> None:
        """Refuse, before any decoding, an image whose raw label map and confidence alone exceed the message limit."""
        size = source.peek()
        if size is None:
            return
        height, width = size
        check_pixels(height, width, self._service.max_pixels)  # the core's first check: an oversized image says so
        label_bytes = _raw_label_bytes(fmt, manifest)
        parts = [f"raw {8 * label_bytes}-bit labels"] if label_bytes else []
        parts += ["confidence"] if options.confidence else []
        check_response_size(height * width * (label_bytes + options.confidence), self._limits.max_message_bytes,
                            _remedies(fmt, options), detail=f" ({' and '.join(parts)} of a {width}x{height} image)",
                            at_least=True)

    async def SegmentStream(self, request_iterator: AsyncIterator[pb.SegmentRequest],
                            context: grpc.aio.ServicerContext) -> AsyncIterator[pb.SegmentResponse]:
        deadline = self._deadline(context)
        slots = asyncio.Semaphore(self._limits.max_stream_in_flight)
        done: asyncio.Queue = asyncio.Queue()
        tasks: set[asyncio.Task] = set()
        end = object()

        async def one(request: pb.SegmentRequest, index: int) -> None:
            call = _Call("SegmentStream", clean_text(request.request_id) or str(index), time.perf_counter(),
                         request.request_id)
            try:
                response = await self._segment(request, deadline, call)
            except asyncio.CancelledError:
                self._finish(call, cancellation_code(context.time_remaining()).name)
                raise
            except Exception as exc:  # one bad image fails its response, not the stream
                code, message, kind = status_of(exc, call.request_id)
                log_unexpected(log, exc, call.request_id, call.method)
                self._finish(call, code.name)
                response = convert.error_response(call.reply_id or call.request_id, kind,
                                                  rpc_status(exc, code, message, call.request_id))
            else:
                self._finish(call, "OK")
            done.put_nowait(response)

        async def read_all() -> None:
            try:
                index = 0
                requests = aiter(request_iterator)
                while True:
                    await slots.acquire()  # back-pressure: no read while the window is full (it holds the images)
                    try:
                        request = await anext(requests)
                    except StopAsyncIteration:  # the end of the stream: no image takes the slot
                        slots.release()
                        break
                    except BaseException:
                        slots.release()
                        raise
                    task = asyncio.get_running_loop().create_task(one(request, index))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    index += 1
            finally:  # also when the request stream broke: answer the images in flight first
                try:
                    while tasks:
                        await asyncio.wait(set(tasks))
                finally:
                    done.put_nowait(end)

        reader = asyncio.get_running_loop().create_task(read_all())
        try:
            while (response := await done.get()) is not end:
                yield response
                slots.release()  # released once the client has taken the response
            reader.result()  # surface a failure of the request stream itself
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:  # the stream failed as a call (its images are counted one by one): count that too
            self._metrics.observe_refused("SegmentStream", status_of(exc, "")[0].name)
            await abort(context, exc, request_id_of("", context), "SegmentStream", log)
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()

    # -- model management -------------------------------------------------------------
    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        async def work(call: _Call) -> pb.ListModelsResponse:
            return pb.ListModelsResponse(models=[convert.model_info(s) for s in await self._manager.describe_all()])

        return await self._handle("ListModels", request_id_of("", context), context, work)

    async def GetModel(self, request: pb.GetModelRequest, context) -> pb.ModelInfo:
        async def work(call: _Call) -> pb.ModelInfo:
            status = await self._manager.describe(request.model, request.version or None)
            call.model, call.version = status.name, status.version
            return convert.model_info(status)

        return await self._handle("GetModel", request_id_of("", context), context, work)

    async def LoadModel(self, request: pb.LoadModelRequest, context) -> pb.ModelInfo:
        async def work(call: _Call) -> pb.ModelInfo:
            lm = await self._manager.load(request.model, request.version or None)
            call.model, call.version = lm.name, lm.version
            return convert.model_info(await self._manager.describe(lm.name, lm.version))

        return await self._handle("LoadModel", request_id_of("", context), context, work)

    async def UnloadModel(self, request: pb.UnloadModelRequest, context) -> pb.UnloadModelResponse:
        async def work(call: _Call) -> pb.UnloadModelResponse:
            versions = await self._manager.unload(request.model, request.version or None)
            call.model = request.model
            return pb.UnloadModelResponse(unloaded_versions=versions)

        return await self._handle("UnloadModel", request_id_of("", context), context, work)

    async def SetDefaultVersion(self, request: pb.SetDefaultVersionRequest, context) -> pb.ModelInfo:
        async def work(call: _Call) -> pb.ModelInfo:
            await self._manager.set_default(request.model, request.version or None)
            status = await self._manager.describe(request.model)
            call.model, call.version = status.name, status.version
            return convert.model_info(status)

        return await self._handle("SetDefaultVersion", request_id_of("", context), context, work)
