"""segsvc versus Ray Serve with ``@serve.batch``: same model, image and protocol, side by side in one run.

Both servers answer the very same ``segsvc.v1.SegmentationService/Segment``
gRPC call (a PNG in, a PNG label map out), driven by the same raw stub from
client threads here, so the protocol cost is the same on both sides:

- segsvc: a ``segsvc serve`` process (its own GIL, like in production).
- Ray Serve: one replica of ``RaySegmenter`` behind Ray Serve's gRPC proxy,
  which registers segsvc's generated servicer and routes by the ``application``
  metadata. The replica loads the same artifact into the backend segsvc serves
  it with (``open_version_dir`` + ``Predictor``: the same network, BatchNorm
  folded and channels-last, and the same contract, normalisation and argmax),
  decodes and PNG-encodes on worker threads (as segsvc does on its I/O threads),
  and batches forward passes with ``@serve.batch`` set to segsvc's batching: the
  same ``max_batch_size`` (capped, like segsvc's, by the CPU memory budget) and
  ``batch_wait_timeout_s`` = ``--max-delay-ms``, one batch at a time. Ray's
  proxy is a separate process from the replica: that hop is part of what a Ray
  Serve deployment costs, so it is measured.

Both sides get the same CPU settings (torch threads, one inter-op thread,
OpenCV single-threaded, segsvc's allocator setting) and run alternately, one
at a time, round by round, so the drift of a shared machine's load cancels.
Ray runs with ``num_cpus=2``, no dashboard, its logs in a temporary directory,
and is shut down at the end; the script checks that no child process is left.

The model is FCN-8s on a 360x480 CamVid image: the trained ``camvid-fcn8s``
under ``runs/`` when there is one (or ``--model-repo/--model``), else an
untrained FCN-8s with the CPU recipe's widths, 11 classes and its inference
scale 0.5. Not part of the test suite. Needs ``pip install -e '.[bench]'``.

    .venv/bin/python bench/bench_rayserve.py [--quick] [--model-repo REPO --model NAME] [--image PNG]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no network calls from Ray

import cv2  # noqa: E402
import grpc  # noqa: E402
import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from ray import serve  # noqa: E402

from segsvc.cli_serve import CPU_BATCH_MB  # noqa: E402  (segsvc serve's --max-batch-mb auto on CPU)
from segsvc.config import InferenceSpec, ModelSpec  # noqa: E402
from segsvc.inference.backends import EngineConfig, open_version_dir  # noqa: E402
from segsvc.inference.batcher import BatchingConfig  # noqa: E402
from segsvc.inference.codec import decode_image, encode_png  # noqa: E402
from segsvc.inference.predictor import Predictor  # noqa: E402
from segsvc.models.artifact import save_artifact  # noqa: E402
from segsvc.models.registry import build_model  # noqa: E402
from segsvc.v1 import segmentation_pb2 as pb  # noqa: E402
from segsvc.v1 import segmentation_pb2_grpc as pb_grpc  # noqa: E402
from segsvc.wire import decode_png_labels  # noqa: E402

MODEL = "camvid-fcn8s"
TRAINED_REPOS = (ROOT / "runs" / "model_repository", ROOT / "runs" / "remeasure" / "repo")
CAMVID_VAL = ROOT.parent / "shared" / "datasets" / "camvid" / "val"
# The CPU recipe (training/recipes/camvid-fcn8s.yaml), untrained: what the trained model costs to run.
FALLBACK_SPEC = ModelSpec("fcn8s", 11, params={"base_channels": 16, "fc_channels": 512, "batch_norm": True})
RAY_APP = "segsvc_bench"
RAY_SERVICER = "segsvc.v1.segmentation_pb2_grpc.add_SegmentationServiceServicer_to_server"
CONCURRENCY = (1, 4, 16)
SIDES = ("segsvc", "ray")


def set_cpu_threads(threads: int) -> None:
    """segsvc serve's CPU settings (``server.app``), given to the Ray replica too."""
    from segsvc.inference.allocator import configure_allocator

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    cv2.setNumThreads(1)
    configure_allocator()


def served_predictor(version_dir: Path) -> Predictor:
    """The artifact in the backend ``segsvc serve`` runs it with on CPU (BatchNorm folded, channels-last)."""
    return Predictor(*open_version_dir(version_dir, torch.device("cpu"), EngineConfig(device="cpu")))


