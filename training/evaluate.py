"""``segsvc eval``: measure a model artifact on a labelled dataset split.

    segsvc eval --model runs/model_repository/camvid-unet/1 --data camvid --split val [--scale 1.0] [--tile 256 256]

Predicts every image exactly as the server does: the manifest's inference
contract (``segsvc.inference.contract``: input scale, normalisation, padding
to the stride, default sliding windows and flip TTA, logits resized back to
the image) through the serving engine's forward pass (same precision rules),
and counts one confusion matrix over the split with void pixels ignored.
``--scale``, ``--tile``, ``--overlap`` and ``--hflip`` override the manifest's
defaults; the report says which were used and where they came from (the
manifest's ``tile_padding``, zero or reflect, always applies). Prints a table,
writes ``metrics.json`` and ``report.png`` (per-class IoU bars and sample rows
image | ground truth | prediction overlay). Besides the means, the table and
``metrics.json`` give the share of wrong pixels (``pixel_error``, 1 - pixel
accuracy over labelled pixels) and, when a class is named like membrane, its
IoU and, for two classes, the ISBI 2012 challenge's own pixel error
(``isbi_pixel_error``: 1 - F-score of the non-membrane pixels).
``--tta-scales`` tries multi-scale TTA; ``--curves DIR`` also writes the
learning curves of every training run under ``DIR`` (``training.curves``)
beside the report, so the model is seen against the other recipes (without it, the curves an earlier
evaluation left in ``--out`` are removed). ``--model <repo>/<name>`` evaluates the version the server
serves for the name: the one ``<name>/DEFAULT`` names, else the newest. A split that counts no pixel (its
masks all void) is refused: every figure would be NaN.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from segsvc.config import InferenceSpec
from segsvc.data.datasets import build_dataset
from segsvc.data.spec import DatasetSpec, load_dataset_spec
from segsvc.errors import InvalidArgument, ModelConfigError, NotFound, SegsvcError
from segsvc.files import write_atomic
from segsvc.inference.allocator import configure_allocator
from segsvc.inference.argmax import class_argmax
from segsvc.inference.backends import open_version_dir
from segsvc.inference.contract import apply_contract
from segsvc.inference.engine import Engine, EngineConfig, resolve_device
from segsvc.inference.predictor import Predictor
from segsvc.inference.repository import DEFAULT_FILE, ModelRepository
from segsvc.models.artifact import Manifest
from segsvc.progress import show_progress
from training.curves import require_validated_runs, write_curves
from training.data import require_labels, select_indices
from training.metrics import (BoundaryErrors, ConfusionMatrix, SegmentationMetrics, format_table, isbi_metrics,
                              require_counted)
from training.rundir import ARTIFACT_RECORD
from training.report import plot_eval_report


@dataclass(frozen=True)
class EvalOptions:
    """How to predict: inference scale, sliding-window tiles, flip TTA, device, and which samples.

    ``scale``, ``tile``, ``overlap`` and ``hflip`` left ``None`` take the model
    manifest's inference contract, as the server does; ``tile=(0, 0)`` turns
    tiling off. Tiles are square, as the server's ``tile_size`` is.
    """

    split: str = "val"
    scale: float | None = None
    tile: tuple[int, int] | None = None
    overlap: float | None = None
    hflip: bool | None = None
    tta_scales: tuple[float, ...] | None = None
    device: str = "cpu"
    precision: str = "auto"
    backend: str | None = None
    indices: tuple[int, int] | None = None
    limit: int | None = None
    samples_in_report: int = 3
    progress: bool = True


def run(args: argparse.Namespace) -> int:
    """Handler of ``segsvc eval`` (flags defined in ``segsvc/cli.py::_add_eval``)."""
    configure_allocator()  # keep freed activation buffers, as segsvc serve does
    if args.threads is not None and args.threads < 1:
        raise InvalidArgument(f"--threads must be at least 1, got {args.threads}")
    if args.indices and not 0 <= args.indices[0] < args.indices[1]:  # the split's length is checked once read
        raise InvalidArgument(f"--indices START STOP needs 0 <= START < STOP, got {args.indices[0]} {args.indices[1]}")
    if args.limit is not None and args.limit < 1:
        raise InvalidArgument(f"--limit must be at least 1, got {args.limit}")
    if args.samples < 0:
        raise InvalidArgument(f"--samples must be at least 0, got {args.samples}")
    device = str(resolve_device(args.device))  # auto: cuda when available; a bad name is a clear error
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    options = EvalOptions(
        split=args.split, scale=args.scale, tile=tuple(args.tile) if args.tile else None, overlap=args.overlap,
        hflip=args.hflip, tta_scales=args.tta_scales, device=device, precision=args.precision, backend=args.backend,
        indices=tuple(args.indices) if args.indices else None, limit=args.limit,
        samples_in_report=args.samples, progress=args.progress,
    )
    version_dir = resolve_model_dir(Path(args.model))
    if args.curves and not Path(args.curves).is_dir():  # before the evaluation, not after it
        raise NotFound(f"--curves {args.curves} is not a directory of training runs")
    if args.curves:
        require_validated_runs(Path(args.curves))
    data = load_dataset_spec(args.data)
    require_labels(data, args.split, "split", "nothing to measure (evaluate a split with masks)")
    config = EngineConfig(device=device, precision=options.precision, backend=options.backend, warmup=False)
    backend, manifest = open_version_dir(version_dir, torch.device(device), config)
    out_dir = Path(args.out) if args.out else Path("runs/eval") / f"{manifest.name}-v{manifest.version}-{args.split}"
    made = not out_dir.exists()
    prepare_out_dir(out_dir)  # before the evaluation, not after it
    try:
        result = evaluate_artifact(Predictor(backend, manifest), data, options)
    except BaseException:
        if made:  # the folder made for this evaluation's files is not left behind, empty
            remove_if_empty(out_dir)
        raise
    table = format_table(result.metrics, list(manifest.class_names), isbi=True)
    print(f"{manifest.name} v{manifest.version} on {data.name}/{args.split} ({result.images} images, "
          f"{result.seconds:.1f} s) {describe_contract(result.contract, options)}\n{table}\n"
          f"{describe_boundary(result.boundary)}")
    write_outputs(out_dir, manifest, data, options, result)
    print(f"wrote {out_dir / 'metrics.json'} and {out_dir / 'report.png'}")
    if args.curves:
        curves = write_curves(Path(args.curves), out_dir / CURVES_PICTURE,
                              f"validation mIoU of the runs under {args.curves}")
        print(f"wrote {out_dir / CURVES_PICTURE} ({len(curves)} runs)")
    else:  # an earlier evaluation's curves in this folder would be taken for this one's
        remove_stale_curves(out_dir)
    return 0


CURVES_PICTURE = "curves.png"  # with --curves; its CSV goes beside it (training.curves.write_curves)


def remove_stale_curves(out_dir: Path) -> None:
    """Remove the curves picture and CSV an earlier ``segsvc eval --curves`` left in ``out_dir``."""
    picture = out_dir / CURVES_PICTURE
    for path in (picture, picture.with_suffix(".csv")):
        path.unlink(missing_ok=True)


def remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # not empty (another program's files), or already gone
        pass


def prepare_out_dir(out_dir: Path) -> None:
    """Create the output folder and check that it takes files (``InvalidArgument`` naming why not)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidArgument(f"cannot create the output folder {out_dir}: {exc.strerror or type(exc).__name__}") \
            from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise InvalidArgument(f"cannot write into the output folder {out_dir}: permission denied")


