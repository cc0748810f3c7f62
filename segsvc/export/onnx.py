"""ONNX export of a model version: ``<repo>/<model>/<version>/model.onnx`` (a re-export: ``model-<sha>.onnx``),
published only once validated; the manifest's ``exports["onnx"]["file"]`` names the current one, and
``exports["onnx"]["previous"]`` the one it superseded, kept for the loaders that read the manifest before.

The exporter is ``torch.onnx.export(..., dynamo=True)`` (``torch.export`` +
onnxscript), chosen over the TorchScript one (``dynamo=False``) because it is the
only one that handles every seed model with dynamic batch, height and width:

- SegNet's ``MaxUnpool2d`` takes the encoder's pre-pool size as ``output_size``;
  the TorchScript tracer turns that size into a tensor and ``max_unpool2d``
  refuses it ("cond must be a bool, but got a Tensor"), and it has no
  ``max_unpool2d`` symbolic anyway. ``torch.export`` keeps the pooling and the
  unpooling as ops over symbolic sizes, and ``segsvc.export.translations``
  writes them as ONNX ``MaxPool`` and ``MaxUnpool``, which ONNX Runtime runs at
  any size (and faster than torchlib's own translations).
- The input-shape check of the models (``H % stride``) becomes a shape guard
  that ``torch.export`` resolves symbolically, instead of a constant baked in
  by tracing.

Dynamic axes are given as names (``batch``, ``height``, ``width``), which the
exporter turns into ``Dim.DYNAMIC`` and writes as the graph's ``dim_param``\\ s.
Nothing is downloaded: the model is built from the artifact's own weights.

The exporter can still specialise a size silently (it "refines" shapes it
cannot keep symbolic, and ``AdaptiveAvgPool2d`` to k > 1 bins becomes an
``AveragePool`` whose kernel is the sample's size / k). So before anything is
written the export is checked: ``onnx.checker``, symbolic input/output axes,
then ONNX Runtime against eager PyTorch on inputs of sizes other than the
sample's (batch > 1, non-square). An export that does not agree is refused:
nothing is written and the manifest is unchanged.

Example:
    >>> result = export_onnx("runs/model_repository/camvid-unet/3")  # doctest: +SKIP
    >>> result.validation.agreement, result.path.name  # doctest: +SKIP
    (1.0, 'model.onnx')
    >>> export_onnx("runs/model_repository/camvid-unet/3").path.name  # doctest: +SKIP
    'model-3f2a9c01d4e7.onnx'
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import warnings
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

import torch
from torch import nn

from segsvc.errors import ArtifactError, ExportError
from segsvc.files import sha256_hex, write_atomic
from segsvc.export import (
    DEFAULT_CHECKS, DEFAULT_OPSET, DEFAULT_TOLERANCE, INPUT_NAME, MIN_AGREEMENT, ONNX_FILE, OUTPUT_NAME,
)
from segsvc.export.compare import Progress, Validation, check_options, one_line, sample_size, validate
from segsvc.models.artifact import WEIGHTS_FILE, Manifest, load_artifact, read_manifest, write_manifest
from segsvc.models.registry import build_model

if TYPE_CHECKING:
    import onnx

DYNAMIC_AXES = {0: "batch", 2: "height", 3: "width"}
EXPORT_LOCK_FILE = ".segsvc-export.lock"  # see version_lock

_ADAPTIVE_POOL = (
    "its pyramid pooling uses AdaptiveAvgPool2d to 2x2, 3x3 and 6x6 bins, which ONNX has no operator for: "
    "the exporter computes the pooling windows (a fixed AveragePool kernel, or gather indices) from the "
    "traced input's size, so the graph is wrong or fails at any other size (dynamic height and width are "
    "impossible)"
)
# Architectures whose export cannot have dynamic height and width, with the reason (found by
# tests/export/test_every_architecture.py, which also checks that each one here does fail):
UNEXPORTABLE: dict[str, str] = {
    "smp/PSPNet": _ADAPTIVE_POOL,
    "smp/UPerNet": _ADAPTIVE_POOL,
}

# Loggers the exporter is noisy on (guard failures it recovers from, "attribute type is ambiguous").
_NOISY_LOGGERS = ("torch._guards", "torch._dynamo", "torch.export", "torch.fx", "torch.onnx", "onnx_ir", "onnxscript")


@dataclass(frozen=True)
class OnnxExport:
    """A published export: the file, its SHA-256 (as in the manifest), its opset and validation."""

    path: Path
    sha256: str
    opset: int
    validation: Validation
    manifest: Manifest


def export_steps(checks: int) -> int:
    """How many times ``export_onnx`` calls its ``progress`` callback (for a progress bar's total)."""
    return 4 + checks


def geometry(model: nn.Module, manifest: Manifest) -> tuple[int, int]:
    """``(stride, min_size)`` the inputs are padded to: the manifest's contract, else the model's own."""
    own = int(getattr(model, "output_stride", 1))
    stride = manifest.inference.stride or own
    if stride % own:
        raise ArtifactError(f"the manifest's inference stride {stride} is not a multiple of the model's {own}")
    return stride, max(manifest.inference.min_input_size or 1, int(getattr(model, "min_input_size", 1)))


def geometry_of(manifest: Manifest) -> tuple[int, int]:
    """``(stride, min_size)`` of a version without loading its weights: its ONNX export's record,
    else its manifest's contract, else the model's own (built, not loaded)."""
    entry = manifest.exports.get("onnx")
    recorded = (entry.get("stride"), entry.get("min_input_size")) if isinstance(entry, dict) else (None, None)
    if all(isinstance(v, int) and v >= 1 for v in recorded):
        return recorded[0], recorded[1]  # type: ignore[return-value]
    return geometry(build_model(manifest.spec), manifest)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter's warnings and logs (it logs failures of strategies it then recovers from)."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.CRITICAL)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def to_onnx(model: nn.Module, in_channels: int, stride: int, min_size: int,
            opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """Export ``model`` (eval mode, CPU) to an ``onnx.ModelProto`` with dynamic batch, height and width.

    Args:
        model: a segsvc model (``[N,C,H,W] -> [N,K,H,W]``).
        in_channels: C.
        stride: H and W of every input are multiples of this.
        min_size: and at least this.
        opset: the ONNX opset of the graph.

    Raises:
        ExportError: the exporter failed, fixed an axis, or could not reach ``opset``.
    """
    import onnx

    from segsvc.export.translations import TRANSLATIONS  # onnxscript, like onnx, only when exporting

    n, h, w = sample_size(stride, min_size)
    sample = torch.randn(n, in_channels, h, w, generator=torch.Generator().manual_seed(0))
    try:
        with _quiet(), torch.no_grad():
            program = torch.onnx.export(
                model.eval(), (sample,), None, dynamo=True, opset_version=opset, verbose=False,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_shapes=(dict(DYNAMIC_AXES),),
                custom_translation_table=TRANSLATIONS,
            )
            proto = program.model_proto
    except Exception as exc:  # the exporter raises many types; all mean "cannot export"
        raise ExportError(f"torch.onnx.export failed: {one_line(exc)}") from None
    reached = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if reached != opset:
        raise ExportError(f"the exporter could not convert the graph to opset {opset} (it is at {reached}); "
                          f"use --opset {DEFAULT_OPSET}")
    for value, fixed in ((proto.graph.input, in_channels), (proto.graph.output, None)):
        dims = [d.dim_param or d.dim_value for d in value[0].type.tensor_type.shape.dim] if len(value) == 1 else []
        static = [i for i in DYNAMIC_AXES if i >= len(dims) or not isinstance(dims[i], str)]
        if len(dims) != 4 or static or (fixed is not None and dims[1] != fixed):
            raise ExportError(f"the exporter fixed the size of {value[0].name if value else '?'} to {dims}: the "
                              "graph would only work at the traced size (batch, height, width must be dynamic)")
    lower_ir_version(proto)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"the exported graph is not valid ONNX: {one_line(exc)}") from None
    return proto


