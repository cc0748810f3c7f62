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
atomic. That folder is made only when a model directory is to be built, removed
after, and used only when it is a folder of the exporting user that no one else
can write into. Where it cannot be made or used, lies on another filesystem
(``out`` a mount point), or a rename from it into ``out`` fails with EXDEV
(``out`` a bind mount of a folder on the same filesystem), the temporaries go
inside ``out`` as ``.tmp-<model>-XXXXXXXX`` and ``.old-<model>-XXXXXXXX``, for
the length of an export. Exports into one ``out`` run one at a time (``flock``
on the folder ``out``; the manifest is read only once it is held), and each
first removes the temporaries of its model that a killed export left in either
place: only folders (never a symlink or a file) whose names match those patterns
for that model and that ``out``. Where ``flock`` fails (some network
filesystems) nothing is removed, since a live export's folders would look the
same. Where it succeeds without excluding other hosts (on NFS a ``flock`` may
be local to each client), exports into one ``out`` from two hosts at once are
not kept apart, and one may remove the other's temporaries mid-export: export
into a shared ``out`` from one host at a time.
"""

from __future__ import annotations

import contextlib
import errno
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

from segsvc.errors import AlreadyExists, ArtifactError, InvalidArgument
from segsvc.export import DEFAULT_MAX_BATCH_SIZE, INPUT_NAME, ONNX_FILE, OUTPUT_NAME
from segsvc.files import fsync_published, fsync_tree, sha256_hex, widen_to_umask
from segsvc.export.compare import Progress
from segsvc.export.onnx import (
    export_onnx, geometry_of, needed_ir_version, published_onnx, version_lock,
)
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
        reason: why the ONNX export was made now (the version had none, or it was made with other options);
            None when the version's recorded one was used.
        replaced: the recorded export's file that the new one replaced; None when none was replaced.
    """

    model_dir: Path
    config: Path
    onnx: Path
    labels: Path
    reason: str | None = None
    replaced: str | None = None

    @property
    def exported(self) -> bool:
        """Whether the ONNX export was made now (False: the version's recorded one was used)."""
        return self.reason is not None


def default_out(repo: str | os.PathLike[str]) -> Path:
    """``<repo>-triton``: beside the segsvc repository, never inside it (its scan would see a model)."""
    repo = Path(repo).resolve()
    return repo.parent / f"{repo.name or 'model_repository'}-triton"


def check_out(out: str | os.PathLike[str], repo: str | os.PathLike[str]) -> None:
    """Refuse a Triton repository ``out`` that is the segsvc repository ``repo`` or inside it (symlinks resolved):
    segsvc's scan would find the Triton files in a model's folder, and tritonserver given ``out`` would read
    that model's version folders as models.

    Raises:
        InvalidArgument: ``out`` is ``repo`` or inside it.
    """
    real_out, real_repo = Path(out).resolve(), Path(repo).resolve()
    if real_out == real_repo or real_repo in real_out.parents:
        raise InvalidArgument(f"--out {out} is inside the segsvc model repository {repo}: write the Triton "
                              f"repository outside it (default: {default_out(repo)})")


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


def contract_steps(manifest: Manifest) -> list[str]:
    """What segsvc does around the network when it serves this version (its manifest's inference contract),
    which a client of the exported graph has to do itself to get segsvc's labels: a CamVid FCN-8s served at
    scale 0.5 with flip averaging agreed with a client that only padded and normalised on 95% of the pixels."""
    spec = manifest.inference
    steps = []
    if any(spec.shift):
        steps.append(f"translate the image by (dy, dx) = ({spec.shift[0]:+.2f}, {spec.shift[1]:+.2f}) px, "
                     f"bilinear, mirrored border")
    if spec.scale != 1.0:
        steps.append(f"resize the image by {spec.scale:g} ({spec.interpolation} interpolation) and the logits back")
    if spec.tta_scales:
        steps.append(f"average the softmax over scales {', '.join(f'{f:g}' for f in spec.tta_scales)} of that")
    if spec.tile_size:
        steps.append(f"run it in {spec.tile_size} px tiles overlapping by {spec.tile_overlap:g} of a tile, "
                     f"blending their logits")
    if spec.flip_tta:
        steps.append("average with the horizontally flipped image's (flipped back)")
    return steps


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
    steps = contract_steps(manifest)
    header.append("segsvc serves it with these steps around the network too (" + INFO_FILE + "'s inference): "
                  + "; ".join(steps) + "." if steps else
                  "segsvc serves it with nothing else around the network: the labels are the logits' arg-max.")
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
    if sha256_hex(version / ONNX_FILE) != sha256:
        raise ArtifactError(f"{onnx_path} changed while it was copied; export again")
    # mkdtemp made the folder 0700: the folder and every file get the modes the umask gives new ones (0755 / 0644
    # under 022), not the weights' 0600: a tritonserver running as another user must load the model too
    widen_to_umask(tmp)
    # Every file, then every folder, on disk before it is renamed into out: after a power cut, the old model or
    # the whole new one, never an empty config.pbtxt or a truncated model.onnx for tritonserver to load.
    fsync_tree(tmp)


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
    try:
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


