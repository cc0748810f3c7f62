"""From a folder of files to a validated dataset with a training spec.

The steps ``DatasetRegistry`` runs for every new dataset, uploaded or
registered, in this order (cheap refusals first):

1. ``dataset_root`` (uploads only): an archive of ``shapes/`` holds the
   dataset in its only folder; ``add_metadata_yaml`` stores the metadata's
   ``dataset.yaml`` text or class names as the dataset's ``dataset.yaml``.
2. ``load_confined``: the description (``dataset.yaml`` or the generic
   layout), whose root and every split folder and list must stay inside the
   dataset's folder (an uploaded YAML may not point at the server's files).
3. ``fingerprint``: the content hash (``content.content_hash``).
4. ``validate``: ``check_dataset``, every problem listed in ``DatasetInvalid``
   with paths relative to the dataset.
5. ``write_training_spec``: the YAML training loads with
   ``load_dataset_spec``, with the deterministic val split when there was
   none (``split.assign_splits``).

Messages never show the server's folders: paths are relative to the dataset.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence, TypeVar

import yaml

from segsvc.data.check import CheckReport, check_dataset
from segsvc.data.labels import LabelMapper
from segsvc.data.layouts import index_split
from segsvc.data.spec import FOLDER_SPEC_NAMES, DatasetSpec, load_dataset_spec, spec_from_folder
from segsvc.datasets.archive import ExtractLimits
from segsvc.datasets.content import content_hash, file_digest, is_excluded
from segsvc.datasets.split import VAL_FRACTION, assign_splits, needs_split
from segsvc.errors import DatasetError, DatasetInvalid, InvalidArgument, NotFound, PathOutsideRoot
from segsvc.files import write_atomic

SPEC_FILE = "spec.yaml"
MAX_MESSAGE_PROBLEMS = 5  # shown in the error message; the status details carry the rest

T = TypeVar("T")
Progress = Callable[[Iterable[T], int], Iterable[T]]


@dataclass(frozen=True)
class Fingerprint:
    """A dataset's identity and size."""

    sha256: str
    files: int
    total_bytes: int


@dataclass(frozen=True)
class TrainingSpec:
    """What ``write_training_spec`` wrote: its path, the split sizes, whether the split was assigned."""

    path: Path
    spec: DatasetSpec
    split_sizes: dict[str, int]
    split_assigned: bool


def dataset_root(folder: Path) -> Path:
    """``folder``, or its only subfolder when it holds nothing else (an archive of ``shapes/``)."""
    entries = [e for e in folder.iterdir() if not is_excluded(e.name)]
    if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink():
        return entries[0]
    return folder


def add_metadata_yaml(root: Path, name: str, dataset_yaml: str = "", class_names: Sequence[str] = ()) -> None:
    """Store the upload metadata's ``dataset.yaml`` text, or a ``dataset.yaml`` naming ``class_names``.

    The file becomes part of the dataset (and of its hash), so the same files
    and classes give the same dataset whichever way the description came. The
    ``root`` in the metadata's text becomes ``.``: it says where the files were on
    the uploader's machine, and on the server the upload itself is the root (so
    a built-in spec such as ``segsvc/data/specs/membrane.yaml`` can be sent as is).
    """
    existing = next((n for n in FOLDER_SPEC_NAMES if (root / n).is_file()), None)
    if dataset_yaml and class_names:
        raise InvalidArgument("give the classes either in dataset_yaml or as class_names, not both")
    if (dataset_yaml or class_names) and existing:
        raise InvalidArgument(f"the upload holds its own {existing}: do not send a description in the metadata too")
    if dataset_yaml:
        (root / FOLDER_SPEC_NAMES[0]).write_text(_rooted_here(dataset_yaml))
    elif class_names:
        spec = spec_from_folder(root)  # the generic layout's splits, as found
        spec = replace(spec, name=name, root=Path("."), class_names=tuple(class_names), palette=())
        _write_yaml(root / FOLDER_SPEC_NAMES[0], spec.to_dict())


def _rooted_here(dataset_yaml: str) -> str:
    """The metadata's ``dataset.yaml`` text with ``root: .`` (unchanged when it says so already)."""
    try:
        data = yaml.safe_load(dataset_yaml)
    except yaml.YAMLError as exc:
        raise DatasetError(f"the metadata's dataset.yaml is not valid YAML: {exc}") from None
    if not isinstance(data, dict) or data.get("root", ".") == ".":
        return dataset_yaml
    data["root"] = "."
    return yaml.safe_dump(data, sort_keys=False)


