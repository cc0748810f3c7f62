"""Every RPC's outcome counted once: ``CallCounter``, the server's innermost interceptor.

``segsvc_requests_total`` and ``segsvc_request_seconds`` had the calls of the segmentation service (counted by
its servicer, which knows the model, its version and where an image's time went) and ``ModelInfer`` (likewise),
and every call an interceptor refused (auth, the call limit, the drain gate: ``errors.refuse``). The jobs,
datasets, training, long-running-operations and the other Open Inference Protocol methods were counted only
when refused, never when they succeeded or failed in their handler, so no error ratio over them could be made.

``CallCounter`` counts those: it goes last in the server's interceptor list, after the drain gate, so it sees
exactly the calls that reached a handler: a call refused before (and counted by ``observe_refused``) never gets
here, and a call counted here was refused by no one. The methods that count themselves
(``COUNTED_BY_HANDLERS``) pass through untouched, as do health, reflection and the readiness probes, which are
neither counted nor refused (load balancers and the kubelet poll them; their calls would swamp the rates).
Labels stay bounded: ``method`` is a served method's name (an unknown method has no handler and is not
counted), ``model`` is always ``"-"`` (these calls are not served by one loaded model). The outcome's code is
the handler's: OK, the code its ``abort`` set, UNKNOWN for an exception gRPC turns into UNKNOWN, and CANCELLED
or DEADLINE_EXCEEDED for a call cancelled under it (``errors.cancellation_code``).

Wiring (``SegmentationServer._start``)::

    grpc.aio.server(interceptors=[*interceptors, self.calls, self.gate, CallCounter(self.metrics)], ...)
"""

from __future__ import annotations

import asyncio
import inspect
import time
from typing import AsyncIterator, Awaitable, Callable

import grpc

from segsvc.server import oip
from segsvc.server.errors import cancellation_code
from segsvc.server.gate import GATED_PREFIXES, PROBE_METHODS
from segsvc.server.metrics import ServerMetrics
from segsvc.v1 import segmentation_pb2 as pb

SEGMENTATION_SERVICE = pb.DESCRIPTOR.services_by_name["SegmentationService"].full_name
# Counted by their own servicers (``servicer.SegmentationServicer._finish``, ``oip.OpenInferenceServicer._finish``),
# with the model that served them: counted here too, each call would count twice.
COUNTED_BY_HANDLERS = (f"/{SEGMENTATION_SERVICE}/", f"/{oip.SERVICE_NAME}/ModelInfer")
NO_MODEL = "-"

Observe = Callable[[str, str, str, float], None]  # (method, model, code, seconds): ``ServerMetrics.observe_request``


def counted_label(method: str) -> str | None:
    """The ``method`` label of a call this interceptor counts (the method's name), or None for one it leaves."""
    if not method.startswith(GATED_PREFIXES) or method in PROBE_METHODS or method.startswith(COUNTED_BY_HANDLERS):
        return None
    return method.rsplit("/", 1)[-1][:64]


class CallCounter(grpc.aio.ServerInterceptor):
    """Counts the outcome and latency of each call that reached a handler not counting itself.

    Per call: one dict look-up for the method, and for a counted one the wrapped handler (made once per method)
    and one ``observe`` when it ends. Nothing is allocated for the hot path's methods (Segment, ModelInfer).

    Args:
        metrics: where the calls are counted (``ServerMetrics.observe_request``).
    """

    def __init__(self, metrics: ServerMetrics) -> None:
        self._observe: Observe = metrics.observe_request
        # method path -> (the servicer's handler, the counted one), or None: not counted. Only methods that have
        # a handler come here, so it holds at most the served methods.
        self._handlers: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler] | None] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        known = self._handlers.get(method, False)
        if known is None:
            return handler
        if known is not False and known[0] is handler:
            return known[1]
        label = counted_label(method)
        if label is None:
            self._handlers[method] = None
            return handler
        wrapped = counted_handler(handler, label, self._observe)
        self._handlers[method] = (handler, wrapped)
        return wrapped


def _code(context: grpc.aio.ServicerContext, default: str) -> str:
    """The code the handler set (``abort``, ``set_code``), else ``default``."""
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else default  # None: none set


def _failed(exc: BaseException, context: grpc.aio.ServicerContext) -> str:
    """The code a call ends with when its handler raised ``exc``."""
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):  # the client went away, or its deadline passed
        return cancellation_code(context.time_remaining()).name
    return _code(context, "UNKNOWN")  # after ``abort``, its code; any other exception, gRPC answers UNKNOWN


def counted_handler(handler: grpc.RpcMethodHandler, method: str, observe: Observe) -> grpc.RpcMethodHandler:
    """``handler`` (of any shape) with its outcome counted as ``method`` once it ends."""
    kwargs = dict(request_deserializer=handler.request_deserializer,
                  response_serializer=handler.response_serializer)
    if handler.response_streaming:
        inner = handler.stream_stream if handler.request_streaming else handler.unary_stream
        make = grpc.stream_stream_rpc_method_handler if handler.request_streaming \
            else grpc.unary_stream_rpc_method_handler
        if not inspect.isasyncgenfunction(inner):  # a coroutine that answers with context.write()
            return make(_unary_counted(inner, method, observe), **kwargs)

        async def streaming(request, context: grpc.aio.ServicerContext) -> AsyncIterator:  # type: ignore[no-untyped-def]
            started, code = time.perf_counter(), "OK"
            try:
                async for response in inner(request, context):
                    yield response
                code = _code(context, "OK")
            except BaseException as exc:
                code = _failed(exc, context)
                raise
            finally:
                observe(method, NO_MODEL, code, time.perf_counter() - started)

        return make(streaming, **kwargs)
    inner = handler.stream_unary if handler.request_streaming else handler.unary_unary
    make = grpc.stream_unary_rpc_method_handler if handler.request_streaming else grpc.unary_unary_rpc_method_handler
    return make(_unary_counted(inner, method, observe), **kwargs)


def _unary_counted(inner: Callable, method: str, observe: Observe) -> Callable:
    """``inner`` (a handler answering once, or writing with ``context.write``), counted when it ends."""

    async def counted(request, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
        started, code = time.perf_counter(), "OK"
        try:
            response = inner(request, context)
            if inspect.isawaitable(response):
                response = await response
            code = _code(context, "OK")
            return response
        except BaseException as exc:
            code = _failed(exc, context)
            raise
        finally:
            observe(method, NO_MODEL, code, time.perf_counter() - started)

    return counted
