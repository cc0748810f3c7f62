"""ONNX Runtime against eager PyTorch on CPU; eager channels-last against contiguous, BatchNorm folded against kept.

Run: .venv/bin/python bench/bench_backends.py [--height 180 --width 240] [--rounds 5] [--threads N]
         [--models FCN-8s U-Net SegNet-Basic U-Net-demo U-Net-bench smp-Unet-R34] [--allocator tuned|glibc]

For each CamVid recipe's network (FCN-8s, U-Net, SegNet-Basic at the recipes'
CPU widths, untrained: speed does not depend on the weights), one artifact is
saved and exported with ``segsvc export`` (``segsvc.export.onnx``, which
validates it against eager), then the backends run the same normalised batches
through the one forward path the server uses (padding to the manifest's stride,
the network, the crop). Eager runs three ways: as ``segsvc serve`` runs a
convolutional network on CPU (channels-last, BatchNorm folded into the
convolutions), with the BatchNorm layers kept
(``EngineConfig(fold_batchnorm=False)``), and as it ran before either change:
contiguous, BatchNorm kept (``channels_last=False`` too). Each round times the
four back to back, rotating which goes first; a figure is the median of the
per-round ratios: ORT over the served eager (goal: >= 1.5), channels-last over
contiguous (both with BatchNorm kept), and folded over kept (both
channels-last). The default size is what the CamVid recipes' network sees
(360x480 images at scale 0.5). ``U-Net-demo`` is the small U-Net that
``make demo`` trains (synthetic-quick: depth 3, base 16, 5 classes; its images are
96x96), where the issue measured ONNX Runtime at about 2x eager; ``U-Net-bench``
is ``bench_server.py``'s bench model (base 4, depth 2; its images are 512x512),
``smp-Unet-R34`` smp's U-Net on a ResNet-34. ``--allocator glibc`` keeps the C
allocator's defaults, as the issue's measurement did, instead of
``configure_allocator``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from segsvc.config import InferenceSpec, ModelSpec
from segsvc.export.onnx import export_onnx
from segsvc.inference.backends import Backend, EngineConfig, open_version_dir
from segsvc.models.artifact import save_artifact
from segsvc.models.registry import build_model
from segsvc.inference.allocator import configure_allocator

# The CamVid recipes' CPU models (training/recipes/camvid-*.yaml).
MODELS = {
    "FCN-8s": ModelSpec("fcn8s", 11, 3, {"base_channels": 16, "fc_channels": 512, "batch_norm": True}),
    "U-Net": ModelSpec("unet", 11, 3, {"depth": 4, "base_channels": 16}),
    "SegNet-Basic": ModelSpec("segnet", 11, 3, {"variant": "basic", "base_channels": 32}),
    # training/recipes/synthetic-quick.yaml, the model make demo trains and serves
    "U-Net-demo": ModelSpec("unet", 5, 3, {"depth": 3, "base_channels": 16}),
    # bench/bench_server.py's "bench" model
    "U-Net-bench": ModelSpec("unet", 5, 3, {"depth": 2, "base_channels": 4}),
    # an smp model with torchvision's ResNet blocks (folded by name, NAMED_PAIRS)
    "smp-Unet-R34": ModelSpec("smp/Unet", 11, 3, {"encoder_name": "resnet34"}),
}
CAMVID = ("FCN-8s", "U-Net", "SegNet-Basic")


def images_per_s(backend: Backend, batch: torch.Tensor, seconds: float) -> float:
    """Images per second of ``backend.forward`` on ``batch``, over at least ``seconds`` (one warm pass first)."""
    backend.forward(batch)
    n, t0 = 0, time.perf_counter()
    while True:
        backend.forward(batch)
        n += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds and n >= 2:
            return n * batch.shape[0] / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=180)
    parser.add_argument("--width", type=int, default=240)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0, help="least time per measurement")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(CAMVID))
    parser.add_argument("--allocator", choices=("tuned", "glibc"), default="tuned",
                        help="tuned: configure_allocator, as segsvc serve runs; glibc: the C allocator's defaults")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # As segsvc serve does: without it glibc unmaps and re-faults eager PyTorch's large activation
    # buffers on every pass, which made eager up to ~19x slower here than it runs in the server.
    tuned = args.allocator == "tuned" and configure_allocator()
    load = os.getloadavg()[0]
    print(f"CPU, {args.threads} threads, {args.height}x{args.width} network input, median of {args.rounds} rounds "
          f"(allocator tuned: {tuned}; load average at start {load:.2f})")
    print(f"{'model':14} {'batch':>5} {'contiguous':>11} {'BN kept':>8} {'eager img/s':>12} {'ORT img/s':>10} "
          f"{'ORT/eager':>10} {'ORT/contiguous':>15} {'channels-last/contiguous':>25} {'folded/kept':>12}")
    rows, layouts, folds = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for label in args.models:
            spec = MODELS[label]
            torch.manual_seed(0)
            model = build_model(spec).eval()
            version = save_artifact(model, tmp, spec.arch.replace("/", "-"), spec=spec,
                                    inference=InferenceSpec(stride=model.output_stride,
                                                            min_input_size=getattr(model, "min_input_size", 1)))
            export_onnx(version)
            cpu = torch.device("cpu")
            backends = {
                "contiguous": open_version_dir(Path(version), cpu, EngineConfig(device="cpu", channels_last=False,
                                                                                fold_batchnorm=False))[0],
                "kept": open_version_dir(Path(version), cpu, EngineConfig(device="cpu", fold_batchnorm=False))[0],
                "eager": open_version_dir(Path(version), cpu, EngineConfig(device="cpu"))[0],
                "ort": open_version_dir(Path(version), cpu, EngineConfig(device="cpu", backend="onnxruntime",
                                                                         threads=args.threads))[0],
            }
            assert backends["eager"].channels_last and not backends["contiguous"].channels_last
            assert backends["kept"].channels_last and backends["contiguous"].folded == backends["kept"].folded == 0
            for n in args.batches:
                x = torch.randn(n, 3, args.height, args.width)
                rounds = []
                for r in range(args.rounds):
                    first = r % len(backends)
                    order = list(backends)[first:] + list(backends)[:first]
                    rounds.append({k: images_per_s(backends[k], x, args.seconds) for k in order})
                med = {k: statistics.median(t[k] for t in rounds) for k in backends}
                ratio = statistics.median(t["ort"] / t["eager"] for t in rounds)
                layout = statistics.median(t["kept"] / t["contiguous"] for t in rounds)
                versus_contiguous = statistics.median(t["ort"] / t["contiguous"] for t in rounds)
                fold = statistics.median(t["eager"] / t["kept"] for t in rounds)
                rows.append(ratio)
                layouts.append(layout)
                folds.append(fold)
                print(f"{label:14} {n:>5} {med['contiguous']:>11.1f} {med['kept']:>8.1f} {med['eager']:>12.1f} "
                      f"{med['ort']:>10.1f} {ratio:>9.2f}x {versus_contiguous:>14.2f}x {layout:>24.2f}x "
                      f"{fold:>11.2f}x", flush=True)
    print("(img/s; eager: channels-last with BatchNorm folded, as served; contiguous: the eager before (BatchNorm "
          "kept too), which the issue's ~2x measured against; BN kept: channels-last without folding)")
    print(f"lowest ORT/eager ratio {min(rows):.2f}x (goal >= 1.5); channels-last/contiguous "
          f"{min(layouts):.2f}-{max(layouts):.2f}x; folded/kept {min(folds):.2f}-{max(folds):.2f}x; "
          f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
