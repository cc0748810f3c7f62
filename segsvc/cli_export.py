"""``segsvc export MODEL[:V] --repo R --format onnx|triton``: a model version for ONNX Runtime or Triton.

``onnx`` writes ``<repo>/<model>/<version>/model.onnx`` (a re-export:
``model-<sha>.onnx``; the file it supersedes is kept until the next re-export,
for a server that read the manifest just before) and records it in the
version's manifest, but only once ONNX Runtime reproduces eager PyTorch on
``--checks`` random inputs (the max |Δlogit| and the label agreement are
printed; an export that disagrees is refused and nothing is written).
``triton`` writes a Triton model repository, ``--out`` (default
``<repo>-triton``, beside the repository), from that export, exporting first
when the version has none, or anew (replacing it, as ``onnx`` would) when
``--opset``, ``--checks``, ``--tolerance`` or ``--min-agreement`` is given and
differs from what the recorded export was made with, or its file declares a
higher ONNX IR version than its opset needs; the options not given then keep
the recorded export's values (else the defaults). Without ``:V`` the
version is the model's default (its ``DEFAULT`` pointer, else the newest).
torch is imported only when the command runs, so ``segsvc --help`` stays fast.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from segsvc.errors import InvalidArgument
from segsvc.export import DEFAULT_CHECKS, DEFAULT_MAX_BATCH_SIZE, DEFAULT_OPSET, DEFAULT_TOLERANCE, MIN_AGREEMENT
from segsvc.progress import progress_bar


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``segsvc export``."""
    p = sub.add_parser("export", help="export a model version to ONNX (validated against PyTorch) or to a "
                                      "Triton model repository")
    p.add_argument("ref", metavar="MODEL[:V]", help="model name, optionally with a version (default: the model's "
                                                    "DEFAULT pointer, else its newest version)")
    p.add_argument("--repo", required=True, help="model repository root (<root>/<model>/<version>/)")
    p.add_argument("--format", choices=("onnx", "triton"), default="onnx",
                   help="onnx: model.onnx (a re-export: model-<sha>.onnx) beside the weights, recorded in the "
                        "manifest (default); triton: a Triton model repository at --out")
    p.add_argument("--out", default=None, help="triton: the Triton model repository to write <model>/ into "
                                               "(default: <repo>-triton, beside --repo)")
    p.add_argument("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH_SIZE,
                   help=f"triton: max_batch_size of config.pbtxt (default {DEFAULT_MAX_BATCH_SIZE})")
    p.add_argument("--opset", type=int, default=None,
                   help=f"ONNX opset (default {DEFAULT_OPSET}). triton: the version's recorded export is used when "
                        "this and --checks, --tolerance, --min-agreement are not given or match what it was made "
                        "with; otherwise the version is exported anew with them (those not given: the recorded "
                        "export's values, else the defaults), replacing the recorded export as --format onnx "
                        "would")
    p.add_argument("--checks", type=int, default=None,
                   help=f"random inputs ONNX Runtime and PyTorch are compared on (default {DEFAULT_CHECKS}; the "
                        "first is non-square, the second square)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="largest |logit difference| allowed, relative to max(1, max |logit|) "
                        f"(default {DEFAULT_TOLERANCE:g})")
    p.add_argument("--min-agreement", type=float, default=None,
                   help=f"share of pixels whose label must agree (default {MIN_AGREEMENT:g})")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=run)


def _check_args(args: argparse.Namespace) -> None:
    if args.checks is not None and args.checks < 1:
        raise InvalidArgument(f"--checks must be at least 1, got {args.checks}")
    if args.tolerance is not None and not 0 < args.tolerance < math.inf:  # inf: no check at all, and not JSON
        raise InvalidArgument(f"--tolerance must be a positive finite number, got {args.tolerance}")
    if args.min_agreement is not None and not 0 < args.min_agreement <= 1:
        raise InvalidArgument(f"--min-agreement must be in (0, 1], got {args.min_agreement}")
    if args.max_batch_size < 1:
        raise InvalidArgument(f"--max-batch-size must be at least 1, got {args.max_batch_size}")
    if args.out is not None and args.format != "triton":
        raise InvalidArgument("--out is for --format triton; the ONNX export is written beside the weights")


