"""Assembling and running the server: ``segsvc serve``.

Start-up order: lock the state folder (a second server on it fails here,
before it binds a port or loads a model), start the metrics endpoint, bind
the port with health NOT_SERVING, load the models, then report SERVING. A
start that fails or is interrupted (SIGTERM/SIGINT while the models load)
logs why and stops what it had started; a failed start's error is what
``segsvc serve`` reports (status 2), also when a signal came meanwhile.
Shutdown (SIGTERM/SIGINT; a second one is logged and changes nothing): health
NOT_SERVING at once, refuse new RPCs, give the requests in flight ``grace_s``
seconds, drain the batchers, stop. The batchers' drain takes at most the
manager's ``drain_timeout_s`` (``--drain-timeout-s``): a model version still
busy then (a forward pass that does not end) is abandoned and logged. So a
stop takes at most ``grace_s + drain_timeout_s`` from the signal (plus the
trainers' ``kill_grace_s`` with training jobs, and about a second to close):
keep that below Kubernetes' ``terminationGracePeriodSeconds`` less the
preStop sleep, or the pod is killed mid-drain. Work still running on a thread
then (that forward pass, a model build that hangs: threads cannot be
cancelled) is logged and ``segsvc serve`` exits at once with status 3
(``EXIT_ABANDONED``), those threads with it: the interpreter would wait for
them at exit, for ever. Otherwise it exits 0. SIGHUP reads the token file
again (``--token-file``), or is logged and ignored without one.

Example:
    >>> server = SegmentationServer(ServerConfig(model_repo="repo", port=0, metrics_port=None))  # doctest: +SKIP
    >>> await server.start(); print(server.port)  # doctest: +SKIP
    >>> await server.stop()  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import gc
import inspect
import logging
import os
import signal
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

import cv2
import grpc
import torch
from google.longrunning import operations_pb2, operations_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from segsvc.config import usable_cpus
from segsvc.datasets.registry import DatasetRegistry
from segsvc.errors import InvalidArgument, Overloaded, SegsvcError
from segsvc.inference.allocator import configure_allocator
from segsvc.inference.manager import ModelManager
from segsvc.inference.repository import ModelRepository
from segsvc.inference.service import InferenceService
from segsvc.jobs.batch import JobRunner
from segsvc.jobs.training import TrainingRunner
from segsvc.server import oip
from segsvc.server.auth import TokenFile, auth_interceptors, required_scope
from segsvc.server.config import ServerConfig
from segsvc.server.counting import CallCounter
from segsvc.server.datasets import DatasetServicer
from segsvc.server.errors import Refused, not_counted, refuse
from segsvc.server.gate import GATED_PREFIXES, PROBE_METHODS, DrainGate
from segsvc.server.jobs import JobServicer, OperationsServicer
from segsvc.server.metrics import ServerMetrics
from segsvc.server.servicer import SegmentationServicer
from segsvc.server.training import TrainingServicer
from segsvc.v1 import datasets_pb2, datasets_pb2_grpc
from segsvc.v1 import jobs_pb2, jobs_pb2_grpc
from segsvc.v1 import segmentation_pb2 as pb
from segsvc.v1 import segmentation_pb2_grpc as pb_grpc
from segsvc.v1 import training_pb2, training_pb2_grpc

log = logging.getLogger("segsvc.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SegmentationService"].full_name
JOB_SERVICE_NAME = jobs_pb2.DESCRIPTOR.services_by_name["JobService"].full_name
DATASET_SERVICE_NAME = datasets_pb2.DESCRIPTOR.services_by_name["DatasetService"].full_name
TRAINING_SERVICE_NAME = training_pb2.DESCRIPTOR.services_by_name["TrainingService"].full_name
OPERATIONS_SERVICE_NAME = operations_pb2.DESCRIPTOR.services_by_name["Operations"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Out of the drain's grace: how long the transport may still send responses whose handlers have returned.
SEND_GRACE_S = 1.0
MODEL_HEALTH_PREFIX = "segsvc.model."  # + model name: that model's health (see the proto's header)
EXIT_ABANDONED = 3  # ``segsvc serve``'s exit status when its stop abandoned work still running on a thread
CLOSE_S = 1.0  # what a stop past its budget still gives work on threads to end (a file write, a SQLite commit)
WRITE_FAILED_WAIT_S = 5.0  # how long a failed response write waits for gRPC to cancel its call (write_response)
# Places beyond --max-concurrent-rpcs that only the calls needing the ``manage`` scope (``auth.METHOD_SCOPES``)
# may take, so that an operator can still unload or roll back a model while inference fills the limit. Each
# holds at most one request message, as any place does: requests hold at most limit + MANAGE_RESERVE messages.
MANAGE_RESERVE = 4


def configure_threads(config: ServerConfig) -> int:
    """Torch intra-op threads = CPUs (or the flag), one inter-op thread, OpenCV single-threaded.

    Parallelism across requests comes from the I/O pool and the batcher; letting
    OpenCV and torch each spawn a thread per core on top would oversubscribe the CPUs.
    """
    threads = config.torch_threads or usable_cpus()
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (e.g. a second server in one process)
        pass
    cv2.setNumThreads(1)
    return threads


def grpc_options(config: ServerConfig) -> list[tuple[str, int]]:
    """The gRPC core options of the server: message limits and, if set, the connection age.

    ``grpc.max_connection_age_ms`` makes the server send GOAWAY to each connection
    after that age (gRPC adds +-10% jitter so clients do not reconnect in step);
    the client then reconnects and re-resolves, so behind a Kubernetes Service
    long-lived HTTP/2 clients spread over new replicas instead of staying pinned.
    RPCs in flight on the old connection get ``grace_s`` to finish.
    """
    limit = config.limits.max_message_bytes
    options = [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        ("grpc.so_reuseport", 0),  # a port in use is an error, not a silent second listener
    ]
    if config.max_connection_age_s is not None:
        options += [
            ("grpc.max_connection_age_ms", max(1, round(config.max_connection_age_s * 1000))),
            ("grpc.max_connection_age_grace_ms", round(config.grace_s * 1000)),
        ]
    return options


class CallLimit(grpc.aio.ServerInterceptor):
    """At most ``limit`` gated calls at once; one more is refused with RESOURCE_EXHAUSTED before its request is read.

    A call holds its request message (up to ``--max-message-mb``) from the moment gRPC reads it until it
    returns, also while it waits for the memory budget (``MemoryBudget``), and nothing bounded how many calls
    did: a burst of large images took the process past its container's memory limit. So the request of a call
    is read only once it has a place: a unary request is read here, after the count (gRPC would read it before
    any handler ran). A call that streams both ways (``SegmentStream``) takes its place as any call does (refused
    at once at the limit, as gRPC's own limit counts an open RPC), which covers one message; each message it
    reads while earlier ones are unanswered takes one more place first, which the stream waits for
    (back-pressure, never a refusal), and gives it back with an answer (``_StreamPlaces``). While the server
    drains, calls pass to the drain gate, which refuses them with UNAVAILABLE (retry elsewhere).

    A place is not held for nothing: a stream that has every message answered and receives no next one (a
    unary call that has not sent its request, an upload that sends no next chunk) for ``idle_s``
    (``--stream-idle-s``) is ended with
    RESOURCE_EXHAUSTED and its place given back. Open streams that sent nothing filled the limit for as long as
    their client wished, and every other call was refused meanwhile. A stream that waits for answers is never
    ended by it. And the calls that need the ``manage`` scope (``auth.required_scope``: LoadModel, UnloadModel,
    SetDefaultVersion, the repository's load and unload, datasets, training) may also take ``MANAGE_RESERVE``
    places beyond ``limit``, which no other call can: an operator can unload or roll back a model on a server
    that inference keeps full. So at most ``limit + MANAGE_RESERVE`` places are taken (``in_flight``), each
    holding at most one request message, and inference calls at most ``limit``.

    gRPC's own ``maximum_concurrent_rpcs`` would not do: it counts and refuses every method alike (grpcio 1.81:
    a health check past it gets RESOURCE_EXHAUSTED), so a busy pod would fail its probes, be taken out of the
    Service and restarted. Here health, reflection and the probes are neither counted nor refused (the gate's
    ``GATED_PREFIXES`` and ``PROBE_METHODS``): a full server still answers them.

    Args:
        limit: most gated calls in progress (``--max-concurrent-rpcs``), management's reserve aside.
        on_refused: counts each refused call.
        accepting: whether the server accepts calls (false while it drains: the drain gate refuses them).
        idle_s: how long a place may wait for a request message with nothing unanswered (``--stream-idle-s``);
            0: for ever.
    """

    def __init__(self, limit: int, on_refused: Refused = not_counted,
                 accepting: Callable[[], bool] = lambda: True, idle_s: float = 0.0) -> None:
        self.limit = limit
        self.idle_s = idle_s
        self._on_refused = on_refused
        self._accepting = accepting  # while the server drains, the drain gate refuses: UNAVAILABLE, not this
        self._active = 0
        self._room = asyncio.Event()  # set when a place is given back

    @property
    def in_flight(self) -> int:
        """Places taken: calls in progress, and the images streams hold or read beyond their first (at most
        ``limit + MANAGE_RESERVE``: management calls may go past ``limit``)."""
        return self._active

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if (handler is None or not method.startswith(GATED_PREFIXES) or method in PROBE_METHODS
                or not self._accepting()):
            return handler
        return self._limited(handler, method.rsplit("/", 1)[-1][:64], manage=required_scope(method) == "manage")

    @contextlib.asynccontextmanager
    async def _place(self, context: grpc.aio.ServicerContext, method: str,
                     manage: bool = False) -> AsyncIterator[None]:
        """Count the call for the block, or refuse it when ``limit`` calls are in progress (``limit`` and the
        reserve, for a ``manage`` call)."""
        if self._active >= self.limit + (MANAGE_RESERVE if manage else 0):
            reserve = (f" and the {MANAGE_RESERVE} more kept for management calls (LoadModel, UnloadModel, ...)"
                       if manage else "")
            await refuse(context, Overloaded(f"the server is at its limit of {self.limit} calls in progress{reserve} "
                                             f"(--max-concurrent-rpcs; a SegmentStream counts as one call, plus one "
                                             f"for each image beyond the first it holds); retry with backoff"),
                         method, log, self._on_refused)
        self._active += 1
        try:
            yield
        finally:
            self.give_back()

    async def take(self, wanted: Callable[[], bool] = lambda: True) -> bool:
        """Take one more place (a stream's next message), waiting for one to be given back; False, with none
        taken, once ``wanted()`` is false (the stream's own answers covered the message meanwhile: ``wake``).
        Never one of management's reserve."""
        while self._active >= self.limit:
            if not wanted():
                return False
            self._room.clear()
            await self._room.wait()
        if not wanted():
            return False
        self._active += 1
        return True

    def give_back(self, places: int = 1) -> None:
        self._active -= places
        self._room.set()

    def wake(self) -> None:
        """Make the calls waiting in ``take`` check again whether they still want a place."""
        self._room.set()

    def idle_ended(self, method: str) -> Overloaded:
        """The error that ends a call whose place waited ``idle_s`` for a request message with nothing unanswered.

        RESOURCE_EXHAUSTED, as the dataset upload's idle limit (--dataset-upload-idle-s): what ran out is the
        server's allowance for a place held unused, not the caller's deadline (DEADLINE_EXCEEDED, which the client
        reports as its own timeout_s passing)."""
        log.info("%s sent no request message for %g s with nothing unanswered (--stream-idle-s): ended to free "
                 "its place", method, self.idle_s, extra={"method": method, "code": "RESOURCE_EXHAUSTED"})
        return Overloaded(f"the {method} call sent no request message for {self.idle_s:g} s with nothing "
                          f"unanswered, the server's limit (--stream-idle-s): it was ended to free its place for "
                          f"other calls; open a new call when there is a request to send, and send each request "
                          f"as soon as it is ready")

    async def _within_idle(self, requests: AsyncIterator, method: str) -> AsyncIterator:
        """``requests``, each read within ``idle_s`` of the one before, else ``idle_ended`` is raised (the servicer
        sends it): an upload that sent nothing held its place for as long as its client wished."""
        messages = requests.__aiter__()
        while True:
            try:
                async with asyncio.timeout(self.idle_s):
                    message = await messages.__anext__()
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise self.idle_ended(method) from None
            yield message

    def _limited(self, handler: grpc.RpcMethodHandler, method: str, manage: bool = False) -> grpc.RpcMethodHandler:
        """``handler`` counted, with its request taken as a stream (read here for a unary request, once counted)."""
        kwargs = dict(request_deserializer=handler.request_deserializer,
                      response_serializer=handler.response_serializer)
        one = not handler.request_streaming

        async def request_of(requests: AsyncIterator, context: grpc.aio.ServicerContext) -> object:
            if not one:  # an upload (UploadImages, UploadDataset): each message within idle_s of the one before
                return self._within_idle(requests, method) if self.idle_s else requests
            try:  # a place waits for its request message at most idle_s (gRPC's clients send it with the call)
                async with asyncio.timeout(self.idle_s or None):
                    async for request in requests:
                        return request
            except TimeoutError:
                await refuse(context, self.idle_ended(method), method, log, self._on_refused)
            await refuse(context, InvalidArgument(f"the {method} call ended before its request message"), method,
                         log, self._on_refused)

        if handler.response_streaming:
            inner = handler.stream_stream if handler.request_streaming else handler.unary_stream

            async def streaming(requests: AsyncIterator, context: grpc.aio.ServicerContext) -> None:
                async with self._place(context, method, manage):  # the call's own place: refused at once at the limit
                    # images beyond the first; an idle stream is ended after idle_s
                    places = _StreamPlaces(self, method) if handler.request_streaming else None
                    try:
                        request = places.read(requests) if places is not None else await request_of(requests, context)
                        responses = inner(request, context)
                        if inspect.isawaitable(responses):  # a handler that writes with context.write()
                            await responses
                            return
                        async with contextlib.aclosing(responses):  # a failed write ends the handler's work too
                            async for response in responses:
                                await write_response(context, response)
                                if places is not None:
                                    places.answered()
                        if context.time_remaining() == 0:  # gone: gRPC cancels it (its status would fail to send)
                            await asyncio.sleep(WRITE_FAILED_WAIT_S)
                    finally:
                        if places is not None:
                            places.close()

            return grpc.stream_stream_rpc_method_handler(streaming, **kwargs)
        inner = handler.stream_unary if handler.request_streaming else handler.unary_unary

        async def unary(requests: AsyncIterator, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
            async with self._place(context, method, manage):
                response = inner(await request_of(requests, context), context)
                return await response if inspect.isawaitable(response) else response

        return grpc.stream_unary_rpc_method_handler(unary, **kwargs)


class _StreamPlaces:
    """The places of one call that streams both ways beyond the call's own, which covers one message.

    A stream counts as one call, plus one for each image beyond the first it holds: it holds
    ``max(1, unanswered + reading)`` places, ``reading`` being 1 while it reads (or waits to read) a message. An
    idle stream (everything answered) reads its next message, or the end of the stream, on its own place, so it
    never waits to end. A message read while earlier ones are unanswered takes one more place before it is read
    (a message is never held uncounted), which the stream waits for (back-pressure); each answer gives one back,
    never the call's own place (``CallLimit._place`` gives that back when the call ends). Each response answers
    one message, as ``SegmentStream``'s do.

    A read that has nothing unanswered, from its start or from the answer that leaves nothing unanswered, waits
    at most the limit's ``idle_s`` for its message (its transfer included): then the read fails with
    ``CallLimit.idle_ended``, which ends the call (the servicer counts and sends it) and so gives its place back.
    While anything is unanswered no timer runs.
    """

    def __init__(self, limit: CallLimit, method: str = "SegmentStream") -> None:
        self._limit = limit
        self._method = method
        self._extra = 0  # places taken beyond the call's own
        self._unanswered = 0  # messages read and not yet answered
        self._reading = 0  # 1 while a message is being read or waits for its place
        self._closed = False
        self._idle: asyncio.Timeout | None = None  # the pending read's idle timer (armed once nothing is unanswered)

    def _wanted(self) -> int:
        """Places beyond the call's own that what the stream holds and reads needs."""
        return max(0, self._unanswered + self._reading - 1)

    def _short(self) -> bool:
        return not self._closed and self._extra < self._wanted()

    async def read(self, requests: AsyncIterator) -> AsyncIterator:
        """``requests``, each read only once a place covers it; a read left idle for ``idle_s`` fails."""
        iterator = requests.__aiter__()
        while True:
            self._reading = 1
            while self._short():
                if await self._limit.take(self._short):
                    self._extra += 1
            if self._closed:  # the call ended while this waited: close() gave back every place it held
                return
            idle = asyncio.timeout(None)  # armed by _arm while nothing is unanswered
            try:
                async with idle:
                    self._idle = idle
                    self._arm()
                    request = await iterator.__anext__()
            except BaseException as exc:  # the end of the stream, or its failure: no message holds the read's place
                self._idle, self._reading = None, 0
                self._settle()
                if isinstance(exc, StopAsyncIteration):
                    return
                if isinstance(exc, TimeoutError) and idle.expired():
                    raise self._limit.idle_ended(self._method) from None
                raise
            self._idle = None
            self._reading, self._unanswered = 0, self._unanswered + 1  # the same places: the read is now held
            yield request

    def _arm(self) -> None:
        """Start the pending read's idle timer once nothing is unanswered (it then runs until the message)."""
        if (self._idle is not None and not self._unanswered and self._limit.idle_s
                and self._idle.when() is None):
            self._idle.reschedule(asyncio.get_running_loop().time() + self._limit.idle_s)

    def answered(self) -> None:
        """One message answered: a place beyond the call's own goes back, if it holds one."""
        if self._unanswered:
            self._unanswered -= 1
            self._settle()
            self._arm()

    def close(self) -> None:
        """The call ends: every place it took beyond the call's own goes back."""
        self._closed = True
        self._unanswered = self._reading = 0
        self._idle = None
        self._settle()

    def _settle(self) -> None:
        """Give back the places beyond what the stream still needs; a read of this stream that waits for a place
        it no longer needs (an answer came meanwhile) goes on."""
        excess = self._extra - self._wanted()
        if excess > 0:
            self._extra -= excess
            self._limit.give_back(excess)
        else:
            self._limit.wake()


async def write_response(context: grpc.aio.ServicerContext, response: object) -> None:
    """Send one response of a streaming call, written here rather than by gRPC so that a call gone meanwhile
    ends quietly.

    A client's cancel or deadline ends the call in gRPC's core, which then fails the write in flight
    (``ExecuteBatchError``, a ``grpc.aio.InternalError``) and, separately, tells grpc.aio that the client has
    gone, which cancels the handler. When the failed write came first, grpc.aio logged it at ERROR with a
    traceback ("ExecuteBatchError raised in core by servicer method"): about one call in 300 of a cancel storm.
    So a failed write waits here for that cancellation (grpc.aio then logs the call at DEBUG, "RPC cancelled");
    a write that fails for another reason, which no cancellation follows, is raised after ``WRITE_FAILED_WAIT_S``
    and logged by grpc.aio as before. (A stream whose responses end after its deadline waits likewise, as the
    status gRPC would send would fail; one cancelled by its client while idle reads an end of stream that
    grpc.aio does not tell from the client's own, so its status send can still race the cancellation.)
    """
    try:
        await context.write(response)
    except grpc.aio.InternalError:
        await asyncio.sleep(WRITE_FAILED_WAIT_S)  # the cancellation of this task, if it comes, ends this wait
        raise


def work_name(fn: Callable[..., object]) -> str:
    """The name of the function ``fn`` runs, through ``functools.partial`` and ``asyncio.to_thread``'s wrapper."""
    while isinstance(fn, functools.partial):
        if isinstance(getattr(fn.func, "__self__", None), contextvars.Context) and fn.args:
            fn = fn.args[0]  # to_thread's partial(context.run, function, ...)
        else:
            fn = fn.func
    return getattr(fn, "__qualname__", type(fn).__name__)


class WatchedExecutor(ThreadPoolExecutor):
    """A thread pool that knows which work it has not finished.

    The interpreter joins a pool's threads at exit, for as long as their work runs: a model build that hangs (on
    ``asyncio.to_thread``) kept ``segsvc serve`` alive after SIGTERM, for ever. ``serve`` waits for that work until
    its stop's deadline (``wait_idle``), then exits without it.
    """

    def __init__(self, max_workers: int | None = None, thread_name_prefix: str = "") -> None:
        super().__init__(max_workers, thread_name_prefix)
        self._work: dict[Future, str] = {}
        self._guard = threading.Lock()

    def submit(self, fn, /, *args, **kwargs) -> Future:  # type: ignore[no-untyped-def]
        future = super().submit(fn, *args, **kwargs)
        with self._guard:
            self._work[future] = work_name(fn)
        future.add_done_callback(self._ended)  # at once when already done
        return future

    def _ended(self, future: Future) -> None:
        with self._guard:
            self._work.pop(future, None)

    async def wait_idle(self, timeout_s: float) -> list[str]:
        """Wait up to ``timeout_s`` for the work submitted so far to end; the names of the work still unfinished."""
        with self._guard:
            futures = list(self._work)
        if futures:
            await asyncio.wait([asyncio.wrap_future(f) for f in futures], timeout=max(timeout_s, 0.0))
        with self._guard:
            return sorted(name for future, name in self._work.items() if future in futures)


class SegmentationServer:
    """The gRPC server, its models, health, reflection and metrics.

    Args:
        config: the whole server configuration.
        metrics: the metrics object (a fresh one with its own registry by default).
    """

    def __init__(self, config: ServerConfig, metrics: ServerMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or ServerMetrics()
        self.manager = ModelManager(
            ModelRepository(config.model_repo),
            config.manager,
            on_batch=self.metrics.observe_batch,
            on_change=self._models_changed,
        )
        self.metrics.watch_models(self.manager.snapshot, failed=self.manager.failed_versions)
        self.health = health.aio.HealthServicer()
        self.io = WatchedExecutor(max(2, config.io_threads or usable_cpus()), thread_name_prefix="segsvc-io")
        self.gate = DrainGate(on_refused=self.metrics.observe_refused)
        self.calls = CallLimit(config.limits.max_concurrent_rpcs, on_refused=self.metrics.observe_refused,
                               accepting=lambda: self.gate.accepting, idle_s=config.limits.stream_idle_s)
        self.metrics.watch_calls(lambda: self.calls.in_flight, self.calls.limit)
        self.metrics.watch_dropped(self.manager.batcher_stats)  # read on the metrics endpoint's threads
        self.service = InferenceService(self.manager, self.io, config.limits.admission)
        self.metrics.watch_memory(self.service.budget.waiting)
        self.servicer = SegmentationServicer(self.service, config.limits, self.metrics)
        # The job store, the dataset registry and the trainer open in ``start``, once the state folder is this
        # server's (``_claim_state``).
        self.datasets: DatasetRegistry | None = None
        self.jobs: JobRunner | None = None
        self.training: TrainingRunner | None = None
        self.tokens = TokenFile.of(config.auth)  # --token-file: read again when it changes (SIGHUP: at once)
        self._token_watch: asyncio.Task | None = None
        self._start_steps: asyncio.Task | None = None  # ``_start`` while it runs: what ``interrupt_start`` cancels
        self._server: grpc.aio.Server | None = None
        self._health_tasks: set[asyncio.Task] = set()
        self._stopped = asyncio.Event()
        self._stopping = False
        self.abandoned: list[str] = []  # "model:version" still busy when the drain gave up (``stop``)
        self.port = 0
        self.metrics_port: int | None = None

    # -- health ---------------------------------------------------------------------
    async def _set_health(self, status: int) -> None:
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)

    async def _publish_health(self) -> None:
        """``segsvc.model.<name>`` per model tried (also while starting); the server once it accepts calls."""
        for name, serving in self.manager.model_health().items():
            await self.health.set(MODEL_HEALTH_PREFIX + name, SERVING if serving else NOT_SERVING)
        if self.gate.accepting and not self._stopping:
            await self._set_health(SERVING if self.manager.ready else NOT_SERVING)

    def _models_changed(self) -> None:
        """Models were loaded, unloaded or failed: SERVING exactly when some model (or that model) is ready."""
        if self._stopping:
            return
        task = asyncio.get_running_loop().create_task(self._publish_health())
        self._health_tasks.add(task)
        task.add_done_callback(self._health_tasks.discard)

    # -- lifecycle --------------------------------------------------------------------
    async def start(self) -> None:
        """Claim the state folder, bind, start serving health/metrics, load the models, then report SERVING.

        A start that fails (or is interrupted: ``interrupt_start``, a signal while the models load) part-way
        logs why, then stops what it had started, so no port or lock outlives it; its error is then raised, also
        when that clean-up failed too (which is logged). Only the steps are interrupted, never that clean-up.
        """
        steps = asyncio.get_running_loop().create_task(self._start(), name="start-steps")
        self._start_steps = steps
        try:
            await steps  # cancelling ``start`` cancels the steps too
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                log.info("start interrupted: stopping what had started")
            else:
                log.error("start failed: %s; stopping what had started", _reason(exc))
            try:
                await self.stop(grace_s=0)
            except Exception:  # the start's error is what the caller must see
                log.exception("stopping what the failed start had started failed too")
            raise
        finally:
            self._start_steps = None

    def interrupt_start(self) -> bool:
        """Cancel the start's steps (SIGTERM while the models load); ``start`` then stops what had started and
        raises ``CancelledError``. False when no step runs: not starting, or a failed start already stopping what
        it had started, whose clean-up goes on and whose error stands."""
        steps = self._start_steps
        if steps is None or steps.done():
            return False
        return steps.cancel()

    def _claim_state(self) -> None:
        """Lock the state folder, then open what lives in it (the job store, the dataset registry, the trainer).

        The lock comes first: a second server on the folder fails on it before it binds a port or loads a
        model, before it opens (creates, checks) the job store, and before the registry opens, which removes
        as a crash's leftovers the work folders of datasets being received, on a folder another server runs
        that server's uploads in progress. ``stop`` releases it last.
        """
        cfg = self.config
        if cfg.jobs is not None:
            self.jobs = JobRunner.claim(self.service, cfg.jobs)  # the lock, then the store
            self.jobs.on_image = self.metrics.observe_job_image
        if cfg.datasets is not None:
            self.datasets = DatasetRegistry(cfg.datasets)
        if self.jobs is not None and cfg.training is not None:  # trains on the registered datasets
            self.training = TrainingRunner(self.jobs.store, self.manager, self.datasets, cfg.training)

    def _start_metrics(self) -> None:
        """Serve the metrics, before the gRPC port is bound: a bound gRPC server listens even unstarted, and its
        ``stop`` leaves that port open, so nothing that can fail may come between its bind and its start."""
        cfg = self.config
        if cfg.metrics_port is None:
            return
        tls = (str(cfg.tls.cert_file), str(cfg.tls.key_file)) if cfg.metrics_tls and cfg.tls else (None, None)
        try:
            self.metrics_port = self.metrics.start_http(cfg.metrics_host, cfg.metrics_port, *tls)
        except OSError as exc:
            raise InvalidArgument(f"cannot serve the metrics on {cfg.metrics_host}:{cfg.metrics_port}: "
                                  f"{exc.strerror or exc}") from None

    async def _start(self) -> None:
        cfg = self.config
        self._claim_state()
        threads = configure_threads(cfg)
        allocator = configure_allocator()
        await self._set_health(NOT_SERVING)
        interceptors = auth_interceptors(self.tokens or cfg.auth, on_refused=self.metrics.observe_refused)
        # The call limit before the gate: the gate's handlers read a unary request before they run.
        # The counter last: it sees only calls that reached a handler (refusals are counted where they are made).
        counter = CallCounter(self.metrics)
        self._server = grpc.aio.server(interceptors=[*interceptors, self.calls, self.gate, counter],
                                       options=grpc_options(cfg))
        pb_grpc.add_SegmentationServiceServicer_to_server(self.servicer, self._server)
        jobs_pb2_grpc.add_JobServiceServicer_to_server(JobServicer(self.jobs, self.training), self._server)
        operations_pb2_grpc.add_OperationsServicer_to_server(OperationsServicer(self.jobs, self.training),
                                                             self._server)
        training_pb2_grpc.add_TrainingServiceServicer_to_server(TrainingServicer(self.training), self._server)
        datasets_pb2_grpc.add_DatasetServiceServicer_to_server(DatasetServicer(self.datasets), self._server)
        oip.add_servicer(self.service, cfg.limits, self._server, self.metrics,  # inference.GRPCInferenceService
                         accepting=lambda: self.gate.accepting)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, JOB_SERVICE_NAME, TRAINING_SERVICE_NAME, OPERATIONS_SERVICE_NAME, DATASET_SERVICE_NAME,
             oip.SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME),
            self._server,
        )
        address = f"{cfg.host}:{cfg.port}"
        creds = grpc.ssl_server_credentials([cfg.tls.read()]) if cfg.tls is not None else None
        self._start_metrics()
        try:
            if creds is not None:
                self.port = self._server.add_secure_port(address, creds)
            else:
                self.port = self._server.add_insecure_port(address)
        except RuntimeError as exc:
            raise InvalidArgument(f"cannot listen on {address}: {exc}") from None
        if not self.port:
            raise InvalidArgument(f"cannot listen on {address} (in use or not a local address)")
        await self._server.start()
        if self.tokens is not None:
            self._token_watch = asyncio.get_running_loop().create_task(self.tokens.watch(), name="token-file")
        log.info("listening on %s:%d (%s), metrics on %s, torch threads %d, allocator tuned: %s",
                 cfg.host, self.port, "TLS" if cfg.tls else "plaintext",
                 self.metrics_port if self.metrics_port is not None else "off", threads, allocator)
        if cfg.auth is None:
            log.warning("no tokens configured (--token-file, $SEGSVC_AUTH_TOKEN, $SEGSVC_ADMIN_TOKEN): every RPC, "
                        "management included (LoadModel, UnloadModel, datasets, training), is open to anyone who "
                        "can reach %s:%d", cfg.host, self.port)
        await self.manager.start()
        if self.jobs is not None:
            await self.jobs.start()  # resumes the jobs a crash or restart interrupted
        if self.training is not None:
            await self.training.start()  # resumes training jobs (a trainer left by a crash is stopped first)
        self.gate.accepting = True
        if self.manager.ready:
            await self._set_health(SERVING)
        else:
            log.warning("no model loaded from %s%s: health stays NOT_SERVING until one is (LoadModel or polling)",
                        cfg.model_repo, "" if Path(cfg.model_repo).exists() else " (the folder does not exist)")

    async def stop(self, grace_s: float | None = None) -> None:
        """Health NOT_SERVING, refuse new RPCs, let in-flight ones finish for ``grace_s``, drain, stop.

        The drain of the models' batchers takes at most ``drain_timeout_s``; the versions it abandoned (still
        running a forward pass) are logged and left in ``abandoned``. The state folder's lock is released last,
        once the job store and the registry are closed and the models drained. A step that fails is logged and the
        next ones still run (the lock is released, the models drained); the first failure is raised once the stop
        has ended.
        """
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        steps = self._start_steps
        if steps is not None and not steps.done():  # a stop while starting: the start's steps end first
            steps.cancel()  # ``start`` then comes here too, and waits for this stop
            await asyncio.gather(steps, return_exceptions=True)
        if self._token_watch is not None:
            self._token_watch.cancel()
        grace = self.config.grace_s if grace_s is None else grace_s
        if self.gate.accepting:  # else a start that did not end stops what it had started (it said why)
            log.info("draining: health NOT_SERVING, %.1f s grace for requests in flight", grace)
        self.gate.accepting = False  # new calls now get UNAVAILABLE
        if self.training is not None:  # a trainer the stop's signal reached too is not restarted meanwhile
            self.training.begin_stop()
        failures: list[Exception] = []
        try:
            await _step("health", self.health.enter_graceful_shutdown, failures)
            await _step("the gRPC server", lambda: self._stop_transport(grace), failures)
            if self.training is not None:  # trainers get SIGTERM; their jobs resume at the next start
                await _step("the training jobs", self.training.stop, failures)
            if self.jobs is not None:  # running jobs stop here and resume at the next start
                await _step("the jobs", self.jobs.stop, failures)
                await _step("the job store", self.jobs.store.close, failures)
            if self.datasets is not None:
                await _step("the dataset registry", self.datasets.close, failures)
            await _step("the models", self._stop_models, failures)
            await _step("the metrics endpoint", self.metrics.stop_http, failures)
        finally:  # last, once nothing of the folder is open (a server waiting for it may start), or the stop cut short
            if self.jobs is not None:
                await _step("the state folder's lock", self.jobs.release_state, failures)
            self.io.shutdown(wait=False)
            self._stopped.set()  # also cut short: a later stop or wait_stopped must not wait for ever
        log.info("stopped" + (f"; abandoned still busy: {', '.join(self.abandoned)}" if self.abandoned else "")
                 + (f"; {len(failures)} step(s) failed" if failures else ""))
        if failures:
            raise failures[0]

    async def _stop_transport(self, grace: float) -> None:
        """Requests in flight get up to ``grace`` seconds; then the transport stops (open health watches and
        anything still running are cancelled). A handler that has returned may still be sending its response:
        the transport gets SEND_GRACE_S more (out of the grace) for that."""
        if self._server is None:
            return
        deadline = asyncio.get_running_loop().time() + grace
        try:
            if self.gate.in_flight:
                await asyncio.wait_for(self.gate.wait_idle(), grace)
        except TimeoutError:
            log.warning("%d requests still in flight after %.1f s of grace; cancelling them",
                        self.gate.in_flight, grace)
        left = deadline - asyncio.get_running_loop().time()
        await self._server.stop(min(SEND_GRACE_S, max(left, 0.0)))

    async def _stop_models(self) -> None:
        self.abandoned = await self.manager.stop()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


def freeze_startup_heap() -> int:
    """Collect the garbage, then keep every object alive now out of the collector's later passes.

    What is alive once the server has started (the modules of torch, gRPC and NumPy, the
    loaded models: about 210,000 objects) lives as long as the process, yet each full
    collection walked all of it: about 110 ms on a 2-CPU host, during which no thread ran
    Python, every few hundred requests under load. Frozen, a full pass walks only what was
    made since (``bench/bench_gc.py``). Reference counting still frees frozen objects, so a
    model loaded at start-up is freed when it is retired; only cycles among them stay.
    Returns how many objects were frozen.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


async def _step(what: str, work: Callable[[], object], failures: list[Exception]) -> None:
    """Run one step of a stop (awaited if it returns an awaitable); a failure is logged and kept in ``failures``."""
    try:
        result = work()
        if inspect.isawaitable(result):
            await result
    except Exception as exc:  # the next steps must still run: the lock, the models, the ports
        log.exception("stopping %s failed; the stop goes on", what)
        failures.append(exc)


def _reason(exc: BaseException) -> str:
    """One line naming what failed: a domain error's message, else the exception's type and message."""
    text = str(exc) if isinstance(exc, SegsvcError) else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())


async def _exit_if_busy(server: SegmentationServer, threads: WatchedExecutor, deadline: float) -> None:
    """End the process now (``EXIT_ABANDONED``) if work still runs on a thread the interpreter would join at exit.

    That work (a forward pass the drain abandoned, a model build or file access that does not end) gets until
    ``deadline``, the stop's budget, and at least ``CLOSE_S``. The process then ends with it: its threads too.
    """
    loop = asyncio.get_running_loop()
    left = max(deadline - loop.time(), CLOSE_S)
    busy = sorted({name for names in await asyncio.gather(threads.wait_idle(left), server.io.wait_idle(left))
                   for name in names})
    parts = [f"the forward passes of {', '.join(server.abandoned)}"] if server.abandoned else []
    parts += [f"the threads still running {', '.join(busy)}"] if busy else []
    if not parts:
        return
    log.error("exiting without waiting for %s", " and ".join(parts))
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_ABANDONED)


async def serve(config: ServerConfig) -> None:
    """Run until SIGTERM or SIGINT, then drain and stop gracefully.

    A signal while the server starts (its models load: minutes, for big ones) interrupts the start, which stops
    what it had started; a start that fails keeps its error (raised here), signals or not. A second signal is
    logged and changes nothing. SIGHUP reads the token file again, or is logged and ignored without one.

    The stop has a budget from the first signal: ``grace_s + drain_timeout_s``. Work still running on a thread
    then (a forward pass, a model build that hangs: a thread cannot be cancelled) is logged and the process exits
    at once with ``EXIT_ABANDONED``, its threads with it: the interpreter would otherwise wait for them for ever.
    """
    loop = asyncio.get_running_loop()
    threads = WatchedExecutor(thread_name_prefix="segsvc-thread")  # asyncio.to_thread's: builds, scans, files
    loop.set_default_executor(threads)
    server = SegmentationServer(config)
    budget_s = config.grace_s + config.manager.drain_timeout_s
    stop = asyncio.Event()
    deadline = loop.time() + budget_s  # set again at the first signal
    starting = loop.create_task(server.start(), name="start")

    def on_signal(sig: signal.Signals) -> None:
        nonlocal deadline
        if stop.is_set():
            log.warning("%s received again: already stopping; the process ends within %.1f s of the first signal "
                        "(grace + drain timeout)", sig.name, budget_s)
            return
        stop.set()
        deadline = loop.time() + budget_s
        if server.interrupt_start():
            log.info("%s received while starting: stopping what has started", sig.name)
        elif not starting.done():  # its steps ended (done, or failed and stopping what had started)
            log.info("%s received as the start ends: stopping once it has", sig.name)

    def on_hangup() -> None:
        if server.tokens is None:
            log.info("SIGHUP received: no token file to read again (--token-file); ignored")
            return
        log.info("SIGHUP received: reading the token file again")
        server.tokens.reload_soon()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    loop.add_signal_handler(signal.SIGHUP, on_hangup)  # its default action ends the process
    try:
        await starting
    except asyncio.CancelledError:
        if not stop.is_set():  # cancelled from outside, not by a signal
            raise
        log.info("stopped before serving")
        await _exit_if_busy(server, threads, deadline)
        return
    except BaseException:
        await _exit_if_busy(server, threads, deadline if stop.is_set() else loop.time() + budget_s)
        raise
    log.info("%d objects alive after start-up kept out of garbage collection", freeze_startup_heap())
    print(f"segsvc: serving on {config.host}:{server.port}"
          + (f", metrics on :{server.metrics_port}" if server.metrics_port is not None else ""), flush=True)
    await stop.wait()
    log.info("shutdown signal received")
    try:
        await server.stop()  # a step that failed was logged: its error is raised after the check below
    finally:
        await _exit_if_busy(server, threads, deadline)


def run(config: ServerConfig) -> None:
    asyncio.run(serve(config))
