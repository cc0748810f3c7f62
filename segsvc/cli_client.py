"""The one way the command line opens a ``SegmentationClient`` from its common flags.

``segsvc segment``, ``jobs``, ``datasets`` and ``train --server`` share the
flags ``--server``, ``--token-file``, ``--tls``, ``--tls-ca`` and ``--timeout-s``, and
those that ``add_max_message_flag`` gives ``--max-message-mb`` (a server started with a
larger ``--max-message-mb`` takes larger images than the client's default lets it send).
The client waits up to ``CONNECT_TIMEOUT_S`` (or ``--timeout-s``, when shorter)
for the server to accept a connection, so a command typed right after
``segsvc serve ... &`` works instead of failing with "connection refused".
Only the light client is imported (no torch).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from segsvc.errors import InvalidArgument, SegsvcError

if TYPE_CHECKING:
    from segsvc.client import SegmentationClient

CONNECT_TIMEOUT_S = float(os.environ.get("SEGSVC_CONNECT_TIMEOUT_S", "30"))
MIB = 1 << 20
DEFAULT_MAX_MESSAGE_MB = 64  # segsvc.client.DEFAULT_MAX_MESSAGE_BYTES, and the server's default
MAX_GRPC_MESSAGE_BYTES = 1 << 31  # gRPC's limits are C ints


def read_file_arg(path: str, flag: str) -> bytes:
    """The bytes of a file named by ``flag``; ``InvalidArgument`` naming the flag when it cannot be read.

    Commands read their local files before connecting, so a typo fails at once.
    """
    from segsvc.errors import InvalidArgument

    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"cannot read {flag} {path}: {exc.strerror or type(exc).__name__}") from None


def read_text_arg(path: str, flag: str) -> str:
    """``read_file_arg`` as UTF-8 text (a recipe, a dataset.yaml)."""
    from segsvc.errors import InvalidArgument

    try:
        return read_file_arg(path, flag).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"cannot read {flag} {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def add_max_message_flag(parser: argparse.ArgumentParser) -> None:
    """``--max-message-mb``: the client's gRPC message limit, each way, to match a server's ``--max-message-mb``."""
    parser.add_argument("--max-message-mb", type=float, default=DEFAULT_MAX_MESSAGE_MB,
                        help=f"largest gRPC message each way, as the server's --max-message-mb "
                             f"(default {DEFAULT_MAX_MESSAGE_MB:g})")


def max_message_bytes(args: argparse.Namespace) -> int:
    """The client's message limit from ``args.max_message_mb`` (a command without the flag: the default).

    Raises:
        InvalidArgument: not a size gRPC can take (0, negative, NaN, 2 GiB or more).
    """
    from segsvc.errors import InvalidArgument

    mb = getattr(args, "max_message_mb", None)
    if mb is None:
        return DEFAULT_MAX_MESSAGE_MB * MIB
    if not 0 < mb * MIB < MAX_GRPC_MESSAGE_BYTES:  # NaN too
        raise InvalidArgument(f"--max-message-mb must be a positive size under {MAX_GRPC_MESSAGE_BYTES // MIB} MiB "
                              f"(as the server's --max-message-mb), got {mb:g}")
    return max(1, int(mb * MIB))


def connection_flags(timeout_help: str, timeout_s: float = 60.0,
                     token_help: str = "bearer token file (else $SEGSVC_AUTH_TOKEN)") -> argparse.ArgumentParser:
    """A parent parser (``parents=[...]``) with the flags ``open_client`` reads: ``--server``, ``--token-file``,
    ``--tls``, ``--tls-ca`` and ``--timeout-s`` (``timeout_help`` says what it bounds in the command)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--server", default="localhost:50051", help="HOST:PORT (default localhost:50051)")
    common.add_argument("--token-file", default=None, help=token_help)
    common.add_argument("--tls", action="store_true", help="connect with TLS (system roots unless --tls-ca)")
    common.add_argument("--tls-ca", default=None, help="PEM CA bundle that signed the server's certificate")
    common.add_argument("--timeout-s", type=float, default=timeout_s, help=f"{timeout_help} (default {timeout_s:g})")
    return common


def open_client(args: argparse.Namespace) -> "SegmentationClient":
    """A connected client for ``args.server`` (raises ``Unavailable`` when nothing answers)."""
    import math

    from segsvc.client import SegmentationClient
    from segsvc.errors import InvalidArgument

    if not 0 < args.timeout_s < math.inf:  # 0, negative or NaN: every call would fail at once, inf: gRPC's too
        raise InvalidArgument(f"--timeout-s must be a positive number of seconds, got {args.timeout_s:g}")
    root_certs = read_file_arg(args.tls_ca, "--tls-ca") if args.tls_ca else None
    client = SegmentationClient(args.server, token=read_token(args), root_certificates=root_certs, tls=args.tls,
                                timeout_s=args.timeout_s, max_message_bytes=max_message_bytes(args))
    try:
        client.wait_for_server(min(CONNECT_TIMEOUT_S, args.timeout_s))  # --timeout-s bounds the whole run
    except BaseException:
        client.close()
        raise
    return client


def read_token(args: argparse.Namespace) -> str | None:
    """A client's bearer token: the first token of --token-file, else $SEGSVC_AUTH_TOKEN.

    The file is read as the server reads it (``token_entries``), so one
    tokens file serves both.
    """
    from segsvc.server.auth import token_entries

    if args.token_file:
        try:
            text = Path(args.token_file).read_text()
        except OSError as exc:
            raise SegsvcError(f"cannot read the token file: {exc}") from None
        entries = token_entries(text)
        if not entries:
            raise SegsvcError(f"token file {args.token_file} holds no token")
        return entries[0][0]
    return env_token("SEGSVC_AUTH_TOKEN")


def env_token(var: str) -> str | None:
    """The token in environment variable ``var`` (unset or empty: None), refused by the variable's name when it is
    not one (``AuthConfig`` would say "a token must be non-empty ...", naming nothing); the value is not shown."""
    token = os.environ.get(var) or None
    if token is not None and any(c.isspace() for c in token):
        raise InvalidArgument(f"${var} must be one token with no whitespace (its value holds whitespace); unset "
                              "it for no token")
    return token
