"""The ``segsvc`` command line.

Each command group has one ``_add_<group>`` function that defines its
arguments and points ``func`` at a handler; handlers import their modules
lazily so ``segsvc --help`` stays fast. ``segsvc train`` is the only entry that
reaches into the ``training`` package; the service itself never imports it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Callable, NoReturn, Sequence

from segsvc.cli_client import add_max_message_flag, connection_flags
from segsvc.cli_serve import add_serve_parser
from segsvc.cli_values import (check_overlap_flags, fraction, non_negative_int, number, positive_int, tile_overlap,
                               tile_size)
from segsvc.config import BACKENDS
from segsvc.errors import InvalidArgument, SegsvcError


# -- models --------------------------------------------------------------------
def _models_list(args: argparse.Namespace) -> int:
    from segsvc.inference.repository import ModelRepository
    from segsvc.models.registry import available_models

    if args.repo is None:
        print("Registered architectures:")
        for name in available_models():
            print(f"  {name}")
        return 0
    repo = ModelRepository.existing(args.repo)
    rows = repo.list_models()
    if not rows:
        print(f"no models in {args.repo}")
        return 0
    print(f"{'MODEL':24} {'VERSIONS':16} {'DEFAULT':>7}  {'ARCH':20} {'CLASSES':>7}  mIoU")
    for name, versions in rows.items():
        # one unreadable manifest (a half-copied version) is marked, as the server skips it; the listing goes on
        broken: dict[int, str] = {}
        manifests = {}
        for version in versions:
            try:
                manifests[version] = repo.read_manifest(name, version)
            except (SegsvcError, OSError) as exc:
                broken[version] = str(exc)
        # the columns describe the version served to requests without one, chosen as the server does:
        # the DEFAULT pointer's when it names a readable version, else the newest readable one
        pointer = repo.default_version(name)
        served = pointer if pointer in manifests else max(manifests, default=None)
        if served is None:
            default_s, arch, classes, miou_s = "-", "-", "-", "-"
        else:
            manifest = manifests[served]
            miou = manifest.metrics.get("miou")
            default_s, arch, classes = str(served), manifest.spec.arch, str(manifest.spec.num_classes)
            miou_s = f"{miou:.4f}" if isinstance(miou, (int, float)) else "-"
        vs = ",".join(str(v) for v in versions)
        print(f"{name:24} {vs:16} {default_s:>7}  {arch:20} {classes:>7}  {miou_s}")
        for version, reason in broken.items():
            print(f"  {name}:{version} is broken: {reason}")
    return 0


def _models_show(args: argparse.Namespace) -> int:
    from segsvc.inference.repository import ModelRepository
    from segsvc.model_names import parse_model_ref

    name, version = parse_model_ref(args.ref)
    repo = ModelRepository.existing(args.repo)
    version = repo.resolve_version(name, version)
    manifest = repo.read_manifest(name, version)
    print(json.dumps(manifest.to_dict(), indent=2))
    return 0


def _model_state(info) -> str:  # type: ignore[no-untyped-def]
    """``m: loaded versions 1,2; default 2 (pinned)``: a model's loaded versions and default, from its ModelInfo."""
    loaded = ",".join(str(v) for v in info.loaded_versions) or "none"
    how = " (pinned)" if info.default_pinned else " (the newest loaded)"
    default = f"{info.default_version}{how}" if info.default_version else "none"
    return f"{info.name}: loaded versions {loaded}; default {default}"


