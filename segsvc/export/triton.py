"""A Triton Inference Server model repository from a validated ONNX export.

Layout written under ``out`` (what ``tritonserver --model-repository=out`` reads):

```
out/<model>/config.pbtxt      platform "onnxruntime_onnx", max_batch_size, dynamic_batching,
                              input "input" TYPE_FP32 [C, -1, -1], output "logits" TYPE_FP32 [K, -1, -1]
out/<model>/labels.txt        class names, one per line (the output's label_filename)
out/<model>/segsvc.json       how to feed it: normalisation, padding, scale, source version and hashes
out/<model>/1/model.onnx      the export validated by ``segsvc export --format onnx``
```

Triton holds one version of the model (``1``): config.pbtxt describes one class
list, and two segsvc versions may differ in theirs. The segsvc version it came
from is named in config.pbtxt's header and in ``segsvc.json``. The network
takes normalised float32 NCHW inputs padded at the bottom/right to the stride,
with zeros or the mirrored image as the manifest's ``inference.tile_padding``
says (see ``segsvc.json``); a Triton client must crop the logits back.

The model directory is built under a temporary name and swapped in with two
renames, so a polling tritonserver never sees a half-written one (between the
renames the model is briefly absent). The temporary folders (the new directory,
and the old one on its way out) are kept out of ``out`` itself: tritonserver
takes every folder of its repository for a model, dot-folders included (its
listing drops only ``.`` and ``..``), and fails on one whose name is not its
config's, which at start-up stops the server. They go in
``<parent of out>/.<out's name>.segsvc-staging/`` (``tmp-<model>-XXXXXXXX``,
``old-<model>-XXXXXXXX``), beside ``out`` on its filesystem so the renames stay
atomic; only where that folder cannot be made or lies on another filesystem
(``out`` a mount point) do they go inside ``out`` as ``.tmp-<model>-XXXXXXXX``
and ``.old-<model>-XXXXXXXX``, for the length of an export. Exports into one
``out`` run one at a time (``flock`` on the folder ``out``), and each first
removes the temporaries of its model that a killed export left in either place:
only folders (never a symlink or a file) whose names match those patterns for
that model and that ``out``. Where ``flock`` is not supported (some network
filesystems) nothing is removed, since a live export's folders would look the same.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from segsvc.errors import AlreadyExists, ArtifactError
from segsvc.export import (
    DEFAULT_CHECKS, DEFAULT_MAX_BATCH_SIZE, DEFAULT_OPSET, DEFAULT_TOLERANCE, INPUT_NAME, MIN_AGREEMENT, ONNX_FILE,
    OUTPUT_NAME,
)
from segsvc.export.compare import Progress
from segsvc.export.onnx import export_onnx, file_sha256, geometry_of, published_onnx
from segsvc.models.artifact import Manifest, read_manifest

CONFIG_FILE = "config.pbtxt"
LABELS_FILE = "labels.txt"
INFO_FILE = "segsvc.json"
TRITON_VERSION = "1"
PLATFORM = "onnxruntime_onnx"
STAGING_SUFFIX = ".segsvc-staging"  # <parent>/.<out name>.segsvc-staging/: where the model directory is built

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TritonExport:
    """What ``export_triton`` wrote.

    Args:
        model_dir: ``out/<model>``.
        config: ``out/<model>/config.pbtxt``.
        onnx: ``out/<model>/1/model.onnx``.
        labels: ``out/<model>/labels.txt``.
        exported: whether the ONNX export was made now (False: the version's recorded one was used).
        reason: why it was made now (the version had none, or it was made with other options); None if not.
        replaced: the recorded export's file that the new one replaced; None when none was replaced.
    """

    model_dir: Path
    config: Path
    onnx: Path
    labels: Path
    exported: bool
    reason: str | None = None
    replaced: str | None = None


def default_out(repo: str | os.PathLike[str]) -> Path:
    """``<repo>-triton``: beside the segsvc repository, never inside it (its scan would see a model)."""
    repo = Path(repo).resolve()
    return repo.parent / f"{repo.name or 'model_repository'}-triton"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# How inputs are padded to the stride, by the manifest's ``inference.tile_padding`` (``contract.pad_to_multiple``):
# (segsvc.json's ``padding.where``, config.pbtxt's header phrase).
PADDING_WHERE: dict[str, tuple[str, str]] = {
    "zero": ("bottom/right, zeros", "padded at the bottom/right with zeros (the mean colour once normalised)"),
    "reflect": ("bottom/right, mirrored image (numpy 'reflect': the edge row/column not repeated)",
                "padded at the bottom/right with the mirrored image (numpy 'reflect', edge not repeated)"),
}


def padding_where(manifest: Manifest) -> tuple[str, str]:
    """``(segsvc.json's padding.where, config.pbtxt's phrase)`` for the manifest's ``tile_padding``."""
    mode = manifest.inference.tile_padding
    if mode not in PADDING_WHERE:
        raise ArtifactError(f"{manifest.name}:{manifest.version}: unknown inference.tile_padding {mode!r}")
    return PADDING_WHERE[mode]


def config_pbtxt(manifest: Manifest, max_batch_size: int, stride: int, min_size: int) -> str:
    """The ``config.pbtxt`` text (protobuf text format of Triton's ``ModelConfig``).

    Args:
        manifest: the version's manifest (name, channels, classes).
        max_batch_size: Triton's batch limit (> 0: the batch axis is implicit in ``dims``).
        stride: the padding multiple (stated in the header comment, with the padding the manifest's
            ``inference.tile_padding`` names: zeros or the mirrored image).
        min_size: the minimum padded size (likewise).
    """
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
    inp = manifest.input
    header = [
        f"segsvc export of {manifest.name} version {manifest.version} ({manifest.spec.arch}), "
        f"weights sha256 {manifest.weights_sha256 or '-'}",
        f"input: float32 NCHW, (pixel / 255 - mean) / std with mean {list(inp.mean)} std {list(inp.std)},",
        f"{padding_where(manifest)[1]} to a multiple of {stride}"
        + (f" and at least {min_size} pixels" if min_size > stride else "")
        + f"; crop the logits back (see {INFO_FILE}).",
    ]
    lines = [f"# {_one_line(h)}" for h in header]
    lines += [
        f'name: "{manifest.name}"',
        f'platform: "{PLATFORM}"',
        f"max_batch_size: {int(max_batch_size)}",
        "input [",
        "  {",
        f'    name: "{INPUT_NAME}"',
        "    data_type: TYPE_FP32",
        f"    dims: [ {manifest.spec.in_channels}, -1, -1 ]",
        "  }",
        "]",
        "output [",
        "  {",
        f'    name: "{OUTPUT_NAME}"',
        "    data_type: TYPE_FP32",
        f"    dims: [ {manifest.spec.num_classes}, -1, -1 ]",
        f'    label_filename: "{LABELS_FILE}"',
        "  }",
        "]",
        "dynamic_batching { }",
    ]
    return "\n".join(lines) + "\n"


def _info(manifest: Manifest, entry: dict[str, Any], stride: int, min_size: int) -> dict[str, Any]:
    return {
        "source": {"model": manifest.name, "version": manifest.version, "arch": manifest.spec.arch,
                   "weights_sha256": manifest.weights_sha256},
        "onnx": {k: entry.get(k) for k in ("file", "sha256", "opset", "torch", "validation")},
        "input": {**manifest.input.to_dict(), "layout": "NCHW", "dtype": "float32",
                  "normalisation": "(pixel / 255 - mean) / std"},
        "padding": {"stride": stride, "min_input_size": min_size, "where": padding_where(manifest)[0],
                    "then": "crop the logits back to the (scaled) image size"},
        "inference": manifest.inference.to_dict(),
        "class_names": list(manifest.class_names),
        "palette": [list(c) for c in manifest.palette],
        "ignore_index": manifest.ignore_index,
    }


def _write_model_dir(tmp: Path, manifest: Manifest, onnx_path: Path, sha256: str, max_batch_size: int) -> None:
    stride, min_size = geometry_of(manifest)
    (tmp / CONFIG_FILE).write_text(config_pbtxt(manifest, max_batch_size, stride, min_size))
    (tmp / LABELS_FILE).write_text("".join(_one_line(n) + "\n" for n in manifest.class_names))
    (tmp / INFO_FILE).write_text(json.dumps(_info(manifest, dict(manifest.exports["onnx"]), stride, min_size),
                                            indent=2) + "\n")
    version = tmp / TRITON_VERSION
    version.mkdir()
    shutil.copyfile(onnx_path, version / ONNX_FILE)
    # As readable as the config beside it (a new file's mode: 0644 under umask 022), not as the weights: a
    # tritonserver running as another user that can read config.pbtxt must be able to load the model too.
    (version / ONNX_FILE).chmod((tmp / CONFIG_FILE).stat().st_mode & 0o777)
    if file_sha256(version / ONNX_FILE) != sha256:
        raise ArtifactError(f"{onnx_path} changed while it was copied; export again")
    tmp.chmod(0o755)  # mkdtemp made it 0700


def _swap_in(tmp: Path, final: Path, scratch: Path, prefix: str) -> None:
    """Replace ``final`` (a model directory written earlier, or nothing) with ``tmp``; the old one passes
    through ``scratch/<prefix>old-<model>-XXXXXXXX`` on its way out."""
    if not final.exists() and not final.is_symlink():
        os.rename(tmp, final)
        return
    if final.is_symlink() or not (final / CONFIG_FILE).is_file():
        raise AlreadyExists(f"{final} exists and is not a Triton model directory (no {CONFIG_FILE}); "
                            "move it away or choose another --out")
    old = Path(tempfile.mkdtemp(prefix=f"{prefix}old-{final.name}-", dir=scratch))
    os.rename(final, old / final.name)
    try:
        os.rename(tmp, final)
    except BaseException:
        os.rename(old / final.name, final)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _device(path: Path) -> int:
    return os.stat(path).st_dev


def _staging(out: Path) -> Path | None:
    """``<parent>/.<out's name>.segsvc-staging``, made if missing, when it is a folder (not a symlink) on
    ``out``'s filesystem; None when there is no such place (``out`` a mount point or ``/``, a parent that
    cannot be written)."""
    real = out.resolve()
    if real.parent == real:
        return None
    staging = real.parent / f".{real.name}{STAGING_SUFFIX}"
    made = False
    try:
        try:
            staging.mkdir()
            made = True
        except FileExistsError:
            pass
        if stat.S_ISDIR(os.lstat(staging).st_mode) and _device(staging) == _device(real):
            return staging
    except OSError:
        pass
    if made:
        with contextlib.suppress(OSError):
            staging.rmdir()
    return None


def _remove_stale(folder: Path, model: str, prefix: str) -> None:
    """Remove the folders ``<prefix>tmp-<model>-XXXXXXXX`` and ``<prefix>old-<model>-XXXXXXXX`` (``mkdtemp``'s
    8 characters) in ``folder``: what an export of ``model`` killed mid-way left. Symlinks and files of those
    names are left alone (segsvc never makes them), as is every other name. Call it with the lock held."""
    pattern = re.compile(re.escape(prefix) + r"(?:tmp|old)-" + re.escape(model) + r"-[a-z0-9_]{8}")
    try:
        entries = [e for e in os.scandir(folder) if pattern.fullmatch(e.name)]
    except OSError:
        return
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)  # refuses a symlink, and follows none below it
                log.info("removed %s, left by an export that did not finish", entry.path)
        except OSError as exc:
            log.warning("cannot remove %s, left by an export that did not finish: %s", entry.path, exc)


