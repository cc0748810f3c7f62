"""Bearer-token authentication with scopes: inference needs less privilege than management.

Clients send ``authorization: Bearer <token>``. Each token has scopes:

- ``infer``: Segment, SegmentStream, ListModels, GetModel, the Open Inference
  Protocol's inference and metadata calls, server reflection;
- ``jobs``: batch jobs (JobService and the long-running Operations service);
- ``manage``: LoadModel, UnloadModel, SetDefaultVersion, repository control,
  and everything above.

A token file has one token per line, ``TOKEN [SCOPE,SCOPE...]`` (no scopes:
``infer``; any blanks, tabs included, separate them); blank lines and comments (a
``#`` at the start of a line or after a blank; inside a token it is part of the
token) are skipped. Each token is listed once. Health checks stay open
(load balancers and Kubernetes probes carry no token), and so do the Open
Inference Protocol's ServerLive, ServerReady and ModelReady: those exact methods,
not every name that starts like them. Unknown methods need a valid token too, so
UNIMPLEMENTED tells an anonymous caller nothing.
Tokens are compared in constant time.

A method's scope is checked here, before its handler runs; a handler whose
answer depends on *what* it acts on asks ``caller_may(scope)`` (the interceptor
sets the caller's scopes around every handler): the Operations service and
JobService also hold training jobs, which need ``manage`` (``server/jobs.py``).
A server without tokens says so explicitly (``OpenAccessInterceptor``, from
``auth_interceptors``); code that runs outside any call has no caller and is
granted no scope, so a path that bypasses the interceptors fails closed.

A token file is read again when it changes (``TokenFile``): tokens rotate
without a restart; a new file that is not valid leaves the tokens in use.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import enum
import hmac
import inspect
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable, Iterable

import grpc

from segsvc.errors import InvalidArgument, PermissionDenied, SegsvcError, Unauthenticated
from segsvc.server.errors import Refused, not_counted, refusing_handler
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
_SCOPE_SEPARATORS = re.compile(r"[\s,]+")
_SCOPE_LIKE = re.compile(r"[a-z]{1,12}")  # a misspelt scope; a token is longer, or has digits or capitals
RELOAD_INTERVAL_S = 5.0  # how often ``TokenFile.watch`` looks at the file (a stat; it is read only when it changed)


class _Access(enum.Enum):
    NO_AUTHENTICATION = "no-authentication"


# The caller's scopes on a server that checks no token (no --token-file): every scope. Set around each handler
# by ``OpenAccessInterceptor``, never a default, so that only calls of such a server get it.
NO_AUTHENTICATION = _Access.NO_AUTHENTICATION

# The scopes of the current call's token, set by the interceptor around the call's handler. None (the default):
# no call is being handled here (a background task, a handler reached without the interceptors): no scope.
_CALLER_SCOPES: contextvars.ContextVar[frozenset[str] | _Access | None] = contextvars.ContextVar(
    "segsvc_caller_scopes", default=None)


def caller_may(scope: str) -> bool:
    """Whether the token of the call being handled grants ``scope`` (``manage`` grants every scope); True for
    every call of a server without authentication; False outside any call (no caller: fail closed)."""
    scopes = _CALLER_SCOPES.get()
    if scopes is NO_AUTHENTICATION:
        return True
    return scopes is not None and (scope in scopes or "manage" in scopes)


def required_scope(method: str) -> str:
    for prefix, scope in METHOD_SCOPES:
        if method.startswith(prefix):
            return scope
    return "infer"


@dataclass(frozen=True, repr=False)
class AuthConfig:
    """Tokens and their scopes. Its repr shows how many tokens and which scopes, never the tokens (configs
    and errors get logged).

    Example:
        >>> AuthConfig.parse("s3cret infer\\nadm1n manage\\n").scopes_of("adm1n")
        frozenset({'manage'})
    """

    tokens: tuple[tuple[str, frozenset[str]], ...]
    source: Path | None = field(default=None, compare=False)  # the token file they were read from (``TokenFile``)

    def __post_init__(self) -> None:
        if not self.tokens:
            raise InvalidArgument("authentication needs at least one token")
        for token, scopes in self.tokens:
            if not token or any(c.isspace() for c in token):
                raise InvalidArgument("a token must be non-empty and contain no whitespace")
            unknown = sorted(set(scopes) - set(SCOPES))
            if unknown or not scopes:
                raise InvalidArgument(f"unknown token scope(s) {_scope_names(unknown)}; use {', '.join(SCOPES)}")

    def __repr__(self) -> str:
        count = len(self.tokens)
        scopes = sorted(set().union(*(s for _, s in self.tokens)))
        return f"AuthConfig({count} token{'' if count == 1 else 's'}, scopes: {', '.join(scopes)})"

    @classmethod
    def single(cls, token: str, scopes: Iterable[str] = ("infer",)) -> "AuthConfig":
        return cls(((token, frozenset(scopes)),))

    @classmethod
    def parse(cls, text: str) -> "AuthConfig":
        return cls(token_entries(text))

    @classmethod
    def from_file(cls, path: str | Path) -> "AuthConfig":
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise InvalidArgument(f"cannot read the token file: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:  # a binary file: its bytes stay out of the message (they may be a token)
            raise InvalidArgument(f"the token file is not text ({exc.reason} at byte {exc.start})") from None
        return cls(token_entries(text), source=Path(path))

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
    lines: dict[str, int] = {}  # token -> its line
    for number, line in enumerate(text.splitlines(), 1):
        line = _COMMENT.split(line, 1)[0].strip()  # '#' at the start or after a blank: part of no token
        if not line:
            continue
        token, *rest = line.split(None, 1)  # any blank separates the token from its scopes
        names = frozenset(filter(None, _SCOPE_SEPARATORS.split(rest[0] if rest else ""))) or frozenset({"infer"})
        try:
            AuthConfig(((token, names),))
        except InvalidArgument as exc:
            raise InvalidArgument(f"token file line {number}: {exc}") from None
        if token in lines:  # which line's scopes count would be a guess (the last one won): refused
            raise InvalidArgument(f"token file line {number}: the token of line {lines[token]} again; list each "
                                  f"token once, with all its scopes")
        lines[token] = number
        tokens.append((token, names))
    return tuple(tokens)


def _scope_names(names: list[str]) -> str:
    """Unknown scopes for a message, naming only those that look like a scope name (a misspelt one): a token
    written where its scopes go (two tokens on one line) stays out of the message, which gets logged."""
    shown = [repr(n) for n in names if _SCOPE_LIKE.fullmatch(n)]
    hidden = len(names) - len(shown)
    if hidden:
        shown.append(f"{hidden} value{'' if hidden == 1 else 's'} that {'is' if hidden == 1 else 'are'} no "
                     f"scope name")
    return ", ".join(shown)


_Version = tuple[int, ...]  # a file's (device, inode, size, mtime, ctime); () when it cannot be stat'ed


def _version(path: Path) -> _Version:
    try:
        st = os.stat(path)  # follows links: a Kubernetes Secret's file is a link into a folder swapped on update
    except OSError:
        return ()
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _ignored(taken: bool) -> None:
    """The default ``on_reload``: nothing to tell."""


class TokenFile:
    """The tokens of a token file, read again when the file changes: a token rotates without a restart.

    ``watch`` looks at the file every ``interval_s``, off the request path (the look and the read run on a
    worker thread), and reads it when its inode, size or times changed (an edit, or a Kubernetes Secret update,
    which swaps the file); ``reload_soon`` (for SIGHUP) reads it at the next turn, changed or not. A file that
    cannot be read or holds no valid token list (half written, emptied, a bad scope) leaves the tokens in use
    in place and logs why, once for that version of the file: a rotation gone wrong must neither lock every
    caller out nor open the server. The interceptor asks ``current`` at every call.

    Args:
        path: the token file.
        tokens: the tokens read from it at start.
        on_reload: called on the event loop after each read ``watch`` makes, with whether its tokens were taken.
    """

    def __init__(self, path: str | Path, tokens: AuthConfig, on_reload: Callable[[bool], None] = _ignored) -> None:
        self.path = Path(path)
        self._current = tokens
        self._on_reload = on_reload
        # The version of the file last read; None: not looked at yet, so the first look reads it (it may have
        # changed between the start's read and the watch's start).
        self._seen: _Version | None = None
        self._wake = asyncio.Event()

    @classmethod
    def of(cls, auth: AuthConfig | None, on_reload: Callable[[bool], None] = _ignored) -> "TokenFile | None":
        """The ``TokenFile`` of tokens read from a file (``AuthConfig.from_file``); None for others (from the
        environment, or none): nothing to read again."""
        if auth is None or auth.source is None:
            return None
        return cls(auth.source, auth, on_reload)

    def __repr__(self) -> str:
        return f"TokenFile({str(self.path)!r}, {self._current!r})"

    @property
    def current(self) -> AuthConfig:
        """The tokens in use."""
        return self._current

    def check(self) -> bool:
        """Read the file if it changed since it was last read; whether its tokens were taken (blocking I/O)."""
        return self._look(force=False) is True

    def reload(self) -> bool:
        """Read the file, changed or not; whether its tokens were taken (blocking I/O)."""
        return self._look(force=True) is True

    def reload_soon(self) -> None:
        """Make ``watch`` read the file at once, changed or not: the SIGHUP handler (call it on the loop)."""
        self._wake.set()

    async def watch(self, interval_s: float = RELOAD_INTERVAL_S) -> None:
        """Look at the file every ``interval_s`` seconds, or at once after ``reload_soon``, until cancelled. It
        never raises: a failure leaves the tokens in use."""
        while True:
            with contextlib.suppress(TimeoutError):  # asyncio.timeout: wait_for may drop a cancel in 3.11
                async with asyncio.timeout(interval_s):
                    await self._wake.wait()
            force = self._wake.is_set()
            self._wake.clear()
            try:
                taken = await asyncio.to_thread(self._look, force)
                if taken is not None:
                    self._on_reload(taken)
            except Exception:  # a bug here must not end the rotation, nor the server
                log.exception("token file %s: could not be checked; keeping the %d token(s) in use", self.path,
                              len(self._current.tokens))

    def _look(self, force: bool) -> bool | None:
        """Read the file if ``force`` or it changed: whether its tokens were taken; None: it was not read."""
        version = _version(self.path)  # before the read: a change after it shows at the next look
        if version == self._seen and not force:
            return None
        self._seen = version
        try:
            tokens = AuthConfig.from_file(self.path)
        except InvalidArgument as exc:  # its message names a line and a reason, never a token
            log.warning("token file %s: %s; keeping the %d token(s) in use", self.path, exc,
                        len(self._current.tokens))
            return False
        if tokens != self._current:
            log.info("token file %s read again: %r", self.path, tokens)
        self._current = tokens
        return True


def _token_of(metadata) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            scheme, _, token = str(value).partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


def auth_interceptors(auth: AuthConfig | TokenFile | None,
                      on_refused: Refused = not_counted) -> list[grpc.aio.ServerInterceptor]:
    """The server's first interceptor: the token check, or on a server without tokens the one that tells
    ``caller_may`` so."""
    if auth is None:
        return [OpenAccessInterceptor()]
    return [BearerTokenInterceptor(auth, on_refused=on_refused)]


class OpenAccessInterceptor(grpc.aio.ServerInterceptor):
    """A server without tokens: every handler runs with ``NO_AUTHENTICATION`` as its caller's scopes.

    Granting every scope is said here, for the calls of this server, rather than assumed wherever no token
    context is set: code that runs outside any call (or a handler reached another way) gets no scope.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        return _with_scopes(await continuation(handler_call_details), NO_AUTHENTICATION)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED without a known token, PERMISSION_DENIED without the method's scope.

    Args:
        auth: the tokens and their scopes, or a ``TokenFile`` (its current tokens, at every call).
        open_methods: the full method paths that need no token (the probes by default).
        on_refused: counts each refused call.
    """

    def __init__(self, auth: AuthConfig | TokenFile, open_methods: frozenset[str] = OPEN_METHODS,
                 on_refused: Refused = not_counted) -> None:
        self._on_refused = on_refused
        self._auth = auth
        self._open = open_methods

    def _tokens(self) -> AuthConfig:
        return self._auth.current if isinstance(self._auth, TokenFile) else self._auth

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        if method in self._open:
            return await continuation(handler_call_details)
        token = _token_of(handler_call_details.invocation_metadata)
        scopes = self._tokens().scopes_of(token) if token is not None else None
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


def _with_scopes(handler: grpc.RpcMethodHandler | None,
                 scopes: frozenset[str] | _Access) -> grpc.RpcMethodHandler | None:
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
    """A handler that only aborts with ``error``'s status before reading anything (``refusing_handler``). It
    counts and logs the refusal under ``method``'s name, or 'unknown' for a method the server does not serve (a
    client-chosen name would make the metric's label set unbounded)."""
    label = method.rsplit("/", 1)[-1][:64] if handler is not None else "unknown"
    return refusing_handler(handler is None or handler.response_streaming, error, label, log, on_refused,
                            logging.WARNING)
