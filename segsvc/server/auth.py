"""Bearer-token authentication with scopes: inference needs less privilege than management.

Clients send ``authorization: Bearer <token>``. Each token has scopes:

- ``infer``: Segment, SegmentStream, ListModels, GetModel, the Open Inference
  Protocol's inference and metadata calls, server reflection;
- ``jobs``: batch jobs (JobService and the long-running Operations service);
- ``manage``: LoadModel, UnloadModel, SetDefaultVersion, repository control,
  and everything above.

A token file has one token per line, ``TOKEN [SCOPE,SCOPE...]`` (no scopes:
``infer``); blank lines and comments (a ``#`` at the start of a line or after a
blank; inside a token it is part of the token) are skipped. Health checks stay open
(load balancers and Kubernetes probes carry no token), and so do the Open
Inference Protocol's ServerLive, ServerReady and ModelReady: those exact methods,
not every name that starts like them. Unknown methods need a valid token too, so
UNIMPLEMENTED tells an anonymous caller nothing.
Tokens are compared in constant time.

A method's scope is checked here, before its handler runs; a handler whose
answer depends on *what* it acts on asks ``caller_may(scope)`` (the interceptor
sets the caller's scopes around every handler): the Operations service and
JobService also hold training jobs, which need ``manage`` (``server/jobs.py``).
"""

from __future__ import annotations

import contextlib
import contextvars
import hmac
import inspect
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable, Iterable

import grpc

from segsvc.errors import InvalidArgument, PermissionDenied, SegsvcError, Unauthenticated
from segsvc.server.errors import Refused, not_counted, refuse
from segsvc.server.gate import PROBE_METHODS

log = logging.getLogger(__name__)

# Health checks, and their Open Inference Protocol equivalents (KServe probes carry no token either). Exact
# paths: another name under these services (Health/List, ModelReadyX) is an unknown method and needs a token.
OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch", *PROBE_METHODS})
SCOPES = ("infer", "jobs", "manage")
# Most specific first; a method matching none needs "infer".
METHOD_SCOPES: tuple[tuple[str, str], ...] = (
    ("/segsvc.v1.SegmentationService/LoadModel", "manage"),
    ("/segsvc.v1.SegmentationService/UnloadModel", "manage"),
    ("/segsvc.v1.SegmentationService/SetDefaultVersion", "manage"),
    ("/inference.GRPCInferenceService/RepositoryModelLoad", "manage"),
    ("/inference.GRPCInferenceService/RepositoryModelUnload", "manage"),
    ("/segsvc.v1.JobService/", "jobs"),
    ("/google.longrunning.Operations/", "jobs"),
    ("/segsvc.v1.DatasetService/", "manage"),
    ("/segsvc.v1.TrainingService/", "manage"),
)


_COMMENT = re.compile(r"(?:^|\s)#")

# The scopes of the current call's token, set by the interceptor around the call's handler. None: no token
# check on this server (no --token-file), so every scope is granted.
_CALLER_SCOPES: contextvars.ContextVar[frozenset[str] | None] = contextvars.ContextVar(
    "segsvc_caller_scopes", default=None)


def caller_may(scope: str) -> bool:
    """Whether the token of the call being handled grants ``scope`` (``manage`` grants every scope); True on a
    server without authentication."""
    scopes = _CALLER_SCOPES.get()
    return scopes is None or scope in scopes or "manage" in scopes


def required_scope(method: str) -> str:
    for prefix, scope in METHOD_SCOPES:
        if method.startswith(prefix):
            return scope
    return "infer"


@dataclass(frozen=True)
class AuthConfig:
    """Tokens and their scopes.

    Example:
        >>> AuthConfig.parse("s3cret infer\\nadm1n manage\\n").scopes_of("adm1n")
        frozenset({'manage'})
    """

    tokens: tuple[tuple[str, frozenset[str]], ...]

    def __post_init__(self) -> None:
        if not self.tokens:
            raise InvalidArgument("authentication needs at least one token")
        for token, scopes in self.tokens:
            if not token or any(c.isspace() for c in token):
                raise InvalidArgument("a token must be non-empty and contain no whitespace")
            unknown = sorted(set(scopes) - set(SCOPES))
            if unknown or not scopes:
                raise InvalidArgument(f"unknown token scope(s) {unknown}; use {', '.join(SCOPES)}")

    @classmethod
    def single(cls, token: str, scopes: Iterable[str] = ("infer",)) -> "AuthConfig":
        return cls(((token, frozenset(scopes)),))

    @classmethod
    def parse(cls, text: str) -> "AuthConfig":
        return cls(token_entries(text))

    @classmethod
    def from_file(cls, path: str | Path) -> "AuthConfig":
        try:
            return cls.parse(Path(path).read_text())
        except OSError as exc:
            raise InvalidArgument(f"cannot read the token file: {exc.strerror or exc}") from None

    def scopes_of(self, token: str) -> frozenset[str] | None:
        """The token's scopes, or None for an unknown token (every entry is compared: constant time)."""
        found: frozenset[str] | None = None
        given = token.encode()
        for known, scopes in self.tokens:
            if hmac.compare_digest(given, known.encode()):
                found = scopes
        return found


