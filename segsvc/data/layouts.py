"""Which files make up a split: image/mask pairs for every on-disk format.

The file formats differ only in where their files sit and how a split is
listed (see ``spec._split_defaults``): the generic folder (``images/`` +
``masks/`` matched by stem), CamVid (``train.txt`` with ``image mask`` pairs
whose absolute paths come from another machine), ISBI membrane (numbered
slices, splits by id) and Pascal VOC (``ImageSets/Segmentation/*.txt`` stems).
So one indexer serves them all and records every pairing problem instead of
stopping at the first, for ``check`` to report and for readers to refuse.

Names that are no part of a dataset's content (``segsvc.datasets.content.is_excluded``:
hidden components such as ``.x.png`` or macOS ``._x.png``, ``__MACOSX/``) are left out
here as the content hash and uploads leave them out, so a folder read in place holds
the samples its upload would.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from segsvc.data.io import IMAGE_SUFFIXES
from segsvc.data.spec import DatasetSpec, SplitSpec
from segsvc.datasets.content import is_excluded
from segsvc.errors import DatasetError


class Fault(str, Enum):
    """The kinds of problem ``check`` reports."""

    IMAGE_WITHOUT_MASK = "image without mask"
    MASK_WITHOUT_IMAGE = "mask without image"
    MISSING_SAMPLE = "listed sample missing"
    SIZE_MISMATCH = "image/mask size mismatch"
    BAD_LABELS = "labels outside the classes"
    UNREADABLE = "unreadable file"
    LAYOUT = "layout"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset, naming the file (or folder) concerned."""

    fault: Fault
    path: Path
    detail: str

    def __str__(self) -> str:
        return f"[{self.fault.value}] {self.path}: {self.detail}"


@dataclass(frozen=True)
class Sample:
    """One sample: its id (the image stem) and files; ``mask`` is None in unlabelled splits."""

    name: str
    image: Path
    mask: Path | None


@dataclass(frozen=True)
class SplitIndex:
    """The complete samples of a split, and what kept others from being complete."""

    split: str
    labelled: bool
    samples: tuple[Sample, ...]
    problems: tuple[Problem, ...]


def natural_key(text: str) -> tuple[list[int | str], str]:
    """Sort ``2.png`` before ``10.png`` (ISBI slices are numbered without padding).

    ``re.split`` puts the digit runs at the odd positions, so only those become numbers (``"²".isdigit()``
    is true but ``int("²")`` fails); names equal as numbers (``a1``, ``a01``) are ordered by the text itself,
    so the order never depends on the order the names came in.
    """
    parts = re.split(r"(\d+)", text)
    return [int(t) if i % 2 else t for i, t in enumerate(parts)], text


def _file_name(token: str) -> str:
    """The file name at the end of a listed path, written on any machine (``/a/b.png``, ``C:\\a\\b.png``)."""
    return token.replace("\\", "/").rsplit("/", 1)[-1]


def _strip_image_suffix(token: str) -> str:
    name = _file_name(token)
    return Path(name).stem if Path(name).suffix.lower() in IMAGE_SUFFIXES else name


def _dataset_rel(root: Path, path: Path) -> str:
    """``path`` relative to the dataset ``root`` as the content hash names files (``""``: the root itself).

    ``..`` components (a folder a spec places beside its root) are dropped, so what
    remains is judged by the names below them.
    """
    rel = Path(os.path.relpath(path, root)).as_posix()
    return "/".join(p for p in rel.split("/") if p not in (".", ".."))


def _join(rel: str, name: str) -> str:
    return f"{rel}/{name}" if rel else name


@dataclass
class _Folder:
    """Files of one folder by stem; stems with two files (``a.png``, ``a.jpg``) are ambiguous.

    ``rel`` is the folder's ``_dataset_rel``: files whose names ``is_excluded`` drops are left out.
    """

    path: Path
    rel: str
    by_stem: dict[str, Path]
    ambiguous: dict[str, list[Path]]
    error: str = ""  # why the folder could not be listed (then it holds nothing)

    def holds(self, name: str) -> bool:
        """Whether the folder holds the dataset file ``name`` (an excluded name it never holds)."""
        return not is_excluded(_join(self.rel, name)) and (self.path / name).is_file()

    @classmethod
    def scan(cls, path: Path, rel: str, strip_suffix: str = "") -> "_Folder":
        by_stem: dict[str, Path] = {}
        ambiguous: dict[str, list[Path]] = {}
        try:
            files = sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES
                           and not is_excluded(_join(rel, f.name)) and f.is_file()) if path.is_dir() else []
        except OSError as exc:  # a folder without read permission: a problem to list, not a traceback
            return cls(path, rel, {}, {}, f"cannot list the folder ({exc.strerror or type(exc).__name__})")
        for f in files:
            stem = f.stem[: -len(strip_suffix)] if strip_suffix and f.stem.endswith(strip_suffix) else f.stem
            if stem in by_stem:
                ambiguous.setdefault(stem, [by_stem[stem]]).append(f)
            else:
                by_stem[stem] = f
        return cls(path, rel, by_stem, ambiguous)


