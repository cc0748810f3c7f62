"""From a folder of files to a validated dataset with a training spec.

The steps ``DatasetRegistry`` runs for every new dataset, uploaded or
registered, in this order (cheap refusals first):

1. ``dataset_root`` (archive uploads only): an archive of ``shapes/`` holds the
   dataset in its only folder; ``add_metadata_yaml`` stores the metadata's
   ``dataset.yaml`` text or class names as the dataset's ``dataset.yaml``.
2. ``load_confined``: the description (``dataset.yaml`` or the generic
   layout), whose root and every split folder and list must stay inside the
   dataset's folder (an uploaded YAML may not point at the server's files),
   and whose split lists fit the file limit.
3. ``fingerprint``: the content hash (``content.content_hash``).
4. ``validate``: every image and mask header within the pixel limit, then
   ``check_dataset``; every problem listed in ``DatasetInvalid`` with paths
   relative to the dataset.
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
from segsvc.data.io import IMAGE_SUFFIXES
from segsvc.data.labels import LabelMapper
from segsvc.data.layouts import Fault, FolderCache, Problem, index_split
from segsvc.data.spec import FOLDER_SPEC_NAMES, DatasetSpec, load_dataset_spec, parse_spec_yaml, spec_from_folder
from segsvc.datasets.archive import ENTRIES_PER_FILE, ExtractLimits
from segsvc.datasets.content import content_hash, file_digest, is_excluded
from segsvc.datasets.split import VAL_FRACTION, assign_splits, needs_split
from segsvc.errors import DatasetError, DatasetInvalid, InvalidArgument, InvalidImage, NotFound, PathOutsideRoot
from segsvc.files import check_path_length, write_atomic
from segsvc.inference.containers import image_header

SPEC_FILE = "spec.yaml"
MAX_MESSAGE_PROBLEMS = 5  # shown in the error message; the status details carry the rest
# PyYAML parses a description whole, in pure Python: about 2 s and 50 MiB of memory per MiB of YAML.
MAX_DESCRIPTION_BYTES = 4 << 20
# A split list names one sample per line (CamVid's 'image mask' lines with absolute paths: ~90 bytes).
LIST_BYTES_PER_SAMPLE = 256
# Class names a dataset may have. Masks hold uint8 or uint16 values (label maps reach 65535), but every class costs
# a logit map per pixel in the model and a name and share in each Dataset message: ADE20K has 150, COCO-Stuff 182.
MAX_CLASSES = 1024
# Bytes of one class name in UTF-8. Names travel in every Dataset message, and a trained model's manifest holds them
# all, JSON-escaped (up to 6 bytes per byte for a control character), under its 1 MiB limit: 1024 x 128 x 6 fits.
# The class names of common datasets (with ADE20K's lists of synonyms) are a few dozen characters.
MAX_CLASS_NAME_BYTES = 128

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
    """An extracted archive's ``folder``, or its only subfolder when it holds nothing else (an archive of ``shapes/``).

    Archives only: files sent one by one (pairs) are named relative to the dataset's root already, and a
    folder's tar stream wraps the files of a folder holding only a folder (``content.folder_tar_names``).
    """
    entries = [e for e in folder.iterdir() if not is_excluded(e.name)]
    if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink():
        return entries[0]
    return folder


def add_metadata_yaml(root: Path, dataset_yaml: str = "", class_names: Sequence[str] = ()) -> None:
    """Store the upload metadata's ``dataset.yaml`` text, or a ``dataset.yaml`` naming ``class_names``.

    The file becomes part of the dataset (and of its hash), so the same files
    and classes give the same dataset whichever way the description came. The
    ``root`` in the metadata's text becomes ``.``: it says where the files were on
    the uploader's machine, and on the server the upload itself is the root (so
    a built-in spec such as ``segsvc/data/specs/membrane.yaml`` can be sent as is).

    The one written from ``class_names`` describes the files alone: the layout's
    splits, the images' own channels (grey slices are not RGB) and the classes.
    It names no dataset: ``name`` is the registry's, which ``load_confined`` gives
    the spec, and written into a hashed file it made the same files and classes a
    new dataset under every name they were uploaded as.
    """
    existing = next((n for n in FOLDER_SPEC_NAMES if (root / n).is_file()), None)
    if dataset_yaml and class_names:
        raise InvalidArgument("give the classes either in dataset_yaml or as class_names, not both")
    if (dataset_yaml or class_names) and existing:
        raise InvalidArgument(f"the upload holds its own {existing}: do not send a description in the metadata too")
    if dataset_yaml:
        (root / FOLDER_SPEC_NAMES[0]).write_text(_rooted_here(dataset_yaml))
    elif class_names:
        check_class_names(class_names)  # before they become the dataset's description
        try:
            spec = spec_from_folder(root)  # the generic layout's splits, as found
        except DatasetError as exc:  # it names the folder: never show the server's folders
            raise DatasetError(scrub_paths(str(exc), root)) from None
        description = replace(spec, root=Path("."), class_names=tuple(class_names), palette=()).to_dict()
        del description["name"]  # the registered name is no part of the content (see above)
        _write_yaml(root / FOLDER_SPEC_NAMES[0], description)


def _rooted_here(dataset_yaml: str) -> str:
    """The metadata's ``dataset.yaml`` text with ``root: .`` (unchanged when it says so already)."""
    data = parse_spec_yaml(dataset_yaml, "the metadata's dataset.yaml")  # a key given twice is refused, not dropped
    if not isinstance(data, dict) or data.get("root", ".") == ".":
        return dataset_yaml
    data["root"] = "."
    return yaml.safe_dump(data, sort_keys=False)