def _models_manage(args: argparse.Namespace) -> int:
    """``segsvc models load|unload|default REF --server ADDR``: LoadModel, UnloadModel, SetDefaultVersion (the
    manage scope), then one line with the model's loaded versions and default."""
    from segsvc.cli_client import open_client
    from segsvc.errors import NotFound
    from segsvc.model_names import parse_model_ref

    name, version = parse_model_ref(args.ref)
    if args.models_cmd == "default" and version is None:
        raise InvalidArgument(f"segsvc models default needs NAME:VERSION, got {args.ref!r}")
    with open_client(args) as client:
        if args.models_cmd == "load":
            info = client.load_model(name, version)
            print(f"loaded {name}:{info.version}; {_model_state(info)}")
        elif args.models_cmd == "default":
            print(f"default of {name} set to {version}; {_model_state(client.set_default_version(name, version))}")
        else:
            unloaded = client.unload_model(name, version)
            try:
                state = _model_state(client.get_model(name))
            except NotFound:  # no version of it is loaded any more
                state = f"{name}: loaded versions none"
            print(f"unloaded {name}:{','.join(str(v) for v in unloaded) or 'nothing'}; {state}")
    return 0


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list architectures or the models in a repository; load, unload a model or "
                                      "set its default version on a running server")
    msub = p.add_subparsers(dest="models_cmd", required=True)
    pl = msub.add_parser("list", help="list registered architectures, or a repository's models with --repo",
                         description="With --repo: each model's versions and its DEFAULT version, the one requests "
                                     "without a version get (its DEFAULT pointer, else the newest readable version); "
                                     "ARCH, CLASSES and mIoU describe that version.")
    pl.add_argument("--repo", default=None, help="model repository root (<root>/<model>/<version>/)")
    pl.set_defaults(func=_models_list)
    ps = msub.add_parser("show", help="print a model version's manifest")
    ps.add_argument("ref", help="NAME or NAME:VERSION (default: the version DEFAULT names, else the newest)")
    ps.add_argument("--repo", required=True, help="model repository root")
    ps.set_defaults(func=_models_show)
    common = connection_flags("deadline of the call, a load's warm-up pass included",
                              token_help="bearer token file with the manage scope (else $SEGSVC_AUTH_TOKEN)")
    for name, ref_help, text in (
        ("load", "NAME or NAME:VERSION (default: the newest in the repository)",
         "load a model version on a running server (LoadModel); it stays loaded until unloaded"),
        ("unload", "NAME (every loaded version) or NAME:VERSION",
         "unload a model version, or the whole model, on a running server (UnloadModel)"),
        ("default", "NAME:VERSION, loaded first if it is not",
         "make a version the default of requests that name none (SetDefaultVersion: it is loaded first if need "
         "be, and written to the repository's DEFAULT pointer; the outgoing default stays loaded for a rollback)"),
    ):
        pm = msub.add_parser(name, parents=[common], help=text)
        pm.add_argument("ref", metavar="NAME[:VERSION]" if name != "default" else "NAME:VERSION", help=ref_help)
        pm.set_defaults(func=_models_manage)


# -- train / eval: the training package, imported only when these commands run -----
def _train(args: argparse.Namespace) -> int:
    if args.server:  # a training job on a server (segsvc/cli_train.py): no torch here
        from segsvc.cli_train import submit_training

        return submit_training(args)
    if not args.config:
        raise InvalidArgument("segsvc train needs --config RECIPE (or --server HOST:PORT --dataset NAME)")
    from training.train import run

    return run(args)


def _add_train(sub: argparse._SubParsersAction) -> None:
    from segsvc.cli_train import add_server_train_arguments
    from training.args import add_train_arguments  # argparse only: no torch import

    p = sub.add_parser("train", help="train a model from a recipe and publish it to a model repository "
                                     "(or, with --server, as a training job on a server)")
    add_train_arguments(p)
    add_server_train_arguments(p)
    p.set_defaults(func=_train)


def _eval(args: argparse.Namespace) -> int:
    from training.evaluate import run

    return run(args)