@contextlib.contextmanager
def _repository_lock(out: Path) -> Iterator[bool]:
    """Hold ``flock`` on the folder ``out`` (a lock file would sit in the Triton repository); yields whether
    it is held (False where the filesystem does not support it)."""
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            locked = True
        except OSError as exc:
            log.warning("cannot lock %s (%s): exports into it at the same time are not kept apart, and what "
                        "killed exports left there is not removed", out, exc)
            locked = False
        yield locked
    finally:
        os.close(fd)


_VALIDATION_OPTIONS = (("checks", "checks"), ("tolerance", "tolerance"), ("min_agreement", "min agreement"))


def why_export(manifest: Manifest, opset: int | None = None, checks: int | None = None,
               tolerance: float | None = None, min_agreement: float | None = None) -> str | None:
    """Why ``export_triton`` must make a new ONNX export rather than use the recorded one (None: use it).

    The recorded export is used when the options were not given (None) or equal what it recorded: its
    ``opset`` and its validation's ``checks``, ``tolerance`` and ``min_agreement``. An option that was
    given and differs, or that the export did not record, means a new export.
    """
    entry = manifest.exports.get("onnx")
    if not isinstance(entry, dict) or not entry.get("file"):
        return "the version had no ONNX export"
    validation = entry.get("validation")
    validation = validation if isinstance(validation, dict) else {}
    differ = []
    if opset is not None and entry.get("opset") != opset:
        differ.append(f"opset {entry.get('opset', '(not recorded)')}, not {opset}")
    for (key, label), asked in zip(_VALIDATION_OPTIONS, (checks, tolerance, min_agreement)):
        if asked is not None and validation.get(key) != asked:
            differ.append(f"{label} {validation.get(key, '(not recorded)')}, not {asked:g}")
    return f"the recorded export was made with {', '.join(differ)}" if differ else None