def lower_ir_version(proto: onnx.ModelProto) -> None:
    """Declare the lowest IR version the graph's opsets need (8 for opset 18), not the exporter's own.

    torch 2.14's exporter (onnx 1.23) writes IR version 10, and ONNX Runtime <= 1.16 (the one inside
    Triton 23.x) refuses any file above IR 9 ("Unsupported model IR version: 10, max supported IR
    version: 9") although opset 18 needs only IR 8. What only IR 10 has goes too: the exporter's
    ``metadata_props`` on nodes, graphs, functions, values and tensors (debugging annotations: module
    paths, stack traces, the graph signature), so the file holds nothing its IR version does not know.
    The model's own ``metadata_props`` (``segsvc.*``, IR 3+) stay. The caller runs the checker after.
    """
    ir = needed_ir_version(proto)
    if ir >= proto.ir_version:
        return
    proto.ir_version = ir
    if ir < 10:
        for graph in _graphs(proto):
            for item in (graph, *graph.node, *graph.input, *graph.output, *graph.value_info, *graph.initializer):
                del item.metadata_props[:]
        for function in proto.functions:
            del function.metadata_props[:]
            for node in function.node:
                del node.metadata_props[:]
            for value in function.value_info:
                del value.metadata_props[:]


def needed_ir_version(proto: onnx.ModelProto) -> int:
    """The lowest IR version the graph's opsets (and model-local functions, IR 8+) need."""
    import onnx

    ir = onnx.helper.find_min_ir_version_for(list(proto.opset_import), ignore_unknown=True)
    return max(ir, 8) if proto.functions else ir  # model-local functions came with IR 8