def _float_list(text: str) -> tuple[float, ...]:
    """``0.75,1,1.25`` as positive, distinct factors, at most ``MAX_TTA_SCALES`` of them; ``InferenceSpec``
    checks each factor times the inference scale, which is not known here."""
    from segsvc.config import MAX_TTA_SCALES

    try:
        factors = tuple(float(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas such as 0.75,1,1.25, got {text!r}")
    if not all(math.isfinite(f) and f > 0 for f in factors) or len(set(factors)) != len(factors):
        raise argparse.ArgumentTypeError(f"expected distinct factors > 0 such as 0.75,1,1.25, got {text}")
    if len(factors) > MAX_TTA_SCALES:
        raise argparse.ArgumentTypeError(f"at most {MAX_TTA_SCALES} factors, got {len(factors)}: {text}")
    return factors


def _inference_scale(text: str) -> float:
    """``--scale``: a resize factor in ``(0, MAX_INFERENCE_SCALE]``, as a manifest's inference scale."""
    from segsvc.config import MAX_INFERENCE_SCALE

    return number(0.0, strict=True, most=MAX_INFERENCE_SCALE)(text)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model artifact on a labelled dataset split")
    p.add_argument("--model", required=True,
                   help="a model version directory <repo>/<name>/<version>, or <repo>/<name> for its default version "
                        "(the one <name>/DEFAULT names, else the newest)")
    p.add_argument("--data", required=True, help="dataset spec: built-in name (camvid, membrane, synthetic) or YAML")
    p.add_argument("--split", default="val", help="split to evaluate (default: val)")
    p.add_argument("--out", default=None, help="output folder (default: runs/eval/<model>-v<version>-<split>)")
    p.add_argument("--scale", type=_inference_scale, default=None,
                   help="resize images by this factor for inference (default: the model's inference scale "
                        "from its manifest); metrics still use the full-size labels")
    p.add_argument("--tile", type=tile_size, nargs=2, metavar=("H", "W"), default=None,
                   help="sliding-window inference with tiles of H x W pixels; 0 0: off (default: the model's)")
    p.add_argument("--overlap", type=tile_overlap, default=None,
                   help="sliding-window overlap fraction (default: the model's, 0.25 unless its manifest says)")
    p.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=None,
                   help="horizontal-flip test-time augmentation (default: the model's, usually off)")
    p.add_argument("--tta-scales", type=_float_list, default=None, metavar="F,F,...",
                   help="multi-scale test-time augmentation: factors of the inference scale to average over, "
                        "e.g. 0.75,1,1.25; 1: off (default: the model's, usually off)")
    p.add_argument("--indices", type=int, nargs=2, metavar=("START", "STOP"), default=None,
                   help="evaluate only samples START..STOP-1 of the split")
    p.add_argument("--curves", default=None, metavar="DIR",
                   help="also write curves.png (+ .csv) beside the report: val mIoU against CPU-minutes for every "
                        "training run under DIR (e.g. runs/), to compare the model with the other recipes")
    p.add_argument("--limit", type=int, default=None, help="evaluate at most this many samples")
    p.add_argument("--samples", type=int, default=3, help="sample rows in the report picture (default 3)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="forward-pass precision, as segsvc serve's (default auto: fp32 on CPU, bf16/fp16 on CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--backend", default=None, choices=BACKENDS,
                   help="what runs the network (default: the manifest's inference.backend, normally torch); "
                        "onnxruntime needs `segsvc export --format onnx` first")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=_eval)


def _curves(args: argparse.Namespace) -> int:
    from training.curves import run

    return run(args)


def _add_curves(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("curves", help="plot validation mIoU against CPU-minutes for every training run under DIR "
                                      "(PNG + CSV)")
    p.add_argument("dir", metavar="DIR", help="a runs folder (runs/, runs/<recipe>) or one run directory")
    p.add_argument("--out", default=None, help="the PNG to write (default: DIR/curves.png); the CSV goes beside it")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads to assume for old runs that recorded neither cpu_minutes nor train.threads "
                        "(default: this machine's torch thread count; the legend says so)")
    p.add_argument("--title", default=None, help="title of the picture")
    p.set_defaults(func=_curves)


# -- data: check a dataset, generate the synthetic one ----------------------------
def _parse_hw(text: str) -> tuple[int, int]:
    """``96x128`` (height x width) or ``96`` (square)."""
    parts = text.lower().split("x")
    try:
        hw = tuple(int(p) for p in parts)
    except ValueError:
        hw = ()
    if len(hw) == 1:
        hw = (hw[0], hw[0])
    if len(hw) != 2 or min(hw) < 1:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH such as 96x96, got {text!r}")
    return hw[0], hw[1]


