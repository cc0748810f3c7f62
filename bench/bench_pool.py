"""2x2 max pooling in CPU inference: ATen's kernel against ``MaxPool2x2``'s strided maxima, side by side.

1. The operation alone on feature maps the models pool (U-Net and VGG widths at
   CamVid and bench sizes), batch 1 and 8.
2. Whole forward passes (eval, no grad), batch 1 and 8, of the bench server's
   models and FCN-8s: the same network with its ``MaxPool2x2`` layers run by
   ATen (``nn.MaxPool2d.forward``, as before) and by the strided path. The logits
   are checked to be identical.

Times are medians of alternating A/B samples in one process (the host's drift
in speed hits both sides alike); the ratio is ATen / strided (> 1: faster now).
The load average is printed with them. Not part of the test suite.

    python bench/bench_pool.py [--threads N] [--samples 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: as bench_server.py, on a shared machine

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segsvc.config import ModelSpec  # noqa: E402
from segsvc.inference.allocator import configure_allocator  # noqa: E402
from segsvc.models import build_model  # noqa: E402
from segsvc.models.pooling import MaxPool2x2, max_pool2x2  # noqa: E402

MAPS = [(4, 512, 512), (8, 256, 256), (16, 368, 480), (64, 192, 256), (64, 180, 240), (256, 46, 60)]
MODELS = {
    "bench U-Net (base 4, depth 2), 512x512": (ModelSpec("unet", 5, params={"base_channels": 4, "depth": 2}),
                                                (512, 512)),
    "U-Net base 16, depth 4, 368x480": (ModelSpec("unet", 11, params={"base_channels": 16, "depth": 4}), (368, 480)),
    "FCN-8s CPU recipe (base 16), 192x256": (ModelSpec("fcn8s", 11, params={"base_channels": 16,
                                                                          "fc_channels": 512}), (192, 256)),
    "FCN-8s VGG16 widths, 384x480": (ModelSpec("fcn8s", 11), (384, 480)),
}


def ab(first: Callable[[], object], second: Callable[[], object], samples: int) -> tuple[float, float]:
    """Median seconds of each callable, sampled alternately after one warm-up call each."""
    first(), second()
    a: list[float] = []
    b: list[float] = []
    for _ in range(samples):
        for fn, out in ((first, a), (second, b)):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return statistics.median(a), statistics.median(b)


def aten_pools(model: nn.Module, aten: bool) -> None:
    """Run the model's ``MaxPool2x2`` layers by ATen's kernel (``aten``) or by their own forward."""
    for module in model.modules():
        if isinstance(module, MaxPool2x2):
            if aten:
                module.forward = nn.MaxPool2d.forward.__get__(module)
            else:
                module.__dict__.pop("forward", None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--samples", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    configure_allocator()  # as segsvc serve does
    print(f"{args.threads} torch threads, torch {torch.__version__}, OMP_WAIT_POLICY {os.environ['OMP_WAIT_POLICY']}, "
          "load average %.2f %.2f %.2f" % os.getloadavg())

    print("\n1. the operation: ms per call, ATen F.max_pool2d(x, 2) / strided maxima")
    for c, h, w in MAPS:
        for n in (1, 8):
            x = torch.randn(n, c, h, w)
            assert torch.equal(max_pool2x2(x), F.max_pool2d(x, 2))
            aten, strided = ab(lambda: F.max_pool2d(x, 2), lambda: max_pool2x2(x), args.samples)
            print(f"  [{n}, {c}, {h}, {w}]".ljust(24) + f"{aten * 1e3:8.2f} {strided * 1e3:8.2f}   "
                  f"{aten / strided:5.2f}x")

    print("\n2. forward passes: ms per image, pools by ATen / by MaxPool2x2 (identical logits)")
    for label, (spec, (h, w)) in MODELS.items():
        model = build_model(spec).eval()
        for n in (1, 8):
            x = torch.randn(n, spec.in_channels, h, w)

            def run(aten: bool) -> torch.Tensor:
                aten_pools(model, aten)
                with torch.inference_mode():
                    return model(x)

            assert torch.equal(run(True), run(False))
            aten, strided = ab(lambda: run(True), lambda: run(False), max(3, args.samples // (2 if n > 1 else 1)))
            print(f"  {label}, batch {n}".ljust(52) + f"{aten / n * 1e3:8.1f} {strided / n * 1e3:8.1f}   "
                  f"{aten / strided:5.2f}x")
    print("load average %.2f %.2f %.2f at the end" % os.getloadavg())


if __name__ == "__main__":
    main()
