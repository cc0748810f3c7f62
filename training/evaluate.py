"""``segsvc eval``: measure a model artifact on a labelled dataset split.

    segsvc eval --model runs/model_repository/camvid-unet/1 --data camvid --split val [--tile 256 256 --hflip]

Predicts every image exactly as the server would (the artifact's own
preprocessing, padding to the stride), optionally with sliding windows and
horizontal-flip test-time augmentation, and counts one confusion matrix over
the split with void pixels ignored. Prints a table, writes ``metrics.json``
and ``report.png`` (per-class IoU bars and sample rows image | ground truth |
prediction overlay).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from segsvc.data.datasets import build_dataset
from segsvc.data.spec import DatasetSpec, load_dataset_spec
from segsvc.errors import InvalidArgument, NotFound
from segsvc.inference.predictor import Predictor
from segsvc.inference.tiling import LogitsFn, make_logits_fn
from segsvc.models.artifact import Manifest, load_artifact
from training.data import select_indices
from training.metrics import ConfusionMatrix, SegmentationMetrics, format_table
from training.report import plot_eval_report


@dataclass(frozen=True)
class EvalOptions:
    """How to predict: inference scale, sliding-window tiles, flip TTA, device, and which samples."""

    split: str = "val"
    scale: float = 1.0
    tile: tuple[int, int] | None = None
    overlap: float = 0.25
    hflip: bool = False
    device: str = "cpu"
    indices: tuple[int, int] | None = None
    limit: int | None = None
    samples_in_report: int = 3
    progress: bool = True


def run(args: argparse.Namespace) -> int:
    """Handler of ``segsvc eval`` (flags defined in ``segsvc/cli.py::_add_eval``)."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    options = EvalOptions(
        split=args.split, scale=args.scale, tile=tuple(args.tile) if args.tile else None, overlap=args.overlap,
        hflip=args.hflip, device=device, indices=tuple(args.indices) if args.indices else None, limit=args.limit,
        samples_in_report=args.samples, progress=args.progress,
    )
    version_dir = resolve_model_dir(Path(args.model))
    data = load_dataset_spec(args.data)
    model, manifest = load_artifact(version_dir, device=device)
    out_dir = Path(args.out) if args.out else Path("runs/eval") / f"{manifest.name}-v{manifest.version}-{args.split}"
    result = evaluate_artifact(Predictor(model, manifest, device), data, options)
    table = format_table(result.metrics, list(manifest.class_names))
    print(f"{manifest.name} v{manifest.version} on {data.name}/{args.split} ({result.images} images, "
          f"{result.seconds:.1f} s){describe_options(options)}\n{table}")
    write_outputs(out_dir, manifest, data, options, result)
    print(f"wrote {out_dir / 'metrics.json'} and {out_dir / 'report.png'}")
    return 0


def resolve_model_dir(path: Path) -> Path:
    """A version directory as given, or the highest numbered version inside a model directory."""
    if (path / "manifest.json").is_file():
        return path
    versions = sorted((int(p.name) for p in path.glob("*") if p.is_dir() and p.name.isdigit())) if path.is_dir() else []
    if not versions:
        raise NotFound(f"{path} is neither a model version directory (with manifest.json) nor a model directory")
    return path / str(versions[-1])


@dataclass(frozen=True)
class EvalResult:
    metrics: SegmentationMetrics
    confusion: list[list[int]]  # rows: ground truth, columns: prediction
    images: int
    seconds: float
    samples: list[tuple[np.ndarray, np.ndarray, np.ndarray]]