def _data_check(args: argparse.Namespace) -> int:
    from segsvc.data.spec import load_dataset_spec
    from segsvc.datasets.ingest import server_check
    from segsvc.progress import progress_bar

    spec = load_dataset_spec(args.path, num_classes=args.num_classes)

    def bar(items, total):  # type: ignore[no-untyped-def]
        return progress_bar(args.progress, items, total=total, desc=f"checking {spec.name}", unit="sample")

    report = server_check(spec, max_pixels=args.max_dataset_pixels, progress=bar)
    print(report.format())
    return 0 if report.ok else 1


REGISTER_HINT_PX = 0.2  # a mean label offset worth registering (the ISBI membranes: 0.6 px)


def _data_offset(args: argparse.Namespace) -> int:
    from segsvc.data.datasets import build_dataset
    from segsvc.data.registration import dataset_offsets, mean_offset
    from segsvc.data.spec import load_dataset_spec
    from segsvc.progress import progress_bar

    spec = load_dataset_spec(args.path)
    if args.class_name not in spec.class_names:
        raise SegsvcError(f"--class {args.class_name!r} is not a class of {spec.name}: {', '.join(spec.class_names)}")
    base = build_dataset(spec, args.split)
    names = getattr(base, "names", None) or [str(i) for i in range(len(base))]

    def bar(items):  # type: ignore[no-untyped-def]
        return progress_bar(args.progress, items, total=len(base), desc=f"measuring {spec.name}/{args.split}",
                            unit="image")

    offsets = dataset_offsets(base.read, range(len(base)), spec.class_names.index(args.class_name), bar)
    for name, (dy, dx) in zip(names, offsets):
        print(f"{name:<24} dy {dy:+.2f}  dx {dx:+.2f}")
    dy, dx = mean_offset(offsets)
    print(f"mean ({dy:+.2f}, {dx:+.2f}) px over {len(offsets)} images (negative: the labels lie up/left of "
          f"the image's {args.class_name})")
    if max(abs(dy), abs(dx)) >= REGISTER_HINT_PX:
        print(f"a constant offset: train with `--set data.register={args.class_name}` to remove it")
    return 0


def _data_synth(args: argparse.Namespace) -> int:
    from segsvc.data.synthetic import SyntheticConfig, write_synthetic_dataset
    from segsvc.progress import progress_bar

    config = SyntheticConfig(size_hw=args.size)
    yaml_path = write_synthetic_dataset(
        args.out_dir, args.count, config, seed=args.seed, val_fraction=args.val_fraction,
        progress=lambda r: progress_bar(args.progress, r, desc="writing", unit="sample"),
    )  # fmt: skip
    print(f"wrote {args.count} samples ({config.size_hw[0]}x{config.size_hw[1]}) to {args.out_dir}")
    print(f"dataset description: {yaml_path}")
    return 0


def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="check a dataset or generate the synthetic one")
    dsub = p.add_subparsers(dest="data_cmd", required=True)
    pc = dsub.add_parser("check", help="list every problem of a dataset; exit 1 if there is any")
    pc.add_argument("path", help="dataset YAML, built-in name (camvid, membrane, voc, synthetic) or a folder "
                                 "with images/ and masks/ (and optionally dataset.yaml)")  # fmt: skip
    pc.add_argument("--num-classes", type=int, default=None,
                    help="for a folder without dataset.yaml: check labels against 0..N-1")  # fmt: skip
    pc.add_argument("--max-dataset-pixels", type=int, default=64_000_000,
                    help="pixels per image the server accepts (segsvc serve --max-dataset-pixels; default 64 MP)")
    pc.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    pc.set_defaults(func=_data_check)
    po = dsub.add_parser("offset", help="how far a class's labels are drawn from the image structure they mark "
                                        "(sub-pixel, per image); see data.register")  # fmt: skip
    po.add_argument("path", help="dataset YAML or built-in name (e.g. membrane)")
    po.add_argument("--class", dest="class_name", required=True, help="the class to measure (e.g. membrane)")
    po.add_argument("--split", default="train", help="split to measure (default train)")
    po.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    po.set_defaults(func=_data_offset)
    ps = dsub.add_parser("synth", help="write a synthetic shapes dataset (folder layout + dataset.yaml)")
    ps.add_argument("out_dir", help="new (or empty) output folder")
    ps.add_argument("--count", type=int, default=200, help="number of samples (default 200)")
    ps.add_argument("--size", type=_parse_hw, default=(96, 96), help="HEIGHTxWIDTH (default 96x96)")
    ps.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    ps.add_argument("--val-fraction", type=float, default=0.2, help="share of samples in val (default 0.2)")
    ps.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    ps.set_defaults(func=_data_synth)


