"""The server's admission gate: which RPCs may start, and how many are in flight.

One interceptor in front of every service, owned by the app, replaces per-servicer
bookkeeping: while the server is starting or draining, calls of the gated
services get UNAVAILABLE before any handler runs; otherwise each call is counted
until it returns, so a drain can wait for exactly the calls in flight. Health
and reflection pass untouched (probes must work while draining).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator, Awaitable, Callable, Iterator

import grpc

GATED_PREFIXES = ("/segsvc.v1.", "/google.longrunning.Operations/", "/inference.GRPCInferenceService/")
REFUSED = "the server is starting or draining; retry on another replica or later"


class DrainGate(grpc.aio.ServerInterceptor):
    """Counts the gated RPCs in flight and refuses new ones while ``accepting`` is False.

    Args:
        prefixes: method paths the gate applies to.
    """

    def __init__(self, prefixes: tuple[str, ...] = GATED_PREFIXES) -> None:
        self._prefixes = prefixes
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
        if handler is None or not handler_call_details.method.startswith(self._prefixes):
            return handler
        return self._wrap(handler)

    def _wrap(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        kwargs = dict(request_deserializer=handler.request_deserializer,
                      response_serializer=handler.response_serializer)
        if handler.response_streaming:
            inner = handler.stream_stream if handler.request_streaming else handler.unary_stream

            async def streaming(request, context: grpc.aio.ServicerContext) -> AsyncIterator:
                if not self.accepting:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, REFUSED)
                with self._track():
                    async for response in inner(request, context):
                        yield response

            make = grpc.stream_stream_rpc_method_handler if handler.request_streaming \
                else grpc.unary_stream_rpc_method_handler
            return make(streaming, **kwargs)
        inner = handler.stream_unary if handler.request_streaming else handler.unary_unary

        async def unary(request, context: grpc.aio.ServicerContext):
            if not self.accepting:
                await context.abort(grpc.StatusCode.UNAVAILABLE, REFUSED)
            with self._track():
                return await inner(request, context)

        make = grpc.stream_unary_rpc_method_handler if handler.request_streaming \
            else grpc.unary_unary_rpc_method_handler
        return make(unary, **kwargs)
