"""Served quality against ``segsvc eval``: the same split, through a real gRPC server and through eval.

Starts a server in-process on 127.0.0.1 (a free port, its own event-loop
thread) over the model repository, segments every selected image of the split
over gRPC with the real client (one request at a time, so each forward pass is
a batch of one, as eval runs it), counts a confusion matrix from the returned
label maps, then runs ``training.evaluate.evaluate_artifact`` on the same
images with the manifest's inference contract, and prints both metrics and
whether the two confusion matrices are equal. Not part of the test suite.

    python bench/served_vs_eval.py --model-repo runs/model_repository --model camvid-fcn8s --data camvid \\
        [--split val] [--limit N] [--device cpu] [--threads N]

Exit status 0 when the matrices are equal, 1 when they differ.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from segsvc.client import SegmentationClient  # noqa: E402
from segsvc.data.datasets import build_dataset  # noqa: E402
from segsvc.data.spec import load_dataset_spec  # noqa: E402
from segsvc.inference.engine import EngineConfig, resolve_device  # noqa: E402
from segsvc.inference.loader import ManagerConfig  # noqa: E402
from segsvc.inference.predictor import Predictor  # noqa: E402
from segsvc.inference.repository import parse_model_ref  # noqa: E402
from segsvc.models.artifact import load_artifact  # noqa: E402
from segsvc.server.app import SegmentationServer  # noqa: E402
from segsvc.server.config import ServerConfig  # noqa: E402
from training.data import select_indices  # noqa: E402
from training.evaluate import EvalOptions, evaluate_artifact  # noqa: E402
from training.metrics import ConfusionMatrix, SegmentationMetrics  # noqa: E402


def start_server(config: ServerConfig) -> tuple[SegmentationServer, asyncio.AbstractEventLoop, threading.Thread]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="server-loop", daemon=True)
    thread.start()

    async def create() -> SegmentationServer:
        server = SegmentationServer(config)
        await server.start()
        return server

    return asyncio.run_coroutine_threadsafe(create(), loop).result(300), loop, thread


def stop_server(server: SegmentationServer, loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    asyncio.run_coroutine_threadsafe(server.stop(0.0), loop).result(60)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def summary(metrics: SegmentationMetrics) -> str:
    return (f"mIoU {100 * metrics.miou:6.2f}  pixel acc {100 * metrics.pixel_accuracy:6.2f}  "
            f"mean class acc {100 * metrics.mean_class_accuracy:6.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repo", required=True, help="repository root: <root>/<model>/<version>/")
    parser.add_argument("--model", required=True, help="NAME or NAME:VERSION (default: the newest version)")
    parser.add_argument("--data", required=True, help="dataset spec: built-in name (camvid, ...) or YAML")
    parser.add_argument("--split", default="val")
    parser.add_argument("--limit", type=int, default=None, help="at most this many images")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (server and eval alike)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (server and eval alike)")
    args = parser.parse_args()

    name, version = parse_model_ref(args.model)
    model_dir = Path(args.model_repo) / name
    if version is None:
        version = max(int(p.name) for p in model_dir.iterdir() if p.name.isdigit())
    data = load_dataset_spec(args.data)
    dataset = build_dataset(data, args.split)
    indices = select_indices(len(dataset), None, args.limit)

    manager = ManagerConfig(engine=EngineConfig(device=args.device, warmup=False), models=(name,))
    config = replace(ServerConfig(model_repo=Path(args.model_repo), host="127.0.0.1", port=0, metrics_port=None,
                                  grace_s=0.0, torch_threads=args.threads or 0), manager=manager)
    server, loop, thread = start_server(config)
    served = ConfusionMatrix(data.num_classes, data.ignore_index)
    try:
        t0 = time.perf_counter()
        with SegmentationClient(f"127.0.0.1:{server.port}", timeout_s=600) as client:
            for i in indices:
                image, mask = dataset.read(i)
                labels = client.segment(image, model=name, version=version).mask
                served.update(torch.from_numpy(np.asarray(mask, np.int64)), torch.from_numpy(labels.astype(np.int64)))
        served_s = time.perf_counter() - t0
    finally:
        stop_server(server, loop, thread)

    # after the server: it set the process's torch threads, which eval then shares
    device = resolve_device(args.device)
    model, manifest = load_artifact(model_dir / str(version), device=device)
    result = evaluate_artifact(Predictor(model, manifest, device), data, EvalOptions(
        split=args.split, device=str(device), limit=args.limit, samples_in_report=0, progress=False))
    equal = np.array_equal(served.mat.numpy(), np.array(result.confusion))
    c = manifest.inference
    print(f"{name} v{version} on {data.name}/{args.split}, {len(indices)} images; manifest contract: scale {c.scale}, "
          f"stride {c.stride}, tiles {c.tile_size or 'off'}, flip TTA {'on' if c.flip_tta else 'off'}")
    print(f"served over gRPC : {summary(served.compute())}  ({served_s:.1f} s)")
    print(f"segsvc eval      : {summary(result.metrics)}  ({result.seconds:.1f} s)")
    print(f"confusion matrices equal: {equal}")
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
