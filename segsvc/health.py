"""``segsvc health``: ask a running server's gRPC health service; exit 0 when it is SERVING.

Made for container health checks (the exec-form ``HEALTHCHECK`` in
deploy/Dockerfile, where no shell expands variables): with no flags it finds the
``segsvc serve`` process (in a container, the server itself) and reads its
``--host``, ``--port`` and ``--tls-cert`` from its command line, so the check
follows the port and TLS wherever they are set (a relative ``--tls-cert`` is
read from the server's working directory, as the server read it). Flags
override what it finds.
When several of the user's ``segsvc serve`` processes run (none of them PID 1) it
refuses, naming their pids and ports, rather than guess: pass ``--address`` or ``--pid``.

With TLS it trusts ``--tls-ca`` (default ``$SEGSVC_TLS_CA``, else the server's
own certificate, which suits a self-signed one) and checks the name in the
certificate (``--tls-server-name``, default the certificate's first subject
alternative name), since it connects to 127.0.0.1.

It imports grpc and the health messages only (no torch), so a check is cheap.

Example:
    $ segsvc health                                   # the server in this container
    127.0.0.1:50051 (plaintext) '': SERVING
    $ segsvc health --address localhost:50061 --service segsvc.model.synthetic-quick
"""

from __future__ import annotations

import argparse
import os
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

DEFAULT_ADDRESS = "127.0.0.1:50051"
WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")
SERVER_COMMANDS = ("segsvc", "segsvc.cli", "segsvc.__main__")  # argv[i] before "serve" (script or -m module)


@dataclass(frozen=True)
class Target:
    """Where and how to connect.

    Args:
        address: HOST:PORT.
        tls: connect with TLS.
        ca_file: PEM roots to trust (``None``: the system roots).
        server_name: the name to check in the server's certificate (``None``: the host of ``address``).
    """

    address: str = DEFAULT_ADDRESS
    tls: bool = False
    ca_file: str | None = None
    server_name: str | None = None


def serve_arguments(cmdline: Sequence[str]) -> list[str] | None:
    """The arguments after ``serve`` if ``cmdline`` runs ``segsvc serve``, else ``None``."""
    for i in range(1, len(cmdline)):
        if cmdline[i] == "serve" and Path(cmdline[i - 1]).name in SERVER_COMMANDS:
            return list(cmdline[i + 1:])
    return None


def process_command_line(pid: int) -> list[str]:
    raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    return [part.decode(errors="replace") for part in raw.split(b"\0")[:-1]]


def server_processes(proc: Path = Path("/proc")) -> dict[int, list[str]]:
    """``{pid: serve arguments}`` of this user's ``segsvc serve`` processes (none without ``/proc``)."""
    found: dict[int, list[str]] = {}
    try:
        pids = sorted(int(p.name) for p in proc.iterdir() if p.name.isdigit())
    except OSError:  # no /proc (not Linux)
        return found
    for pid in pids:
        if pid == os.getpid():
            continue
        try:
            if (proc / str(pid)).stat().st_uid != os.getuid():
                continue
            args = serve_arguments(process_command_line(pid))
        except OSError:  # gone, or not ours to read
            continue
        if args is not None:
            found[pid] = args
    return found