def _staging_place(out: Path) -> Path | None:
    """``<parent>/.<out's name>.segsvc-staging`` (None when ``out`` is ``/``); nothing is made."""
    real = out.resolve()
    return None if real.parent == real else real.parent / f".{real.name}{STAGING_SUFFIX}"


def _own_folder(path: Path) -> bool:
    """Whether ``path`` is a folder (not a symlink) of this user that no one else can write into: the only
    kind of staging folder used, or cleaned up (anyone could swap what is in another one)."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022


def _staging(out: Path) -> Path | None:
    """The staging folder (``_staging_place``), made if missing, when it is this user's own folder
    (``_own_folder``) on ``out``'s filesystem; None when there is no such place (``out`` a mount point or
    ``/``, a parent that cannot be written, a folder of that name that is another user's or writable by
    others). ``_build`` still falls back to ``out`` when a rename from it fails (``out`` a bind mount)."""
    staging = _staging_place(out)
    if staging is None:
        return None
    made = False
    try:
        try:
            staging.mkdir(mode=0o755)
            made = True
        except FileExistsError:
            pass
        if _own_folder(staging) and _device(staging) == _device(out.resolve()):
            return staging
    except OSError:
        pass
    if made:
        with contextlib.suppress(OSError):
            staging.rmdir()
    return None


def _build(out: Path, staging: Path | None, manifest: Manifest, onnx_path: Path, max_batch_size: int) -> Path:
    """Build ``<model>`` in ``staging`` and swap it in as ``out/<model>``; in ``out`` itself (as
    ``.tmp-<model>-XXXXXXXX``) when there is no staging folder, no temporary can be made in it, or a rename
    from it into ``out`` fails with EXDEV (``out`` a bind mount: the same ``st_dev``, another mount)."""
    final = out / manifest.name
    places = ([(staging, "")] if staging is not None else []) + [(out, ".")]
    for scratch, prefix in places:
        inside_out = scratch == out
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}tmp-{manifest.name}-", dir=scratch))
        except OSError as exc:
            if inside_out:
                raise
            log.info("cannot build in %s (%s): building inside %s", scratch, exc, out)
            continue
        try:
            _write_model_dir(tmp, manifest, onnx_path, str(manifest.exports["onnx"]["sha256"]), max_batch_size)
            _swap_in(tmp, final, scratch, prefix)
            fsync_published(f"Triton model {final}", [out])  # the rename itself
            return final
        except OSError as exc:
            with contextlib.suppress(OSError):
                shutil.rmtree(tmp)
            if inside_out or exc.errno != errno.EXDEV:
                raise
            log.info("cannot rename from %s into %s (another mount): building inside %s", scratch, out, out)
        except BaseException:
            with contextlib.suppress(OSError):
                shutil.rmtree(tmp)
            raise
    raise AssertionError("unreachable: building inside out either returns or raises")


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


def _recorded_options(manifest: Manifest) -> dict[str, Any]:
    """What the recorded export was made with: ``opset``, ``checks``, ``tolerance``, ``min_agreement`` (each
    only when recorded, and a value those options can take)."""
    entry = manifest.exports.get("onnx")
    entry = entry if isinstance(entry, dict) else {}
    validation = entry.get("validation")
    validation = validation if isinstance(validation, dict) else {}
    recorded = {"opset": entry.get("opset"), **{key: validation.get(key) for key, _ in _VALIDATION_OPTIONS}}
    valid = {
        "opset": lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
        "checks": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
        "tolerance": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0,
        "min_agreement": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1,
    }
    return {key: value for key, value in recorded.items() if valid[key](value)}


def export_options(manifest: Manifest, opset: int | None = None, checks: int | None = None,
                   tolerance: float | None = None, min_agreement: float | None = None) -> dict[str, Any]:
    """The options ``export_triton`` exports anew with: those given, else the recorded export's (those
    neither given nor recorded are left to ``export_onnx``'s defaults)."""
    given = {"opset": opset, "checks": checks, "tolerance": tolerance, "min_agreement": min_agreement}
    return {**_recorded_options(manifest), **{key: value for key, value in given.items() if value is not None}}


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


