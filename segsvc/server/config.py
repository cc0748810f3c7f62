"""The server's configuration: frozen dataclasses built once from the command line.

Each component gets its own slice: the model manager gets ``ManagerConfig``
(which holds ``EngineConfig`` and ``BatchingConfig``), the servicer gets
``LimitsConfig``, the app wires ``TLSConfig`` and the token.
"""

from __future__ import annotations

import math
import numbers
import ssl

from dataclasses import dataclass, field
from pathlib import Path

from segsvc.errors import InvalidArgument
from segsvc.inference.admission import AdmissionConfig
from segsvc.inference.codec import DEFAULT_MAX_PIXELS
from segsvc.inference.manager import ManagerConfig
from segsvc.datasets.registry import DatasetsConfig
from segsvc.jobs.batch import JobsConfig
from segsvc.jobs.trainspec import TrainingConfig
from segsvc.server.auth import AuthConfig

MIB = 1 << 20
GRPC_MAX_INT = 2**31 - 1  # gRPC's integer options (the message limits) are 32-bit
GRPC_MAX_S = GRPC_MAX_INT // 1000  # it takes the connection age and its grace in milliseconds


def check_count(name: str, value: object, most: int | None = None) -> None:
    """Refuse a count or size that is not a whole number >= 1, or over ``most``: NaN and 2.5 passed ``< 1``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise InvalidArgument(f"{name} must be a positive whole number, got {value!r}")
    if most is not None and value > most:
        raise InvalidArgument(f"{name} must be at most {most}, got {value}")


def check_seconds(name: str, value: float, *, positive: bool, most: float) -> None:
    """Refuse a duration that is not a finite number of seconds >= 0 (> 0 with ``positive``), or over ``most``.

    NaN passes ``value < 0`` and infinity every lower bound: they broke the stop's deadlines, or the start
    (``round``, gRPC's options) with a traceback.
    """
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise InvalidArgument(f"{name} must be a finite number of seconds {'> 0' if positive else '>= 0'}, "
                              f"got {value!r}")
    if value > most:
        raise InvalidArgument(f"{name} must be at most {most:.0f} s, got {value:.0f}")


@dataclass(frozen=True)
class LimitsConfig:
    """Request limits.

    Args:
        max_message_bytes: largest gRPC message accepted or sent (each way).
        max_pixels: largest image (height x width), checked from the header before decoding.
        max_stream_in_flight: images of one ``SegmentStream`` processed at the same time;
            the stream stops reading while this many are pending (back-pressure). The default, 16, is half
            the default ``max_concurrent_rpcs``: one stream's images cannot take every place of the server.
        max_inflight_mb: memory budget of the images being served (estimated per model
            and image); a request over it alone is refused, others wait for room.
        max_tiles: most sliding-window tiles of one request.
        max_work_pixels: most pixels one request pushes through the network (tiles x flips).
        max_concurrent_rpcs: calls in progress at once (health, reflection and the readiness probes aside);
            one more is refused with RESOURCE_EXHAUSTED before its request is read. A call holds one request
            message before the memory budget admits it; a ``SegmentStream`` takes one more place for each
            image it holds beyond the first (it waits for one). So this times ``max_message_bytes`` bounds
            what requests hold before admission: the default, 32 x 64 MiB, is the default ``max_inflight_mb``.
            Management calls (the ``manage`` scope) may take ``app.MANAGE_RESERVE`` (4) places beyond it, which
            inference never takes, so an operator can unload or roll back a model on a full server.
        stream_idle_s: how long a ``SegmentStream`` with every image answered may wait for its next message (its
            transfer included), and a unary call for its request message, before the server ends it with
            RESOURCE_EXHAUSTED and gives its place back (``--stream-idle-s``); a stream waiting for answers is never
            ended by it. Without it, open streams that sent nothing held every place for as long as their client
            wished. 0: wait for ever (the old behaviour: a client can then fill the limit).
    """

    max_message_bytes: int = 64 * MIB
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_stream_in_flight: int = 16
    max_inflight_mb: int = 2048
    max_tiles: int = 1024
    max_work_pixels: int = 256_000_000
    max_concurrent_rpcs: int = 32
    stream_idle_s: float = 60.0

    def __post_init__(self) -> None:
        check_count("max_message_bytes", self.max_message_bytes, most=GRPC_MAX_INT)
        for name in ("max_pixels", "max_stream_in_flight", "max_inflight_mb", "max_tiles", "max_work_pixels",
                     "max_concurrent_rpcs"):
            check_count(name, getattr(self, name))
        check_seconds("stream_idle_s", self.stream_idle_s, positive=False, most=math.inf)  # 0: for ever

    @property
    def admission(self) -> AdmissionConfig:
        return AdmissionConfig(max_pixels=self.max_pixels, max_inflight_mb=self.max_inflight_mb,
                               max_tiles=self.max_tiles, max_work_pixels=self.max_work_pixels)


@dataclass(frozen=True)
class TLSConfig:
    """Server certificate chain and private key (PEM files)."""

    cert_file: Path
    key_file: Path

    def read(self) -> tuple[bytes, bytes]:
        """``(key, certificate chain)`` PEM bytes, checked to be a matching pair (gRPC would only fail to bind)."""
        try:
            key, cert = Path(self.key_file).read_bytes(), Path(self.cert_file).read_bytes()
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(self.cert_file, self.key_file)
        except ssl.SSLError as exc:
            raise InvalidArgument(f"--tls-cert {self.cert_file} and --tls-key {self.key_file} are not a PEM "
                                  f"certificate chain and its private key ({exc.reason or exc})") from None
        except OSError as exc:
            raise InvalidArgument(f"cannot read the TLS certificate or key: {exc}") from None
        return key, cert


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``segsvc serve`` needs.

    Args:
        model_repo: repository root (``<root>/<model>/<version>/``).
        host: address to bind ("0.0.0.0" for every interface, "127.0.0.1" for local only).
        port: gRPC port; 0 picks a free one (``SegmentationServer.port`` tells which).
        metrics_port: Prometheus port; 0 picks a free one, ``None`` disables the endpoint.
        metrics_host: address of the metrics endpoint (local only by default: it is not authenticated).
        metrics_tls: serve the metrics over TLS with ``tls``'s certificate.
        manager: models, device, precision, batching, polling.
        limits: message, pixel and stream limits.
        auth: bearer tokens and their scopes (health stays open); ``None`` disables authentication.
        tls: certificate and key; ``None`` serves plaintext.
        grace_s: on SIGTERM, how long requests in flight may take before they are cancelled
            (it and the manager's ``drain_timeout_s`` added up stay below Kubernetes'
            terminationGracePeriodSeconds less the preStop sleep).
        io_threads: threads for decoding and encoding images (0: one per CPU, at least 2).
        torch_threads: intra-op threads of the forward pass on CPU (0: one per CPU).
        jobs: batch jobs (state, data and output roots); ``None`` turns them off.
        datasets: the dataset registry (``DatasetService``; state folder, data root, upload limits);
            ``None`` turns it off.
        training: training jobs (need ``jobs``: they share its job store); ``None`` turns them off.
        max_connection_age_s: close each client connection (HTTP/2 GOAWAY) after about this
            long, so long-lived clients reconnect, re-resolve the service name and spread over the
            replicas behind it; its RPCs in flight get ``grace_s`` to finish. ``None``: never.

    Example:
        >>> ServerConfig(model_repo=Path("model_repository"), port=0).grace_s
        25.0
    """

    model_repo: Path
    host: str = "0.0.0.0"
    port: int = 50051
    metrics_port: int | None = 9090
    metrics_host: str = "127.0.0.1"
    metrics_tls: bool = False
    manager: ManagerConfig = field(default_factory=ManagerConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    auth: AuthConfig | None = field(default=None, repr=False)
    tls: TLSConfig | None = None
    grace_s: float = 25.0
    io_threads: int = 0
    torch_threads: int = 0
    jobs: JobsConfig | None = None
    datasets: DatasetsConfig | None = None
    training: TrainingConfig | None = None
    max_connection_age_s: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_repo", Path(self.model_repo))
        if not 0 <= self.port <= 65535:
            raise InvalidArgument(f"port must be in 0..65535, got {self.port}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise InvalidArgument(f"metrics port must be in 0..65535, got {self.metrics_port}")
        check_seconds("grace_s", self.grace_s, positive=False, most=GRPC_MAX_S)  # also the connections' grace
        if self.metrics_tls and self.tls is None:
            raise InvalidArgument("metrics over TLS need the server's certificate and key (--tls-cert, --tls-key)")
        if self.training is not None and self.jobs is None:
            raise InvalidArgument("training jobs need the job store: give --state-dir")
        if self.io_threads < 0 or self.torch_threads < 0:
            raise InvalidArgument("io_threads and torch_threads must be >= 0")
        if self.max_connection_age_s is not None:  # None: never
            check_seconds("max_connection_age_s", self.max_connection_age_s, positive=True, most=GRPC_MAX_S)
