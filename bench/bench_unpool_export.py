"""ONNX Runtime on SegNet exported with segsvc's pooling translations against torch.onnx's own.

Run: .venv/bin/python bench/bench_unpool_export.py [--height 180 --width 240] [--rounds 5] [--threads 2]

SegNet max-pools with indices and max-unpools by them. ``segsvc.export.translations``
writes that pair as ONNX ``MaxPool`` (plane indices by one ``Mod``) and ``MaxUnpool``;
the exporter's defaults (onnxscript's torchlib) run a second, full-size ``MaxPool``
for the plane offsets and decompose the unpooling into a ``ScatterND``. Both graphs
come from the same untrained network (speed does not depend on the weights) and
run in the server's ``onnxruntime`` backend (its session options); each
round times both back to back, alternating which goes first. Printed: images/s,
the median per-round ratio, and the largest |logit| difference between the two.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_backends import images_per_s  # noqa: E402
from segsvc.config import ModelSpec  # noqa: E402
from segsvc.export.onnx import to_onnx  # noqa: E402
from segsvc.export.translations import TRANSLATIONS  # noqa: E402
from segsvc.inference.backends.ort import OnnxRuntimeBackend  # noqa: E402
from segsvc.inference.contract import Geometry  # noqa: E402
from segsvc.models.registry import build_model  # noqa: E402

MODELS = {
    "SegNet-Basic": ModelSpec("segnet", 11, 3, {"variant": "basic", "base_channels": 32}),  # camvid-segnet's CPU width
    "SegNet-VGG16/4": ModelSpec("segnet", 11, 3, {"variant": "vgg16", "base_channels": 16}),
}


def backend(model: torch.nn.Module, geometry: Geometry, threads: int) -> OnnxRuntimeBackend:
    """The server's ``onnxruntime`` backend (its session options) on ``model`` exported as ``segsvc export`` does."""
    proto = to_onnx(model, 3, geometry.stride, geometry.min_size)
    return OnnxRuntimeBackend(proto.SerializeToString(), geometry, torch.device("cpu"), 3, threads=threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0, help="least time per measurement")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--height", type=int, default=180)
    parser.add_argument("--width", type=int, default=240)
    args = parser.parse_args()
    print(f"CPU, {args.threads} threads, {args.height}x{args.width}, median of {args.rounds} rounds "
          f"(load average at start {os.getloadavg()[0]:.2f})")
    print(f"{'model':15} {'batch':>5} {'torchlib img/s':>15} {'segsvc img/s':>13} {'ratio':>7} {'max |dlogit|':>13}")
    for label, spec in MODELS.items():
        torch.manual_seed(0)
        model = build_model(spec).eval()
        geometry = Geometry(model.output_stride, getattr(model, "min_input_size", 1))
        sessions = {"segsvc": backend(model, geometry, args.threads)}
        saved = dict(TRANSLATIONS)
        TRANSLATIONS.clear()  # the exporter's own translations
        try:
            sessions["torchlib"] = backend(model, geometry, args.threads)
        finally:
            TRANSLATIONS.update(saved)
        for n in args.batches:
            x = torch.randn(n, 3, args.height, args.width, generator=torch.Generator().manual_seed(n))
            diff = float((sessions["segsvc"].run(x) - sessions["torchlib"].run(x)).abs().max())
            rounds = []
            for r in range(args.rounds):
                order = ["segsvc", "torchlib"] if r % 2 == 0 else ["torchlib", "segsvc"]
                rounds.append({k: images_per_s(sessions[k], x, args.seconds) for k in order})
            med = {k: statistics.median(t[k] for t in rounds) for k in sessions}
            ratio = statistics.median(t["segsvc"] / t["torchlib"] for t in rounds)
            print(f"{label:15} {n:>5} {med['torchlib']:>15.1f} {med['segsvc']:>13.1f} {ratio:>6.2f}x {diff:>13.2e}",
                  flush=True)
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
