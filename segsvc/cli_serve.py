"""``segsvc serve``: its flags, checked by name at the start, and the ``ServerConfig`` they make.

The server's modules are imported when the command runs, not when the parser is built, so
``segsvc --help`` and the client commands stay fast.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Sequence

from segsvc.cli_client import env_token
from segsvc.cli_datasets import add_server_arguments, server_config
from segsvc.cli_train import training_config
from segsvc.cli_values import (mebibytes, non_negative_float, non_negative_int, number, port, positive_float,
                               positive_int, whole_number)
from segsvc.config import BACKENDS, LOG_LEVELS
from segsvc.errors import InvalidArgument, SegsvcError


def _server_auth(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The server's tokens and scopes: --token-file, else $SEGSVC_AUTH_TOKEN (infer) / $SEGSVC_ADMIN_TOKEN (manage)."""
    from segsvc.server.auth import AuthConfig

    if args.token_file:
        return AuthConfig.from_file(args.token_file)
    tokens = [(env_token(var), scope) for var, scope in
              (("SEGSVC_AUTH_TOKEN", "infer"), ("SEGSVC_ADMIN_TOKEN", "manage"))]
    given = tuple((t, frozenset({scope})) for t, scope in tokens if t)
    return AuthConfig(given) if given else None


def _serve(args: argparse.Namespace) -> int:
    from segsvc.inference.batcher import BatchingConfig
    from segsvc.inference.engine import EngineConfig, resolve_device
    from segsvc.inference.manager import ManagerConfig
    from segsvc.server.app import run
    from segsvc.server.config import MIB, LimitsConfig, ServerConfig, TLSConfig
    from segsvc.server.logs import configure_logging

    if (args.tls_cert is None) != (args.tls_key is None):
        raise SegsvcError("TLS needs both --tls-cert and --tls-key")
    _check_stop_durations(args)
    _check_message_mb(args.max_message_mb)
    configure_logging(args.log_level, json_lines=args.log_format == "json")
    device_type = resolve_device(args.device).type
    config = ServerConfig(
        model_repo=args.model_repo,
        host=args.host,
        port=args.port,
        metrics_port=None if args.metrics_port == -1 else args.metrics_port,
        metrics_host=args.metrics_host,
        metrics_tls=args.metrics_tls,
        manager=ManagerConfig(
            engine=EngineConfig(device=args.device, precision=args.precision, warmup=args.warmup,
                                compile=args.compile, threads=args.torch_threads,
                                **_backend_choices(args.backend or ())),
            batching=BatchingConfig(
                max_batch_size=1 if args.no_batching else args.max_batch_size,
                max_delay_s=args.max_delay_ms / 1e3,
                max_queue_size=args.max_queue,
                max_batch_pixels=batch_pixels(args.max_batch_pixels, device_type),
                max_batch_bytes=_batch_bytes(args.max_batch_mb, device_type),
                concurrency=args.concurrent_batches,
            ),
            poll_interval_s=args.poll_interval_s,
            models=tuple(args.models or ()),
            drain_timeout_s=args.drain_timeout_s,
        ),
        limits=LimitsConfig(
            max_message_bytes=int(args.max_message_mb * MIB),
            max_pixels=args.max_pixels,
            max_stream_in_flight=args.max_stream_in_flight,
            max_inflight_mb=args.max_inflight_mb,
            max_tiles=args.max_tiles,
            max_concurrent_rpcs=args.max_concurrent_rpcs,
            stream_idle_s=args.stream_idle_s,
        ),
        auth=_server_auth(args),
        tls=TLSConfig(args.tls_cert, args.tls_key) if args.tls_cert else None,
        grace_s=args.grace_s,
        io_threads=args.io_threads,
        torch_threads=args.torch_threads,
        jobs=_jobs_config(args),
        datasets=server_config(args),
        training=training_config(args),
        max_connection_age_s=args.max_connection_age_s or None,
    )
    _warn_unknown_backend_models(config.manager.engine.model_backends, args.model_repo)
    run(config)
    return 0


def _train_minutes(text: str) -> float:
    """``--max-train-min``: minutes in ``(0, MAX_TIME_MIN]`` (a week), as ``TrainingConfig`` takes them; the bound is
    read only when the flag is given (its module is slow to import)."""
    from segsvc.jobs.trainspec import MAX_TIME_MIN

    return number(0.0, strict=True, most=MAX_TIME_MIN)(text)


