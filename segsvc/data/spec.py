"""Dataset descriptions: one YAML file says where a dataset lives and what its labels mean.

A ``DatasetSpec`` is built once (from a YAML file, a built-in name or a bare
folder) and handed to the readers, the checker and the trainer; nothing
downstream re-reads the YAML or the environment.

YAML schema (every key but ``format`` and ``root`` is optional)::

    name: camvid
    format: camvid            # folder | camvid | membrane | voc | synthetic
    root: ${datasets}/camvid  # ${datasets} = $SEGSVC_DATASETS or <repo>/../shared/datasets;
                              # other relative paths are relative to this YAML file's folder
    channels: 3               # 3 = RGB, 1 = grey
    classes: [Sky, Building]  # class id i is classes[i]
    palette: [[128, 128, 128], [128, 0, 0]]   # RGB per class: display and RGB-mask decoding
    ignore_index: 255         # label ignored by loss and metrics; padding uses it too
    ignore_color: [0, 0, 0]   # RGB masks: this colour means ignore_index
    label_map: {11: 255}      # raw mask value -> class id (or ignore_index), via a lookup table
    unknown_labels: error     # error | ignore: what reading does with values outside the classes
    mean: [0.485, 0.456, 0.406]   # normalisation, both or neither (default: ImageNet for RGB, 0.5/0.25 for grey)
    std: [0.229, 0.224, 0.225]
    splits:                   # per split; keys left out take the format's defaults
      train: {images: train, masks: trainannot, list: train.txt}
      val: {images: images, masks: masks, ids: [a, b, c]}
      test: {images: test, masks: null}      # masks: null = unlabelled split
    options: {}               # mask_encoding: auto | ids | rgb (colour masks; see io.read_label_file);
                              # mask_suffix (masks named <stem><suffix>.png);
                              # images_without_masks: allowed (VOC); synthetic: size [h, w],
                              # min_shapes, max_shapes, pixel_noise, shape_texture
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Mapping, Optional

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Strict, ValidationError

from segsvc.config import InputSpec
from segsvc.data.channels import folder_channels
from segsvc.data.spec_values import value_problems
from segsvc.datasets.content import is_excluded
from segsvc.palette import default_palette
from segsvc.errors import DatasetError, NotFound
from segsvc.validation import explain, fixed_length

DATASETS_ENV = "SEGSVC_DATASETS"
SPECS_DIR = Path(__file__).resolve().parent / "specs"
FOLDER_SPEC_NAMES = ("dataset.yaml", "dataset.yml")
_DATASETS_TOKEN = "${datasets}"


def repo_root() -> Path:
    """The checkout this package lives in (``segsvc/`` sits directly under it)."""
    return Path(__file__).resolve().parents[2]


def datasets_dir() -> Path:
    """Where the shared datasets live: ``$SEGSVC_DATASETS`` or ``<repo>/../shared/datasets``."""
    env = os.environ.get(DATASETS_ENV)
    return Path(env).expanduser() if env else (repo_root().parent / "shared" / "datasets").resolve()


@dataclass(frozen=True)
class SplitSpec:
    """Which files make up one split. Paths are relative to the dataset root.

    Args:
        images: folder of the images.
        masks: folder of the masks; ``None`` for an unlabelled split.
        list: a text file naming the samples, one per line: a stem, or an
            ``image mask`` pair of paths (only the file names are used, so lists
            written on another machine still work).
        ids: the sample stems, when listed in the YAML itself.
        count, seed: synthetic datasets: how many samples, and the split's seed.
    """

    images: str | None = None
    masks: str | None = None
    list: str | None = None
    ids: tuple[str, ...] | None = None
    count: int | None = None
    seed: int | None = None

    @property
    def labelled(self) -> bool:
        return self.masks is not None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"images": self.images, "masks": self.masks}
        for key in ("list", "count", "seed"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.ids is not None:
            out["ids"] = list(self.ids)
        return out


def _split_defaults(fmt: str, split: str, index: int) -> dict[str, Any]:
    """The layout each format has on disk, so a YAML only spells out what differs."""
    if fmt == "camvid":
        return {"images": split, "masks": f"{split}annot", "list": f"{split}.txt"}
    if fmt == "membrane":
        return {"images": "train/image", "masks": "train/label"}
    if fmt == "voc":
        return {"images": "JPEGImages", "masks": "SegmentationClass", "list": f"ImageSets/Segmentation/{split}.txt"}
    if fmt == "synthetic":
        return {"count": 256, "seed": index}
    return {"images": "images", "masks": "masks"}


@dataclass(frozen=True)
class DatasetSpec:
    """Everything the readers need to know about one dataset; see the module docstring for YAML.

    Args:
        name: a short name for messages and model manifests.
        format: one of ``FORMATS``; it picks the reader and the default layout.
        root: the dataset's folder (unused by ``synthetic``).
        class_names: class id ``i`` is ``class_names[i]``. Empty only for a bare
            folder without ``dataset.yaml`` (which can be checked but not trained on).
        palette: one RGB colour per class.
        ignore_index: label excluded from loss and metrics, and used for padding.
        label_map: raw mask value -> class id or ``ignore_index``.
        unknown_labels: ``"error"`` stops reading at a value outside the classes;
            ``"ignore"`` turns it into ``ignore_index`` (``check`` reports it either way).
        splits: split name -> ``SplitSpec``.
        channels: 3 (RGB) or 1 (grey); images are converted on reading.

    Example:
        >>> spec = load_dataset_spec("membrane")
        >>> spec.num_classes, spec.channels, dict(spec.label_map)
        (2, 1, {255: 1})
    """

    name: str
    format: str
    root: Path
    class_names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...] = ()
    ignore_index: int | None = 255
    ignore_color: tuple[int, int, int] | None = None
    label_map: Mapping[int, int] = field(default_factory=dict)
    unknown_labels: str = "error"
    splits: Mapping[str, SplitSpec] = field(default_factory=dict)
    channels: int = 3
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    source: Path | None = None

    def __post_init__(self) -> None:
        problems = value_problems(vars(self))
        if problems:
            raise DatasetError(f"{self.source or self.name}: " + "; ".join(problems))
        palette = self.palette or default_palette(len(self.class_names))
        object.__setattr__(self, "root", Path(self.root))
        object.__setattr__(self, "palette", tuple(tuple(c) for c in palette))
        object.__setattr__(self, "label_map", MappingProxyType(dict(self.label_map)))
        object.__setattr__(self, "splits", MappingProxyType(dict(self.splits)))
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def mask_encoding(self) -> str:
        """How mask files store labels: ``auto``, ``ids`` or ``rgb`` (see ``io.read_label_file``)."""
        return str(self.options.get("mask_encoding", "auto"))

    def input_spec(self) -> InputSpec:
        """Normalisation for ``preprocess``: the YAML's mean/std or the channel default."""
        if self.mean is None or self.std is None:
            return InputSpec.default_for(self.channels)
        return InputSpec(self.channels, self.mean, self.std)

    def split(self, name: str) -> SplitSpec:
        """The named split, or a ``DatasetError`` listing the splits there are."""
        try:
            return self.splits[name]
        except KeyError:
            raise DatasetError(
                f"dataset {self.name!r} has no split {name!r}; splits: {', '.join(self.splits)}"
            ) from None

    def to_dict(self) -> dict[str, Any]:
        """The YAML form (root as given; write it next to the data with ``root: .``)."""
        out: dict[str, Any] = {
            "name": self.name,
            "format": self.format,
            "root": str(self.root),
            "channels": self.channels,
            "classes": list(self.class_names),
            "palette": [list(c) for c in self.palette],
            "ignore_index": self.ignore_index,
            "label_map": dict(self.label_map),
            "unknown_labels": self.unknown_labels,
            "splits": {name: s.to_dict() for name, s in self.splits.items()},
            "options": dict(self.options),
        }
        if self.ignore_color is not None:
            out["ignore_color"] = list(self.ignore_color)
        if self.mean is not None and self.std is not None:
            out["mean"], out["std"] = list(self.mean), list(self.std)
        return out


