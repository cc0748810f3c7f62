"""Optional bearer-token authentication: metadata ``authorization: Bearer <token>``.

Health checks stay open (load balancers and Kubernetes probes carry no token);
every other method, reflection included, needs the token. The comparison takes
constant time.
"""

from __future__ import annotations

import hmac
from typing import Awaitable, Callable

import grpc

OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)


def _token_of(metadata) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            scheme, _, token = str(value).partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuse calls without the right bearer token with UNAUTHENTICATED.

    Args:
        token: the shared secret clients send as ``authorization: Bearer <token>``.
        open_prefixes: method paths that need no token (health checks by default).
    """

    def __init__(self, token: str, open_prefixes: tuple[str, ...] = OPEN_METHOD_PREFIXES) -> None:
        if not token:
            raise ValueError("the bearer token must be non-empty")
        self._token = token.encode()
        self._open = open_prefixes

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(self._open):
            return handler
        token = _token_of(handler_call_details.invocation_metadata)
        if token is not None and hmac.compare_digest(token.encode(), self._token):
            return handler
        reason = "missing" if token is None else "wrong"
        return _deny(handler, f"{reason} bearer token: send metadata 'authorization: Bearer <token>'")


def _deny(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that only aborts with UNAUTHENTICATED."""

    async def refuse(_request, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kwargs = dict(
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse, **kwargs)
    return grpc.unary_unary_rpc_method_handler(refuse, **kwargs)
