"""PNG encoding: ``codec.PNG_ENCODING`` (every row Up-filtered) against libpng's adaptive filters, same zlib level.

Run: .venv/bin/python bench/bench_png.py [--repeats 30]

Encodes what segsvc writes as PNG (a label map, uint8 and uint16, its colour map,
an overlay on the photo, a confidence map, the photo itself) both ways, alternating,
on one thread as the server's I/O threads do. The photo and label map are a CamVid
val pair from ``../shared/datasets`` when it is there, synthetic ones otherwise.
Printed per kind: median milliseconds and bytes of each, and their ratios. Both
decode to the same array (checked). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from segsvc.inference.codec import PNG_ENCODING, decode_image  # noqa: E402
from segsvc.palette import colorize, overlay  # noqa: E402

ADAPTIVE = [cv2.IMWRITE_PNG_COMPRESSION, 1]  # what encode_png used before: libpng picks a filter per row
CAMVID = ROOT.parent / "shared" / "datasets" / "camvid"


def photo_and_labels() -> tuple[np.ndarray, np.ndarray, str]:
    images = sorted((CAMVID / "val").glob("*.png"))
    if images:
        labels = cv2.imread(str(CAMVID / "valannot" / images[0].name), cv2.IMREAD_UNCHANGED)
        return decode_image(images[0].read_bytes()), np.where(labels == 11, 0, labels).astype(np.uint8), images[0].name
    rng = np.random.default_rng(0)
    photo = cv2.resize(rng.integers(0, 256, (23, 30, 3), dtype=np.uint8), (480, 360), interpolation=cv2.INTER_LINEAR)
    labels = cv2.resize(rng.integers(0, 11, (24, 32)).astype(np.uint8), (480, 360), interpolation=cv2.INTER_NEAREST)
    return photo, labels, "synthetic (no CamVid in ../shared/datasets)"


def seconds(array: np.ndarray, params: list[int]) -> float:
    start = time.perf_counter()
    cv2.imencode(".png", array, params)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    cv2.setNumThreads(1)
    photo, labels, source = photo_and_labels()
    palette = [tuple(int(v) for v in np.random.default_rng(c).integers(0, 256, 3)) for c in range(12)]
    smooth = np.random.default_rng(1).integers(100, 256, (23, 30)).astype(np.uint8)
    kinds = {  # as encode_png hands them to OpenCV (BGR)
        "label map, uint8": labels,
        "label map, uint16": labels.astype(np.uint16),
        "colour map": cv2.cvtColor(colorize(labels, palette), cv2.COLOR_RGB2BGR),
        "overlay": cv2.cvtColor(overlay(photo, labels, palette, 0.5), cv2.COLOR_RGB2BGR),
        "confidence": cv2.resize(smooth, labels.shape[::-1], interpolation=cv2.INTER_LINEAR),
        "photo": cv2.cvtColor(photo, cv2.COLOR_RGB2BGR),
    }
    print(f"{source}, {labels.shape[1]}x{labels.shape[0]}, median of {args.repeats}, 1 thread, "
          "load average %.2f %.2f %.2f" % os.getloadavg())
    print(f"  {'kind':18s} {'adaptive ms':>11s} {'Up ms':>7s} {'faster':>7s} {'adaptive B':>11s} {'Up B':>8s} {'size':>6s}")
    for kind, array in kinds.items():
        sizes = {}
        for name, params in (("adaptive", ADAPTIVE), ("up", PNG_ENCODING)):
            ok, buf = cv2.imencode(".png", array, params)
            assert ok and np.array_equal(cv2.imdecode(buf, cv2.IMREAD_UNCHANGED), array)
            sizes[name] = len(buf)
        times: dict[str, list[float]] = {"adaptive": [], "up": []}
        for _ in range(args.repeats):
            times["adaptive"].append(seconds(array, ADAPTIVE))
            times["up"].append(seconds(array, PNG_ENCODING))
        a, u = statistics.median(times["adaptive"]), statistics.median(times["up"])
        print(f"  {kind:18s} {a * 1e3:11.2f} {u * 1e3:7.2f} {a / u:6.2f}x {sizes['adaptive']:11d} {sizes['up']:8d} "
              f"{sizes['up'] / sizes['adaptive']:5.2f}x")
    print("load average %.2f %.2f %.2f" % os.getloadavg())


if __name__ == "__main__":
    main()