def token_entries(text: str) -> tuple[tuple[str, frozenset[str]], ...]:
    """The ``(token, scopes)`` lines of a tokens file, in order; each is checked, none may be missing.

    The one reading of the format, for the server and for clients given the same file.
    """
    tokens: list[tuple[str, frozenset[str]]] = []
    for number, line in enumerate(text.splitlines(), 1):
        line = _COMMENT.split(line, 1)[0].strip()  # '#' at the start or after a blank: part of no token
        if not line:
            continue
        token, _, scopes = line.partition(" ")
        names = frozenset(s.strip() for s in scopes.replace(" ", ",").split(",") if s.strip()) or {"infer"}
        try:
            AuthConfig(((token, names),))
        except InvalidArgument as exc:
            raise InvalidArgument(f"token file line {number}: {exc}") from None
        tokens.append((token, names))
    return tuple(tokens)


def _token_of(metadata) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            scheme, _, token = str(value).partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED without a known token, PERMISSION_DENIED without the method's scope.

    Args:
        auth: the tokens and their scopes.
        open_methods: the full method paths that need no token (the probes by default).
        on_refused: counts each refused call.
    """

    def __init__(self, auth: AuthConfig, open_methods: frozenset[str] = OPEN_METHODS,
                 on_refused: Refused = not_counted) -> None:
        self._on_refused = on_refused
        self._auth = auth
        self._open = open_methods

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        if method in self._open:
            return await continuation(handler_call_details)
        token = _token_of(handler_call_details.invocation_metadata)
        scopes = self._auth.scopes_of(token) if token is not None else None
        handler = await continuation(handler_call_details)
        if scopes is None:
            reason = "missing" if token is None else "wrong"
            return _deny(handler, Unauthenticated(f"{reason} bearer token: send metadata "
                                                  f"'authorization: Bearer <token>'"), method, self._on_refused)
        needed = required_scope(method)
        if needed not in scopes and "manage" not in scopes:
            return _deny(handler, PermissionDenied(f"this token lacks the '{needed}' scope that "
                                                   f"{method.rsplit('/', 1)[-1][:64]} needs"), method, self._on_refused)
        return _with_scopes(handler, scopes)


def _with_scopes(handler: grpc.RpcMethodHandler | None, scopes: frozenset[str]) -> grpc.RpcMethodHandler | None:
    """``handler`` run with ``scopes`` as the caller's (``caller_may``); same shape, serializers and behaviour."""
    if handler is None:
        return None
    kwargs = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.response_streaming:
        inner_stream = handler.stream_stream if handler.request_streaming else handler.unary_stream

        async def streaming(request, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
            token = _CALLER_SCOPES.set(scopes)
            try:
                responses = inner_stream(request, context)
                if inspect.isawaitable(responses):  # a handler that writes with context.write()
                    await responses
                    return
                if hasattr(responses, "__aiter__"):
                    async for response in responses:
                        yield response
                else:
                    for response in responses:
                        yield response
            finally:
                with contextlib.suppress(ValueError):  # a generator closed from another context: nothing to undo
                    _CALLER_SCOPES.reset(token)

        make = grpc.stream_stream_rpc_method_handler if handler.request_streaming \
            else grpc.unary_stream_rpc_method_handler
        return make(streaming, **kwargs)
    inner = handler.stream_unary if handler.request_streaming else handler.unary_unary

    async def unary(request, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
        token = _CALLER_SCOPES.set(scopes)
        try:
            response = inner(request, context)
            return await response if inspect.isawaitable(response) else response
        finally:
            _CALLER_SCOPES.reset(token)

    make = grpc.stream_unary_rpc_method_handler if handler.request_streaming else grpc.unary_unary_rpc_method_handler
    return make(unary, **kwargs)


def _deny(handler: grpc.RpcMethodHandler | None, error: SegsvcError, method: str,
          on_refused: Refused) -> grpc.RpcMethodHandler:
    """A handler that only aborts with ``error``'s status (and its ``ErrorInfo`` and ``segsvc-error``
    trailers, as every other error) before reading anything: it takes the request as a stream it never
    reads, whatever the method's own shape. (With a unary-request shape gRPC first waits for the request
    message, so a caller that sent none, or held it back, got no refusal until its deadline, or ever.)
    It counts and logs the refusal under ``method``'s name, or 'unknown' for a method the server does not
    serve (a client-chosen name would make the metric's label set unbounded)."""
    label = method.rsplit("/", 1)[-1][:64] if handler is not None else "unknown"

    async def refused(_requests, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
        await refuse(context, error, label, log, on_refused, logging.WARNING)

    if handler is not None and not handler.response_streaming:
        return grpc.stream_unary_rpc_method_handler(refused)
    return grpc.stream_stream_rpc_method_handler(refused)
