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

The model directory is built beside the old one under a hidden temporary name
and swapped in with two renames, so a polling tritonserver never sees a
half-written one (between the renames the model is briefly absent).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


@dataclass(frozen=True)
class TritonExport:
    """What ``export_triton`` wrote.

    Args:
        model_dir: ``out/<model>``.
        config: ``out/<model>/config.pbtxt``.
        onnx: ``out/<model>/1/model.onnx``.
        labels: ``out/<model>/labels.txt``.
        exported: whether the ONNX export was made now (False: the version's recorded one was used).
    """

    model_dir: Path
    config: Path
    onnx: Path
    labels: Path
    exported: bool


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
    (version / ONNX_FILE).chmod(onnx_path.stat().st_mode & 0o777)  # as readable as the weights, no more
    if file_sha256(version / ONNX_FILE) != sha256:
        raise ArtifactError(f"{onnx_path} changed while it was copied; export again")
    tmp.chmod(0o755)  # mkdtemp made it 0700


def _swap_in(tmp: Path, final: Path) -> None:
    """Replace ``final`` (a model directory written earlier, or nothing) with ``tmp``."""
    if not final.exists() and not final.is_symlink():
        os.rename(tmp, final)
        return
    if final.is_symlink() or not (final / CONFIG_FILE).is_file():
        raise AlreadyExists(f"{final} exists and is not a Triton model directory (no {CONFIG_FILE}); "
                            "move it away or choose another --out")
    old = Path(tempfile.mkdtemp(prefix=f".old-{final.name}-", dir=final.parent))
    os.rename(final, old / final.name)
    try:
        os.rename(tmp, final)
    except BaseException:
        os.rename(old / final.name, final)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def export_triton(version_dir: str | os.PathLike[str], out: str | os.PathLike[str], *,
                  max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, opset: int = DEFAULT_OPSET,
                  checks: int = DEFAULT_CHECKS, tolerance: float = DEFAULT_TOLERANCE,
                  min_agreement: float = MIN_AGREEMENT, progress: Progress | None = None) -> TritonExport:
    """Write ``out/<model>/`` for Triton from a version's validated ONNX export (exporting it first if needed).

    Args:
        version_dir: ``<repo>/<model>/<version>``.
        out: the Triton model repository (created if missing); ``out/<model>`` is replaced.
        max_batch_size: Triton's ``max_batch_size``.
        opset: used only when the version has no export yet (as ``checks``, ``tolerance``,
            ``min_agreement`` and ``progress``).

    Raises:
        ArtifactError: the version's recorded ``model.onnx`` does not match its SHA-256.
        ExportError: the version has no export and cannot be exported.
        AlreadyExists: ``out/<model>`` exists and is not a Triton model directory.
    """
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
    version_dir = Path(version_dir)
    manifest = read_manifest(version_dir)
    onnx_path = published_onnx(version_dir, manifest)
    exported = onnx_path is None
    if onnx_path is None:
        result = export_onnx(version_dir, opset=opset, checks=checks, tolerance=tolerance,
                             min_agreement=min_agreement, progress=progress)
        onnx_path, manifest = result.path, result.manifest
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{manifest.name}-", dir=out))
    try:
        _write_model_dir(tmp, manifest, onnx_path, str(manifest.exports["onnx"]["sha256"]), max_batch_size)
        final = out / manifest.name
        _swap_in(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
        raise
    return TritonExport(final, final / CONFIG_FILE, final / TRITON_VERSION / ONNX_FILE, final / LABELS_FILE, exported)
