"""How long Python's full garbage collection pauses the server, before and after ``freeze_startup_heap``.

Run: .venv/bin/python bench/bench_gc.py [--model bench] [--repeats 15] [--requests 20]

A ``SegmentationServer`` starts in this process as ``segsvc serve`` starts it
(same imports, the model loaded and warmed up) and answers ``--requests`` gRPC
``Segment`` calls; then ``gc.collect()``, which is what an automatic full
collection does, is timed ``--repeats`` times. Then ``freeze_startup_heap`` runs,
as ``serve`` runs it after start-up, the server answers as many calls again, and
the same is timed again. Printed: the objects the collector walks, and the
median and worst pause on each side. A full pass holds the GIL, so
for its length no request is parsed, decoded, batched or answered. Not part of the
test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_server import MODELS, load, make_image, save_model  # noqa: E402
import segsvc.cli  # noqa: E402,F401  (everything `segsvc serve` imports)
from segsvc.client import SegmentationClient  # noqa: E402
from segsvc.server.app import SegmentationServer, freeze_startup_heap  # noqa: E402
from segsvc.server.config import ServerConfig  # noqa: E402


def pauses(repeats: int) -> list[float]:
    """Seconds of ``repeats`` full collections."""
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        gc.collect()
        out.append(time.perf_counter() - start)
    return out


def send(address: str, image: bytes, model: str, requests: int) -> None:
    with SegmentationClient(address) as client:
        for _ in range(requests):
            client.segment(image, model=model)


async def measure(repo: Path, model: str, image: bytes, args: argparse.Namespace) -> None:
    server = SegmentationServer(ServerConfig(model_repo=str(repo), host="127.0.0.1", port=0, metrics_port=None))
    await server.start()
    address = f"127.0.0.1:{server.port}"
    try:
        await asyncio.to_thread(send, address, image, model, args.requests)
        tracked = len(gc.get_objects())
        before = pauses(args.repeats)
        frozen = freeze_startup_heap()
        await asyncio.to_thread(send, address, image, model, args.requests)
        left = len(gc.get_objects())
        after = pauses(args.repeats)
    finally:
        await server.stop(grace_s=0)
        gc.unfreeze()
    med_b, med_a = statistics.median(before), statistics.median(after)
    print(f"objects the collector walks: {tracked} before, {left} after ({frozen} frozen)")
    print(f"full collection, median of {args.repeats}: {med_b * 1e3:.1f} ms before, {med_a * 1e3:.3f} ms after "
          f"(worst {max(before) * 1e3:.1f} and {max(after) * 1e3:.3f} ms)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="bench")
    parser.add_argument("--repeats", type=int, default=15, help="full collections timed on each side")
    parser.add_argument("--requests", type=int, default=20, help="Segment calls answered before each side")
    args = parser.parse_args()
    print(f"model {args.model}, Python {sys.version.split()[0]}, {load()}")
    with tempfile.TemporaryDirectory() as tmp:
        model = MODELS[args.model]
        save_model(model, Path(tmp))
        asyncio.run(measure(Path(tmp), model.name, make_image(*model.size), args))
    print(load())


if __name__ == "__main__":
    main()