def resolve_root(root: str, base: Path) -> Path:
    """Expand ``${datasets}`` and ``~``; relative paths are relative to ``base`` (the YAML's folder)."""
    if root.startswith(_DATASETS_TOKEN):
        return datasets_dir() / root[len(_DATASETS_TOKEN) :].lstrip("/")
    path = Path(root).expanduser()
    return path if path.is_absolute() else (base / path).resolve()


# -- the YAML schema: structure and types here, meaning in DatasetSpec.__post_init__ --------
def _int_or_str(value: Any) -> Any:
    """Sample ids may be written as numbers (``ids: [0, 1]``); they are file stems."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _colour_range(value: Any) -> Any:
    if isinstance(value, (list, tuple)) and not all(isinstance(v, int) and 0 <= v <= 255 for v in value):
        raise ValueError(f"colours are [r, g, b] integers in 0..255, got {list(value)!r}")
    return value


_Int = Annotated[int, Strict()]
_Str = Annotated[str, Strict()]
_Colour = Annotated[fixed_length(tuple[_Int, _Int, _Int], 3, "integers (r, g, b)"), BeforeValidator(_colour_range)]
_SampleId = Annotated[_Str, BeforeValidator(_int_or_str)]


class _SplitFile(BaseModel):
    """One entry of ``splits:``; keys left out take the format's defaults (``_split_defaults``)."""

    model_config = ConfigDict(extra="forbid")

    images: Optional[_Str] = None
    masks: Optional[_Str] = None
    list: Optional[_Str] = None
    ids: Optional[tuple[_SampleId, ...]] = None
    count: Optional[_Int] = None
    seed: Optional[_Int] = None

    def resolve(self, fmt: str, split: str, index: int) -> SplitSpec:
        given = self.model_dump(exclude_unset=True)
        return SplitSpec(**{**_split_defaults(fmt, split, index), **given})


