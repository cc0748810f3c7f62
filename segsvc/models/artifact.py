"""The model artifact: ``<root>/<name>/<version>/{weights.safetensors, manifest.json}``.

Weights are safetensors, so loading a model never executes code. The manifest
carries everything needed to rebuild and use the model from the artifact alone:
the architecture spec, classes, palette, ignore index, input normalisation, the
inference contract (input scale, padding, default tiling and TTA: how the model
was evaluated, so serving reproduces it), training summary, metrics and
lineage. Versions are written to a temporary directory, synced to disk and
renamed into place (the rename synced too), so a crash or a power cut leaves
the whole version or none of it; an existing version is never overwritten.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Mapping, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

import segsvc
from segsvc.config import InferenceSpec, InputSpec, ModelSpec
from segsvc.errors import AlreadyExists, ArtifactError, InvalidArgument, PathOutsideRoot, SegsvcError
from segsvc.files import (PathChanged, fsync_published, fsync_tree, open_beneath, sha256_hex, widen_to_umask,
                          write_atomic)
from segsvc.model_names import VERSION_NAME, check_name  # noqa: F401  (here too under their old names)
from segsvc.models.registry import architecture_spec, build_model, plan_model
from segsvc.palette import Color, default_palette

log = logging.getLogger(__name__)

WEIGHTS_FILE = "weights.safetensors"
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 2  # 2 added "inference" and "lineage"; a version-1 manifest reads with their defaults
READABLE_FORMATS = (1, 2)
MAX_MANIFEST_BYTES = 1 << 20
MAX_VERSION = 10**18 - 1



@dataclass(frozen=True)
class Manifest:
    """What a model version is: ``manifest.json`` as a typed object.

    ``inference`` is the contract serving and ``segsvc eval`` both apply
    (``segsvc.inference.contract``); ``lineage`` says where the weights came from
    (dataset hash, parent version, recipe, metrics) for retrained versions.
    ``spec`` never holds the parameters that only initialise weights from a file
    (``*_path``, e.g. smp's ``encoder_weights_path``): the saved weights replace
    what they loaded, and the file is not on the server. They are dropped when a
    manifest is made or read, so a manifest written before still loads.
    """

    name: str
    version: int
    spec: ModelSpec
    input: InputSpec
    class_names: tuple[str, ...]
    palette: tuple[Color, ...]
    ignore_index: int | None = None
    training: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, Any] = field(default_factory=dict)
    created_at: str = ""
    segsvc_version: str = segsvc.__version__
    weights_sha256: str = ""
    inference: InferenceSpec = InferenceSpec()
    lineage: Mapping[str, Any] = field(default_factory=dict)
    # Exported forms of the weights, by format: ``{"onnx": {"file": "model.onnx", "sha256": ..., ...}}``.
    exports: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:  # the name reaches logs, metrics labels and folder names: a manifest may not make up its own
            check_name(self.name)
        except InvalidArgument as exc:
            raise ArtifactError(f"manifest is invalid: {exc}") from None
        object.__setattr__(self, "spec", architecture_spec(self.spec))
        k = self.spec.num_classes
        if len(self.class_names) != k:
            raise ArtifactError(f"manifest lists {len(self.class_names)} class names for {k} classes")
        if len(self.palette) != k:
            raise ArtifactError(f"manifest lists {len(self.palette)} palette colours for {k} classes")
        if self.input.channels != self.spec.in_channels:
            raise ArtifactError(
                f"manifest input has {self.input.channels} channels but the model takes {self.spec.in_channels}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "version": self.version,
            "model": self.spec.to_dict(),
            "input": self.input.to_dict(),
            "inference": self.inference.to_dict(),
            "class_names": list(self.class_names),
            "palette": [list(c) for c in self.palette],
            "ignore_index": self.ignore_index,
            "training": dict(self.training),
            "metrics": dict(self.metrics),
            "lineage": dict(self.lineage),
            "exports": dict(self.exports),
            "created_at": self.created_at,
            "segsvc_version": self.segsvc_version,
            "weights_sha256": self.weights_sha256,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Manifest":
        if not isinstance(data, Mapping):
            raise ArtifactError("manifest must be a JSON object")
        if data.get("format_version") not in READABLE_FORMATS:
            raise ArtifactError(
                f"manifest format_version {data.get('format_version')!r} is not supported "
                f"(expected one of {list(READABLE_FORMATS)})"
            )
        missing = [k for k in ("name", "version", "model", "input", "class_names", "palette") if k not in data]
        if missing:
            raise ArtifactError(f"manifest lacks required fields {missing}")
        try:
            palette = tuple(_color(c) for c in data["palette"])
            return cls(
                name=str(data["name"]),
                version=_integer(data["version"], "version"),
                spec=ModelSpec.from_dict(data["model"]),
                input=InputSpec.from_dict(data["input"]),
                inference=InferenceSpec.from_dict(data.get("inference") or {}),
                class_names=tuple(str(n) for n in data["class_names"]),
                palette=palette,
                ignore_index=None if data.get("ignore_index") is None else _integer(data["ignore_index"], "ignore_index"),
                training=dict(data.get("training") or {}),
                metrics=dict(data.get("metrics") or {}),
                lineage=dict(data.get("lineage") or {}),
                exports=dict(data.get("exports") or {}),
                created_at=str(data.get("created_at", "")),
                segsvc_version=str(data.get("segsvc_version", "")),
                weights_sha256=str(data.get("weights_sha256", "")),
            )
        except ArtifactError:
            raise
        except (SegsvcError, TypeError, ValueError, OverflowError) as exc:
            raise ArtifactError(f"manifest is invalid: {exc}") from None


def with_model_geometry(spec: InferenceSpec, model: nn.Module) -> InferenceSpec:
    """``spec`` with the stride and minimum input size it leaves unset taken from the model, so every
    published manifest records the padding its backends need (an ONNX export has no module to ask)."""
    own = model_inference_spec(model)
    return replace(spec, stride=own.stride if spec.stride is None else spec.stride,
                   min_input_size=own.min_input_size if spec.min_input_size is None else spec.min_input_size)


def model_inference_spec(model: nn.Module, **overrides: Any) -> InferenceSpec:
    """An ``InferenceSpec`` with the model's own stride and minimum input size (plus ``overrides``)."""
    return InferenceSpec(stride=int(getattr(model, "output_stride", 1)),
                         min_input_size=int(getattr(model, "min_input_size", 1)), **overrides)


def _integer(value: Any, name: str) -> int:
    """``int(value)`` for a manifest field, refusing a float that is not a whole number by name: ``1e999`` (valid
    JSON) reads as infinity, whose ``int`` raised ``OverflowError``; ``2.5`` became 2. Other values fail in
    ``int`` (a ``ValueError`` or ``TypeError`` that ``Manifest.from_dict`` reports)."""
    if isinstance(value, float) and not value.is_integer():  # also inf and nan
        raise ArtifactError(f"manifest is invalid: {name} must be an integer, got {value!r}")
    return int(value)


def _color(value: Any) -> Color:
    if not isinstance(value, Sequence) or len(value) != 3 or not all(isinstance(v, int) and 0 <= v <= 255 for v in value):
        raise ArtifactError(f"palette colours must be [r, g, b] with 0..255 integers, got {value!r}")
    return (value[0], value[1], value[2])


def next_version(model_dir: Path) -> int:
    """One more than the highest version folder under ``model_dir``, past any number a file or a dangling
    symlink takes: that name cannot become a version (``save_artifact`` would fail on it every time)."""
    if not model_dir.is_dir():
        return 1
    names = set(os.listdir(model_dir))
    version = max((int(n) for n in names if VERSION_NAME.fullmatch(n) and (model_dir / n).is_dir()), default=0) + 1
    while str(version) in names:
        version += 1
    return version


def _sync_published(final: Path, created: Sequence[Path]) -> None:
    """Put the rename that published ``final`` on disk, and the entries of the folders made for it (``created``).

    The version is whole already: were this lost, a power cut would leave no version, never a torn one. So a
    failure is logged, not raised (``fsync_published``): the version exists, and a caller told otherwise would
    publish it again.
    """
    fsync_published(f"model version {final.parent.name}/{final.name}", (final.parent, *(p.parent for p in created)))


def save_artifact(
    model: nn.Module,
    root: str | os.PathLike[str],
    name: str,
    *,
    spec: ModelSpec,
    input_spec: InputSpec | None = None,
    class_names: Sequence[str] | None = None,
    palette: Sequence[Color] | None = None,
    ignore_index: int | None = None,
    training: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    version: int | None = None,
    inference: InferenceSpec | None = None,
    lineage: Mapping[str, Any] | None = None,
) -> Path:
    """Write a new model version atomically and durably and return its directory.

    ``inference`` is how the model was evaluated (scale, stride, tiling, TTA);
    ``None`` records the defaults (full resolution, no tiling or TTA). A stride
    or minimum input size it leaves unset is the model's own. ``spec`` is
    recorded without its ``*_path`` parameters (``architecture_spec``): the
    weights saved here already hold what such a file initialised.

    Example:
        >>> spec = ModelSpec("unet", num_classes=2, in_channels=1, params={"base_channels": 4, "depth": 2})
        >>> path = save_artifact(build_model(spec), tmp, "membrane", spec=spec)  # doctest: +SKIP
    """
    check_name(name)
    model_dir = Path(root) / name
    created = [p for p in (model_dir, *model_dir.parents) if not p.exists()]  # their entries are synced too
    model_dir.mkdir(parents=True, exist_ok=True)
    version = next_version(model_dir) if version is None else int(version)
    if version < 1:
        raise InvalidArgument(f"model versions are positive integers, got {version}")
    if version > MAX_VERSION:  # its folder's name would be no version number to the repository
        raise InvalidArgument(f"model versions have at most 18 digits, got {version}")
    final = model_dir / str(version)
    if os.path.lexists(final):  # a dangling symlink too: the rename would fail on it
        raise AlreadyExists(f"model {name} version {version} already exists at {final}; versions are never overwritten")
    k = spec.num_classes
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=model_dir))
    try:
        state = {key: t.detach().cpu().contiguous() for key, t in model.state_dict().items()}
        save_file(state, os.fspath(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        manifest = Manifest(
            name=name,
            version=version,
            spec=spec,
            input=input_spec or InputSpec.default_for(spec.in_channels),
            class_names=tuple(class_names) if class_names is not None else tuple(f"class_{i}" for i in range(k)),
            palette=tuple(tuple(c) for c in palette) if palette is not None else tuple(default_palette(k)),  # type: ignore[misc]
            ignore_index=ignore_index,
            training=dict(training or {}),
            metrics=dict(metrics or {}),
            inference=with_model_geometry(inference or InferenceSpec(), model),
            lineage=dict(lineage or {}),
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            weights_sha256=sha256_hex(tmp / WEIGHTS_FILE),
        )
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
        widen_to_umask(tmp)  # readable as the umask allows, not only by this user (mkdtemp: 0700)
        fsync_tree(tmp)  # files then folder before the rename: else a power cut may publish a torn version
        os.rename(tmp, final)  # atomic on one filesystem; fails if another writer won the race
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if os.path.lexists(final):
            raise AlreadyExists(f"model {name} version {version} already exists at {final}") from None
        raise ArtifactError(f"cannot write model {name} version {version}: {exc}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _sync_published(final, created)
    return final


def open_version_file(path: Path, root: Path | None = None) -> BinaryIO:
    """``path`` (a file of a version) open for reading, without blocking: a FIFO would wait forever.

    With ``root`` (the resolved root of the model repository ``path`` is in), ``path`` is resolved, must
    stay inside the root, and is opened beneath it following no symlink (``files.open_beneath``): the
    repository checked the version before, and a symlink swapped in since fails the open instead of
    leading it out of the root. A symlink that stays inside the root is still followed.

    Raises:
        PathOutsideRoot: ``path`` now leads outside ``root``, or a symlink appeared on its way.
        OSError: the kernel's (missing, permissions); ``EINVAL`` for anything but a regular file.
    """
    if root is not None:
        real = Path(os.path.realpath(path))
        if real == root or not real.is_relative_to(root):
            raise PathOutsideRoot(f"{path} leads outside the repository root; refused")
        try:
            return open_beneath(root, real.relative_to(root).as_posix())
        except PathChanged as exc:
            raise PathOutsideRoot(f"{path} changed while it was opened ({exc.strerror}); refused") from None
    f = os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb")
    if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
        f.close()
        raise OSError(errno.EINVAL, "not a regular file")
    return f


def read_manifest(version_dir: str | os.PathLike[str], root: Path | None = None) -> Manifest:
    """Parse and validate ``manifest.json`` (does not touch the weights).

    It is opened without blocking and must be a regular file: reading a FIFO of
    that name would wait forever (its ``stat`` size is 0). ``root``: the model
    repository's, to open it confined there (``open_version_file``).
    """
    path = Path(version_dir) / MANIFEST_FILE
    try:
        with open_version_file(path, root) as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
        if len(raw) > MAX_MANIFEST_BYTES:
            raise ArtifactError(f"{path} is larger than {MAX_MANIFEST_BYTES} bytes")
        data = json.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"{path} does not exist: not a model version directory") from None
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            raise ArtifactError(f"{path} is not a regular file") from None
        raise ArtifactError(f"cannot read {path}: {exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"cannot read {path}: {exc}") from None
    except RecursionError:  # brackets nested thousands deep, well under the size limit
        raise ArtifactError(f"cannot read {path}: its JSON is nested too deeply") from None
    return Manifest.from_dict(data)


def write_manifest(version_dir: str | os.PathLike[str], manifest: Manifest) -> Path:
    """Rewrite ``manifest.json`` of an existing version atomically (temporary file, fsync, rename).

    Readers see the old or the new manifest, never a partial one. Only fields
    derived from the weights (``exports``, ``metrics``) should change this way:
    the weights themselves are never rewritten.

    Args:
        version_dir: ``<root>/<name>/<version>``; must exist.
        manifest: the manifest to write (its name and version should match the directory).
    """
    data = (json.dumps(manifest.to_dict(), indent=2) + "\n").encode("utf-8")
    return write_atomic(Path(version_dir) / MANIFEST_FILE, data)


# -- loading: every cost bounded before it is paid ---------------------------------------------------------------
# The most state-dict elements a manifest may ask for: 4 GiB of float32, far above the models served here (smp
# Unet/ResNet-34: 24M). A manifest's widths are otherwise unbounded (base_channels 10**6 asked torch for 36 TB; a
# smaller absurd width was allocated and initialised, filling the server's memory).
MAX_MODEL_PARAMETERS = 1 << 30
# The JSON header of weights.safetensors (name, dtype, shape and offsets of each tensor: ~100 bytes a tensor, so
# about 80k tensors). safetensors' own limit is 100 MB, whose parse and tensors cost far more than the file.
MAX_WEIGHTS_HEADER_BYTES = 8 << 20
# torch dtype -> safetensors' name for it (the header's "dtype").
_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}

# (shape, safetensors dtype) of each tensor of a state dict
TensorPlan = Mapping[str, tuple[tuple[int, ...], str]]


def planned_state(version_dir: Path, spec: ModelSpec) -> TensorPlan:
    """The tensors the model ``spec`` describes, from a build on the meta device (no memory, no initialisation).

    Raises:
        ArtifactError: the spec cannot be built, or its model has more than ``MAX_MODEL_PARAMETERS`` elements.
    """
    try:
        model = plan_model(spec)
    except SegsvcError as exc:
        raise ArtifactError(f"{version_dir}: cannot build the model its manifest describes: {exc}") from None
    plan = {k: (tuple(t.shape), _SAFETENSORS_DTYPES.get(t.dtype, str(t.dtype))) for k, t in model.state_dict().items()}
    count = sum(math.prod(shape) for shape, _ in plan.values())
    if count > MAX_MODEL_PARAMETERS:
        raise ArtifactError(f"{version_dir}: the model its manifest describes has {count:,} parameters, over the "
                            f"limit of {MAX_MODEL_PARAMETERS:,}")
    return plan


def _plan_bytes(plan: TensorPlan) -> int:
    itemsize = {v: torch.empty((), dtype=k).element_size() for k, v in _SAFETENSORS_DTYPES.items()}
    return sum(math.prod(shape) * itemsize.get(dtype, 8) for shape, dtype in plan.values())


def _read_header(f: BinaryIO, path: Path) -> TensorPlan:
    """``(shape, dtype)`` of each tensor the safetensors file ``f`` (open at its start) declares, from its header
    alone (at most ``MAX_WEIGHTS_HEADER_BYTES``); ``path`` names it in messages.

    Raises:
        ArtifactError: not a safetensors header, or one over the limit.
    """
    prefix = f.read(8)
    size = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
    if size > MAX_WEIGHTS_HEADER_BYTES:
        raise ArtifactError(f"{path} is not a readable safetensors file: its header declares {size} bytes, "
                            f"over the limit of {MAX_WEIGHTS_HEADER_BYTES}")
    raw = f.read(size) if size >= 0 else b""
    try:
        if size < 0 or len(raw) != size:
            raise ValueError("the file ends inside its header")
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("its header is not a JSON object")
        header.pop("__metadata__", None)
        plan = {}
        for name, info in header.items():
            shape = info.get("shape") if isinstance(info, dict) else None
            if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
                raise ValueError(f"tensor {name!r} has no valid shape")
            plan[name] = (tuple(shape), str(info.get("dtype")))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ArtifactError(f"{path} is not a readable safetensors file: {exc}") from None
    return plan


def _check_state(path: Path, expected: TensorPlan, found: TensorPlan, arch: str) -> None:
    """Refuse tensors the model lacks or does not have, or of another shape or dtype, naming up to three."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise ArtifactError(
            f"{path} does not hold the weights of a {arch!r} model as the manifest describes it: "
            f"{len(missing)} tensors missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    wrong = [f"{k}: file {found[k][0]} vs model {shape}" for k, (shape, _) in expected.items() if found[k][0] != shape]
    if wrong:
        raise ArtifactError(f"{path} has {len(wrong)} tensors of the wrong shape, e.g. {wrong[:3]}")
    wrong = [f"{k}: file {found[k][1]} vs model {dtype}" for k, (_, dtype) in expected.items() if found[k][1] != dtype]
    if wrong:
        raise ArtifactError(f"{path} has {len(wrong)} tensors of the wrong dtype, e.g. {wrong[:3]}")


def _plan_of(state: Mapping[str, torch.Tensor]) -> TensorPlan:
    return {k: (tuple(t.shape), _SAFETENSORS_DTYPES.get(t.dtype, str(t.dtype))) for k, t in state.items()}


def _fd_path(f: BinaryIO, path: Path) -> str:
    """A name that opens the very file ``f`` is open on (Linux's ``/proc/self/fd``), for a loader that takes a
    path: it reads the file that was checked, not whatever ``path`` names by now. ``path`` without ``/proc``."""
    proc = f"/proc/self/fd/{f.fileno()}"
    return proc if os.path.exists(proc) else os.fspath(path)


def _read_weights(f: BinaryIO, weights: Path, manifest: Manifest, plan: TensorPlan) -> dict[str, torch.Tensor]:
    """The tensors of the open weights file ``f``, once its size, SHA-256 and header are checked against
    ``manifest`` and ``plan``, and refused with NaN or infinite values."""
    size = os.fstat(f.fileno()).st_size
    limit = 8 + MAX_WEIGHTS_HEADER_BYTES + _plan_bytes(plan)
    if size > limit:
        raise ArtifactError(f"{weights} is {size} bytes, more than the model its manifest describes can hold "
                            f"({limit})")
    try:
        if manifest.weights_sha256 and sha256_hex(f) != manifest.weights_sha256:
            raise ArtifactError(f"{weights} is corrupt: its SHA-256 does not match the manifest")
        f.seek(0)
        _check_state(weights, plan, _read_header(f, weights), manifest.spec.arch)
        state = load_file(_fd_path(f, weights))
    except (SafetensorError, OSError) as exc:
        raise ArtifactError(f"{weights} is not a readable safetensors file: {exc}") from None
    _check_state(weights, plan, _plan_of(state), manifest.spec.arch)  # the file may have changed since its header
    bad = [k for k, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ArtifactError(f"{weights} holds NaN or infinite values in {len(bad)} tensors, e.g. {bad[:3]}")
    return state


def load_artifact(version_dir: str | os.PathLike[str], device: str | torch.device = "cpu",
                  root: Path | None = None) -> tuple[nn.Module, Manifest]:
    """Rebuild the model from its manifest and load its weights; the model is returned in eval mode.

    Every cost is bounded before it is paid: the model the manifest describes is first built on the meta device
    (nothing allocated) and refused over ``MAX_MODEL_PARAMETERS``; the weights file is refused when larger than
    that model and its header (before its SHA-256 is read), and its header (at most ``MAX_WEIGHTS_HEADER_BYTES``)
    must name exactly the model's tensors with their shapes and dtypes before any tensor is read. Tensors
    holding NaN or infinity are refused. The manifest's spec has no ``*_path`` parameter (``Manifest`` drops one
    an older artifact recorded), so rebuilding never opens a file outside the version directory.

    Each file is opened once, and every check and the load read that open file. ``root``: the model
    repository's, to open them confined there (``open_version_file``).
    """
    version_dir = Path(version_dir)
    manifest = read_manifest(version_dir, root)
    plan = planned_state(version_dir, manifest.spec)
    weights = version_dir / WEIGHTS_FILE
    try:
        f = open_version_file(weights, root)
    except FileNotFoundError:
        raise ArtifactError(f"{weights} does not exist") from None
    except OSError as exc:
        raise ArtifactError(f"{weights} is not a readable safetensors file: {exc.strerror}") from None
    with f:
        state = _read_weights(f, weights, manifest, plan)
    try:
        model = build_model(manifest.spec)
    except SegsvcError as exc:
        raise ArtifactError(f"{version_dir}: cannot build the model its manifest describes: {exc}") from None
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), manifest