def _graphs(proto: onnx.ModelProto) -> Iterator[onnx.GraphProto]:
    """The main graph and every subgraph (If/Loop/Scan bodies), in it and in local functions."""
    import onnx

    def nested(nodes: Iterable[onnx.NodeProto]) -> Iterator[onnx.GraphProto]:
        for node in nodes:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    yield from walk(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        yield from walk(g)

    def walk(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
        yield graph
        yield from nested(graph.node)

    yield from walk(proto.graph)
    for function in proto.functions:
        yield from nested(function.node)


def _metadata(manifest: Manifest, stride: int, min_size: int) -> dict[str, str]:
    """``metadata_props`` of the graph, so the file alone says how to feed it."""
    return {
        "segsvc.model": manifest.name, "segsvc.version": str(manifest.version),
        "segsvc.weights_sha256": manifest.weights_sha256, "segsvc.arch": manifest.spec.arch,
        "segsvc.input": json.dumps(manifest.input.to_dict()), "segsvc.stride": str(stride),
        "segsvc.min_input_size": str(min_size), "segsvc.class_names": json.dumps(list(manifest.class_names)),
    }


def _plain_onnx_name(name: object) -> str | None:
    """``name`` when it is a plain ``.onnx`` file name (in the version directory, no path), else None."""
    if not isinstance(name, str) or Path(name).name != name or not name.endswith(".onnx"):
        return None
    return name


def _recorded_file(manifest: Manifest) -> str | None:
    """The ONNX file the manifest records, when it is a plain ``.onnx`` name in the version directory."""
    entry = manifest.exports.get("onnx")
    return _plain_onnx_name(entry.get("file")) if isinstance(entry, dict) else None


def _previous_record(manifest: Manifest) -> dict[str, str] | None:
    """``exports["onnx"]["previous"]``: the file the recorded export superseded (a plain ``.onnx`` name) and
    its SHA-256; None when there is none (a first export, or a manifest written before segsvc kept one)."""
    entry = manifest.exports.get("onnx")
    previous = entry.get("previous") if isinstance(entry, dict) else None
    if not isinstance(previous, dict) or _plain_onnx_name(previous.get("file")) is None:
        return None
    return {"file": str(previous["file"]), "sha256": str(previous.get("sha256", ""))}


def _named_files(manifest: Manifest) -> dict[str, str]:
    """The ONNX files the manifest names (the recorded one and the previous one), with the SHA-256 of each."""
    named = {previous["file"]: previous["sha256"]} if (previous := _previous_record(manifest)) else {}
    if (file := _recorded_file(manifest)) is not None:
        named[file] = str(manifest.exports["onnx"].get("sha256", ""))
    return named


def export_file_name(sha256: str, manifest: Manifest) -> str:
    """Where a new export with ``sha256`` is written: ``model.onnx`` when none is recorded, else a name
    derived from its hash (``model-<12 hex>.onnx``), so the recorded file is never overwritten.

    Identical bytes under a hash-derived name get that name again (replacing the file atomically with the
    same bytes keeps it matching, for the manifest and for one read before it); a recorded ``model.onnx`` is
    never reused, so identical bytes move to ``model-<12 hex>.onnx``.
    """
    entry = manifest.exports.get("onnx")
    if not isinstance(entry, dict) or not entry.get("file"):
        return ONNX_FILE
    name = f"model-{sha256[:12]}.onnx"
    named = _named_files(manifest)
    if name in named and named[name] != sha256:  # 48-bit prefix collision
        name = f"model-{sha256}.onnx"
    return name


def _superseding(current: Manifest, name: str) -> tuple[dict[str, str] | None, str | None]:
    """``(the new entry's "previous", the file to remove once it is published)`` for an export to ``name``.

    A re-export to a new name supersedes the recorded file: that one becomes "previous" and stays on disk,
    since a loader may have read the manifest naming it (and its SHA-256) and not yet opened it; the file
    the recorded export had superseded is named by no manifest written since, and goes. An export to the
    recorded name (the same bytes) supersedes nothing: "previous" stays as it was. A file the new export
    is written to, or still names, is never removed.
    """
    previous, file = _previous_record(current), _recorded_file(current)
    if file is None or file == name:
        return previous, None
    stale = previous["file"] if previous is not None and previous["file"] not in (name, file) else None
    return {"file": file, "sha256": _named_files(current)[file]}, stale


def export_onnx(version_dir: str | os.PathLike[str], *, opset: int = DEFAULT_OPSET, checks: int = DEFAULT_CHECKS,
                tolerance: float = DEFAULT_TOLERANCE, min_agreement: float = MIN_AGREEMENT,
                progress: Progress | None = None) -> OnnxExport:
    """Export a version to ONNX beside its weights, validate it, and record it in the manifest.

    Writes the file (temporary file + rename), then rewrites the manifest
    (likewise) with ``exports["onnx"] = {"file", "sha256", "opset", "torch",
    "validation", "previous", ...}``. A first export is ``model.onnx``; a
    re-export never overwrites the file the manifest records but writes
    ``model-<12 hex of its SHA-256>.onnx`` and switches the manifest to it, so at
    every instant the manifest names a file that matches its SHA-256 (a crash
    leaves at most an unrecorded file behind). The file it superseded is kept,
    recorded as ``previous`` (``{"file", "sha256"}``): a loader that read the
    manifest just before the switch still opens the file it names, with the
    SHA-256 it read. The re-export after removes it (``_superseding``), so a
    version keeps at most two exports. A refused or failed export removes
    only what it wrote: an earlier export and the manifest stay as they were.
    Exports of one version running at once publish one after the other
    (``version_lock``, from reading the manifest to writing it): the later one is
    a re-export of the earlier, so the manifest always names the file it hashed.
    Readers take the file name from the manifest, never ``ONNX_FILE``.

    Args:
        version_dir: ``<repo>/<model>/<version>``.
        opset: ONNX opset of the graph.
        checks: validation inputs (see ``check_sizes``).
        tolerance: allowed max |logit difference| relative to max(1, max |logit|).
        min_agreement: share of pixels whose label must agree (0.999: 99.9%).
        progress: called after each step (``export_steps(checks)`` calls in all).

    Raises:
        InvalidArgument: ``checks``, ``tolerance`` or ``min_agreement`` out of range (``check_options``).
        ExportError: the architecture cannot be exported, or the export does not reproduce the model.
        ArtifactError: the version does not load, or its weights changed during the export.
    """
    import onnx

    check_options(checks, tolerance, min_agreement)  # before the minutes an export takes
    step = progress or (lambda _: None)
    version_dir = Path(version_dir)
    model, manifest = load_artifact(version_dir)
    label = f"{manifest.name}:{manifest.version} ({manifest.spec.arch})"
    if manifest.spec.arch in UNEXPORTABLE:
        raise ExportError(f"{label} cannot be exported to ONNX: {UNEXPORTABLE[manifest.spec.arch]}")
    stride, min_size = geometry(model, manifest)
    step("loaded")
    try:
        proto = to_onnx(model, manifest.spec.in_channels, stride, min_size, opset)
    except ExportError as exc:
        raise ExportError(f"{label} cannot be exported to ONNX: {exc}") from None
    onnx.helper.set_model_props(proto, _metadata(manifest, stride, min_size))
    data = proto.SerializeToString()
    step("exported")
    result = validate(model, data, manifest.spec.in_channels, stride, min_size, checks, tolerance,
                      min_agreement, progress=step)
    if not result.passed:
        raise ExportError(f"{label}: the ONNX export does not reproduce the model, so it was not written: "
                          f"{result.describe()}")
    step("validated")
    with version_lock(version_dir):  # another export of this version publishes before or after, never between
        current = read_manifest(version_dir)  # re-read: keep any change made meanwhile, except to the weights
        if current.weights_sha256 != manifest.weights_sha256:
            raise ArtifactError(f"{label}: its weights changed during the export; export again")
        weights_mode = (version_dir / WEIGHTS_FILE).stat().st_mode & 0o777
        sha = hashlib.sha256(data).hexdigest()
        name = export_file_name(sha, current)
        previous, stale = _superseding(current, name)
        kept = _named_files(current)  # a failed publish leaves these: what named them still matches
        path = version_dir / name
        write_atomic(path, data, weights_mode)
        entry = {
            "file": name, "sha256": sha, "opset": opset, "torch": torch.__version__, "onnx": onnx.__version__,
            "exporter": "torch.onnx.export(dynamo=True)", "input": INPUT_NAME, "output": OUTPUT_NAME,
            "dynamic_axes": {str(k): v for k, v in DYNAMIC_AXES.items()}, "stride": stride,
            "min_input_size": min_size, "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "validation": result.to_dict(),
            **({"previous": previous} if previous is not None else {}),
        }
        updated = replace(current, exports={**current.exports, "onnx": entry})
        try:
            write_manifest(version_dir, updated)
        except BaseException:
            if name not in kept:  # the new file only: the recorded ones still match what named them
                path.unlink(missing_ok=True)  # a file the manifest does not vouch for must not look published
            raise
        if stale is not None:
            with contextlib.suppress(OSError):  # the export is published; a leftover file is only clutter
                (version_dir / stale).unlink()
    step("written")
    return OnnxExport(path, sha, opset, result, updated)


@contextlib.contextmanager
def version_lock(version_dir: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the export lock of a version: ``flock`` on ``<version>/.segsvc-export.lock``.

    ``export_onnx`` holds it from reading the manifest through writing it (and removing the file two
    exports back). Without it two exports of one version (two users, a retried CI job) could both see
    no export, both write ``model.onnx`` and write their manifests in either order: the manifest would
    then record the SHA-256 of the file the other one wrote, and every reader would refuse the version.
    With it the second publishes after the first, as a re-export of it.

    The lock file is removed before the lock is let go, so a version folder keeps only its own files
    (a kill -9 leaves it behind; the next export takes it over and removes it). A waiter that was
    queued on a removed file finds its name gone, or naming another file, and locks again; so at any
    time at most one holder has the file the name leads to.
    """
    path = Path(version_dir) / EXPORT_LOCK_FILE
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        except PermissionError:  # another user's lock file (0644 under umask 022): flock needs no write access
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            held = os.fstat(fd)
            try:
                named = os.stat(path, follow_symlinks=False)
            except FileNotFoundError:
                named = None
        except BaseException:
            os.close(fd)
            raise
        if named is not None and (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino):
            break
        os.close(fd)  # the holder before us removed it: lock the file the name leads to now
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)  # lets the lock go


def published_onnx(version_dir: str | os.PathLike[str], manifest: Manifest | None = None) -> Path | None:
    """The version's recorded ONNX file (the manifest's ``file``), checked against its SHA-256; None when not exported.

    Raises:
        ArtifactError: the file is recorded but missing, or its SHA-256 differs from the manifest's.
    """
    version_dir = Path(version_dir)
    manifest = manifest or read_manifest(version_dir)
    entry = manifest.exports.get("onnx")
    if not isinstance(entry, dict) or not entry.get("file"):
        return None
    name = str(entry["file"])
    path = version_dir / name
    hint = f"run `segsvc export {manifest.name}:{manifest.version} --format onnx` to export it again"
    if Path(name).name != name or not path.is_file():
        raise ArtifactError(f"{manifest.name}:{manifest.version}: the manifest records the ONNX export {name!r}, "
                            f"which is not a file in the version directory; {hint}")
    if sha256_hex(path) != entry.get("sha256"):
        raise ArtifactError(f"{manifest.name}:{manifest.version}: {name} does not match the SHA-256 its manifest "
                            f"records (changed after the export?); {hint}")
    return path