class _SpecFile(BaseModel):
    """A dataset YAML as written; ``null`` means "the default" wherever a key is optional."""

    model_config = ConfigDict(extra="forbid")

    name: Optional[_Str] = None
    format: _Str = "folder"
    root: Optional[_Str] = None
    channels: _Int = 3
    classes: Optional[tuple[_Str, ...]] = None
    palette: Optional[tuple[_Colour, ...]] = None
    ignore_index: Optional[_Int] = 255
    ignore_color: Optional[_Colour] = None
    label_map: Optional[dict[int, _Int]] = None
    unknown_labels: _Str = "error"
    mean: Optional[tuple[float, ...]] = None
    std: Optional[tuple[float, ...]] = None
    splits: Optional[dict[str, Optional[_SplitFile]]] = None
    options: Optional[dict[str, Any]] = None


def spec_from_dict(data: Mapping[str, Any], base: Path, source: Path | None = None) -> DatasetSpec:
    """Build a spec from parsed YAML; relative paths resolve against ``base``.

    Raises:
        DatasetError: naming the file and every bad key, e.g. ``splits.train.imgs: unknown key``.
    """
    where = str(source or "dataset spec")
    if not isinstance(data, Mapping):
        raise DatasetError(f"{where}: a dataset spec must be a mapping, got {type(data).__name__}")
    try:
        raw = _SpecFile.model_validate(dict(data))
    except ValidationError as exc:
        raise DatasetError(f"{where}: " + "; ".join(explain(exc, _SpecFile))) from None
    splits = raw.splits or {"train": None}
    fields: dict[str, Any] = dict(
        name=raw.name or (source.stem if source else "dataset"),
        format=raw.format,
        root=resolve_root(raw.root or ".", base),
        class_names=raw.classes or (),
        palette=raw.palette or (),
        ignore_index=raw.ignore_index,
        ignore_color=raw.ignore_color,
        label_map=raw.label_map or {},
        unknown_labels=raw.unknown_labels,
        splits={
            name: (split or _SplitFile()).resolve(raw.format, name, i) for i, (name, split) in enumerate(splits.items())
        },
        channels=raw.channels,
        mean=raw.mean,
        std=raw.std,
        options=raw.options or {},
        source=source,
    )
    if raw.root is None and raw.format != "synthetic":  # listed with the value problems, if any
        problems = ["'root' (the dataset folder) is required", *value_problems(fields)]
        raise DatasetError(f"{where}: " + "; ".join(problems))
    spec = DatasetSpec(**fields)
    if spec.format == "synthetic":  # its options are the generator's: checked now, not when a dataset is built
        from segsvc.data.synthetic import SyntheticConfig  # synthetic.py builds its specs with this module

        SyntheticConfig.from_spec(spec)
    return spec


def builtin_specs() -> list[str]:
    """Names accepted by ``load_dataset_spec`` besides paths."""
    return sorted(p.stem for p in SPECS_DIR.glob("*.yaml"))


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the last silently,
    so a second ``train:`` split or ``label_map:`` would replace the first without a word)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *anchor": its keys may be overridden here
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) or key is None:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is given twice in one mapping", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_spec_yaml(text: str, what: str) -> Any:
    """A dataset description's YAML text as data (``UniqueKeyLoader``); ``what`` begins each refusal.

    Raises:
        DatasetError: ``<what>: invalid YAML: <problem> at line L, column C``, or nesting deeper than PyYAML's
            recursion reaches (5,000 ``[`` in a row were an internal error: a RecursionError).
    """
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as exc:
        raise DatasetError(f"{what}: invalid YAML: {_yaml_problem(exc)}") from None
    except RecursionError:  # the composer recurses once per level of nesting
        raise DatasetError(f"{what}: invalid YAML: nested too deeply (a dataset description needs a few "
                           f"levels)") from None