# -- segment: the gRPC client ---------------------------------------------------------
def _segment(args: argparse.Namespace) -> int:
    from pathlib import Path

    from segsvc.cli_client import open_client
    from segsvc.cli_segment import claim_outputs, output_stems
    from segsvc.client import SegmentationClient, named_image_files, no_images
    from segsvc.files import write_atomic
    from segsvc.inference.codec import encode_png
    from segsvc.model_names import parse_model_ref

    model, version = parse_model_ref(args.model) if args.model else (None, None)
    # a bad option (a model name, --alpha 1.5) is named now, before the files are walked and the server is waited for
    check_overlap_flags(args.tile_size, args.overlap)
    SegmentationClient.request_template(model=model, version=version, tile_size=args.tile_size,
                                        tile_overlap=args.overlap, flip_tta=args.flip_tta)
    named = named_image_files(args.inputs, skip=args.out)  # --out may lie inside an input folder
    if not named:
        raise no_images(args.inputs)
    files, stems = output_stems(named)  # a folder's subfolders are kept under --out
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    claim_outputs(out, files, stems)  # no output of another input is overwritten, in this run or a later one
    failed = written = 0

    def write(index: int, result) -> None:  # type: ignore[no-untyped-def]
        """One image's outputs, as its answer arrives: a run that breaks off keeps what was answered."""
        nonlocal failed, written
        path, stem = files[index], stems[index]
        if isinstance(result, Exception):
            failed += 1
            print(f"{path}: error: {result}", file=sys.stderr)
            return
        (out / stem).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out / f"{stem}_mask.png", encode_png(result.mask))
        write_atomic(out / f"{stem}_color.png", encode_png(result.colorize()))
        if args.overlay:
            write_atomic(out / f"{stem}_overlay.png", encode_png(result.overlay(path, args.alpha)))
        written += 1
        present = [result.class_names[c] for c in sorted(set(result.mask.flat)) if c < len(result.class_names)]
        print(f"{path} -> {out / (stem + '_mask.png')} ({result.model}:{result.version}; "
              f"{result.timings.total_ms:.0f} ms; classes: {', '.join(present)})")

    with open_client(args) as client:
        try:
            client.segment_many(
                files, model=model, version=version, tile_size=args.tile_size, tile_overlap=args.overlap,
                flip_tta=args.flip_tta,
                progress=args.progress, return_exceptions=True, on_result=write,
            )
        except SegsvcError:
            if written:
                print(f"segmented {written}/{len(files)} images into {out} before the error below", file=sys.stderr)
            raise
    print(f"segmented {len(files) - failed}/{len(files)} images into {out}")
    return 1 if failed else 0


def _add_segment(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("segment", help="segment images through a running server; writes PNG masks (+ overlays)",
                       parents=[connection_flags("deadline of the whole run", 300.0)])
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR",
                   help="image files or folders of images (walked recursively)")
    p.add_argument("--out", required=True,
                   help="output folder for <name>_mask.png, _color.png, _overlay.png (a folder's subfolders kept; "
                        "<name> keeps its suffix when another input has the same stem); a run that would overwrite "
                        "another input's outputs is refused before anything is sent")
    p.add_argument("--overlay", action="store_true", help="also write the colours blended over the image")
    p.add_argument("--alpha", type=fraction, default=0.5, help="overlay opacity (default 0.5)")
    p.add_argument("--model", default=None, help="NAME or NAME:VERSION (default: the server's only model)")
    p.add_argument("--tile-size", type=tile_size, default=None,
                   help="sliding-window tile side in pixels; 0: off (default: the model's, usually off)")
    p.add_argument("--overlap", type=tile_overlap, default=None,
                   help="sliding-window overlap, a fraction of the tile; needs --tile-size (default: the model's, "
                        "0.25 unless its manifest says)")
    p.add_argument("--flip-tta", action=argparse.BooleanOptionalAction, default=None,
                   help="horizontal-flip test-time augmentation (default: the model's, usually off)")
    add_max_message_flag(p)
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=_segment)


