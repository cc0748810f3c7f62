"""The ``segsvc.v1.SegmentationService`` implementation on ``grpc.aio``.

A ``Segment`` call: validate the options, take a lease on the model version
(so a hot swap cannot retire it mid-request), decode and preprocess the image
on an I/O thread, queue it in the version's batcher with the call's deadline,
await the batch, and encode the response on an I/O thread. The event loop only
moves bytes and futures. ``SegmentStream`` runs the same path for many
requests of one stream at once (bounded by ``max_stream_in_flight``), answering
in completion order with each response's ``request_id``. Every failure goes
through ``server.errors``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable, Iterator

import grpc
import numpy as np

from segsvc.errors import DeadlineExceeded, Unavailable
from segsvc.inference.batcher import Batched
from segsvc.inference.engine import Engine, InferenceOptions, Job, Output
from segsvc.inference.manager import ModelManager
from segsvc.server import convert
from segsvc.server.config import LimitsConfig
from segsvc.server.errors import REQUEST_ID_KEY, abort, log_unexpected, status_of
from segsvc.server.metrics import ServerMetrics
from segsvc.v1 import segmentation_pb2 as pb
from segsvc.v1 import segmentation_pb2_grpc as pb_grpc

log = logging.getLogger("segsvc.server")


@dataclass
class _Call:
    """What is known about one request, for its metrics and its log line."""

    method: str
    request_id: str
    started: float
    model: str = "-"
    version: int = 0
    queue_s: float | None = None
    run_s: float | None = None


class SegmentationServicer(pb_grpc.SegmentationServiceServicer):
    """Serves segmentation and model management from a ``ModelManager``.

    Args:
        manager: the loaded models.
        limits: message, pixel and stream limits.
        metrics: where request metrics go.
        io_executor: threads for decoding, preprocessing and encoding.

    ``accepting`` is False until the app has loaded the models and again while
    it drains; requests then get UNAVAILABLE.
    """

    def __init__(self, manager: ModelManager, limits: LimitsConfig, metrics: ServerMetrics,
                 io_executor: Executor) -> None:
        self._manager = manager
        self._limits = limits
        self._metrics = metrics
        self._io = io_executor
        self.accepting = False
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    # -- drain ---------------------------------------------------------------------
    @contextlib.contextmanager
    def _track(self) -> Iterator[None]:
        """Count an RPC of this service as in flight (health watches are not counted)."""
        self._active += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._active -= 1
            if self._active == 0:
                self._idle.set()

    @property
    def in_flight(self) -> int:
        """RPCs of this service running now."""
        return self._active

    async def wait_idle(self) -> None:
        """Return once no RPC of this service is in flight."""
        await self._idle.wait()

    # -- bookkeeping -------------------------------------------------------------
    @staticmethod
    def _request_id(given: str, context: grpc.aio.ServicerContext) -> str:
        if given:
            return given
        for key, value in context.invocation_metadata() or ():
            if key == REQUEST_ID_KEY and value:
                return str(value)
        return uuid.uuid4().hex[:16]

    def _finish(self, call: _Call, code: str) -> None:
        total_s = time.perf_counter() - call.started
        self._metrics.observe_request(call.method, call.model, code, total_s, call.queue_s, call.run_s)
        log.info(
            "%s %s", call.method, code,
            extra={"request_id": call.request_id, "method": call.method, "model": call.model,
                   "version": call.version, "code": code, "ms": round(total_s * 1e3, 2)},
        )

    async def _handle(self, method: str, request_id: str, context: grpc.aio.ServicerContext,
                      work: Callable[[_Call], Awaitable]):
        """Run ``work``; map its failure to a status (the one place unary RPCs fail)."""
        call = _Call(method, request_id, time.perf_counter())
        with self._track():
            try:
                response = await work(call)
            except asyncio.CancelledError:
                self._finish(call, "CANCELLED")
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
            "Segment", self._request_id(request.request_id, context), context,
            lambda call: self._segment(request, deadline, call),
        )

    @staticmethod
    def _deadline(context: grpc.aio.ServicerContext) -> float | None:
        """The call's deadline on the event loop's clock (None: no deadline)."""
        remaining = context.time_remaining()
        if remaining is None:
            return None
        return asyncio.get_running_loop().time() + remaining

    def _decode_and_prepare(self, request: pb.SegmentRequest, engine: Engine,
                            options: InferenceOptions) -> tuple[np.ndarray, Job]:
        image = convert.image_from_request(request, self._limits.max_pixels)
        return image, engine.prepare(image, options)

    async def _segment(self, request: pb.SegmentRequest, deadline: float | None, call: _Call) -> pb.SegmentResponse:
        if not self.accepting:
            raise Unavailable("the server is starting or draining; retry on another replica or later")
        options, fmt = convert.options_from_proto(request.options)
        loop = asyncio.get_running_loop()
        with self._manager.lease(request.model or None, request.version or None) as lm:
            call.model, call.version = lm.name, lm.version
            fmt.check(lm.manifest)
            image, job = await loop.run_in_executor(self._io, self._decode_and_prepare, request, lm.engine, options)
            result = await self._wait(lm.batcher.submit(job, deadline=deadline), deadline)
            call.queue_s, call.run_s = result.queue_s, result.run_s
            response = await loop.run_in_executor(
                self._io, convert.segment_response, call.request_id, lm.manifest, image, result, fmt
            )
        response.timings.total_ms = (time.perf_counter() - call.started) * 1e3
        return response

    @staticmethod
    async def _wait(future: asyncio.Future, deadline: float | None) -> Batched[Output]:
        """Await the batch result; at the deadline the request leaves the queue (if it has not run)."""
        if deadline is None:
            return await future
        remaining = deadline - asyncio.get_running_loop().time()
        try:
            return await asyncio.wait_for(future, max(remaining, 0.0))
        except TimeoutError:
            raise DeadlineExceeded("the deadline passed before the image was segmented") from None

    async def SegmentStream(self, request_iterator: AsyncIterator[pb.SegmentRequest],
                            context: grpc.aio.ServicerContext) -> AsyncIterator[pb.SegmentResponse]:
        deadline = self._deadline(context)
        slots = asyncio.Semaphore(self._limits.max_stream_in_flight)
        done: asyncio.Queue = asyncio.Queue()
        tasks: set[asyncio.Task] = set()
        end = object()

        async def one(request: pb.SegmentRequest, index: int) -> None:
            call = _Call("SegmentStream", request.request_id or str(index), time.perf_counter())
            try:
                response = await self._segment(request, deadline, call)
            except asyncio.CancelledError:
                self._finish(call, "CANCELLED")
                raise
            except Exception as exc:  # one bad image fails its response, not the stream
                code, message, kind = status_of(exc, call.request_id)
                log_unexpected(log, exc, call.request_id, call.method)
                self._finish(call, code.name)
                response = convert.error_response(call.request_id, code.value[0], message, kind)
            else:
                self._finish(call, "OK")
            done.put_nowait(response)

        async def read_all() -> None:
            try:
                index = 0
                async for request in request_iterator:
                    await slots.acquire()  # back-pressure: stop reading while the window is full
                    task = asyncio.get_running_loop().create_task(one(request, index))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    index += 1
                while tasks:
                    await asyncio.wait(set(tasks))
            finally:
                done.put_nowait(end)

        with self._track():
            reader = asyncio.get_running_loop().create_task(read_all())
            try:
                while (response := await done.get()) is not end:
                    yield response
                    slots.release()  # released once the client has taken the response
                reader.result()  # surface a failure of the request stream itself
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as exc:
                await abort(context, exc, self._request_id("", context), "SegmentStream", log)
            finally:
                reader.cancel()
                for task in list(tasks):
                    task.cancel()

    # -- model management -------------------------------------------------------------
    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        async def work(call: _Call) -> pb.ListModelsResponse:
            return pb.ListModelsResponse(models=[convert.model_info(s) for s in await self._manager.describe_all()])

        return await self._handle("ListModels", self._request_id("", context), context, work)

    async def GetModel(self, request: pb.GetModelRequest, context) -> pb.ModelInfo:
        async def work(call: _Call) -> pb.ModelInfo:
            status = await self._manager.describe(request.model, request.version or None)
            call.model, call.version = status.name, status.version
            return convert.model_info(status)

        return await self._handle("GetModel", self._request_id("", context), context, work)

    async def LoadModel(self, request: pb.LoadModelRequest, context) -> pb.ModelInfo:
        async def work(call: _Call) -> pb.ModelInfo:
            lm = await self._manager.load(request.model, request.version or None)
            call.model, call.version = lm.name, lm.version
            return convert.model_info(await self._manager.describe(lm.name, lm.version))

        return await self._handle("LoadModel", self._request_id("", context), context, work)

    async def UnloadModel(self, request: pb.UnloadModelRequest, context) -> pb.UnloadModelResponse:
        async def work(call: _Call) -> pb.UnloadModelResponse:
            versions = await self._manager.unload(request.model, request.version or None)
            call.model = request.model
            return pb.UnloadModelResponse(unloaded_versions=versions)

        return await self._handle("UnloadModel", self._request_id("", context), context, work)

    async def SetDefaultVersion(self, request: pb.SetDefaultVersionRequest, context) -> pb.ModelInfo:
        async def work(call: _Call) -> pb.ModelInfo:
            self._manager.set_default(request.model, request.version or None)
            status = await self._manager.describe(request.model)
            call.model, call.version = status.name, status.version
            return convert.model_info(status)

        return await self._handle("SetDefaultVersion", self._request_id("", context), context, work)