def _serve_flags(args: Sequence[str]) -> argparse.Namespace:
    """The ``--host``, ``--port`` and ``--tls-cert`` of a ``segsvc serve`` command line (the rest ignored)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=50051)
    parser.add_argument("--tls-cert", default=None)
    return parser.parse_known_args(list(args))[0]


def find_server_process(proc: Path = Path("/proc")) -> tuple[int, list[str]] | None:
    """``(pid, serve arguments)`` of the one ``segsvc serve`` process of this user (PID 1 first), else ``None``.

    Raises:
        ValueError: several are running (none of them PID 1): which one to check is the caller's choice.
    """
    found = server_processes(proc)
    if 1 in found:
        return 1, found[1]
    if len(found) > 1:
        servers = ", ".join(f"pid {pid} (port {_serve_flags(args).port})" for pid, args in sorted(found.items()))
        raise ValueError(f"{len(found)} 'segsvc serve' processes are running: {servers}; "
                         "pass --address HOST:PORT or --pid PID to choose one")
    return next(iter(found.items()), None)


def find_server(proc: Path = Path("/proc")) -> list[str] | None:
    """The ``serve`` arguments of the one ``segsvc serve`` process of this user (``find_server_process``)."""
    found = find_server_process(proc)
    return None if found is None else found[1]


def process_cwd(pid: int) -> Path | None:
    """The working directory of process ``pid`` (``None`` where it cannot be read: not ours, or gone)."""
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return None


def certificate_name(cert_file: str) -> str | None:
    """The first DNS or IP subject alternative name of a PEM certificate (else its common name)."""
    try:
        # CPython's own certificate decoder (used by its test suite); any failure just means "no name".
        decoded = ssl._ssl._test_decode_cert(cert_file)  # type: ignore[attr-defined]
    except Exception:
        return None
    for kind, value in decoded.get("subjectAltName", ()):
        if kind in ("DNS", "IP Address"):
            return value
    for rdn in decoded.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None


def target_from_serve_arguments(args: Sequence[str], cwd: Path | None = None) -> Target:
    """The address and TLS settings a local client needs for a server started with ``args``.

    ``cwd``: the server's working directory, against which it resolved a relative ``--tls-cert`` (the check
    may run in another one: ``--pid`` from a shell, ``docker compose exec -w``, a probe's own directory).
    """
    known = _serve_flags(args)
    if known.tls_cert is not None and cwd is not None:
        known.tls_cert = str(cwd / known.tls_cert)  # an absolute path stays as it is
    if known.port == 0:
        raise ValueError("the server was started with --port 0 (a free port): give --address")
    host = "127.0.0.1" if known.host in WILDCARD_HOSTS else known.host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    if known.tls_cert is None:
        return Target(f"{host}:{known.port}")
    return Target(f"{host}:{known.port}", tls=True, ca_file=known.tls_cert, server_name=certificate_name(known.tls_cert))


def process_server(pid: int) -> list[str]:
    args = serve_arguments(process_command_line(pid))
    if args is None:
        raise ValueError(f"process {pid} is not 'segsvc serve'")
    return args


def resolve_target(args: argparse.Namespace) -> Target:
    """Flags first, then the server's own command line (``--pid``, or the one found without ``--address``)."""
    serve_args, pid = None, None
    if args.pid is not None:
        serve_args, pid = process_server(args.pid), args.pid
    elif args.discover and args.address is None:
        pid, serve_args = find_server_process() or (None, None)
    found = Target() if serve_args is None else \
        target_from_serve_arguments(serve_args, process_cwd(pid) if pid is not None else None)
    address = args.address or found.address
    if not (args.tls or found.tls):
        return Target(address)
    return Target(address, tls=True, ca_file=args.tls_ca or os.environ.get("SEGSVC_TLS_CA") or found.ca_file,
                  server_name=args.tls_server_name or found.server_name)


def check(target: Target, service: str = "", timeout_s: float = 3.0) -> tuple[bool, str]:
    """(SERVING?, the status name or the error) of one Health/Check call."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    options = [("grpc.enable_http_proxy", 0)]  # a proxy from the environment must not carry a local check
    if target.tls:
        roots = Path(target.ca_file).read_bytes() if target.ca_file else None
        if target.server_name:
            options.append(("grpc.ssl_target_name_override", target.server_name))
        channel = grpc.secure_channel(target.address, grpc.ssl_channel_credentials(roots), options=options)
    else:
        channel = grpc.insecure_channel(target.address, options=options)
    with channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as exc:
            return False, f"{exc.code().name}: {exc.details()}"
    serving = response.status == health_pb2.HealthCheckResponse.SERVING
    return serving, health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def run(args: argparse.Namespace) -> int:
    """0 when SERVING, 1 otherwise (Docker reads 1 as unhealthy; 2 is reserved there)."""
    try:
        target = resolve_target(args)
        serving, status = check(target, args.service, args.timeout_s)
    except (OSError, ValueError) as exc:
        print(f"segsvc health: {exc}", file=sys.stderr)
        return 1
    print(f"{target.address} ({'TLS' if target.tls else 'plaintext'}) {args.service!r}: {status}",
          file=sys.stdout if serving else sys.stderr)
    return 0 if serving else 1


def add_health_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("health", help="check a running server's gRPC health (exit 0 when SERVING); for "
                                      "container health checks")
    p.add_argument("--address", default=None,
                   help=f"HOST:PORT (default: from the local 'segsvc serve' command line, else {DEFAULT_ADDRESS}; "
                        "with several local servers, --address or --pid is needed)")
    p.add_argument("--service", default="",
                   help="health service name (default '': the whole server; segsvc.model.NAME for one model)")
    p.add_argument("--tls", action="store_true", help="use TLS (default: when the server runs with --tls-cert)")
    p.add_argument("--tls-ca", default=None,
                   help="PEM roots to trust (default $SEGSVC_TLS_CA, else the server's --tls-cert)")
    p.add_argument("--tls-server-name", default=None,
                   help="name to check in the certificate (default: its first subject alternative name)")
    p.add_argument("--timeout-s", type=float, default=3.0, help="deadline of the check (default 3)")
    p.add_argument("--pid", type=int, default=None, help="read the flags of this 'segsvc serve' process")
    p.add_argument("--no-discover", dest="discover", action="store_false",
                   help="do not look for the local 'segsvc serve' process")
    p.set_defaults(func=run)