def _load_yaml(path: Path) -> DatasetSpec:
    try:
        text = path.read_text()
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read dataset spec ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: dataset spec is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    return spec_from_dict(parse_spec_yaml(text, str(path)), base=path.parent, source=path)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's multi-line message in one line: the problem and where (``line 2, column 9``)."""
    problem = getattr(exc, "problem", None)
    mark = getattr(exc, "problem_mark", None)
    if problem is None:
        return " ".join(str(exc).split())
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    context = getattr(exc, "context", None)
    return f"{problem}{where}" + (f" ({context})" if context else "")


def spec_from_folder(folder: Path, num_classes: int | None = None) -> DatasetSpec:
    """Describe a folder in the generic layout: ``images/`` + ``masks/`` matched by file stem.

    A ``dataset.yaml`` inside the folder wins. Otherwise splits come from
    subfolders (``images/train``, ``masks/train``), from ``splits/*.txt`` stem
    lists, or the whole folder is one split named ``all``. Without a YAML the
    class names are unknown: ``num_classes`` names them ``class_0...``, or the
    spec has none (enough to check pairing and readability, not to train). The
    channels are the images' own, from their headers (``channels.folder_channels``:
    grey 1, colour 3; a folder mixing both is refused), not the default 3 that made
    grey slices an RGB dataset. Hidden
    subfolders and lists (``images/.ipynb_checkpoints``, ``splits/._train.txt``) are
    no part of a dataset (``content.is_excluded``) and name no split.
    """
    for name in FOLDER_SPEC_NAMES:
        if (folder / name).is_file():
            return _load_yaml(folder / name)
    images, masks = folder / "images", folder / "masks"
    if not images.is_dir() or not masks.is_dir():
        raise DatasetError(
            f"{folder}: not a dataset folder: it needs {FOLDER_SPEC_NAMES[0]} or images/ and masks/ subfolders"
        )
    # Split folders are images/'s. With them, a split folder only masks/ has (masks/val without images/val) names
    # a split too, reported as a missing folder rather than left unread; without them, folders in masks/ (a
    # preview/ beside flat masks) name no split.
    subdirs = _split_folders(images)
    if subdirs:
        subdirs = sorted({*subdirs, *_split_folders(masks)})
    lists = sorted(p for p in (folder / "splits").glob("*.txt") if not is_excluded(f"splits/{p.name}"))
    if subdirs:
        splits = {s: SplitSpec(images=f"images/{s}", masks=f"masks/{s}") for s in subdirs}
    elif lists:
        splits = {p.stem: SplitSpec(images="images", masks="masks", list=f"splits/{p.name}") for p in lists}
    else:
        splits = {"all": SplitSpec(images="images", masks="masks")}
    classes = tuple(f"class_{i}" for i in range(num_classes)) if num_classes else ()
    channels = folder_channels(folder, (split.images for split in splits.values() if split.images is not None))
    return DatasetSpec(name=folder.name, format="folder", root=folder, class_names=classes, splits=splits,
                       channels=channels)


def _split_folders(top: Path) -> list[str]:
    """The visible subfolders of ``top`` (``images/`` or ``masks/``), by name."""
    return sorted(p.name for p in top.iterdir() if not is_excluded(f"{top.name}/{p.name}") and p.is_dir())


def load_dataset_spec(path_or_name: str | Path, num_classes: int | None = None) -> DatasetSpec:
    """Load a dataset description from a YAML file, a built-in name or a generic-layout folder.

    Args:
        path_or_name: ``camvid``/``membrane``/``synthetic``/... (see ``builtin_specs()``),
            a ``.yaml`` file, or a folder (its ``dataset.yaml``, else the generic layout).
        num_classes: only for a bare folder without ``dataset.yaml``.

    Raises:
        NotFound: neither an existing path nor a built-in name.
        DatasetError: the description is malformed.
    """
    path = Path(path_or_name).expanduser()
    if path.is_dir():
        return spec_from_folder(path, num_classes)
    if path.is_file():
        return _load_yaml(path)
    name = str(path_or_name)
    if re.fullmatch(r"[A-Za-z0-9_.-]+", name) and (SPECS_DIR / f"{name}.yaml").is_file():
        return _load_yaml(SPECS_DIR / f"{name}.yaml")
    raise NotFound(
        f"no dataset spec {name!r}: not a file or folder, and not a built-in ({', '.join(builtin_specs())})"
    )


def with_root(spec: DatasetSpec, root: str | Path) -> DatasetSpec:
    """The same description pointing at another copy of the data."""
    return replace(spec, root=Path(root))