def resolve_model_dir(path: Path) -> Path:
    """A version directory as given, or a model directory's default version, the one the server serves for
    the model's name: the complete version its ``DEFAULT`` names, else the highest numbered complete version
    (with its manifest; a version still being copied or published has none yet and is passed over)."""
    if (path / "manifest.json").is_file():
        return path
    numbered = [p for p in path.glob("*") if p.is_dir() and p.name.isdigit()] if path.is_dir() else []
    versions = sorted(int(p.name) for p in numbered if (p / "manifest.json").is_file())
    if not versions:
        raise NotFound(not_a_model_dir(path, [p.name for p in numbered]))
    pinned = default_version(path)
    return path / str(pinned if pinned in versions else versions[-1])


def default_version(model_dir: Path) -> int | None:
    """The version ``model_dir/DEFAULT`` names (``ModelRepository.default_version``), None without one; a
    pointer the repository refuses (a symlink out of it, an oversized file) is ignored with a warning."""
    model_dir = model_dir.absolute()
    try:
        return ModelRepository(model_dir.parent).default_version(model_dir.name)
    except SegsvcError as exc:
        print(f"warning: {model_dir / DEFAULT_FILE} ignored ({exc}): evaluating the newest version",
              file=sys.stderr)
        return None


def not_a_model_dir(path: Path, incomplete: list[str]) -> str:
    """Why ``--model path`` names no model, and which path to give instead when ``path`` shows one: a
    training run's folder (its ``artifact.txt``) or a model repository (its model folders)."""
    record = path / ARTIFACT_RECORD
    if record.is_file():
        try:
            published = record.read_text(encoding="utf-8", errors="replace").strip()
        except OSError:
            published = ""
        if published:
            return (f"{path} is a training run's folder; the model it published is {published}: "
                    f"pass --model {published}")
    names = sorted({m.parent.parent.name for m in path.glob("*/*/manifest.json")}) if path.is_dir() else []
    if names:
        return f"{path} is a model repository (models: {', '.join(names)}): pass --model {path / names[0]}"
    why = f" (its versions {', '.join(sorted(incomplete))} have no manifest.json)" if incomplete else ""
    return f"{path} is neither a model version directory (with manifest.json) nor a model directory{why}"