def _check_message_mb(value: float) -> None:
    """``--max-message-mb``: at least a byte, and under 2 GiB (gRPC's message limits are a 32-bit int).

    ``int()`` of NaN or infinity times a MiB raised ValueError or OverflowError, and 2048 an OverflowError at the
    start: tracebacks instead of the flag's name.
    """
    from segsvc.server.config import GRPC_MAX_INT, MIB

    if not math.isfinite(value) or not 1 <= value * MIB <= GRPC_MAX_INT:
        raise InvalidArgument(f"--max-message-mb must be more than 0 and less than 2048 (gRPC's limit: 2 GiB less a "
                              f"byte), got {value:g}")


def _check_stop_durations(args: argparse.Namespace) -> None:
    """The flags that bound the stop (``--grace-s``, ``--drain-timeout-s``) and the connections' age, refused by
    their names (the configuration's own checks name its fields)."""
    from segsvc.server.config import GRPC_MAX_S, check_seconds

    check_seconds("--grace-s", args.grace_s, positive=False, most=GRPC_MAX_S)  # also the connections' grace
    check_seconds("--drain-timeout-s", args.drain_timeout_s, positive=True, most=math.inf)
    check_seconds("--max-connection-age-s", args.max_connection_age_s, positive=False, most=GRPC_MAX_S)  # 0: never


def _warn_unknown_backend_models(model_backends: Sequence[tuple[str, str]], model_repo: str) -> None:
    """A WARNING naming the ``--backend MODEL=KIND`` models the repository does not hold (a typo is otherwise
    silent); not an error, since such a model may be published later."""
    from segsvc.inference.repository import ModelRepository

    if not model_backends:
        return
    held = sorted(ModelRepository(model_repo).list_models()) if Path(model_repo).is_dir() else []
    unknown = [name for name, _ in model_backends if name not in held]
    if unknown:
        logging.getLogger("segsvc.cli").warning(
            "--backend MODEL=KIND names a model the repository %s does not hold: %s (its models: %s); the choice "
            "applies only once such a model is published", model_repo, ", ".join(repr(n) for n in unknown),
            ", ".join(held) or "none")


def _backend_choices(values: Sequence[str]) -> dict:  # type: ignore[type-arg]
    """``--backend`` values -> ``EngineConfig``'s ``backend`` and ``model_backends``."""
    everyone: str | None = None
    per_model: dict[str, str] = {}
    for value in values:
        model, _, kind = value.rpartition("=")
        if kind not in BACKENDS:
            raise InvalidArgument(f"--backend {value!r}: the backend must be one of {', '.join(BACKENDS)}")
        if model:
            per_model[model] = kind
        else:
            everyone = kind
    return {"backend": everyone, "model_backends": tuple(sorted(per_model.items()))}


