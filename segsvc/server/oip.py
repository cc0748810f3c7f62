"""The Open Inference Protocol (KServe v2) over gRPC: ``inference.GRPCInferenceService``, a thin adapter.

Served on the same port as ``segsvc.v1``, so tritonclient (and KServe's
``grpc-v2`` protocol) works unchanged. Each method turns its request into
arguments (``oip_convert``), calls the protocol-free core (``InferenceService``
and its ``ModelManager``), and turns the result into a response (KServe's
``InferenceServicer`` over its ``DataPlane``). Every failure goes through
``server.errors.guarded``: domain errors map through the one table, anything
else is logged and answered INTERNAL without internals. What the protocol
offers beyond segmentation, the model repository, model configuration and
statistics (streaming, shared memory, trace and log settings) answers
UNIMPLEMENTED with a message saying what to use instead. ``ModelConfig`` and
``ModelStatistics`` give what perf_analyzer and model-analyzer read; the
statistics are the core's (``segsvc.inference.statistics``), so they count
every protocol and batch jobs too, and they count images: a request of N
images adds N to ``success`` or ``fail``, where the protocol counts it once.

Example (tritonclient, unchanged):
    >>> client = tritonclient.grpc.InferenceServerClient("localhost:50051")  # doctest: +SKIP
    >>> image = tritonclient.grpc.InferInput("image", [1], "BYTES")  # doctest: +SKIP
    >>> image.set_data_from_numpy(np.array([png_bytes], dtype=object))  # doctest: +SKIP
    >>> client.infer("membrane", [image]).as_numpy("labels").shape  # doctest: +SKIP
    (1, 512, 512)
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator, Callable

import grpc

import segsvc
from segsvc.errors import InvalidArgument, NotFound, Unimplemented
from segsvc.inference.predictor import labels_dtype
from segsvc.inference.service import InferenceService
from segsvc.server import oip_convert as convert
from segsvc.server.config import LimitsConfig
from segsvc.server.errors import abort, cancellation_code, guarded, request_id_of, status_of
from segsvc.server.metrics import ServerMetrics
from segsvc.server.oip_pb import grpc_service_pb2 as pb
from segsvc.server.oip_pb import grpc_service_pb2_grpc as pb_grpc

log = logging.getLogger("segsvc.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVED = ("ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelConfig, ModelStatistics, "
          "ModelInfer, RepositoryIndex, RepositoryModelLoad and RepositoryModelUnload")


def _deadline(context: grpc.aio.ServicerContext, timeout_s: float | None = None) -> float | None:
    """The earlier of the call's deadline and ``timeout_s`` from now, on the event loop's clock."""
    now = asyncio.get_running_loop().time()
    limits = [t for t in (context.time_remaining(), timeout_s) if t is not None]
    return now + min(limits) if limits else None


def _not_served(method: str, instead: str) -> str:
    return f"segsvc does not implement {method}: {instead}; this endpoint serves {SERVED}"


def _unimplemented(method: str, instead: str):  # type: ignore[no-untyped-def]
    """A unary method that answers UNIMPLEMENTED, saying what to use instead."""
    message = _not_served(method, instead)

    async def refuse(self, _request, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
        await abort(context, Unimplemented(message), "", method, log)

    refuse.__name__ = method
    return refuse


class OpenInferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Serves the Open Inference Protocol through an ``InferenceService`` and its model manager.

    Args:
        service: the protocol-free inference core.
        limits: ``max_stream_in_flight`` bounds the images of one ``ModelInfer`` request, and so does the
            batchers' ``max_queue_size`` (``--max-queue``) where it is lower: a request's images are queued at
            once, so more than the queue holds would be refused as "queue is full" on an idle server.
        metrics: where ``ModelInfer`` requests are counted, as ``segsvc.v1`` calls are.
        accepting: False while the server starts or drains.
    """

    def __init__(self, service: InferenceService, limits: LimitsConfig, metrics: ServerMetrics,
                 accepting: Callable[[], bool] = lambda: True) -> None:
        self._service = service
        self._metrics = metrics
        self._accepting = accepting
        self._manager = service.manager
        self._max_images = min(limits.max_stream_in_flight, service.manager.config.batching.max_queue_size)
        self._max_bytes = limits.max_message_bytes

    # -- health and metadata --------------------------------------------------------
    async def ServerLive(self, request: pb.ServerLiveRequest, context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._accepting() and self._manager.ready)

    async def ModelReady(self, request: pb.ModelReadyRequest, context) -> pb.ModelReadyResponse:
        """Ready or not, never an error that names models: the probe needs no token. An empty name is not
        ready (as Triton answers), rather than "the one loaded model" as on segsvc.v1; the other methods refuse
        it (``convert.model_name``), but for ModelStatistics, where it means every model."""

        async def work() -> pb.ModelReadyResponse:
            if not request.name:
                return pb.ModelReadyResponse(ready=False)
            try:
                lm = self._manager.resolve(request.name, convert.version_of(request.version))
            except NotFound:  # unknown or unloaded model or version: not ready (Triton answers the same)
                return pb.ModelReadyResponse(ready=False)
            return pb.ModelReadyResponse(ready=self._accepting() and lm.batcher.running)

        return await guarded("ModelReady", context, work, log)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="segsvc", version=segsvc.__version__,
                                         extensions=list(convert.EXTENSIONS))

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context) -> pb.ModelMetadataResponse:
        async def work() -> pb.ModelMetadataResponse:
            lm = self._manager.resolve(convert.model_name(request.name), convert.version_of(request.version))
            versions = [m.version for m in self._manager.loaded(lm.name)]
            return convert.model_metadata(lm.name, versions, lm.manifest)

        return await guarded("ModelMetadata", context, work, log)

    async def ModelConfig(self, request: pb.ModelConfigRequest, context) -> pb.ModelConfigResponse:
        async def work() -> pb.ModelConfigResponse:
            lm = self._manager.resolve(convert.model_name(request.name), convert.version_of(request.version))
            versions = [m.version for m in self._manager.loaded(lm.name)]
            return pb.ModelConfigResponse(config=convert.model_config(
                lm.name, versions, lm.manifest, backend=lm.engine.backend.name, device=str(lm.engine.device),
                batching=lm.batcher.config, max_images=self._max_images))

        return await guarded("ModelConfig", context, work, log)

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context) -> pb.ModelStatisticsResponse:
        """Every loaded version (of the named model). Unlike the protocol's per-request ``success``/``fail``,
        each image counts as one request: a ``ModelInfer`` of N images adds N."""

        async def work() -> pb.ModelStatisticsResponse:
            version = convert.version_of(request.version)
            if version is not None and not request.name:
                raise InvalidArgument("a model version needs a model name; send neither for every model")
            if version is None:
                loaded = self._manager.loaded(request.name)
            else:
                loaded = [self._manager.resolve(request.name, version)]
            return pb.ModelStatisticsResponse(model_stats=[
                convert.model_statistics(lm.name, lm.version, lm.stats.snapshot()) for lm in loaded])

        return await guarded("ModelStatistics", context, work, log)

    # -- inference ----------------------------------------------------------------------
    async def ModelInfer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        started = time.perf_counter()
        model = "-"  # the loaded model's name once resolved: a bounded metrics label, never request text
        version = 0  # the version resolved (0 before), in the log line as Segment's
        code = "OK"
        request_id = request_id_of(request.id, context)  # for the trailers and the log line, as on segsvc.v1

        async def work() -> pb.ModelInferResponse:
            nonlocal model, version, code
            try:
                # the model first, as Triton does: a request for a model that is not served says so, whatever
                # else is wrong with it
                name, resolved, manifest = self._service.resolve(convert.model_name(request.model_name),
                                                                convert.version_of(request.model_version))
                model, version = name, resolved
                # held from here, before the first await: a swap while the tensors convert must not retire
                # (nor a retain then rebuild) the version this request resolved; a request's hold, which an
                # unload lets finish (it refuses only while batch jobs hold the version)
                await self._manager.retain(name, resolved)
                try:
                    call = await self._service.run_io(convert.infer_call, request, self._max_images,
                                                      self._service.max_pixels)
                    # outputs over the message limit: refused before any image is decoded
                    convert.check_outputs_size(call, labels_dtype(manifest.spec.num_classes), self._max_bytes)
                    segs = await self._segment_all(call, name, resolved, _deadline(context, call.timeout_s))
                finally:
                    self._manager.release(name, resolved)
                return await self._service.run_io(convert.infer_response, request.id, segs, call.outputs,
                                                  self._max_bytes)
            except asyncio.CancelledError:
                code = cancellation_code(context.time_remaining()).name
                raise
            except Exception as exc:
                code = status_of(exc)[0].name
                raise
            finally:
                self._finish(request_id, model, version, code, time.perf_counter() - started)

        return await guarded("ModelInfer", context, work, log, request_id)

    def _finish(self, request_id: str, model: str, version: int, code: str, total_s: float) -> None:
        """Count one ``ModelInfer`` call and write its log line (the same fields as a segsvc.v1 call's: the
        version is 0 when the request failed before one was resolved)."""
        self._metrics.observe_request("ModelInfer", model, code, total_s)
        log.info("ModelInfer %s", code, extra={"request_id": request_id, "method": "ModelInfer", "model": model,
                                                "version": version, "code": code, "ms": round(total_s * 1e3, 2)})

    async def _segment_all(self, call: convert.InferCall, name: str, version: int,
                           deadline: float | None) -> list:
        """Segment the request's images at once, all on one version (the caller holds it, so no swap splits
        the batch)."""
        tasks = [asyncio.ensure_future(self._service.segment(source, model=name, version=version,
                                                             options=call.options, deadline=deadline))
                 for source in call.sources]
        try:
            segs = await asyncio.gather(*tasks)
        except BaseException:  # one image failed or the call was cancelled: the others stop too
            for task in tasks:
                task.cancel()
            raise
        for seg in segs:
            self._metrics.observe_stages(name, seg.queue_s, seg.run_s)
        return segs

    # -- model repository -----------------------------------------------------------------
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context) -> pb.RepositoryIndexResponse:
        async def work() -> pb.RepositoryIndexResponse:
            convert.check_repository_request(request.repository_name, {})
            return convert.repository_index(await self._manager.describe_all(), request.ready)

        return await guarded("RepositoryIndex", context, work, log)

    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest,
                                  context) -> pb.RepositoryModelLoadResponse:
        async def work() -> pb.RepositoryModelLoadResponse:
            convert.check_repository_request(request.repository_name, request.parameters)
            await self._manager.load(request.model_name)  # its newest version that loads
            return pb.RepositoryModelLoadResponse()

        return await guarded("RepositoryModelLoad", context, work, log)

    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest,
                                    context) -> pb.RepositoryModelUnloadResponse:
        async def work() -> pb.RepositoryModelUnloadResponse:
            # tritonclient always sends unload_dependents; segsvc models have no dependents
            convert.check_repository_request(request.repository_name, request.parameters, ("unload_dependents",))
            await self._manager.unload(request.model_name)  # every loaded version
            return pb.RepositoryModelUnloadResponse()

        return await guarded("RepositoryModelUnload", context, work, log)

    # -- the rest of the protocol ----------------------------------------------------------
    async def ModelStreamInfer(self, request_iterator, context) -> AsyncIterator[pb.ModelStreamInferResponse]:
        await abort(context, Unimplemented(_not_served("ModelStreamInfer", "use ModelInfer, or segsvc.v1 SegmentStream")),
                    "", "ModelStreamInfer", log)
        yield pb.ModelStreamInferResponse()  # never reached; a streaming handler is an async generator

    SystemSharedMemoryStatus = _unimplemented("SystemSharedMemoryStatus", "send tensors in the request")
    SystemSharedMemoryRegister = _unimplemented("SystemSharedMemoryRegister", "send tensors in the request")
    SystemSharedMemoryUnregister = _unimplemented("SystemSharedMemoryUnregister", "send tensors in the request")
    CudaSharedMemoryStatus = _unimplemented("CudaSharedMemoryStatus", "send tensors in the request")
    CudaSharedMemoryRegister = _unimplemented("CudaSharedMemoryRegister", "send tensors in the request")
    CudaSharedMemoryUnregister = _unimplemented("CudaSharedMemoryUnregister", "send tensors in the request")
    TraceSetting = _unimplemented("TraceSetting", "tracing is not available")
    LogSettings = _unimplemented("LogSettings", "use segsvc serve --log-level")


def add_servicer(service: InferenceService, limits: LimitsConfig, server: grpc.aio.Server, metrics: ServerMetrics,
                 accepting: Callable[[], bool] = lambda: True) -> None:
    """Serve ``inference.GRPCInferenceService`` on ``server``; ``accepting()`` is False while the server
    starts or drains (its readiness probes then answer not ready)."""
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(OpenInferenceServicer(service, limits, metrics, accepting),
                                                       server)
