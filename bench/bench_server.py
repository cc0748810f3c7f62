"""Server benchmarks: gRPC overhead and batching throughput, printed as ratios from one run.

Same 512x512 PNG image and the same model everywhere:

1. overhead: ``Segment`` latency over gRPC (PNG in, PNG label map out, concurrency 1)
   divided by the in-process path doing the same work (decode + forward + encode
   with ``Predictor``). Goal: at most 1.10.
2. throughput: images/s at concurrency 1, 4 and 16 with batching on and off,
   with p50/p99 latency. Goal: batching on >= 1.3x batching off at concurrency 16.

The server runs as a separate ``segsvc serve`` process (its own GIL, like in
production); the client threads run here. Not part of the test suite.

    python bench/bench_server.py [--iters 5] [--rounds 2] [--size 512] [--requests-per-client 2]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import cv2  # noqa: E402
import grpc  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from segsvc.config import ModelSpec  # noqa: E402
from segsvc.inference.codec import decode_image, encode_png  # noqa: E402
from segsvc.inference.predictor import Predictor  # noqa: E402
from segsvc.models.artifact import load_artifact, save_artifact  # noqa: E402
from segsvc.models.registry import build_model  # noqa: E402
from segsvc.server.app import configure_allocator  # noqa: E402
from segsvc.v1 import segmentation_pb2 as pb  # noqa: E402
from segsvc.v1 import segmentation_pb2_grpc as pb_grpc  # noqa: E402

SPEC = ModelSpec("unet", 5, params={"base_channels": 4, "depth": 2})


def make_image(size: int) -> bytes:
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
    image = cv2.resize(small, (size, size), interpolation=cv2.INTER_LINEAR)
    ok, buf = cv2.imencode(".png", image)
    assert ok
    return buf.tobytes()


def start_server(repo: Path, threads: int, batching: bool) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "segsvc", "serve", "--model-repo", str(repo), "--host", "127.0.0.1",
           "--port", "0", "--metrics-port", "-1", "--torch-threads", str(threads), "--log-level", "WARNING",
           "--poll-interval-s", "0", "--max-batch-size", "8", "--max-delay-ms", "5"]
    if not batching:
        cmd.append("--no-batching")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if "serving on" not in line:
        proc.kill()
        raise SystemExit(f"server did not start: {line!r}")
    return proc, line.split("serving on ")[1].split(",")[0].strip()


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def request_for(image: bytes) -> pb.SegmentRequest:
    return pb.SegmentRequest(model="bench", image=image, options=pb.SegmentOptions(encoding=pb.OUTPUT_ENCODING_PNG))


def latencies(repo: Path, address: str, image: bytes, iters: int) -> tuple[float, float]:
    """Median latency of the in-process path and of gRPC ``Segment``, measured alternately.

    The in-process path does the work the server does for this request: decode the
    PNG, predict, PNG-encode the label map, with the server's CPU settings.
    Alternating the two cancels the drift of a shared machine's load.
    """
    model, manifest = load_artifact(repo / "bench" / "1")
    predictor = Predictor(model, manifest)
    request = request_for(image)
    worker = ThreadPoolExecutor(1)  # one long-lived worker thread, like the server's batch thread

    def local_once() -> None:
        encode_png(predictor.predict(decode_image(image)))

    local, remote = [], []
    with grpc.insecure_channel(address) as channel, worker:
        stub = pb_grpc.SegmentationServiceStub(channel)
        for _ in range(5):  # warm-up both paths (allocator, kernels, connection)
            worker.submit(local_once).result()
            stub.Segment(request, timeout=120)
        for _ in range(iters):
            t0 = time.perf_counter()
            worker.submit(local_once).result()
            local.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            stub.Segment(request, timeout=120)
            remote.append(time.perf_counter() - t0)
    return statistics.median(local), statistics.median(remote)


def throughput(address: str, image: bytes, concurrency: int, per_client: int) -> tuple[int, float, list[float]]:
    """``concurrency`` clients send ``per_client`` images each: (images, seconds, latencies)."""
    request = request_for(image)
    latencies: list[float] = []
    lock = threading.Lock()
    start = threading.Barrier(concurrency + 1)

    def client() -> None:
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.SegmentationServiceStub(channel)
            grpc.channel_ready_future(channel).result(timeout=30)
            start.wait()
            for _ in range(per_client):
                t0 = time.perf_counter()
                stub.Segment(request, timeout=600)
                with lock:
                    latencies.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return len(latencies), time.perf_counter() - t0, latencies


def summarize(images: int, seconds: float, latencies: list[float]) -> tuple[float, float, float]:
    """images/s, p50 and p99 latency in seconds."""
    lat = sorted(latencies)
    p99 = lat[min(len(lat) - 1, int(round(0.99 * (len(lat) - 1))))]
    return images / seconds, statistics.median(lat), p99


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=5, help="latency samples for the overhead ratio")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--requests-per-client", type=int, default=2, help="images per client in throughput runs")
    parser.add_argument("--rounds", type=int, default=2, help="alternating on/off rounds per concurrency")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads")
    args = parser.parse_args()
    # the in-process baseline gets the server's CPU settings: threads, OpenCV single-threaded, allocator
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    cv2.setNumThreads(1)
    configure_allocator()
    image = make_image(args.size)
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp)
        torch.manual_seed(0)
        save_artifact(build_model(SPEC), repo, "bench", spec=SPEC)
        print(f"model {SPEC.arch} {dict(SPEC.params)}, image {args.size}x{args.size} PNG, "
              f"{args.threads} torch threads, {os.cpu_count()} CPUs")

        servers = {batching: start_server(repo, args.threads, batching) for batching in (True, False)}
        try:
            base, rpc = latencies(repo, servers[True][1], image, args.iters)
            # throughput: alternate on/off rounds at each concurrency (both servers stay up, one works at a time)
            totals = {b: {c: [0, 0.0, []] for c in (1, 4, 16)} for b in (True, False)}
            for c in (1, 4, 16):
                per_client = args.iters if c == 1 else args.requests_per_client
                for _ in range(args.rounds):
                    for batching in (True, False):
                        n, elapsed, lat = throughput(servers[batching][1], image, c, per_client)
                        t = totals[batching][c]
                        t[0], t[1] = t[0] + n, t[1] + elapsed
                        t[2].extend(lat)
        finally:
            for proc, _ in servers.values():
                stop_server(proc)
        results = {b: {c: summarize(*totals[b][c]) for c in (1, 4, 16)} for b in (True, False)}

    print("\noverhead (concurrency 1, median of %d, measured alternately)" % args.iters)
    print(f"  in-process decode+forward+encode  {base * 1e3:8.1f} ms")
    print(f"  gRPC Segment (batching on)        {rpc * 1e3:8.1f} ms")
    print(f"  ratio gRPC / in-process           {rpc / base:8.3f}   (goal <= 1.10)")
    print("\nthroughput            batching on                      batching off")
    print("  concurrency   img/s   p50 ms   p99 ms      img/s   p50 ms   p99 ms    on/off")
    for c in (1, 4, 16):
        on, off = results[True][c], results[False][c]
        print(f"  {c:11d} {on[0]:7.2f} {on[1] * 1e3:8.0f} {on[2] * 1e3:8.0f}    {off[0]:7.2f} "
              f"{off[1] * 1e3:8.0f} {off[2] * 1e3:8.0f}    {on[0] / off[0]:6.2f}x")
    ratio16 = results[True][16][0] / results[False][16][0]
    print(f"\nbatching speed-up at concurrency 16: {ratio16:.2f}x (goal >= 1.3x)")


if __name__ == "__main__":
    main()