def _inside(root: Path, path: Path) -> bool:
    return path == root or path.is_relative_to(root)


def load_confined(root: Path, name: str, limits: ExtractLimits = ExtractLimits()) -> DatasetSpec:
    """The dataset's description, named ``name``, with every path it reads confined to ``root``.

    Its cost is bounded before it is read: a ``dataset.yaml`` of at most ``MAX_DESCRIPTION_BYTES``,
    split lists and ids naming at most ``limits.max_entries`` samples in all (``check_listed``).

    Raises:
        DatasetError: no usable description, a synthetic one (no files), no class names, more than
            ``MAX_CLASSES`` or one over ``MAX_CLASS_NAME_BYTES``, too long a description or split list, an
            absolute split folder or list.
        PathOutsideRoot: the root, a split folder or list leads outside ``root``.
    """
    for file_name in FOLDER_SPEC_NAMES:
        if (root / file_name).is_file() and (size := (root / file_name).stat().st_size) > MAX_DESCRIPTION_BYTES:
            raise DatasetError(f"{file_name} is {size} bytes: more than {MAX_DESCRIPTION_BYTES} bytes, the server's "
                               f"limit for a dataset description")
    spec = load_dataset_spec(root)
    if spec.format == "synthetic":
        raise DatasetError("a synthetic dataset is generated on the fly: there are no files to register")
    real_root = root.resolve()
    if not _inside(real_root, spec.root.resolve()):
        raise PathOutsideRoot(f"dataset.yaml: root {spec.to_dict()['root']!r} leads outside the dataset")
    for split_name, split in spec.splits.items():
        for key in ("images", "masks", "list"):
            rel = getattr(split, key)
            # An absolute one would stay where it is while the dataset moves (an upload's work folder is
            # renamed to its hash), and its files have no name relative to the dataset to hash or split by.
            if rel is not None and Path(rel).is_absolute():
                raise DatasetError(f"dataset.yaml: split {split_name!r} {key} is an absolute path: give it "
                                   f"relative to the dataset's root")
            if rel is not None:  # before the filesystem is asked ('File name too long' was an internal error)
                check_path_length(real_root, str(rel), f"dataset.yaml: split {split_name!r} {key}")
            if rel is not None and not _inside(real_root, (spec.root / rel).resolve()):
                raise PathOutsideRoot(f"dataset.yaml: split {split_name!r} {key} {rel!r} leads outside the dataset")
    if not spec.class_names:
        raise DatasetError("the dataset names no classes: add a dataset.yaml with 'classes:' "
                           "(or send the class names with the upload)")
    check_class_names(spec.class_names)
    check_listed(spec, limits)
    return replace(spec, name=name)