# -- batch: offline segmentation of many files, no server ------------------------------
def _batch(args: argparse.Namespace) -> int:
    from segsvc.inference.allocator import configure_allocator
    from segsvc.cli_serve import batch_pixels
    from segsvc.jobs.offline import BatchOptions, run_batch, stored_options

    configure_allocator()  # before the forward threads allocate, as segsvc serve does
    if args.torch_threads < 0:
        raise InvalidArgument(f"--torch-threads must be >= 0 (0: one per CPU), got {args.torch_threads}")
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)  # the local engine runs one forward stream per thread on CPU

    given = {k: getattr(args, k) for k in ("tile_size", "flip_tta", "color", "overlay", "confidence", "alpha")
             if getattr(args, k) is not None}
    # --resume keeps the stored options of the flags left out; the flags given must match the stored values.
    if args.resume and given:
        given = {**stored_options(Path(args.out)), **given}
    options = BatchOptions(**given) if given or not args.resume else None
    summary = run_batch(
        args.inputs, model_repo=args.model_repo, model=args.model, out=args.out, engine=args.engine,
        resume=args.resume, options=options, batch_size=args.batch_size,
        max_batch_pixels=-1 if args.max_batch_pixels == "auto" else batch_pixels(args.max_batch_pixels, "cpu"),
        device=args.device, backend=args.backend,
        io_threads=args.io_threads, actors=args.actors, progress=args.progress,
        max_inflight_mb=None if args.max_inflight_mb == "auto" else args.max_inflight_mb,
    )  # fmt: skip
    counts = summary["counts"]
    for failure in summary["failures"]:
        print(f"{failure['input']}: error: {failure['reason']}", file=sys.stderr)
    if summary.get("failures_truncated"):
        print(f"... and {counts['failed'] - len(summary['failures'])} more failed inputs: all are listed in "
              f"{Path(args.out) / summary['failures_file']}", file=sys.stderr)
    rate = summary["images_per_s"]
    print(f"segmented {counts['done']}/{counts['total']} images ({counts['failed']} failed) with "
          f"{summary['model']}:{summary['version']} into {args.out}" + (f" at {rate:.1f} images/s" if rate else ""))
    return 1 if counts["failed"] else 0