def ir_too_high(onnx_path: Path) -> str | None:
    """Why the recorded file (verified by ``published_onnx``) must be exported anew: it declares a higher ONNX
    IR version than its opsets need, as exports made before segsvc lowered it do (the exporter's IR 10, which
    ONNX Runtime <= 1.16, as in Triton 23.x, refuses). None when it does not."""
    import onnx

    try:
        proto = onnx.load(onnx_path, load_external_data=False)
    except Exception:  # noqa: BLE001 - not ours to judge: published_onnx verified it, onnxruntime will load it
        return None
    needed = needed_ir_version(proto)
    if proto.ir_version > needed:
        return (f"the recorded export declares ONNX IR version {proto.ir_version}, above the {needed} its "
                "opsets need (ONNX Runtime <= 1.16, as in Triton 23.x, refuses IR 10)")
    return None


def export_triton(version_dir: str | os.PathLike[str], out: str | os.PathLike[str], *,
                  max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, opset: int | None = None,
                  checks: int | None = None, tolerance: float | None = None,
                  min_agreement: float | None = None, progress: Progress | None = None) -> TritonExport:
    """Write ``out/<model>/`` for Triton from a version's validated ONNX export (exporting it first if needed).

    The version's recorded export is used (its SHA-256 verified) unless it has none, or ``opset``,
    ``checks``, ``tolerance`` or ``min_agreement`` was given and differs from what it recorded, or its file
    declares a higher IR version than its opsets need (``ir_too_high``): then the version is exported anew
    (``export_options``: the options given, the recorded export's for those not given, else the defaults),
    replacing the recorded export exactly as ``export_onnx`` does.

    The manifest is read once the lock on ``out`` is held (another export into ``out`` may have re-exported
    the version meanwhile), and the recorded file is verified and copied holding the version's
    ``version_lock`` (so no ``--format onnx`` export replaces it between); locks are taken in that order.

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
        InvalidArgument: ``out`` is inside the segsvc repository that holds ``version_dir`` (``check_out``).
    """
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
    version_dir = Path(version_dir)
    out = Path(out)
    check_out(out, version_dir.resolve().parent.parent)  # before anything is made in it
    out.mkdir(parents=True, exist_ok=True)
    given = {"opset": opset, "checks": checks, "tolerance": tolerance, "min_agreement": min_agreement}
    with _repository_lock(out) as locked:
        staging: Path | None = None  # made only once there is a model directory to build
        try:
            manifest = read_manifest(version_dir)
            if locked:  # no other export into out runs now: any temporary of this model is a killed one's
                _remove_stale(out, manifest.name, ".")
                place = _staging_place(out)
                if place is not None and _own_folder(place):
                    _remove_stale(place, manifest.name, "")
            replaced = None
            with version_lock(version_dir):  # inside the out lock, never the other way round
                manifest = read_manifest(version_dir)
                reason = why_export(manifest, **given)
                if reason is None:
                    onnx_path = published_onnx(version_dir, manifest)
                    assert onnx_path is not None  # why_export found a recorded export
                    reason = ir_too_high(onnx_path)
                if reason is None:
                    staging = _staging(out)
                    final = _build(out, staging, manifest, onnx_path, max_batch_size)
            if reason is not None:  # export_onnx takes version_lock itself: not held here
                entry = manifest.exports.get("onnx")
                replaced = str(entry["file"]) if isinstance(entry, dict) and entry.get("file") else None
                result = export_onnx(version_dir, **export_options(manifest, **given), progress=progress)
                with version_lock(version_dir):
                    manifest = read_manifest(version_dir)
                    entry = manifest.exports.get("onnx")
                    if not isinstance(entry, dict) or entry.get("sha256") != result.sha256:
                        raise ArtifactError(f"{manifest.name}:{manifest.version}: exported again by another "
                                            "export while this one ran; export again")
                    staging = _staging(out)
                    final = _build(out, staging, manifest, result.path, max_batch_size)
        finally:
            if staging is not None and locked:  # empty unless a removal failed
                with contextlib.suppress(OSError):
                    staging.rmdir()
    return TritonExport(final, final / CONFIG_FILE, final / TRITON_VERSION / ONNX_FILE, final / LABELS_FILE,
                        reason, replaced)