@serve.deployment
class RaySegmenter:
    """``Segment`` on Ray Serve: decode and encode on threads, forward passes batched by ``@serve.batch``."""

    def __init__(self, version_dir: str, threads: int, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        set_cpu_threads(threads)
        self.predictor = served_predictor(Path(version_dir))
        self.forward.set_max_batch_size(max_batch_size)
        self.forward.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005, max_concurrent_batches=1)
    async def forward(self, images: list[np.ndarray]) -> list[np.ndarray]:
        return await asyncio.to_thread(self.predictor.predict_batch, images)

    async def Segment(self, request: pb.SegmentRequest) -> pb.SegmentResponse:  # noqa: N802 (the gRPC method)
        image = await asyncio.to_thread(decode_image, request.image)
        labels = await self.forward(image)
        data = await asyncio.to_thread(encode_png, labels)
        h, w = labels.shape
        return pb.SegmentResponse(request_id=request.request_id, labels=pb.LabelMap(
            encoding=pb.OUTPUT_ENCODING_PNG, data=data, height=h, width=w))


# -- set-up -------------------------------------------------------------------------------------------------------
def resolve_model(args: argparse.Namespace, tmp: Path) -> tuple[Path, str, str]:
    """(repository, model name, description): the given one, a trained one under runs/, or an untrained FCN-8s."""
    if args.model_repo:
        return Path(args.model_repo), args.model, f"{args.model} from {args.model_repo}"
    for repo in TRAINED_REPOS:
        if (repo / MODEL).is_dir():
            return repo, MODEL, f"trained {MODEL} from {repo.relative_to(ROOT)}"
    torch.manual_seed(0)
    save_artifact(build_model(FALLBACK_SPEC).eval(), tmp / "repo", MODEL, spec=FALLBACK_SPEC,
                  inference=InferenceSpec(scale=0.5))
    return tmp / "repo", MODEL, f"untrained {FALLBACK_SPEC.arch} {dict(FALLBACK_SPEC.params)}, 11 classes, scale 0.5"