def _jobs_config(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """Batch jobs are on when ``--state-dir`` is given; outputs default to ``<state-dir>/outputs``."""
    from segsvc.jobs.batch import JobsConfig
    from segsvc.jobs.staging import UploadLimits

    if args.state_dir is None:
        if args.data_root or args.output_root:
            raise InvalidArgument("--data-root and --output-root need --state-dir (where jobs keep their state)")
        return None
    state = Path(args.state_dir)
    _check_writable_folder(state, "--state-dir")
    if args.output_root:  # the default, <state-dir>/outputs, is as writable as the state folder
        _check_writable_folder(Path(args.output_root), "--output-root")
    if args.data_root:
        _check_data_root(Path(args.data_root))
    return JobsConfig(
        state_dir=state,
        output_root=Path(args.output_root) if args.output_root else state / "outputs",
        data_root=Path(args.data_root) if args.data_root else None,
        max_running_jobs=args.max_running_jobs,
        max_inputs=args.max_job_images,
        max_input_specs=args.max_job_paths,
        upload=UploadLimits(max_file_bytes=int(args.max_upload_file_mb * (1 << 20)),
                            max_total_bytes=int(args.max_upload_mb * (1 << 20))),
        upload_ttl_s=args.upload_ttl_hours * 3600.0,
        max_uploads_disk_bytes=int(args.max_uploads_disk_mb * (1 << 20)),
    )


def _check_writable_folder(path: Path, flag: str) -> None:
    """A folder the server writes (``--state-dir``, ``--output-root``), refused at the start by its flag when it
    cannot be: a file, or a folder (or, for one not there yet, its nearest existing parent) where nothing can be
    created (read-only, /proc, no permission). One not there yet is left to be created where it is today (the
    state folder at the start, the output root by the first job): only a probe entry is made and removed.

    Without this, every job failed later ("cannot write the job's outputs: No such file or directory").
    """
    if path.exists():
        if not path.is_dir():
            raise InvalidArgument(f"{flag} {path} is not a folder")
        probe_dir = path
    else:
        probe_dir = next((p for p in Path(os.path.abspath(path)).parents if p.exists()), Path("/"))
        if not probe_dir.is_dir():
            raise InvalidArgument(f"{flag} {path} cannot be created: {probe_dir} is not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".segsvc-probe-", dir=probe_dir))
    except OSError as exc:
        where = "" if probe_dir == path else f" cannot be created: {probe_dir}"
        raise InvalidArgument(f"{flag} {path}{where} is not writable ({exc.strerror or type(exc).__name__})") from None


def _check_data_root(path: Path) -> None:
    """``--data-root``: a folder the server can list, refused at the start by the flag when it is not (every job
    over server paths, every dataset registration failed later: "the data root does not exist")."""
    if not path.exists():
        raise InvalidArgument(f"--data-root {path} does not exist")
    if not path.is_dir():
        raise InvalidArgument(f"--data-root {path} is not a folder")
    if not os.access(path, os.R_OK | os.X_OK):
        raise InvalidArgument(f"--data-root {path} is not readable")



CUDA_BATCH_PIXELS = 64 << 20
CPU_BATCH_MB = 256  # 8 of the bench model's 512x512 images, 2 of U-Net 16's 360x480 (bench/bench_batch_budget.py)


def _budget(value: str, flag: str, auto: int | None) -> int | None:
    """A batch budget flag: ``auto`` gives ``auto``, ``0`` no limit, else a positive integer."""
    if value == "auto":
        return auto
    try:
        amount = int(value)
    except ValueError:
        raise InvalidArgument(f"{flag} must be 'auto' or an integer, got {value!r}") from None
    if amount < 0:
        raise InvalidArgument(f"{flag} must be >= 0, got {amount}")
    return amount or None


def batch_pixels(value: str, device_type: str) -> int | None:
    """``--max-batch-pixels``: ``auto`` (64 MP on CUDA, no limit on CPU), ``0`` for no limit, else pixels."""
    return _budget(value, "--max-batch-pixels", CUDA_BATCH_PIXELS if device_type == "cuda" else None)


def _batch_bytes(value: str, device_type: str) -> int | None:
    """``--max-batch-mb`` in bytes: ``auto`` (``CPU_BATCH_MB`` on CPU, no limit on CUDA), ``0`` for no limit."""
    mb = _budget(value, "--max-batch-mb", None if device_type == "cuda" else CPU_BATCH_MB)
    return None if mb is None else mb << 20


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model repository over gRPC (Segment, SegmentStream, models, health)")
    p.add_argument("--model-repo", required=True, help="repository root: <root>/<model>/<version>/")
    p.add_argument("--host", default="0.0.0.0", help="address to bind (default 0.0.0.0)")
    p.add_argument("--port", type=port, default=50051, help="gRPC port; 0 picks a free one (default 50051)")
    p.add_argument("--metrics-port", type=whole_number(-1, 65535), default=9090,
                   help="Prometheus port; 0 picks a free one, -1 disables (default 9090)")
    p.add_argument("--metrics-host", default="127.0.0.1",
                   help="metrics address (default 127.0.0.1: the endpoint has no auth; 0.0.0.0 to expose it)")
    p.add_argument("--metrics-tls", action="store_true", help="serve the metrics over HTTPS with --tls-cert/--tls-key")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="autocast dtype on CUDA (auto: bf16 where supported, else fp16; CPU runs fp32)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the warm-up pass at load")
    p.add_argument("--backend", action="append", default=None, metavar="[MODEL=]KIND",
                   help=f"what runs the networks, one of {', '.join(BACKENDS)}: for every model, or MODEL=KIND for "
                        "one (repeatable; default: each manifest's inference.backend, normally torch). onnxruntime "
                        "serves the version's `segsvc export --format onnx` file")
    p.add_argument("--compile", action="store_true", help="torch.compile the eager models (CUDA only)")
    p.add_argument("--models", nargs="+", default=None, metavar="NAME", help="serve only these models")
    p.add_argument("--max-batch-size", type=positive_int, default=8, help="images per batch (default 8)")
    p.add_argument("--max-delay-ms", type=non_negative_float, default=5.0, help="longest wait for a batch to fill while other requests are still being decoded; a lone "
                        "request never waits (default 5)")
    p.add_argument("--concurrent-batches", type=positive_int, default=1,
                   help="batches of one model that run at once (default 1). For throughput on CPU (batch jobs), "
                        "N with --torch-threads = CPUs/N: small models run ~1.4x faster as single-threaded "
                        "passes side by side, each request a little slower")
    p.add_argument("--max-queue", type=positive_int, default=256,
                   help="requests waiting per model version, and per lane for the memory budget, "
                        "before RESOURCE_EXHAUSTED (default 256)")
    p.add_argument("--max-batch-mb", default="auto",
                   help="most forward-pass memory in one batch, from each model's bytes per pixel measured at "
                        f"load, so small models batch more images than large ones; 0: no limit; auto (default): "
                        f"{CPU_BATCH_MB} on CPU (bench/bench_batch_budget.py), no limit on CUDA")
    p.add_argument("--max-batch-pixels", default="auto",
                   help="most input pixels in one batch; 0: no limit; auto (default): 64 MP on CUDA, "
                        "no limit on CPU (where --max-batch-mb bounds batches)")
    p.add_argument("--no-batching", action="store_true", help="one image per forward pass")
    p.add_argument("--poll-interval-s", type=non_negative_float, default=5.0,
                   help="seconds between repository scans for new versions; 0 disables (default 5)")
    p.add_argument("--max-message-mb", type=float, default=64, help="largest gRPC message each way (default 64)")
    p.add_argument("--max-pixels", type=positive_int, default=64_000_000,
                   help="largest image in pixels, checked from the header before decoding (default 64 MP)")
    p.add_argument("--max-stream-in-flight", type=positive_int, default=16,
                   help="images of one SegmentStream processed at once (default 16: half the default "
                        "--max-concurrent-rpcs, so one stream cannot take every place)")
    p.add_argument("--max-inflight-mb", type=positive_int, default=2048,
                   help="memory budget of the images being served, from each model's measured bytes per pixel; "
                        "a request over it alone is refused, others wait (default 2048)")
    p.add_argument("--max-tiles", type=positive_int, default=1024,
                   help="most sliding-window tiles of one request (default 1024)")
    p.add_argument("--max-concurrent-rpcs", type=positive_int, default=32,
                   help="calls in progress at once (health, reflection and readiness probes aside); one more gets "
                        "RESOURCE_EXHAUSTED before its request is read; a SegmentStream counts as one call, plus one "
                        "for each image beyond the first it holds (for which it waits). Each place holds up to "
                        "--max-message-mb before the memory budget admits its image: size the container for "
                        "--max-inflight-mb plus this "
                        "times --max-message-mb (default 32: 32 x 64 MiB = the default --max-inflight-mb). "
                        "Management calls (load, unload, set default, datasets, training) may take 4 places "
                        "more, which inference never takes, so a full server can still be managed")
    p.add_argument("--stream-idle-s", type=non_negative_float, default=60.0,
                   help="end a SegmentStream that has every image answered and sends nothing for this many "
                        "seconds (a unary call that sends no request, and an upload that sends no next chunk, "
                        "likewise) with RESOURCE_EXHAUSTED, giving its --max-concurrent-rpcs place back; a stream "
                        "waiting for answers is never ended. The wait includes a message's transfer: raise it for "
                        "clients on slow links sending large images (default 60; 0: never, and open streams that "
                        "send nothing can then hold every place)")
    p.add_argument("--grace-s", type=float, default=25.0,
                   help="on SIGTERM, seconds for requests in flight (default 25); the stop then drains the "
                        "batchers for up to --drain-timeout-s: see there how the two add up")
    p.add_argument("--drain-timeout-s", type=float, default=30.0,
                   help="after --grace-s, the longest wait for the models' batchers to finish the forward passes "
                        "they run; work still running on a thread then (a forward pass, a model build) is abandoned and "
                        "the server exits with status 3. Also "
                        "how long a version swapped out or unloaded waits for its requests (default 30). A stop "
                        "takes at most --grace-s + --drain-timeout-s, plus about 1 s to close (and, with training "
                        "jobs, up to 10 s for their trainers to exit): keep that below Kubernetes' "
                        "terminationGracePeriodSeconds less the preStop sleep, or the pod is killed mid-drain")
    p.add_argument("--max-connection-age-s", type=float, default=0.0,
                   help="close each client connection (GOAWAY) after about this many seconds so clients "
                        "reconnect and spread over the replicas behind a load balancer; calls in flight get "
                        "--grace-s to finish (default 0: never)")
    p.add_argument("--token-file", default=None,
                   help="require 'authorization: Bearer <token>': one 'TOKEN [infer,jobs,manage]' per line "
                        "(no scope: infer); else $SEGSVC_AUTH_TOKEN (infer) and $SEGSVC_ADMIN_TOKEN (manage); "
                        "health checks stay open")
    p.add_argument("--tls-cert", default=None, help="PEM certificate chain (with --tls-key: serve TLS)")
    p.add_argument("--tls-key", default=None, help="PEM private key")
    p.add_argument("--io-threads", type=non_negative_int, default=0,
                   help="decode/encode threads (default 0: one per CPU)")
    p.add_argument("--torch-threads", type=non_negative_int, default=0,
                   help="torch CPU threads (default 0: one per CPU)")
    p.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS,
                   help=f"{', '.join(LOG_LEVELS)}, in any case (default INFO)")
    p.add_argument("--log-format", default="json", choices=("json", "text"), help="log lines (default json)")
    g = p.add_argument_group("batch jobs (on with --state-dir)")
    g.add_argument("--state-dir", default=None,
                   help="job database (SQLite), upload staging and the dataset registry; enables jobs and datasets")
    g.add_argument("--data-root", default=None,
                   help="server-side job inputs and registered datasets must lie under this folder")
    g.add_argument("--output-root", default=None, help="job outputs go to <root>/<job-id>/ (default <state-dir>/outputs)")
    g.add_argument("--max-running-jobs", type=positive_int, default=1,
                   help="jobs run at once; others wait in order (default 1)")
    g.add_argument("--max-training-jobs", type=non_negative_int, default=1,
                   help="training jobs run at once, each in its own process group (default 1); 0 turns training "
                        "jobs off: the server then refuses them, batch jobs and datasets stay on")
    g.add_argument("--max-train-min", type=_train_minutes, default=None,
                   help="the longest a training job's trainer runs, in minutes; a request asking for longer is "
                        "refused, and a budget in epochs stops there (default one week, 10080)")
    g.add_argument("--max-job-images", type=positive_int, default=100_000,
                   help="most images in one job (default 100000)")
    g.add_argument("--max-job-paths", type=positive_int, default=1_000,
                   help="most input paths (folders, globs, files) one job request names (default 1000)")
    g.add_argument("--max-upload-mb", type=mebibytes, default=2048, help="largest upload in MiB (default 2048)")
    g.add_argument("--max-upload-file-mb", type=mebibytes, default=64, help="largest uploaded file in MiB (default 64)")
    g.add_argument("--upload-ttl-hours", type=positive_float, default=24,
                   help="delete an upload that no job uses this many hours after it was committed (default 24); "
                        "deleting a job deletes its upload as soon as no other job uses it")
    g.add_argument("--max-uploads-disk-mb", type=mebibytes, default=8192,
                   help="most MiB all uploads together may take in <state-dir>/uploads: committed uploads plus "
                        "those in progress, checked before each chunk is written; beyond it an upload is refused "
                        "(RESOURCE_EXHAUSTED) until jobs are deleted or unused uploads expire. The state folder "
                        "also holds the job database, which must not run out of room (default 8192: four "
                        "uploads of the default --max-upload-mb)")
    add_server_arguments(g)
    p.set_defaults(func=_serve)