def check_class_names(names: Sequence[str]) -> None:
    """Refuse more than ``MAX_CLASSES`` class names, or one longer than ``MAX_CLASS_NAME_BYTES`` in UTF-8.

    Raises:
        DatasetError: naming the first name too long by its index and its beginning (not the whole of it).
    """
    if len(names) > MAX_CLASSES:
        raise DatasetError(f"the dataset names {len(names)} classes: more than {MAX_CLASSES}, the server's limit")
    for index, name in enumerate(names):
        size = len(str(name).encode("utf-8", "surrogatepass"))
        if size > MAX_CLASS_NAME_BYTES:
            raise DatasetError(f"class {index} ({str(name)[:24] + '...'!r}) is {size} bytes in UTF-8: more than "
                               f"{MAX_CLASS_NAME_BYTES}, the server's limit for a class name")


def check_listed(spec: DatasetSpec, limits: ExtractLimits) -> None:
    """Refuse split lists and ids that name more samples than a dataset within ``limits`` can hold.

    Indexing costs a sample, or a problem, per listed line whether or not its files exist: a list
    of a million lines (8 MB) took a minute and 900 MB. A folder split costs one per file, which
    the file limit bounds; a listed one is bounded the same way, before it is read: at most
    ``ENTRIES_PER_FILE`` listed samples per allowed file over all splits, and at most
    ``LIST_BYTES_PER_SAMPLE`` bytes of list file per sample (blank lines and comments included).
    """
    listed = 0
    for split_name, split in spec.splits.items():
        if split.list is not None:
            listed += _list_entries(spec.root / split.list, split.list, limits)
        elif split.ids is not None:
            listed += len(split.ids)
        if listed > limits.max_entries:
            raise DatasetError(f"the splits list more than {limits.max_entries} samples (reached at split "
                               f"{split_name!r}); the server's limit: {limits.max_files} files, at most "
                               f"{ENTRIES_PER_FILE} listed samples per file")


def _list_entries(path: Path, shown: str, limits: ExtractLimits) -> int:
    """The samples a split list names (its lines but blank ones and comments), read a line at a time."""
    if not path.is_file():
        return 0  # index_split reports it
    most = LIST_BYTES_PER_SAMPLE * limits.max_entries
    if (size := path.stat().st_size) > most:
        raise DatasetError(f"split list {shown!r} is {size} bytes: more than {most} bytes, the server's limit "
                           f"({LIST_BYTES_PER_SAMPLE} bytes per sample of a dataset of at most {limits.max_files} "
                           f"files)")
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip() and not line.lstrip().startswith(b"#"))


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
    check_path_length(real_root, folder, "folder")
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