@dataclass(frozen=True)
class EvalResult:
    metrics: SegmentationMetrics
    confusion: list[list[int]]  # rows: ground truth, columns: prediction
    images: int
    seconds: float
    samples: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
    contract: InferenceSpec = InferenceSpec()  # what the images were run with
    boundary: dict[str, object] = field(default_factory=dict)  # BoundaryErrors.to_dict()


def eval_contract(manifest: Manifest, options: EvalOptions) -> InferenceSpec:
    """The manifest's inference contract with the options given explicitly (``None`` keeps the manifest's)."""
    changes: dict[str, object] = {}
    if options.scale is not None:
        changes["scale"] = options.scale
    if options.tile is not None:
        if options.tile[0] != options.tile[1]:
            raise InvalidArgument(f"tiles are square, as the server's tile_size is: use --tile {options.tile[0]} "
                                  f"{options.tile[0]}, not {options.tile[0]} {options.tile[1]}")
        changes["tile_size"] = int(options.tile[0])
    if options.overlap is not None:
        changes["tile_overlap"] = options.overlap
    if options.hflip is not None:
        changes["flip_tta"] = options.hflip
    if options.tta_scales is not None:
        changes["tta_scales"] = options.tta_scales
    try:
        return replace(manifest.inference, **changes)
    except ModelConfigError as exc:
        raise InvalidArgument(str(exc)) from None


def evaluate_artifact(predictor: Predictor, data: DatasetSpec, options: EvalOptions) -> EvalResult:
    """Predict every selected image of the split as the server would and accumulate one confusion matrix.

    The forward pass is the serving ``Engine``'s (device, autocast, memory format),
    and each image goes through ``apply_contract``, so the label maps equal the
    ones a server returns for the same images with the same options.
    """
    manifest = predictor.manifest
    check_compatible(manifest, data)
    contract = eval_contract(manifest, options)
    engine = Engine(predictor, EngineConfig(device=str(predictor.device), warmup=False))
    dataset = build_dataset(data, options.split)
    indices = select_indices(len(dataset), options.indices, options.limit)
    if not indices:
        raise InvalidArgument(f"split {options.split!r} of {data.name!r} has no samples to evaluate")
    wanted = set(np.linspace(0, len(indices) - 1, options.samples_in_report).round().astype(int).tolist()) \
        if options.samples_in_report > 0 else set()
    cm = ConfusionMatrix(manifest.spec.num_classes, data.ignore_index)
    boundary = BoundaryErrors(manifest.spec.num_classes, data.ignore_index)
    samples = []
    t0 = time.perf_counter()
    bar = tqdm(indices, desc=f"eval {data.name}/{options.split}", disable=not show_progress(options.progress))
    for n, i in enumerate(bar):
        image, mask = dataset.read(i)
        mask = torch.from_numpy(np.asarray(mask, dtype=np.int64))
        if tuple(mask.shape) != tuple(image.shape[:2]):
            raise InvalidArgument(f"sample {i} of {data.name}/{options.split}: mask {tuple(mask.shape)} and image "
                                  f"{tuple(image.shape[:2])} differ in size (segsvc data check lists such files)")
        pred = predict_labels(engine, contract, image)
        cm.update(mask, pred)
        boundary.update(mask, pred)
        if n in wanted:
            samples.append((image, mask.numpy(), pred.numpy()))
    metrics = require_counted(cm.compute(), f"split {options.split!r} of {data.name}", data.ignore_index)
    return EvalResult(metrics, cm.mat.tolist(), len(indices), time.perf_counter() - t0, samples, contract,
                      boundary.to_dict())


def predict_labels(engine: Engine, contract: InferenceSpec, image: np.ndarray) -> torch.Tensor:
    """The label map of one image at its own size, run as ``contract`` with the serving forward pass."""
    p = engine.predictor
    logits = apply_contract(engine.forward, image, p.manifest.input, contract, p.geometry)
    return class_argmax(logits)[0].cpu()


