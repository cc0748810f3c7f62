"""Hardening figures, measured in one run (not part of the test suite).

1. Memory per megapixel per model and backend (torch, onnxruntime on the version's
   ONNX export): the estimate the server admits requests by (``Engine.measure_memory``,
   at load) against the peak RSS growth of one forward pass at 1024x1024 (VmRSS sampled
   during the pass) in a fresh process. The ratio estimate / measured should be >= 1
   (the estimate errs on the safe side).
2. Time to refuse hostile requests over gRPC (the probe's findings): the worst
   and median of ``--repeats`` sends each, against a real ``segsvc serve``.

``--load N`` runs N busy processes meanwhile, for the "under load" figures.

    .venv/bin/python bench/bench_hardening.py [--repeats 20] [--load 0]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

MODELS = {  # name -> (arch, params)
    "fcn8s": ("fcn8s", {}),
    "unet": ("unet", {}),
    "segnet-basic": ("segnet", {"variant": "basic"}),
    "segnet-vgg16": ("segnet", {"variant": "vgg16"}),
    "smp-unet-r34": ("smp/Unet", {"encoder_name": "resnet34"}),
}
MEASURE = r"""
import json, sys, threading, time, torch
from pathlib import Path
from segsvc.inference.backends import open_version_dir
from segsvc.inference.engine import Engine, EngineConfig
from segsvc.inference.predictor import Predictor
def rss():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
torch.set_num_threads(2)
config = EngineConfig(device="cpu", backend=sys.argv[2], warmup=False)
engine = Engine(Predictor(*open_version_dir(Path(sys.argv[1]), torch.device("cpu"), config)), config)  # as served
estimate = engine.measure_memory()
engine.forward(torch.zeros(1, 3, 64, 64))  # kernels warm at a small size
before, peak, done = rss(), [0], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], rss()); time.sleep(0.0005)
t = threading.Thread(target=sample); t.start()
engine.forward(torch.zeros(1, 3, 1024, 1024))
done.set(); t.join()
print(json.dumps({"estimate": estimate, "measured": (peak[0] - before) / (1024 * 1024)}))
"""


def memory_per_megapixel(work: Path) -> None:
    import torch

    from segsvc.config import ModelSpec
    from segsvc.export.onnx import export_onnx
    from segsvc.models.artifact import save_artifact
    from segsvc.models.registry import build_model

    print("model            backend       estimate MiB/MP   measured MiB/MP   estimate/measured")
    for name, (arch, params) in MODELS.items():
        spec = ModelSpec(arch, 12, params=params)
        torch.manual_seed(0)
        version_dir = save_artifact(build_model(spec).eval(), work / "repo", name, spec=spec,
                                    class_names=[f"c{i}" for i in range(12)])
        export_onnx(version_dir, checks=1)
        for backend in ("torch", "onnxruntime"):
            out = subprocess.run([sys.executable, "-c", MEASURE, str(version_dir), backend], capture_output=True,
                                 text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            est, meas = r["estimate"] * 1e6 / (1 << 20), r["measured"] * 1e6 / (1 << 20)
            ratio = est / meas if meas > 0 else float("inf")
            print(f"{name:16} {backend:12} {est:12.0f}      {meas:12.0f}        {ratio:6.2f}")


def _hostile(image_png: bytes) -> dict[str, bytes]:
    from segsvc.v1 import segmentation_pb2 as pb

    at = image_png.index(b"IDAT") - 4
    idat_bomb = image_png[:at] + struct.pack(">I", 0xFFFFFFFF) + image_png[at + 4:]
    huge = image_png[:16] + struct.pack(">II", 100_000, 100_000) + image_png[24:]
    return {
        "PNG IDAT length 0xFFFFFFFF (261 B class)": pb.SegmentRequest(model="m", image=idat_bomb).SerializeToString(),
        "PNG header 100000x100000": pb.SegmentRequest(model="m", image=huge).SerializeToString(),
        "tile 16, overlap 0.9999": pb.SegmentRequest(model="m", image=image_png, options=pb.SegmentOptions(
            tiling=pb.TilingOptions(tile_size=16, overlap=0.9999))).SerializeToString(),
        "raw 1x262144 (padding counted)": pb.SegmentRequest(model="m", raw=pb.RawImage(
            data=b"\0" * 262144 * 3, shape=[1, 262144, 3])).SerializeToString(),
        "malformed protobuf bytes": b"\x0a\xff\xff\xff\xff\x0f",
        "20 KiB non-ASCII request_id": pb.SegmentRequest(model="m", request_id="\u00e9" * 10000,
                                                         image=b"x").SerializeToString(),
    }


def refusal_times(work: Path, repeats: int) -> None:
    import grpc

    from tests.server.conftest import encode, make_image, publish

    publish(work / "serve", "m", seed=1)
    proc = subprocess.Popen(
        [sys.executable, "-m", "segsvc", "serve", "--model-repo", str(work / "serve"), "--host", "127.0.0.1",
         "--port", "0", "--metrics-port", "-1", "--max-inflight-mb", "8", "--log-level", "ERROR"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True,
    )
    try:
        address = proc.stdout.readline().split("serving on ")[1].split(",")[0].strip()
        with grpc.insecure_channel(address) as channel:
            call = channel.unary_unary("/segsvc.v1.SegmentationService/Segment", request_serializer=None,
                                       response_deserializer=None)
            grpc.channel_ready_future(channel).result(timeout=60)
            print("\nhostile request                            code              worst ms   median ms")
            worst_all = 0.0
            for name, payload in _hostile(encode(make_image(96, 96))).items():
                times, code = [], None
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    try:
                        call(payload, timeout=60)
                        code = "OK"
                    except grpc.RpcError as exc:
                        code = exc.code().name
                    times.append((time.perf_counter() - t0) * 1e3)
                worst_all = max(worst_all, max(times))
                print(f"{name:42} {code:17} {max(times):8.1f}   {statistics.median(times):8.1f}")
            print(f"worst-case time to refuse a hostile request: {worst_all:.1f} ms")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def _spin(stop_at: float) -> None:
    while time.time() < stop_at:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--load", type=int, default=0, help="busy processes running meanwhile")
    args = parser.parse_args()
    spinners = [multiprocessing.Process(target=_spin, args=(time.time() + 3600,), daemon=True)
                for _ in range(args.load)]
    for p in spinners:
        p.start()
    la = os.getloadavg()
    print(f"CPUs {os.cpu_count()}, {args.load} busy processes, load average before {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            memory_per_megapixel(Path(tmp))
            refusal_times(Path(tmp), args.repeats)
    finally:
        for p in spinners:
            p.terminate()
    la = os.getloadavg()
    print(f"load average after: {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}")


if __name__ == "__main__":
    main()