def oversized_images(spec: DatasetSpec, max_pixels: int) -> list[Problem]:
    """The images and masks whose headers declare more than ``max_pixels`` pixels, found without decoding them.

    ``check_dataset`` decodes every file whole: a PNG of a few hundred kilobytes that declares
    30 000 x 30 000 pixels would take gigabytes, and one past OpenCV's own limit raises ``cv2.error``.
    So every file must first pass the container check the server applies to the images it segments
    (``inference.containers``: PNG, JPEG, TIFF, BMP or WebP, whole): OpenCV decodes other formats
    under an image suffix (a PGM named ``x.png``) past any header check here. A file that cannot be
    read is left to ``check_dataset``, which reports it.
    """
    folders = FolderCache(spec)
    seen: set[Path] = set()
    problems: list[Problem] = []
    for name in spec.splits:
        for sample in index_split(spec, name, folders).samples:
            for path in (sample.image, sample.mask):
                if path is None or path in seen:
                    continue
                seen.add(path)
                try:
                    header = image_header(path.read_bytes())
                except OSError:
                    continue
                except InvalidImage as exc:
                    problems.append(Problem(Fault.UNREADABLE, path, str(exc)))
                    continue
                if header.width * header.height > max_pixels:
                    problems.append(Problem(Fault.UNREADABLE, path, (
                        f"{header.width}x{header.height} = {header.width * header.height} pixels, over the "
                        f"server's limit of {max_pixels} pixels per image (segsvc serve --max-dataset-pixels)")))
    return problems


def server_check(spec: DatasetSpec, max_pixels: int = ExtractLimits.max_pixels,
                 progress: Progress | None = None) -> CheckReport:
    """The check the server runs on every dataset it ingests, as a report: ``segsvc data check`` runs it too,
    so a user learns before uploading what the server would refuse.

    Every image and mask must first pass the container and pixel checks (``oversized_images``: one frame of
    PNG, JPEG, TIFF, BMP or WebP, no APNG, multi-page TIFF or animated WebP, at most ``max_pixels`` pixels);
    the files that fail are problems and are never decoded. ``check_dataset`` then checks the rest, so one
    report lists every problem. When it finds nothing, a split without samples (images in a format no layout
    reads, or a folder too deep) is a problem.
    """
    if spec.format == "synthetic":
        return check_dataset(spec, progress=progress)
    refused = oversized_images(spec, max_pixels)
    report = check_dataset(spec, progress=progress, skip={problem.path for problem in refused})
    if refused:
        return replace(report, problems=tuple(refused) + report.problems,
                       notes=report.notes + ("files refused from their headers were not decoded",))
    if not report.ok:
        return report
    empty = [Problem(Fault.LAYOUT, spec.root / (spec.splits[name].images or ""),
                     f"split {name!r} has no samples: no {'/'.join(IMAGE_SUFFIXES)} image in its folder or list")
             for name, size in report.split_sizes.items() if size == 0]
    return replace(report, problems=report.problems + tuple(empty))


def validate(spec: DatasetSpec, root: Path, progress: Progress | None = None,
             max_pixels: int = ExtractLimits.max_pixels) -> CheckReport:
    """``server_check``; any problem raises ``DatasetInvalid`` listing them all (relative to ``root``)."""
    report = server_check(spec, max_pixels, progress)
    if not report.ok:
        raise _invalid(spec, root, report.problems)
    return report


def _invalid(spec: DatasetSpec, root: Path, found: Sequence[Problem]) -> DatasetInvalid:
    problems = tuple((p.fault.value, _relative(p.path, root), scrub_paths(p.detail, root)) for p in found)
    shown = "; ".join(f"{path}: {kind}" for kind, path, _ in problems[:MAX_MESSAGE_PROBLEMS])
    more = f"; and {len(problems) - MAX_MESSAGE_PROBLEMS} more" if len(problems) > MAX_MESSAGE_PROBLEMS else ""
    return DatasetInvalid(f"dataset {spec.name!r} fails its check with {len(problems)} problem(s) "
                          f"(listed in the status details): {shown}{more}", problems)


def class_shares(report: CheckReport, spec: DatasetSpec) -> dict[str, float]:
    """Share of each class among the labelled pixels (after the label map; ignored pixels left out)."""
    mapper = LabelMapper(spec)
    counts = [0] * spec.num_classes
    for raw, n in report.raw_label_pixels.items():
        value = mapper.colour_table.get(raw) if isinstance(raw, tuple) else raw
        if value is None:
            continue
        if isinstance(raw, tuple) and value == spec.ignore_index:
            continue  # the ignore colour: label_map does not remap it (LabelMapper)
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