def _print_validation(validation: Any) -> None:
    keys = ("max_abs_diff", "max_abs_logit", "agreement", "pixels")
    if not isinstance(validation, dict) or not all(isinstance(validation.get(k), (int, float)) for k in keys):
        print("  validation: not recorded in the manifest")
        return
    sizes = ", ".join("x".join(str(d) for d in s) for s in validation.get("sizes", []))
    print(f"  validation ({validation.get('runtime', 'onnxruntime')} vs eager PyTorch, "
          f"{validation.get('checks')} inputs N x H x W: {sizes}):")
    print(f"    max |Δlogit| {validation['max_abs_diff']:.3g} (max |logit| {validation['max_abs_logit']:.3g}), "
          f"labels agree on {validation['agreement']:.4%} of {validation['pixels']} pixels")


def run(args: argparse.Namespace) -> int:
    """Run ``segsvc export``; returns the exit status (errors raise ``SegsvcError``)."""
    from segsvc.export.onnx import export_onnx, export_steps
    from segsvc.export.triton import check_out, default_out, export_options, export_triton
    from segsvc.inference.repository import ModelRepository, check_manifest
    from segsvc.model_names import parse_model_ref

    _check_args(args)
    name, version = parse_model_ref(args.ref)
    repo = ModelRepository.existing(args.repo)  # as `models list` says it, not "no model named ..."
    version_dir = repo.version_dir(name, version)
    version = int(version_dir.name)
    manifest = repo.read_manifest(name, version)
    check_manifest(name, version, manifest)
    out = args.out if args.out is not None else default_out(args.repo)
    if args.format == "triton":
        check_out(out, args.repo)  # a Triton model folder inside a segsvc model's folder confuses both servers
        Path(out).mkdir(parents=True, exist_ok=True)  # an impossible --out fails now, not after the export
    # Options not given are None: --format onnx takes the defaults, --format triton reuses the recorded export
    # unless one that was given differs from it (and a re-export keeps the recorded values of those not given).
    given = {"opset": args.opset, "checks": args.checks, "tolerance": args.tolerance,
             "min_agreement": args.min_agreement}
    # A Triton re-export validates with the recorded number of checks unless --checks is given.
    checks = args.checks if args.format == "onnx" else export_options(manifest, checks=args.checks).get("checks")
    bar = progress_bar(args.progress, total=export_steps(checks or DEFAULT_CHECKS),
                       desc=f"exporting {name}:{version}", unit="step", leave=False)

    def progress(step: str) -> None:
        bar.set_postfix_str(step, refresh=False)
        bar.update()

    try:
        if args.format == "onnx":
            result = export_onnx(version_dir, **{k: v for k, v in given.items() if v is not None}, progress=progress)
        else:
            triton = export_triton(version_dir, out, max_batch_size=args.max_batch_size, **given, progress=progress)
    finally:
        bar.close()
    if args.format == "onnx":
        print(f"exported {name}:{version} ({result.manifest.spec.arch}) to ONNX opset {result.opset}")
        _print_validation(result.validation.to_dict())
        print(f"  wrote {result.path} (sha256 {result.sha256})")
        print(f"  recorded it in {version_dir / 'manifest.json'} (exports.onnx)")
        return 0
    entry = repo.read_manifest(name, version).exports["onnx"]
    if not triton.exported:
        how = "used the recorded export, SHA-256 verified"
    elif triton.replaced is None:
        how = f"exported it now: {triton.reason}"
    else:
        how = f"exported it anew, replacing the recorded export {triton.replaced}: {triton.reason}"
    print(f"wrote a Triton model repository for {name}:{version} from {version_dir / entry['file']} ({how})")
    _print_validation(entry.get("validation"))
    for path in (triton.config, triton.labels, triton.onnx):
        print(f"  wrote {path}")
    print(f"  run: tritonserver --model-repository={triton.model_dir.parent}")
    return 0

