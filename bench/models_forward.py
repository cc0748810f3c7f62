"""Parameter count and CPU forward time per 360x480 image (CamVid size) for each reference model.

Run: .venv/bin/python bench/models_forward.py [--repeats 3] [--threads N]
Times are the median of --repeats forward passes after one warm-up, batch 1,
through the predictor (padding to the stride included), eval mode, no grad.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from segsvc.inference.predictor import pad_to_multiple
from segsvc.models import build_model
from segsvc.models.zoo import paper_specs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--height", type=int, default=360)
    parser.add_argument("--width", type=int, default=480)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(1, 3, args.height, args.width)
    print(f"CPU forward, batch 1, {args.height}x{args.width}, {args.threads} threads, median of {args.repeats}")
    print(f"{'model':20} {'params (M)':>11} {'forward (s)':>12}")
    for label, spec in paper_specs().items():
        model = build_model(spec).eval()
        params = sum(p.numel() for p in model.parameters()) / 1e6
        padded, (h, w) = pad_to_multiple(x, model.output_stride, getattr(model, "min_input_size", 1))
        times = []
        with torch.inference_mode():
            model(padded)
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                out = model(padded)[:, :, :h, :w]
                times.append(time.perf_counter() - t0)
        assert out.shape[-2:] == (h, w)
        print(f"{label:20} {params:11.2f} {statistics.median(times):12.3f}")


if __name__ == "__main__":
    main()