def _inside(root: Path, path: Path) -> bool:
    return path == root or path.is_relative_to(root)


def load_confined(root: Path, name: str) -> DatasetSpec:
    """The dataset's description, named ``name``, with every path it reads confined to ``root``.

    Raises:
        DatasetError: no usable description, a synthetic one (no files), no class names.
        PathOutsideRoot: the root, a split folder or list leads outside ``root``.
    """
    spec = load_dataset_spec(root)
    if spec.format == "synthetic":
        raise DatasetError("a synthetic dataset is generated on the fly: there are no files to register")
    real_root = root.resolve()
    if not _inside(real_root, spec.root.resolve()):
        raise PathOutsideRoot(f"dataset.yaml: root {spec.to_dict()['root']!r} leads outside the dataset")
    for split_name, split in spec.splits.items():
        for key in ("images", "masks", "list"):
            rel = getattr(split, key)
            if rel is not None and not _inside(real_root, (spec.root / rel).resolve()):
                raise PathOutsideRoot(f"dataset.yaml: split {split_name!r} {key} {rel!r} leads outside the dataset")
    if not spec.class_names:
        raise DatasetError("the dataset names no classes: add a dataset.yaml with 'classes:' "
                           "(or send the class names with the upload)")
    return replace(spec, name=name)


def registered_folder(data_root: Path, folder: str) -> Path:
    """The real path of ``folder`` (a normalised path relative to the data root), confined to the root.

    Raises:
        NotFound: the data root is missing (a server misconfiguration).
        PathOutsideRoot: the folder leads outside the data root ('..', a symlink).
        DatasetError: there is no such folder.
    """
    real_root = data_root.resolve()
    if not real_root.is_dir():
        raise NotFound("the data root is not a folder (check the server configuration)")
    real = Path(os.path.realpath(real_root / folder))
    if not _inside(real_root, real):
        raise PathOutsideRoot(f"folder {folder!r} leads outside the data root")
    if not real.is_dir():
        raise DatasetError(f"no folder {folder!r} under the data root")
    return real


def registered_files(folder: Path, data_root: Path, shown: str, limits: ExtractLimits) -> list[tuple[str, Path]]:
    """The files of a folder registered in place, as ``(relative name, real path)``: what its upload holds.

    Named as ``content.local_files`` names a folder for an upload: every file, each
    symlink by its own name (two links to one file are two files, as the dataset
    reads them), excluded names (``is_excluded``) left out unopened. The folder
    is on the server, so every symlink must resolve inside ``data_root``, a folder
    link into a folder it lies in (a loop) is refused, and the walk stops beyond
    ``limits.max_files`` files or ``limits.max_entries`` folder entries. Messages
    name paths relative to the data root (``shown`` is the folder's).

    Raises:
        PathOutsideRoot: a symlink leads outside the data root.
        DatasetError: a folder link loops, or a folder cannot be read.
        InvalidArgument: more files or entries than ``limits`` allow.
    """
    real_root = data_root.resolve()
    files: list[tuple[str, Path]] = []
    listed = 0
    stack: list[tuple[Path, str, frozenset[Path]]] = [(folder, "", frozenset({folder}))]
    while stack:
        real_dir, rel_dir, ancestors = stack.pop()
        entries = _listing(real_dir, _shown(shown, rel_dir.rstrip("/")))
        listed += len(entries)
        if listed > limits.max_entries:
            raise InvalidArgument(f"folder {shown!r} holds more than {limits.max_entries} entries "
                                  f"(the server's limit for a dataset of at most {limits.max_files} files)")
        for entry in entries:
            rel = rel_dir + entry.name
            if is_excluded(rel):
                continue
            real = _confined(entry, real_root, _shown(shown, rel))
            if real.is_dir():
                if real in ancestors:
                    raise DatasetError(f"folder link {_shown(shown, rel)!r} leads back into a folder it lies in "
                                       f"(a loop): remove it")
                stack.append((real, rel + "/", ancestors | {real}))
            elif real.is_file():
                files.append((rel, real))
                if len(files) > limits.max_files:
                    raise InvalidArgument(f"folder {shown!r} holds more than {limits.max_files} files "
                                          f"(the server's limit)")
    return sorted(files)