def _add_batch(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("batch", help="segment files offline (no server) into labels/, results.jsonl, summary.json; "
                                     "resumable")
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="image files, folders (walked recursively) or glob patterns; optional with --resume")
    p.add_argument("--model-repo", required=True, help="repository root: <root>/<model>/<version>/")
    p.add_argument("--model", default=None,
                   help="NAME or NAME:VERSION (default: the repository's only model, refused at once when it "
                        "holds several; VERSION by default: the one DEFAULT names, else the newest; with --resume: "
                        "the stored one)")
    p.add_argument("--out", required=True, help="output folder (must be empty unless --resume)")
    p.add_argument("--engine", default="local", choices=("local", "ray"),
                   help="local: one process, pipelined (default); ray: Ray Data actors (pip install 'segsvc[ray]')")
    p.add_argument("--resume", action="store_true", help="continue the unfinished batch in --out")
    # Option flags default to None: with --resume, the ones not given keep the stored values.
    p.add_argument("--color", action="store_true", default=None, help="also write color/<input>.png")
    p.add_argument("--overlay", action="store_true", default=None,
                   help="also write overlay/<input>.png (colours over the image)")
    p.add_argument("--alpha", type=fraction, default=None, help="overlay opacity (default 0.5)")
    p.add_argument("--confidence", action="store_true", default=None,
                   help="also write confidence/<input>.png (uint8 max softmax)")
    p.add_argument("--tile-size", type=tile_size, default=None,
                   help="sliding-window tile side in pixels; 0: off (default off)")
    p.add_argument("--flip-tta", action="store_true", default=None, help="horizontal-flip test-time augmentation")
    p.add_argument("--batch-size", type=positive_int, default=8, help="most images per forward pass (default 8)")
    p.add_argument("--max-batch-pixels", default="auto",
                   help="a forward pass also ends at this many input pixels: auto (65536 on CPU, no limit on "
                        "GPU), 0 for no limit, or an integer")
    p.add_argument("--max-inflight-mb", type=lambda text: text if text == "auto" else positive_int(text),
                   default="auto", metavar="MB|auto",
                   help="memory budget of the forward passes in flight, estimated per image from the model's "
                        "measured bytes per pixel as segsvc serve does: an image over it alone (after tiling, "
                        "with --tile-size) fails with the reason in failures.jsonl and the run goes on; passes "
                        "run at once as far as it holds. auto (the default): 75% of the memory available when the "
                        "run starts (RAM, within a container's limit, at most what ulimit -v leaves; on CUDA the "
                        "GPU's free memory; with --engine ray on CPU, shared by the --actors)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--backend", default=None, choices=BACKENDS,
                   help="what runs the network (default: the manifest's inference.backend, normally torch)")
    p.add_argument("--io-threads", type=non_negative_int, default=0,
                   help="local engine: decode and write threads each (default 0: up to 4)")
    p.add_argument("--torch-threads", type=int, default=0,
                   help="local engine: torch CPU threads, one concurrent forward pass each on CPU (0, the default: "
                        "one per CPU, as segsvc serve); leave the rest of a shared machine's CPUs to others")
    p.add_argument("--actors", type=positive_int, default=1,
                   help="ray engine: model-holding actors (default 1; one GPU each on CUDA)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=_batch)


def _add_jobs(sub: argparse._SubParsersAction) -> None:
    from segsvc.cli_jobs import add_jobs_parser

    add_jobs_parser(sub)


def _add_datasets(sub: argparse._SubParsersAction) -> None:
    from segsvc.cli_datasets import add_datasets_parser

    add_datasets_parser(sub)


def _add_export(sub: argparse._SubParsersAction) -> None:
    from segsvc.cli_export import add_parser  # torch only when it runs

    add_parser(sub)


def _add_health(sub: argparse._SubParsersAction) -> None:
    from segsvc.health import add_health_parser  # grpc only when it runs: a health check stays cheap

    add_health_parser(sub)


_ADDERS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_models, _add_train, _add_eval, _add_curves, _add_data, add_serve_parser, _add_segment, _add_batch, _add_jobs,
    _add_datasets, _add_health, _add_export,
]


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line, exit 2, as the commands' own are (``segsvc serve: error: argument
    --max-queue: must be a whole number >= 1, got 0``): the usage it printed first ran to 40 lines for ``serve``,
    above the line that says what is wrong. Its sub-commands' parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        hint = "" if message.startswith("argument ") else f" (see {self.prog} --help)"
        self.exit(2, f"{self.prog}: error: {message}{hint}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="segsvc", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _ADDERS:
        add(sub)
    return parser


def _os_error_text(exc: OSError) -> str:
    """``PATH: reason`` as the OS words it (``/proc/ev: No such file or directory``), no traceback."""
    if exc.filename is None:
        return str(exc)
    names = f"{exc.filename} -> {exc.filename2}" if exc.filename2 is not None else str(exc.filename)
    return f"{names}: {exc.strerror or type(exc).__name__}"


def _hint(exc: SegsvcError) -> str:
    """What the command line adds to an error from the server (whose words speak gRPC, not flags)."""
    from segsvc.errors import Unauthenticated

    if isinstance(exc, Unauthenticated):
        return " (pass --token-file FILE or set $SEGSVC_AUTH_TOKEN)"
    return ""


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SegsvcError as exc:
        print(f"segsvc: error: {exc}{_hint(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file or folder named on the command line cannot be read or written
        print(f"segsvc: error: {_os_error_text(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("segsvc: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