def export_triton(version_dir: str | os.PathLike[str], out: str | os.PathLike[str], *,
                  max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, opset: int | None = None,
                  checks: int | None = None, tolerance: float | None = None,
                  min_agreement: float | None = None, progress: Progress | None = None) -> TritonExport:
    """Write ``out/<model>/`` for Triton from a version's validated ONNX export (exporting it first if needed).

    The version's recorded export is used (its SHA-256 verified) unless it has none, or ``opset``,
    ``checks``, ``tolerance`` or ``min_agreement`` was given and differs from what it recorded
    (``why_export``): then the version is exported anew with those options (the defaults for the ones
    not given), replacing the recorded export exactly as ``export_onnx`` does.

    Args:
        version_dir: ``<repo>/<model>/<version>``.
        out: the Triton model repository (created if missing); ``out/<model>`` is replaced.
        max_batch_size: Triton's ``max_batch_size``.
        opset: the ONNX opset (None: the recorded export's, else ``DEFAULT_OPSET``).
        checks, tolerance, min_agreement: the validation (None: the recorded export's, else the defaults).
        progress: ``export_onnx``'s, when it runs.

    Raises:
        ArtifactError: the version's recorded export does not match its SHA-256.
        ExportError: the version has to be exported and cannot be.
        AlreadyExists: ``out/<model>`` exists and is not a Triton model directory.
    """
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
    version_dir = Path(version_dir)
    manifest = read_manifest(version_dir)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with _repository_lock(out) as locked:
        staging = _staging(out)
        if locked:  # no other export into out runs now: any temporary of this model is a killed one's
            _remove_stale(out, manifest.name, ".")
            if staging is not None:
                _remove_stale(staging, manifest.name, "")
        reason = why_export(manifest, opset, checks, tolerance, min_agreement)
        replaced = None
        if reason is None:
            onnx_path = published_onnx(version_dir, manifest)
            assert onnx_path is not None  # why_export found a recorded export
        else:
            entry = manifest.exports.get("onnx")
            replaced = str(entry["file"]) if isinstance(entry, dict) and entry.get("file") else None
            result = export_onnx(version_dir, opset=DEFAULT_OPSET if opset is None else opset,
                                 checks=DEFAULT_CHECKS if checks is None else checks,
                                 tolerance=DEFAULT_TOLERANCE if tolerance is None else tolerance,
                                 min_agreement=MIN_AGREEMENT if min_agreement is None else min_agreement,
                                 progress=progress)
            onnx_path, manifest = result.path, result.manifest
        scratch, prefix = (staging, "") if staging is not None else (out, ".")
        tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}tmp-{manifest.name}-", dir=scratch))
        final = out / manifest.name
        try:
            _write_model_dir(tmp, manifest, onnx_path, str(manifest.exports["onnx"]["sha256"]), max_batch_size)
            _swap_in(tmp, final, scratch, prefix)
        except BaseException:
            with contextlib.suppress(OSError):
                shutil.rmtree(tmp)
            raise
        finally:
            if staging is not None and locked:  # empty unless a removal failed
                with contextlib.suppress(OSError):
                    staging.rmdir()
    return TritonExport(final, final / CONFIG_FILE, final / TRITON_VERSION / ONNX_FILE, final / LABELS_FILE,
                        reason is not None, reason, replaced)