def _shown(folder: str, rel: str) -> str:
    """A name under a registered folder, relative to the data root."""
    return posixpath.join(folder, rel) if folder != "." and rel else (rel or folder)


def _listing(folder: Path, shown: str) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(folder) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError as exc:
        raise DatasetError(f"cannot read folder {shown!r} ({exc.strerror or type(exc).__name__})") from None


def _confined(entry: os.DirEntry[str], real_root: Path, shown: str) -> Path:
    """The real path of a folder entry (in a real folder); a symlink must resolve inside ``real_root``."""
    if not entry.is_symlink():
        return Path(entry.path)
    real = Path(os.path.realpath(entry.path))
    if not _inside(real_root, real):
        raise PathOutsideRoot(f"{shown!r} is a symlink leading outside the data root")
    return real


def fingerprint(files: Iterable[tuple[str, Path]]) -> Fingerprint:
    """The content hash of ``(relative name, path)`` files (excluded names left out)."""
    entries = [(rel, *file_digest(path)) for rel, path in files if not is_excluded(rel)]
    if not entries:
        raise DatasetError("the dataset holds no files")
    return Fingerprint(content_hash(entries), len(entries), sum(size for _, size, _ in entries))


def _relative(path: Path, root: Path) -> str:
    for base in (root, root.resolve()):
        try:
            return path.relative_to(base).as_posix()
        except ValueError:
            continue
    return path.name


def scrub_paths(text: str, root: Path) -> str:
    """``text`` with the dataset's folder on the server left out (paths become relative to the dataset)."""
    for base in sorted({str(root.resolve()), str(root)}, key=len, reverse=True):
        text = text.replace(base + os.sep, "").replace(base, "<dataset>")
    return text


def validate(spec: DatasetSpec, root: Path, progress: Progress | None = None) -> CheckReport:
    """``check_dataset``; any problem raises ``DatasetInvalid`` listing them all (relative to ``root``)."""
    report = check_dataset(spec, progress=progress)
    if report.ok:
        return report
    problems = tuple((p.fault.value, _relative(p.path, root), scrub_paths(p.detail, root)) for p in report.problems)
    shown = "; ".join(f"{path}: {kind}" for kind, path, _ in problems[:MAX_MESSAGE_PROBLEMS])
    more = f"; and {len(problems) - MAX_MESSAGE_PROBLEMS} more" if len(problems) > MAX_MESSAGE_PROBLEMS else ""
    raise DatasetInvalid(f"dataset {spec.name!r} fails its check with {len(problems)} problem(s) "
                         f"(listed in the status details): {shown}{more}", problems)


def class_shares(report: CheckReport, spec: DatasetSpec) -> dict[str, float]:
    """Share of each class among the labelled pixels (after the label map; ignored pixels left out)."""
    mapper = LabelMapper(spec)
    counts = [0] * spec.num_classes
    for raw, n in report.raw_label_pixels.items():
        value = mapper.colour_table.get(raw) if isinstance(raw, tuple) else raw
        if value is None:
            continue
        cls = mapper.label_map.get(value, value)
        if 0 <= cls < spec.num_classes:
            counts[cls] += n
    total = sum(counts)
    return {name: (c / total if total else 0.0) for name, c in zip(spec.class_names, counts)}


def _write_yaml(path: Path, data: dict) -> None:
    write_atomic(path, yaml.safe_dump(data, sort_keys=False, default_flow_style=None).encode())


def write_training_spec(spec: DatasetSpec, entry: Path, val_fraction: float = VAL_FRACTION,
                        absolute_root: bool = False) -> TrainingSpec:
    """Write ``<entry>/spec.yaml`` for training and read it back.

    The root is written relative to ``entry`` (uploads live inside it, so the
    entry folder can be renamed into place) or, with ``absolute_root``, as an
    absolute path (registered folders stay where they are).
    """
    assigned = needs_split(spec)
    final = assign_splits(spec, val_fraction) if assigned else spec
    assigned = assigned and final is not spec
    data = final.to_dict()
    data["root"] = str(spec.root.resolve()) if absolute_root else os.path.relpath(spec.root, entry)
    path = entry / SPEC_FILE
    _write_yaml(path, data)
    loaded = load_dataset_spec(path)
    sizes = {name: len(index_split(loaded, name).samples) for name in loaded.splits}
    return TrainingSpec(path, loaded, sizes, assigned)