def evaluate_artifact(predictor: Predictor, data: DatasetSpec, options: EvalOptions) -> EvalResult:
    """Predict every selected image of the split and accumulate one confusion matrix."""
    manifest = predictor.manifest
    check_compatible(manifest, data)
    dataset = build_dataset(data, options.split)
    indices = select_indices(len(dataset), options.indices, options.limit)
    if not indices:
        raise InvalidArgument(f"split {options.split!r} of {data.name!r} has no samples to evaluate")
    wanted = set(np.linspace(0, len(indices) - 1, options.samples_in_report).round().astype(int).tolist()) \
        if options.samples_in_report > 0 else set()
    logits_fn = make_logits_fn(predictor.logits, options.tile, options.overlap, options.hflip)
    cm = ConfusionMatrix(manifest.spec.num_classes, data.ignore_index)
    samples = []
    t0 = time.perf_counter()
    for n, i in enumerate(tqdm(indices, desc=f"eval {data.name}/{options.split}", disable=not options.progress)):
        image, mask = dataset.read(i)
        mask = torch.from_numpy(np.asarray(mask, dtype=np.int64))
        pred = predict_labels(predictor, logits_fn, image, options.scale, tuple(mask.shape))
        cm.update(mask, pred)
        if n in wanted:
            samples.append((image, mask.numpy(), pred.numpy()))
    return EvalResult(cm.compute(), cm.mat.tolist(), len(indices), time.perf_counter() - t0, samples)


def predict_labels(
    predictor: Predictor, logits_fn: LogitsFn, image: np.ndarray, scale: float, size: tuple[int, int]
) -> torch.Tensor:
    """The label map of one image at ``size``; logits are resized when the input was rescaled."""
    if scale != 1.0:
        h, w = image.shape[:2]
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        image = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=interp)
    x = predictor.input_tensor(image).unsqueeze(0)
    with torch.inference_mode():
        logits = logits_fn(x)
        if tuple(logits.shape[-2:]) != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    return logits.argmax(1)[0].cpu()


def check_compatible(manifest: Manifest, data: DatasetSpec) -> None:
    if manifest.spec.num_classes != data.num_classes:
        raise InvalidArgument(
            f"model {manifest.name!r} predicts {manifest.spec.num_classes} classes but dataset "
            f"{data.name!r} has {data.num_classes}: evaluate it on the dataset it was trained for"
        )
    if tuple(manifest.class_names) != tuple(data.class_names):
        print(f"warning: class names differ: model {list(manifest.class_names)} vs dataset "
              f"{list(data.class_names)}", file=sys.stderr)


def describe_options(options: EvalOptions) -> str:
    parts = []
    if options.scale != 1.0:
        parts.append(f"scale {options.scale}")
    if options.tile:
        parts.append(f"tiles {options.tile[0]}x{options.tile[1]} overlap {options.overlap}")
    if options.hflip:
        parts.append("hflip TTA")
    return f" [{', '.join(parts)}]" if parts else ""


def write_outputs(
    out_dir: Path, manifest: Manifest, data: DatasetSpec, options: EvalOptions, result: EvalResult
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(manifest.class_names)
    payload = {
        "model": manifest.name,
        "version": manifest.version,
        "dataset": data.name,
        "split": options.split,
        "images": result.images,
        "seconds": round(result.seconds, 2),
        "options": {"scale": options.scale, "tile": list(options.tile) if options.tile else None,
                    "overlap": options.overlap, "hflip": options.hflip, "device": options.device},
        "ignore_index": data.ignore_index,
        "metrics": result.metrics.to_dict(names),
        "confusion_matrix": {"rows": "ground truth", "columns": "prediction", "classes": names,
                             "counts": result.confusion},
    }
    (out_dir / "metrics.json").write_text(json.dumps(payload, indent=2) + "\n")
    title = (f"{manifest.name} v{manifest.version} on {data.name}/{options.split}: mIoU "
             f"{100 * result.metrics.miou:.2f}, pixel acc {100 * result.metrics.pixel_accuracy:.2f}")
    plot_eval_report(out_dir / "report.png", title=title, class_names=names, iou=result.metrics.iou,
                     samples=result.samples, palette=manifest.palette, ignore_index=data.ignore_index)