class FolderCache:
    """Folder listings of one spec, shared by ``index_split`` and ``orphan_problems`` calls."""

    def __init__(self, spec: DatasetSpec) -> None:
        self.spec = spec
        self.mask_suffix = str(spec.options.get("mask_suffix", ""))
        self._folders: dict[tuple[Path, str], _Folder] = {}

    def folder(self, rel: str, is_mask: bool) -> _Folder:
        path, suffix = self.spec.root / rel, self.mask_suffix if is_mask else ""
        if (path, suffix) not in self._folders:
            self._folders[path, suffix] = _Folder.scan(path, _dataset_rel(self.spec.root, path), suffix)
        return self._folders[path, suffix]


def _read_list(path: Path) -> list[list[str]]:
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read split list ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: split list is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    return [line.split() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _absent(spec: DatasetSpec, rel: str, folder: bool) -> str:
    """Why the folder (or file) ``rel`` the spec names is no part of the dataset; ``""`` when it is."""
    path = spec.root / rel
    if is_excluded(_dataset_rel(spec.root, path)):
        return "is hidden (hidden names are no part of a dataset)"
    return "" if (path.is_dir() if folder else path.is_file()) else "does not exist"


def _layout_problems(spec: DatasetSpec, name: str, split: SplitSpec) -> list[Problem]:
    problems = []
    if split.images is None:
        problems.append(Problem(Fault.LAYOUT, spec.root, f"split {name!r} names no images folder"))
    for rel in (split.images, split.masks):
        if rel is not None and (why := _absent(spec, rel, folder=True)):
            problems.append(Problem(Fault.LAYOUT, spec.root / rel, f"split {name!r}: folder {why}"))
    if split.list is not None and (why := _absent(spec, split.list, folder=False)):
        problems.append(Problem(Fault.LAYOUT, spec.root / split.list, f"split {name!r}: list file {why}"))
    return problems


def _entries(spec: DatasetSpec, split: SplitSpec, images: _Folder, masks: _Folder | None) -> list[list[str]]:
    """The split's entries: ``[stem]`` or ``[image, mask]`` token lists."""
    if split.list is not None:
        return _read_list(spec.root / split.list)
    if split.ids is not None:
        return [[i] for i in split.ids]
    stems = set(images.by_stem) | (set(masks.by_stem) if masks else set())
    return [[s] for s in sorted(stems, key=natural_key)]


def index_split(spec: DatasetSpec, name: str, folders: FolderCache | None = None) -> SplitIndex:
    """Pair the images and masks of one split of a file-based dataset.

    Raises:
        DatasetError: the split does not exist, or the dataset is synthetic.
    """
    if spec.format == "synthetic":
        raise DatasetError(f"dataset {spec.name!r} is synthetic: it has no files to index")
    split = spec.split(name)
    problems = _layout_problems(spec, name, split)
    if any(p.fault is Fault.LAYOUT for p in problems):
        return SplitIndex(name, split.labelled, (), tuple(problems))
    folders = folders or FolderCache(spec)
    images = folders.folder(split.images, is_mask=False)
    masks = folders.folder(split.masks, is_mask=True) if split.masks is not None else None
    unlisted = [Problem(Fault.LAYOUT, f.path, f"split {name!r}: {f.error}") for f in (images, masks) if f and f.error]
    if unlisted:
        return SplitIndex(name, split.labelled, (), tuple(problems + unlisted))
    samples: list[Sample] = []
    for tokens in _entries(spec, split, images, masks):
        sample, problem = _pair(spec, split, tokens, images, masks)
        if problem is not None:
            problems.append(problem)
        if sample is not None:
            samples.append(sample)
    samples, repeats = _listed_once(name, split, samples)
    problems += repeats
    for folder in (images, masks):
        for stem, paths in (folder.ambiguous if folder else {}).items():
            others = ", ".join(p.name for p in paths[1:])
            problems.append(Problem(Fault.LAYOUT, paths[0], f"sample {stem!r} also has {others}; which is meant?"))
    return SplitIndex(name, split.labelled, tuple(samples), tuple(problems))


def _listed_once(name: str, split: SplitSpec, samples: list[Sample]) -> tuple[list[Sample], list[Problem]]:
    """The samples whose image and mask no earlier sample of the split uses, and a problem for each other one.

    An image listed twice would weigh twice in training and in the metrics; a mask listed with two
    images (``a.png m.png`` and ``b.png m.png``) labels one of them with the other's labels.
    """
    where = f"list {split.list}" if split.list is not None else "ids"
    images: set[Path] = set()
    masks: dict[Path, Path] = {}
    kept, problems = [], []
    for sample in samples:
        if sample.image in images:
            problems.append(Problem(Fault.LAYOUT, sample.image, f"split {name!r}: {where} names this image twice"))
        elif sample.mask is not None and sample.mask in masks:
            problems.append(Problem(Fault.LAYOUT, sample.mask, f"split {name!r}: {where} pairs this mask with "
                                                               f"{masks[sample.mask].name} and {sample.image.name}"))
        else:
            images.add(sample.image)
            if sample.mask is not None:
                masks[sample.mask] = sample.image
            kept.append(sample)
    return kept, problems


def _pair(
    spec: DatasetSpec, split: SplitSpec, tokens: list[str], images: _Folder, masks: _Folder | None
) -> tuple[Sample | None, Problem | None]:
    """One list entry -> a complete sample, or the problem that stops it."""
    if len(tokens) == 2:
        image = images.path / _file_name(tokens[0])
        mask = masks.path / _file_name(tokens[1]) if masks else None
        stem = image.stem
        image_ok = images.holds(image.name)
        mask_ok = mask is None or (masks is not None and masks.holds(mask.name))
    elif len(tokens) == 1:
        stem = _strip_image_suffix(tokens[0])
        image, mask = images.by_stem.get(stem), masks.by_stem.get(stem) if masks else None
        image_ok, mask_ok = image is not None, masks is None or mask is not None
        image = image or images.path / f"{stem}.*"
        mask = mask or (masks.path / f"{stem}{spec.options.get('mask_suffix', '')}.*" if masks else None)
    else:
        where = spec.root / (split.list or "")
        return None, Problem(Fault.LAYOUT, where, f"bad list line {' '.join(tokens)!r}: want 'stem' or 'image mask'")
    if image_ok and mask_ok:
        return Sample(stem, image, mask), None
    if image_ok:
        return None, Problem(Fault.IMAGE_WITHOUT_MASK, image, f"no mask {mask}")
    if mask_ok and mask is not None:
        return None, Problem(Fault.MASK_WITHOUT_IMAGE, mask, f"no image {image}")
    return None, Problem(Fault.MISSING_SAMPLE, image, f"sample {stem!r} is listed but its image is missing")


def orphan_problems(spec: DatasetSpec, folders: FolderCache | None = None) -> list[Problem]:
    """Files in a split's image/mask folders whose partner is missing, whether listed or not.

    List-based splits only look at the files they list; this finds the rest
    (a stray ``trainannot/x.png`` with no image). Datasets whose image folder
    legitimately holds unlabelled images (VOC's ``JPEGImages``) set the option
    ``images_without_masks: allowed``.
    """
    folders = folders or FolderCache(spec)
    allow_unlabelled = spec.options.get("images_without_masks") == "allowed"
    pairs = {(s.images, s.masks) for s in spec.splits.values() if s.images and s.masks}
    problems = []
    for images_rel, masks_rel in sorted(pairs):
        images, masks = folders.folder(images_rel, False), folders.folder(masks_rel, True)
        if not images.path.is_dir() or not masks.path.is_dir() or images.error or masks.error:
            continue  # index_split reports them
        if not allow_unlabelled:
            for stem in sorted(set(images.by_stem) - set(masks.by_stem), key=natural_key):
                problems.append(Problem(Fault.IMAGE_WITHOUT_MASK, images.by_stem[stem], f"no mask in {masks.path}"))
        for stem in sorted(set(masks.by_stem) - set(images.by_stem), key=natural_key):
            problems.append(Problem(Fault.MASK_WITHOUT_IMAGE, masks.by_stem[stem], f"no image in {images.path}"))
    return problems

