"""Server benchmarks: gRPC overhead and batching throughput, printed as ratios from one run.

Three models, each with its own image, all served by real ``segsvc serve`` processes:
``bench`` (U-Net base 4, depth 2, 512x512: so small that fixed costs dominate),
``unet16`` (U-Net base 16, depth 4, 11 classes, 360x480: a realistic CamVid model)
and ``fcn8s`` (the CamVid FCN-8s CPU recipe, 360x480 served at its contract's scale
0.5: the network sees 180x240, small enough that batches of 8 fit the CPU memory budget).

1. overhead: ``Segment`` latency over gRPC (PNG in, PNG label map out, concurrency 1)
   divided by the in-process path doing the same work: decode the PNG, ``Engine.prepare``
   (resize, normalise), ``Engine.run`` (forward pass + arg-max) on a thread of its own as in
   the server, PNG-encode the label map (``InProcess``). The engine is built by
   ``ModelManager`` exactly as the server builds it, so only the protocol, the event loop
   and the batcher differ. Goal: at most 1.10 on both models. The same work on one thread
   is printed too; it is not the reference because its forward pass, right after a decode
   on the same thread, was bimodal on a shared 2-CPU machine (31 ms or 34-45 ms per call,
   against a steady 31 ms on a thread of its own), which flatters the server. Latencies
   come in alternating blocks; the median and the first quartile are both printed.
2. throughput: images/s at concurrency 1, 4 and 16 with batching on and off,
   with p50/p99 latency. Clients send back to back and only the requests that
   finish within a steady window (``--window`` seconds, from ``WARM_S`` after
   every client's first answer, its ends aligned to answers: ``throughput``)
   count, over ``--rounds`` alternating rounds, or more for a slow model: enough
   for ``--min-requests`` in-process latencies per server. Counting whole bursts
   instead (2 images per client) took the ramp-up and the drain too, where fewer
   requests are in flight and batches are smaller: FCN-8s batches averaged 7.0
   instead of 8.0 and its on/off ratio read about 0.1-0.2 lower.
3. stability: ``--runs`` separate measurements of batching on/off at concurrency 16
   (each alternates on and off rounds). Goal: >= 1.3x in every run. On this
   shared host one on/off pair of rounds scatters by a standard deviation of
   0.13 (1 s windows) to 0.16 (2 s) for the bench model, from the host's drift
   in speed, so a run averages 6 pairs of 1 s (a standard error of about 0.05 if
   the pairs were independent), not 2 of 2 s (about 0.11). Slower drift still
   moves whole runs: 1.14, 1.23 and 1.37 in one invocation, 1.30-1.33 in another.
4. ceiling: what batching can give at most, in-process: ``Engine.run`` time per image
   for a batch of 1 against the batch the server forms (``--max-batch-size 8`` within
   the CPU memory budget of ``segsvc serve``, ``--max-batch-mb``), and against 8 images.
5. where the time went in the servers over the runs of 3, from their own statistics
   (``ModelStatistics``, as perf_analyzer reads them): per image, decoding and
   preparing, the queue, its batch's forward pass and label extraction, and the rest
   of its time in the core; the batch's forward and extraction divided by its size
   is what one image cost the model.

The servers run as separate processes (their own GIL, like in production); the
client threads run here. Like ``bench_batch.py``, OpenMP waits passively
(``OMP_WAIT_POLICY=PASSIVE``, inherited by the servers) unless set: on a shared,
oversubscribed machine spinning OpenMP threads make the figures measure the
scheduler (``OMP_WAIT_POLICY=default`` measures libgomp's own default). The load
average is printed with the figures: compare ratios within one run only.
``request_stages.py`` breaks the overhead down per hop. Not part of the test suite.

    python bench/bench_server.py [--models bench unet16 fcn8s] [--iters 40] [--window 1] [--min-requests 40]
        [--rounds 6] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
if os.environ.get("OMP_WAIT_POLICY", "").lower() == "default":
    del os.environ["OMP_WAIT_POLICY"]  # libgomp's own default (spin a while, then sleep), in the servers too
else:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import cv2  # noqa: E402
import grpc  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from segsvc.config import InferenceSpec, ModelSpec  # noqa: E402
from segsvc.inference.codec import decode_image, encode_png  # noqa: E402
from segsvc.inference.batcher import BatchingConfig  # noqa: E402
from segsvc.inference.engine import InferenceOptions  # noqa: E402
from segsvc.inference.manager import ManagerConfig, ModelManager  # noqa: E402
from segsvc.inference.repository import ModelRepository  # noqa: E402
from segsvc.cli_serve import CPU_BATCH_MB  # noqa: E402
from segsvc.models.artifact import save_artifact  # noqa: E402
from segsvc.models.registry import build_model  # noqa: E402
from segsvc.inference.allocator import configure_allocator  # noqa: E402
from segsvc.server.oip_pb import grpc_service_pb2 as oip  # noqa: E402
from segsvc.server.oip_pb import grpc_service_pb2_grpc as oip_grpc  # noqa: E402
from segsvc.v1 import segmentation_pb2 as pb  # noqa: E402
from segsvc.v1 import segmentation_pb2_grpc as pb_grpc  # noqa: E402


@dataclass(frozen=True)
class BenchModel:
    name: str
    spec: ModelSpec
    size: tuple[int, int]  # image (height, width)
    scale: float = 1.0  # the inference contract's input scale


MODELS = {
    "bench": BenchModel("bench", ModelSpec("unet", 5, params={"base_channels": 4, "depth": 2}), (512, 512)),
    "unet16": BenchModel("unet16", ModelSpec("unet", 11, params={"base_channels": 16, "depth": 4}), (360, 480)),
    "fcn8s": BenchModel("fcn8s", ModelSpec("fcn8s", 11, params={"base_channels": 16, "fc_channels": 512,
                                                                  "batch_norm": True}), (360, 480), scale=0.5),
}
CONCURRENCY = (1, 4, 16)
SERVED_BATCHING = BatchingConfig(max_batch_size=8, max_batch_bytes=CPU_BATCH_MB << 20)  # start_server's, on CPU
K = TypeVar("K")
WARM_S = 0.5  # throughput rounds count from this long after the first answer (and after every client has one)


def make_image(height: int, width: int) -> bytes:
    """A smooth random RGB image as PNG (photo-like: it compresses about as well as a photo)."""
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (max(1, height // 16), max(1, width // 16), 3), dtype=np.uint8)
    image = cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)
    ok, buf = cv2.imencode(".png", image)
    assert ok
    return buf.tobytes()


def save_model(model: BenchModel, repo: Path) -> None:
    """Random weights, BatchNorm statistics calibrated on noise so the label maps vary like real ones."""
    torch.manual_seed(0)
    net = build_model(model.spec)
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(2, model.spec.in_channels, 64, 64))
    net.eval()
    save_artifact(net, repo, model.name, spec=model.spec, inference=InferenceSpec(scale=model.scale))


def configure_like_server(threads: int) -> None:
    """The server's CPU settings (``configure_threads``, ``configure_allocator``) for the in-process path."""
    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    cv2.setNumThreads(1)
    configure_allocator()