def check_compatible(manifest: Manifest, data: DatasetSpec) -> None:
    if manifest.spec.num_classes != data.num_classes:
        raise InvalidArgument(
            f"model {manifest.name!r} predicts {manifest.spec.num_classes} classes but dataset "
            f"{data.name!r} has {data.num_classes}: evaluate it on the dataset it was trained for"
        )
    if tuple(manifest.class_names) != tuple(data.class_names):
        print(f"warning: class names differ: model {list(manifest.class_names)} vs dataset "
              f"{list(data.class_names)}", file=sys.stderr)


def contract_sources(options: EvalOptions) -> dict[str, str]:
    """Where each setting came from: ``flag`` (given explicitly) or ``manifest``."""
    given = {"scale": options.scale, "tile_size": options.tile, "tile_overlap": options.overlap,
             "flip_tta": options.hflip, "tta_scales": options.tta_scales}
    return {k: "manifest" if v is None else "flag" for k, v in given.items()}


def describe_boundary(boundary: dict[str, object]) -> str:
    """One line: how many wrong pixels lie within ``band_px`` of a label boundary, and the error off that band."""
    def pct(x: object) -> str:
        return "-" if x is None else f"{100 * float(x):.2f}%"  # type: ignore[arg-type]

    return (f"wrong pixels within {boundary['band_px']} px of a label boundary: {pct(boundary['errors_in_band'])} "
            f"(the band holds {pct(boundary['band_pixels'])} of the pixels); "
            f"pixel error off the band: {pct(boundary['pixel_error_off_band'])}")


def describe_contract(contract: InferenceSpec, options: EvalOptions) -> str:
    """One line: the scale, tiling and TTA used, and whether each came from the manifest or a flag."""
    src = contract_sources(options)
    tiles = (f"tiles {contract.tile_size} overlap {contract.tile_overlap} ({src['tile_size']})"
             if contract.tile_size else f"no tiling ({src['tile_size']})")
    # ``tile_padding: reflect`` without tiles still mirrors the padding to the stride and minimum size
    # (``contract_logits``): said as that, not as the overlap tiles' mirrored borders
    padding = ("" if contract.tile_padding != "reflect" else ", mirrored borders (manifest)" if contract.tile_size
               else ", mirrored padding to the stride (manifest)")
    scales = (f"scales {', '.join(f'{f:g}' for f in contract.tta_scales)}" if contract.tta_scales
              else "no multi-scale TTA")
    shift = (f", inputs shifted by ({contract.shift[0]:+.2f}, {contract.shift[1]:+.2f}) px (manifest)"
             if any(contract.shift) else "")
    return (f"[scale {contract.scale} ({src['scale']}), {tiles}{padding}, "
            f"flip TTA {'on' if contract.flip_tta else 'off'} ({src['flip_tta']}), {scales} ({src['tta_scales']})"
            f"{shift}]")


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
        "options": {"scale": result.contract.scale,
                    "tile": [result.contract.tile_size] * 2 if result.contract.tile_size else None,
                    "overlap": result.contract.tile_overlap, "hflip": result.contract.flip_tta,
                    "tta_scales": list(result.contract.tta_scales),
                    "tile_padding": result.contract.tile_padding,
                    "device": options.device, "precision": options.precision,
                    "backend": options.backend or manifest.inference.backend},
        "inference": result.contract.to_dict(),
        "inference_source": contract_sources(options),
        "ignore_index": data.ignore_index,
        "metrics": {**result.metrics.to_dict(names), **isbi_metrics(result.metrics, names)},
        "boundary_errors": result.boundary,
        "confusion_matrix": {"rows": "ground truth", "columns": "prediction", "classes": names,
                             "counts": result.confusion},
    }
    title = (f"{manifest.name} v{manifest.version} on {data.name}/{options.split} "
             f"at scale {result.contract.scale}: mIoU "
             f"{100 * result.metrics.miou:.2f}, pixel acc {100 * result.metrics.pixel_accuracy:.2f}")
    plot_eval_report(out_dir / "report.png", title=title, class_names=names, iou=result.metrics.iou,
                     samples=result.samples, palette=manifest.palette, ignore_index=data.ignore_index)
    # Last: a training job takes an evaluation with metrics.json for finished, so a kill before it is run again.
    write_atomic(out_dir / "metrics.json", (json.dumps(payload, indent=2) + "\n").encode())
