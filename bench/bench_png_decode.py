"""PNG decoding: ``codec.decode_image`` (Pillow, which stops at the last row) against what it did before.

Run: .venv/bin/python bench/bench_png_decode.py [--repeats 50]

Before, every PNG was inflated once with its output thrown away, so that libpng
(OpenCV's decoder), which inflates a stream to its end, would never meet a zlib
bomb; then OpenCV decoded it. ``before`` below does exactly that (the pre-pass
as it was, ``cv2.imdecode``, BGR to RGB). ``now`` is ``decode_image``: the
container walk, the IDAT CRC check, Pillow. Inputs: ``bench_server.py``'s
512x512 photo-like image and CamVid photos from ``../shared/datasets`` when
present. Each round times both back to back, the order alternating; printed per
image: median milliseconds and their ratio. Both give the same array (checked).
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import zlib
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.bench_server import make_image  # noqa: E402
from segsvc.inference.codec import decode_image  # noqa: E402
from segsvc.inference.containers import inspect  # noqa: E402

CAMVID = ROOT.parent / "shared" / "datasets" / "camvid" / "val"


def before(data: bytes) -> np.ndarray:
    """The old path for an 8-bit RGB PNG: walk, inflate everything (discarded), then OpenCV."""
    _, pixels = inspect(data)
    inflater, view = zlib.decompressobj(), memoryview(data)
    for start, length in pixels.idat:  # the pre-pass's work: every byte inflated once, the output dropped
        for piece in range(start, start + length, 1 << 16):
            pending = view[piece: min(piece + (1 << 16), start + length)]
            while pending and not inflater.eof:
                inflater.decompress(pending, 1 << 20)
                pending = inflater.unconsumed_tail
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def inputs() -> dict[str, bytes]:
    found = {"bench_server 512x512": make_image(512, 512)}
    for path in sorted(CAMVID.glob("*.png"))[:2]:
        found[f"CamVid {path.name}"] = path.read_bytes()
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    cv2.setNumThreads(1)
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; one thread, as the server's I/O threads")
    print(f"  {'image':32} {'bytes':>8} {'before ms':>10} {'now ms':>8} {'before/now':>11}")
    for name, data in inputs().items():
        assert np.array_equal(before(data), decode_image(data)), name
        times: dict[str, list[float]] = {"before": [], "now": []}
        for i in range(args.repeats):
            order = [("before", before), ("now", decode_image)]
            for label, fn in order if i % 2 else order[::-1]:
                t0 = time.perf_counter()
                fn(data)
                times[label].append(time.perf_counter() - t0)
        b, n = (statistics.median(times[k]) * 1e3 for k in ("before", "now"))
        print(f"  {name:32} {len(data):>8} {b:>10.2f} {n:>8.2f} {b / n:>10.2f}x")


if __name__ == "__main__":
    main()
