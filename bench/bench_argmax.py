"""Per-pixel arg-max on CPU logits: ``Tensor.argmax(1)`` against ``class_argmax`` (``max(1).indices``), in one run.

Prints milliseconds per call for a few logits shapes and the ratio; the labels
are checked to be identical. Not part of the test suite.

    python bench/bench_argmax.py [--repeats 30]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from segsvc.inference.argmax import class_argmax  # noqa: E402

SHAPES = [(1, 5, 256, 256), (8, 5, 256, 256), (1, 12, 360, 480), (1, 2, 512, 512)]


def ms_per_call(fn, x: torch.Tensor, repeats: int) -> float:
    fn(x)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn(x)
    return (time.perf_counter() - t0) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    la = os.getloadavg()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, load average {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}")
    for shape in SHAPES:
        x = torch.randn(shape)
        assert torch.equal(class_argmax(x), x.argmax(1))
        old = ms_per_call(lambda t: t.argmax(1), x, args.repeats)
        new = ms_per_call(class_argmax, x, args.repeats)
        print(f"logits {str(shape):18s} argmax(1) {old:7.2f} ms   class_argmax {new:6.2f} ms   speed-up {old / new:5.1f}x")


if __name__ == "__main__":
    main()