def newest_version(repo: Path, name: str) -> Path:
    versions = sorted((p for p in (repo / name).iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    if not versions:
        raise SystemExit(f"no version of {name} in {repo}")
    return versions[-1]


def load_image(args: argparse.Namespace) -> tuple[bytes, str]:
    """PNG bytes: ``--image``, else the first CamVid val image, else smooth noise at CamVid's 360x480."""
    path = Path(args.image) if args.image else next(iter(sorted(CAMVID_VAL.glob("*.png"))), None) \
        if CAMVID_VAL.is_dir() else None
    if path is not None:
        data = path.read_bytes()
        return data, f"{path.name} {'x'.join(map(str, decode_image(data).shape[:2]))}"
    rng = np.random.default_rng(0)
    image = cv2.resize(rng.integers(0, 256, (45, 60, 3), dtype=np.uint8), (480, 360), interpolation=cv2.INTER_LINEAR)
    return encode_png(image), "synthetic 360x480"


def batch_cap(version_dir: Path, image: bytes, max_batch_size: int) -> int:
    """segsvc's batch size for this image: ``max_batch_size`` or fewer, as the CPU memory budget allows."""
    predictor = served_predictor(version_dir)
    h, w = predictor.input_tensor(decode_image(image)).shape[-2:]
    stride = predictor.stride
    padded = (-(-h // stride) * stride) * (-(-w // stride) * stride)
    batching = BatchingConfig(max_batch_size=max_batch_size, max_batch_bytes=CPU_BATCH_MB << 20)
    return batching.for_model(predictor.backend.measure_memory()).images_per_batch(padded)  # as the server's


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_segsvc(repo: Path, name: str, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "segsvc", "serve", "--model-repo", str(repo), "--models", name,
           "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1", "--poll-interval-s", "0",
           "--torch-threads", str(args.threads), "--max-batch-size", str(args.max_batch_size),
           "--max-delay-ms", str(args.max_delay_ms), "--log-level", "WARNING", "--device", "cpu"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                            text=True)
    line = proc.stdout.readline()
    if "serving on" not in line:
        stop_segsvc(proc)
        raise SystemExit(f"segsvc did not start: {line!r}")
    return proc, line.split("serving on ")[1].split(",")[0].strip()


def stop_segsvc(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_ray(version_dir: Path, args: argparse.Namespace, batch: int, ray_tmp: Path) -> str:
    """Ray (2 CPUs, no dashboard, logs in ``ray_tmp``) with the app behind its gRPC proxy; returns the address."""
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=str(ray_tmp), log_to_driver=False,
             object_store_memory=128 << 20, logging_level=logging.WARNING)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()},
                grpc_options={"port": port, "grpc_servicer_functions": [RAY_SERVICER]})
    app = RaySegmenter.options(
        num_replicas=1, max_ongoing_requests=4 * max(CONCURRENCY), ray_actor_options={"num_cpus": 1},
    ).bind(str(version_dir), args.threads, batch, args.max_delay_ms / 1e3)
    serve.run(app, name=RAY_APP, route_prefix=f"/{RAY_APP}")  # the proxies route only apps with a prefix
    return f"127.0.0.1:{port}"


def stop_ray() -> None:
    if ray.is_initialized():
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def leftover_processes(ray_tmp: Path, wait_s: float = 30.0) -> list[int]:
    """Live processes this script started: its children, and Ray's (named by their session under ``ray_tmp``).

    Ray's workers are the raylet's children, so they are found by the temporary directory in their
    command line. Processes still exiting get ``wait_s`` to go.
    """
    me, marker = str(os.getpid()), str(ray_tmp).encode()
    deadline = time.monotonic() + wait_s
    while True:
        left = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or entry.name == me:
                continue
            try:
                state, ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
                if state != "Z" and (ppid == me or marker in (entry / "cmdline").read_bytes()):
                    left.append(int(entry.name))
            except (OSError, ValueError):
                continue
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


# -- measurement ------------------------------------------------------------------------------------------------
class Side:
    """One server as the client threads see it: its address and the metadata its calls carry."""

    def __init__(self, address: str, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self.address, self.metadata = address, metadata

    def segment(self, stub: pb_grpc.SegmentationServiceStub, request: pb.SegmentRequest,
                timeout: float = 600) -> pb.SegmentResponse:
        return stub.Segment(request, timeout=timeout, metadata=self.metadata)

    def wait_ready(self, request: pb.SegmentRequest, timeout_s: float = 300) -> pb.SegmentResponse:
        """The first answer (Ray's proxy learns about the app a little after ``serve.run`` returns)."""
        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(self.address) as channel:
            stub = pb_grpc.SegmentationServiceStub(channel)
            while True:
                try:
                    return self.segment(stub, request)
                except grpc.RpcError as exc:
                    if time.monotonic() > deadline or exc.code() not in (
                            grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND):
                        raise
                    time.sleep(0.5)


def throughput(side: Side, request: pb.SegmentRequest, concurrency: int, per_client: int) -> tuple[int, float, list]:
    """``concurrency`` clients send ``per_client`` images each, one channel each: (images, seconds, latencies).

    The clock runs from the start signal to the last answer (closing a channel takes a while: not counted).
    """
    latencies: list[float] = []
    finished: list[float] = []
    lock = threading.Lock()
    start = threading.Barrier(concurrency + 1)
    failures: list[BaseException] = []

    def client() -> None:
        try:
            with grpc.insecure_channel(side.address) as channel:
                stub = pb_grpc.SegmentationServiceStub(channel)
                grpc.channel_ready_future(channel).result(timeout=60)
                start.wait()
                for _ in range(per_client):
                    t0 = time.perf_counter()
                    side.segment(stub, request)
                    with lock:
                        latencies.append(time.perf_counter() - t0)
                finished.append(time.perf_counter())
        except BaseException as exc:  # reported after the join; the barrier is broken so nobody hangs
            failures.append(exc)
            start.abort()

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    try:
        start.wait()
    except threading.BrokenBarrierError:
        pass
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    if failures:
        raise failures[0]
    return len(latencies), max(finished) - t0, latencies


def summarize(images: int, seconds: float, latencies: list[float]) -> tuple[float, float, float]:
    """images/s, p50 and p99 latency in seconds."""
    lat = sorted(latencies)
    p99 = lat[min(len(lat) - 1, int(round(0.99 * (len(lat) - 1))))]
    return images / seconds, statistics.median(lat), p99


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-repo", default=None, help="repository with the model (default: a trained "
                                                           f"{MODEL} under runs/, else an untrained FCN-8s)")
    parser.add_argument("--model", default=MODEL, help=f"model name in --model-repo (default {MODEL})")
    parser.add_argument("--image", default=None, help="PNG to send (default: the first CamVid val image)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads, both sides")
    parser.add_argument("--max-batch-size", type=int, default=8, help="segsvc --max-batch-size (default 8)")
    parser.add_argument("--max-delay-ms", type=float, default=5.0, help="segsvc --max-delay-ms (default 5)")
    parser.add_argument("--iters", type=int, default=40, help="sequential requests per round at concurrency 1")
    parser.add_argument("--requests-per-client", type=int, default=8, help="requests per client at concurrency > 1")
    parser.add_argument("--rounds", type=int, default=3, help="alternating segsvc/Ray rounds per concurrency")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round, few requests")
    args = parser.parse_args()
    if args.quick:
        args.iters, args.requests_per_client, args.rounds = 3, 1, 1
    load_start = load_average()

    tmp = Path(tempfile.mkdtemp(prefix="segsvc-bench-"))
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths live under it
    proc = None
    try:
        repo, name, described = resolve_model(args, tmp)
        version_dir = newest_version(repo, name)
        image, image_described = load_image(args)
        batch = batch_cap(version_dir, image, args.max_batch_size)
        proc, segsvc_address = start_segsvc(repo, name, args)
        ray_address = start_ray(version_dir, args, batch, ray_tmp)
        sides = {"segsvc": Side(segsvc_address), "ray": Side(ray_address, (("application", RAY_APP),))}
        request = pb.SegmentRequest(model=name, image=image, options=pb.SegmentOptions(encoding=pb.OUTPUT_ENCODING_PNG))

        # warm-up (connections, allocator, batch shapes) and the check that both sides answer the same
        answers = {side: decode_png_labels(s.wait_ready(request).labels.data) for side, s in sides.items()}
        agree = float((answers["segsvc"] == answers["ray"]).mean())
        for s in sides.values():
            throughput(s, request, max(CONCURRENCY), 1)

        totals = {side: {c: [0, 0.0, []] for c in CONCURRENCY} for side in SIDES}
        for c in CONCURRENCY:
            per_client = args.iters if c == 1 else args.requests_per_client
            for _ in range(args.rounds):
                for side in SIDES:
                    n, elapsed, lat = throughput(sides[side], request, c, per_client)
                    t = totals[side][c]
                    t[0], t[1] = t[0] + n, t[1] + elapsed
                    t[2].extend(lat)
    finally:
        try:
            stop_ray()
        finally:
            if proc is not None:
                stop_segsvc(proc)
            left = leftover_processes(ray_tmp)
            for pid in left:  # ours, by id: a clean shutdown leaves none
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(ray_tmp, ignore_errors=True)
    results = {side: {c: summarize(*totals[side][c]) for c in CONCURRENCY} for side in SIDES}

    print(f"model      {described}, version {version_dir.name}")
    print(f"image      {image_described}, PNG in, PNG label map out, over gRPC Segment on both sides")
    print(f"CPU        {os.cpu_count()} CPUs, {args.threads} torch threads on both sides; "
          f"load average at start {load_start}, at end {load_average()}")
    print(f"batching   segsvc --max-batch-size {args.max_batch_size} --max-delay-ms {args.max_delay_ms:g} "
          f"(memory budget: batches of <= {batch}); Ray @serve.batch(max_batch_size={batch}, "
          f"batch_wait_timeout_s={args.max_delay_ms / 1e3:g}), 1 replica, 1 batch at a time")
    print(f"Ray        {ray.__version__}, num_cpus=2, Serve gRPC proxy; label maps agree on {agree:.2%} of pixels")
    print(f"rounds     {args.rounds} alternating; {args.iters} requests per round at concurrency 1, "
          f"{args.requests_per_client} per client above{' (--quick)' if args.quick else ''}")
    print("\n               segsvc                       Ray Serve @serve.batch       segsvc / Ray")
    print("  concurrency   img/s   p50 ms   p99 ms     img/s   p50 ms   p99 ms     img/s    p50")
    for c in CONCURRENCY:
        s, r = results["segsvc"][c], results["ray"][c]
        print(f"  {c:11d} {s[0]:7.2f} {s[1] * 1e3:8.0f} {s[2] * 1e3:8.0f}   {r[0]:7.2f} {r[1] * 1e3:8.0f} "
              f"{r[2] * 1e3:8.0f}   {s[0] / r[0]:6.2f}x {s[1] / r[1]:6.2f}")
    samples = ", ".join(f"c={c}: {len(totals['segsvc'][c][2])}" for c in CONCURRENCY)
    print(f"\nsegsvc ahead where the img/s ratio is above 1 and the p50 ratio below 1. Latency samples per cell: "
          f"{samples} (the p99 of few samples is close to the maximum).")
    if left:
        print(f"WARNING: {len(left)} process(es) outlived the shutdown and were killed: {left}")
        raise SystemExit(1)
    print("no process left behind")


if __name__ == "__main__":
    main()
