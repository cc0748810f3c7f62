"""The server's admission gate: which RPCs may start, and how many are in flight.

One interceptor in front of every service, owned by the app, replaces per-servicer
bookkeeping: while the server is starting or draining, calls of the gated
services get UNAVAILABLE before any handler runs, and before their request is
read (a caller that holds its message back, or sends a large one, is answered at
once: it can retry elsewhere while this replica drains); otherwise each call is counted
until it returns, so a drain can wait for exactly the calls in flight. Health,
reflection and the readiness probes are neither refused nor counted (probes must
work while draining).

The gate also parses requests, of every method it sees: bytes that are not a
valid message answer INVALID_ARGUMENT with a short message (gRPC itself would answer UNKNOWN with
the parser's exception text and log a traceback). In a request stream, a bad
message ends the stream with INVALID_ARGUMENT once the messages before it
are answered. Both refusals go through ``server.errors.refuse`` (counted and
logged), so they carry the same ``google.rpc.Status`` (with its ``ErrorInfo``) and ``segsvc-error``
trailer as every other error.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from typing import AsyncIterator, Awaitable, Callable, Iterator

import grpc

from segsvc.errors import InvalidArgument, Unavailable
from segsvc.server.errors import Refused, not_counted, refuse, refusing_handler

log = logging.getLogger("segsvc.server")

GATED_PREFIXES = ("/segsvc.v1.", "/google.longrunning.Operations/", "/inference.GRPCInferenceService/")
# Readiness probes of the Open Inference Protocol pass like gRPC health: while starting or draining they
# answer ready=false (as Triton does) instead of UNAVAILABLE.
PROBE_METHODS = tuple(f"/inference.GRPCInferenceService/{m}" for m in ("ServerLive", "ServerReady", "ModelReady"))
REFUSED = "the server is starting or draining; retry on another replica or later"


class DrainGate(grpc.aio.ServerInterceptor):
    """Counts the gated RPCs in flight and refuses new ones while ``accepting`` is False.

    Args:
        prefixes: method paths the gate applies to.
        probes: methods among them that always pass (readiness probes answer for themselves).
    """

    def __init__(self, prefixes: tuple[str, ...] = GATED_PREFIXES, probes: tuple[str, ...] = PROBE_METHODS,
                 on_refused: Refused = not_counted) -> None:
        self._on_refused = on_refused
        self._prefixes = prefixes
        self._probes = probes
        self.accepting = False
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def in_flight(self) -> int:
        """Gated RPCs running now."""
        return self._active

    async def wait_idle(self) -> None:
        """Return once no gated RPC is in flight."""
        await self._idle.wait()

    @contextlib.contextmanager
    def _track(self) -> Iterator[None]:
        self._active += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._active -= 1
            if self._active == 0:
                self._idle.set()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None:
            return handler
        gated = method.startswith(self._prefixes) and method not in self._probes
        label = method.rsplit("/", 1)[-1][:64]
        if gated and not self.accepting:
            # answered before the request is read, as the auth interceptor's refusals (refusing_handler)
            return refusing_handler(handler.response_streaming, Unavailable(REFUSED), label, log,
                                    self._on_refused)
        return self._wrap(handler, label, gated)

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str, gated: bool) -> grpc.RpcMethodHandler:
        """``handler`` with its requests parsed here; ``gated``: also refused while not accepting, and counted."""
        kwargs = dict(request_deserializer=_safe(handler.request_deserializer),
                      response_serializer=handler.response_serializer)
        streaming_in = handler.request_streaming
        track = self._track if gated else contextlib.nullcontext

        def answering(context: grpc.aio.ServicerContext) -> contextlib.AbstractAsyncContextManager:
            return contextlib.nullcontext() if gated else self._answered(context, method)

        async def admit(request, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
            # through errors.refuse: counted and logged, then the google.rpc.Status + ErrorInfo and segsvc-error
            # trailers of every other error. A call let in (``intercept_service``) whose message came after the
            # drain began is refused here: the drain waits only for calls counted in flight.
            if gated and not self.accepting:
                await refuse(context, Unavailable(REFUSED), method, log, self._on_refused)
            if streaming_in:
                return _checked(request, method)
            if isinstance(request, _Malformed):
                await refuse(context, InvalidArgument(f"the request is not a valid {method} message"), method, log,
                             self._on_refused)
            return request

        if handler.response_streaming:
            inner = handler.stream_stream if handler.request_streaming else handler.unary_stream
            make = grpc.stream_stream_rpc_method_handler if handler.request_streaming \
                else grpc.unary_stream_rpc_method_handler
            if not inspect.isasyncgenfunction(inner):  # a coroutine that answers with context.write (health Watch)

                async def writing(request, context: grpc.aio.ServicerContext) -> None:
                    request = await admit(request, context)
                    with track():
                        async with answering(context):
                            await inner(request, context)

                return make(writing, **kwargs)

            async def streaming(request, context: grpc.aio.ServicerContext) -> AsyncIterator:
                request = await admit(request, context)
                with track():
                    async with answering(context):
                        async for response in inner(request, context):
                            yield response

            return make(streaming, **kwargs)
        inner = handler.stream_unary if handler.request_streaming else handler.unary_unary

        async def unary(request, context: grpc.aio.ServicerContext):
            request = await admit(request, context)
            with track():
                async with answering(context):
                    return await inner(request, context)

        make = grpc.stream_unary_rpc_method_handler if handler.request_streaming \
            else grpc.unary_unary_rpc_method_handler
        return make(unary, **kwargs)

    @contextlib.asynccontextmanager
    async def _answered(self, context: grpc.aio.ServicerContext, method: str) -> AsyncIterator[None]:
        """segsvc's servicers answer their own errors; for the others (reflection), a bad message of a request
        stream (``_checked``) is refused here, not reported by gRPC as UNKNOWN with its exception text."""
        try:
            yield
        except InvalidArgument as exc:
            await refuse(context, exc, method, log, self._on_refused)


class _Malformed:
    """Stands for request bytes that did not parse; the gate answers INVALID_ARGUMENT for it."""

    __slots__ = ()


def _safe(deserializer):  # type: ignore[no-untyped-def]
    if deserializer is None:
        return None

    def parse(data: bytes):  # type: ignore[no-untyped-def]
        try:
            return deserializer(data)
        except Exception:  # DecodeError and friends: the bytes are the client's problem
            return _Malformed()

    return parse


async def _checked(requests: AsyncIterator, method: str) -> AsyncIterator:
    """The request stream, ending with InvalidArgument at the first message that did not parse."""
    index = 0
    async for request in requests:
        if isinstance(request, _Malformed):
            raise InvalidArgument(f"message {index} of the {method} stream is not a valid request message")
        yield request
        index += 1