def start_server(repo: Path, threads: int, batching: bool, launcher: list[str] | None = None,
                 env: dict[str, str] | None = None, flags: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    """``segsvc serve`` on a free port (``launcher`` replaces ``python -m segsvc``, ``env`` this process's
    environment, ``flags`` are added); returns it and its address."""
    cmd = [*(launcher or [sys.executable, "-m", "segsvc"]), "--model-repo", str(repo), "--host", "127.0.0.1",
           "--port", "0", "--metrics-port", "-1", "--torch-threads", str(threads), "--log-level", "WARNING",
           "--poll-interval-s", "0", "--max-batch-size", "8", "--max-delay-ms", "5", *flags]
    if launcher is None:
        cmd.insert(3, "serve")
    if not batching:
        cmd.append("--no-batching")
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**(os.environ if env is None else env), "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, text=True)
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


def request_for(image: bytes, model: str) -> pb.SegmentRequest:
    return pb.SegmentRequest(model=model, image=image, options=pb.SegmentOptions(encoding=pb.OUTPUT_ENCODING_PNG))


class InProcess:
    """The server's work for one request, without the server: decode, prepare, run, encode.

    ``split`` (the reference) lays the work out on threads as the server does, minus
    the event loop, the batcher and the protocol: decode, prepare and encode on one
    long-lived thread, the forward pass on another, each handing straight to the
    next. ``split=False`` runs all four on one thread (see the module docstring for
    why that is not the reference). The engine comes from a ``ModelManager`` (built,
    warmed and measured as the server builds it).
    """

    def __init__(self, repo: Path, name: str) -> None:
        async def build():  # type: ignore[no-untyped-def]
            manager = ModelManager(ModelRepository(repo), ManagerConfig(models=(name,)))
            await manager.start()
            try:
                return manager.resolve(name, None).engine
            finally:
                await manager.stop()

        self.engine = asyncio.run(build())
        self._worker = ThreadPoolExecutor(1)  # long-lived threads, like the server's I/O thread ...
        self._forward = ThreadPoolExecutor(1)  # ... and its batch thread

    def once(self, data: bytes, stages: bool = False, split: bool = True) -> dict[str, float]:
        return self._worker.submit(self._once, data, stages, split).result()

    def _once(self, data: bytes, stages: bool, split: bool) -> dict[str, float]:
        t0 = time.perf_counter()
        image = decode_image(data)
        t1 = time.perf_counter()
        prepared = self.engine.prepare(image, InferenceOptions())
        t2 = time.perf_counter()
        if split:
            [output] = self._forward.submit(self.engine.run, [prepared]).result()
        else:
            [output] = self.engine.run([prepared])
        t3 = time.perf_counter()
        encode_png(output.labels)
        t4 = time.perf_counter()
        return {"decode": t1 - t0, "prepare": t2 - t1, "run": t3 - t2, "encode": t4 - t3} if stages else {}

    def run_seconds_per_image(self, data: bytes, batch: int) -> float:
        """``Engine.run`` time per image for a batch of ``batch`` copies of the image (one sample)."""
        prepared = self.engine.prepare(decode_image(data), InferenceOptions())

        def run() -> float:
            t0 = time.perf_counter()
            self.engine.run([prepared] * batch)
            return (time.perf_counter() - t0) / batch
        return self._forward.submit(run).result()

    def close(self) -> None:
        self._worker.shutdown()
        self._forward.shutdown()


def latencies(local: InProcess, address: str, image: bytes, model: str, iters: int,
              block: int = 3) -> tuple[list[float], list[float], list[float]]:
    """Latencies of the in-process path (split, one thread) and of gRPC ``Segment``, in alternating blocks.

    Each block sends ``block + 1`` requests one after another and drops the first:
    every sample is a request that follows one of its own kind (as a server sees
    a sequential client), not one whose caches the other path just evicted.
    Alternating the blocks cancels the drift of a shared machine's load.
    """
    request = request_for(image, model)
    local_s: list[float] = []
    single_s: list[float] = []
    remote_s: list[float] = []

    def timed(fn, out: list[float]) -> None:  # type: ignore[no-untyped-def]
        for i in range(block + 1):
            t0 = time.perf_counter()
            fn()
            if i:
                out.append(time.perf_counter() - t0)

    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.SegmentationServiceStub(channel)
        for _ in range(3):  # warm-up both paths (allocator, kernels, connection)
            local.once(image)
            stub.Segment(request, timeout=120)
        while len(local_s) < iters:
            timed(lambda: local.once(image), local_s)
            timed(lambda: stub.Segment(request, timeout=120), remote_s)
            timed(lambda: local.once(image, split=False), single_s)
    return local_s, single_s, remote_s


def p25(values: list[float]) -> float:
    """The first quartile: on a shared machine, the samples least disturbed by other processes."""
    return statistics.quantiles(values, n=4)[0]


def throughput(address: str, request: pb.SegmentRequest, concurrency: int,
               window_s: float) -> tuple[int, float, list[float], list[int]]:
    """``concurrency`` clients send images back to back; what completes in a steady window counts.

    Returns (images, seconds, latencies, batch sizes) of the requests counted. The window begins
    ``WARM_S`` after every client has had one answer, so neither the ramp-up, when the first requests
    arrive together, nor the drain, when fewer than ``concurrency`` are in flight, is counted: both form
    smaller batches than the steady state does. No client waits for the others: clients held after their
    first answer until all had one (as this function once did) emptied the server, and the window then
    began on a second ramp-up, a gap of up to 0.18 s in 2 s that cost batching off more than on.

    The window's ends are answers: it runs from the first answer at or after its start to the first
    answer at or after ``window_s`` later, and counts the answers before its end. Batched answers come in
    bursts (8 at a time, about 3 a second for the bench model), and a fixed window caught a whole burst
    more or less by chance: one round's images/s moved by up to 1/6.
    """
    done: list[tuple[float, float, int]] = []  # (finished at, latency, batch size)
    lock = threading.Lock()
    start = threading.Barrier(concurrency + 1)
    steady = threading.Event()  # every client has had an answer since the start
    answered = [0]
    window_end: list[float | None] = [None]
    stop = threading.Event()

    def client() -> None:
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.SegmentationServiceStub(channel)
            grpc.channel_ready_future(channel).result(timeout=30)
            stub.Segment(request, timeout=600)  # connection and server warm before the clock starts
            start.wait()
            first = True
            while first or not stop.is_set():
                t0 = time.perf_counter()
                response = stub.Segment(request, timeout=600)
                t1 = time.perf_counter()
                with lock:
                    done.append((t1, t1 - t0, response.timings.batch_size))
                    if first:
                        answered[0] += 1
                        if answered[0] == concurrency:
                            steady.set()
                    if window_end[0] is not None and t1 >= window_end[0]:
                        stop.set()  # this answer ends the window
                first = False

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    start.wait()
    if not steady.wait(600):
        raise SystemExit(f"a client had no answer for 600 s at concurrency {concurrency}")
    begin = time.perf_counter() + WARM_S
    with lock:
        window_end[0] = begin + window_s
    if not stop.wait(window_s + 600):
        raise SystemExit(f"no answer for 600 s after the window at concurrency {concurrency}")
    for t in threads:
        t.join()
    times = sorted(t for t, _, _ in done)
    first_in = next(t for t in times if t >= begin)
    last_out = next(t for t in times if t >= begin + window_s)
    kept = [(lat, size) for t, lat, size in done if first_in <= t < last_out]
    if not kept:
        raise SystemExit(f"no request finished within the {window_s} s window at concurrency {concurrency}: "
                         "give a longer --window")
    return len(kept), last_out - first_in, [lat for lat, _ in kept], [size for _, size in kept]


def summarize(images: int, seconds: float, lat: list[float], sizes: list[int]) -> tuple[float, float, float, float]:
    """images/s, p50 and p99 latency in seconds, mean batch size an image ran in."""
    lat = sorted(lat)
    p99 = lat[min(len(lat) - 1, int(round(0.99 * (len(lat) - 1))))]
    return images / seconds, statistics.median(lat), p99, statistics.fmean(sizes)


def on_off(servers: dict[K, str], request: pb.SegmentRequest, concurrency: int, window_s: float,
           rounds: int) -> dict[K, tuple[float, float, float, float]]:
    """Rounds at one concurrency, every server up, one working at a time, the order rotating each round
    (for batching on and off: on, off, then off, on)."""
    labels = list(servers)
    totals = {label: [0, 0.0, [], []] for label in labels}
    for i in range(rounds):
        for label in labels[i % len(labels):] + labels[:i % len(labels)]:
            n, elapsed, lat, sizes = throughput(servers[label], request, concurrency, window_s)
            t = totals[label]
            t[0], t[1] = t[0] + n, t[1] + elapsed
            t[2].extend(lat)
            t[3].extend(sizes)
    return {label: summarize(*totals[label]) for label in labels}


def batching_ceiling(local: InProcess, image: bytes, samples: int) -> tuple[int, dict[int, float]]:
    """The batch the server forms, and median ``Engine.run`` seconds per image by batch size (alternately)."""
    pixels = local.engine.prepare(decode_image(image), InferenceOptions()).pixels  # padded, as the batcher counts
    formed = SERVED_BATCHING.for_model(local.engine.bytes_per_pixel).images_per_batch(pixels)
    sizes = sorted({1, formed, 8})
    times: dict[int, list[float]] = {n: [] for n in sizes}
    for n in sizes:
        local.run_seconds_per_image(image, n)  # warm-up (allocator, kernels for this batch shape)
    for _ in range(samples):
        for n in sizes:
            times[n].append(local.run_seconds_per_image(image, n))
    return formed, {n: statistics.median(v) for n, v in times.items()}


STAGES = ("success", "queue", "compute_input", "compute_infer", "compute_output")


def server_statistics(address: str, model: str) -> oip.ModelStatistics:
    """The served version's statistics (the Open Inference Protocol's ``ModelStatistics``)."""
    with grpc.insecure_channel(address) as channel:
        request = oip.ModelStatisticsRequest(name=model)
        return oip_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(request, timeout=60).model_stats[0]


def stage_means(before: oip.ModelStatistics, after: oip.ModelStatistics) -> dict[str, float]:
    """Mean seconds per image of each stage between two snapshots, and ``images`` per ``execution``."""
    images = after.inference_count - before.inference_count
    out = {stage: (getattr(after.inference_stats, stage).ns - getattr(before.inference_stats, stage).ns) / 1e9
           / images for stage in STAGES}
    out["batch"] = images / (after.execution_count - before.execution_count)
    return out


def load() -> str:
    return "load average %.2f %.2f %.2f" % os.getloadavg()


def bench_model(model: BenchModel, args: argparse.Namespace, root: Path) -> dict:
    image = make_image(*model.size)
    repo = root / model.name
    save_model(model, repo)
    request = request_for(image, model.name)
    local = InProcess(repo, model.name)
    servers = {b: start_server(repo, args.threads, b) for b in (True, False)}
    address = {b: s[1] for b, s in servers.items()}
    out: dict = {"load_start": load()}
    try:
        out["base"], out["single"], out["rpc"] = latencies(local, address[True], image, model.name, args.iters)
        out["base_off"], _, out["rpc_off"] = latencies(local, address[False], image, model.name,
                                                       max(6, args.iters // 2))
        out["ceiling"] = batching_ceiling(local, image, max(3, args.iters // 4))
        # Enough alternating rounds for --min-requests images per server at one image per in-process latency:
        # U-Net 16 (150 ms an image) finishes 11 in a 2 s window, and one batch more or less moved a run's
        # on/off ratio by up to 0.2. More rounds, not longer ones: a 6.4 s window let the host's drift in
        # speed between an on and an off round show instead (0.90-1.49x where the ceiling is 1.02x).
        per_round = args.window / statistics.median(out["base"])
        out["rounds"] = rounds = max(args.rounds, math.ceil(args.min_requests / per_round))
        out["table"] = {c: on_off(address, request, c, args.window, rounds) for c in CONCURRENCY}
        out["runs"] = []
        before = {b: server_statistics(a, model.name) for b, a in address.items()}
        for _ in range(args.runs):
            r = on_off(address, request, 16, args.window, rounds)
            out["runs"].append((r[True][0] / r[False][0], r[True][3], load()))
        out["stages"] = {b: stage_means(before[b], server_statistics(a, model.name)) for b, a in address.items()}
    finally:
        for proc, _ in servers.values():
            stop_server(proc)
        local.close()
    out["load_end"] = load()
    return out


def report(model: BenchModel, r: dict, args: argparse.Namespace) -> None:
    h, w = model.size
    print(f"\n== {model.name}: {model.spec.arch} {dict(model.spec.params)}, {model.spec.num_classes} classes, "
          f"{h}x{w} PNG ({r['load_start']} at start, {r['load_end']} at end)")
    print(f"overhead at concurrency 1 (median of {args.iters}, in alternating blocks of 3)")
    med = statistics.median
    print("                                               median      p25")
    for label, key in (("in-process, server's thread layout", "base"), ("gRPC Segment, batching on", "rpc"),
                       ("in-process, all on one thread", "single"),
                       ("in-process (alternating with off)", "base_off"), ("gRPC Segment, batching off", "rpc_off")):
        print(f"  {label:<42s} {med(r[key]) * 1e3:8.1f} {p25(r[key]) * 1e3:8.1f} ms")
    print(f"  ratio gRPC (batching on) / in-process      {med(r['rpc']) / med(r['base']):8.3f} "
          f"{p25(r['rpc']) / p25(r['base']):8.3f}   (goal <= 1.10)")
    print(f"  ratio gRPC (batching on) / one thread      {med(r['rpc']) / med(r['single']):8.3f} "
          f"{p25(r['rpc']) / p25(r['single']):8.3f}")
    print(f"  ratio gRPC (batching off) / in-process     {med(r['rpc_off']) / med(r['base_off']):8.3f} "
          f"{p25(r['rpc_off']) / p25(r['base_off']):8.3f}")
    print(f"throughput in steady windows of {args.window:.1f} s, {r['rounds']} alternating rounds per server")
    print("                      batching on                           batching off")
    print("  concurrency   img/s   p50 ms   p99 ms  batch      img/s   p50 ms   p99 ms    on/off")
    for c, res in r["table"].items():
        on, off = res[True], res[False]
        print(f"  {c:11d} {on[0]:7.2f} {on[1] * 1e3:8.0f} {on[2] * 1e3:8.0f} {on[3]:6.2f}    {off[0]:7.2f} "
              f"{off[1] * 1e3:8.0f} {off[2] * 1e3:8.0f}    {on[0] / off[0]:6.2f}x")
    print("  (batch: mean size of the batch an image ran in)")
    formed, ceiling = r["ceiling"]
    print(f"batching ceiling in-process: Engine.run per image by batch size (batch 1 / batch n = the most "
          f"batching can give; the server's CPU memory budget makes batches of {formed})")
    print("  " + ",  ".join(f"batch {n}: {t * 1e3:.1f} ms ({ceiling[1] / t:.2f}x)" for n, t in ceiling.items()))
    ratios = [x for x, _, _ in r["runs"]]
    for i, (x, size, ld) in enumerate(r["runs"], 1):
        print(f"  batching on/off at concurrency 16, run {i}: {x:.2f}x, mean batch {size:.2f}   ({ld})")
    print(f"  min {min(ratios):.2f}x, max {max(ratios):.2f}x over {len(ratios)} runs (goal >= 1.3x in every run)")
    print("server side over those runs, ms per image (ModelStatistics): in the core = decode and prepare + queue "
          "+ the batch's forward and label extraction + the rest (waiting for a thread or the event loop)")
    print("               in core    prepare      queue  batch fwd  batch out   the rest   batch   fwd+out / batch")
    for on, label in ((True, "batching on"), (False, "batching off")):
        m = {k: v * 1e3 if k != "batch" else v for k, v in r["stages"][on].items()}
        rest = m["success"] - m["compute_input"] - m["queue"] - m["compute_infer"] - m["compute_output"]
        print(f"  {label:<12s} {m['success']:8.1f} {m['compute_input']:10.1f} {m['queue']:10.1f} "
              f"{m['compute_infer']:10.1f} {m['compute_output']:10.1f} {rest:10.1f} {m['batch']:7.2f} "
              f"{(m['compute_infer'] + m['compute_output']) / m['batch']:12.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["bench", "unet16", "fcn8s"])
    parser.add_argument("--iters", type=int, default=40, help="latency samples for the overhead ratio")
    parser.add_argument("--min-requests", type=int, default=40,
                        help="more rounds for a slow model: this many in-process latencies per server")
    parser.add_argument("--window", type=float, default=1.0,
                        help="seconds of steady state counted per throughput round (after the first answers)")
    parser.add_argument("--rounds", type=int, default=6, help="alternating on/off rounds per measurement")
    parser.add_argument("--runs", type=int, default=3, help="separate on/off measurements at concurrency 16")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads")
    args = parser.parse_args()
    configure_like_server(args.threads)  # the in-process path gets the server's CPU settings
    print(f"{args.threads} torch threads, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY')}, {load()}")
    with tempfile.TemporaryDirectory() as tmp:
        results = {name: bench_model(MODELS[name], args, Path(tmp)) for name in args.models}
    for name, r in results.items():
        report(MODELS[name], r, args)
    print("\nsummary (ratios)")
    for name, r in results.items():
        ratios = [x for x, _, _ in r["runs"]]
        rpc = statistics.median(r["rpc"]) / statistics.median(r["base"])
        print(f"  {name:8s} gRPC/in-process {rpc:.3f} (goal <= 1.10)   batching on/off at 16: "
              + ", ".join(f"{x:.2f}x" for x in ratios) + " (goal >= 1.3x)")
    print(f"  {load()} at the end")


if __name__ == "__main__":
    main()
