"""``segsvc data check``: every problem of a dataset in one report.

Training on a dataset with a stray unlabelled image or a mask full of
unexpected values fails late (in a worker, hours in) or, worse, not at all.
``check_dataset`` reads every file once and collects all problems: images
without masks and masks without images, listed samples that are missing,
image/mask size mismatches, label values outside the classes (after the
spec's remapping; the ignore index is allowed), unreadable or truncated files,
and layout mistakes (missing folders or list files, ambiguous file names).
It also counts the raw label values found, which is how surprises such as an
undocumented void value show up.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Collection, Iterable, Iterator, Mapping, TypeVar

import numpy as np

from segsvc.data.io import read_image, read_label_file
from segsvc.data.labels import LabelMapper, RawValue
from segsvc.data.layouts import Fault, FolderCache, Problem, Sample, index_split, orphan_problems
from segsvc.data.spec import DatasetSpec, load_dataset_spec
from segsvc.data.synthetic import SyntheticConfig, generate_sample
from segsvc.errors import SegsvcError

__all__ = ["CheckReport", "Fault", "Problem", "check_dataset"]

T = TypeVar("T")
Progress = Callable[[Iterable[T], int], Iterable[T]]


def _no_progress(items: Iterable[T], total: int) -> Iterator[T]:
    return iter(items)


@dataclass(frozen=True)
class CheckReport:
    """The outcome of ``check_dataset``.

    Args:
        dataset: the spec's name; ``root`` its folder (None for generated data).
        split_sizes: complete samples per split.
        files_checked: image and mask files read.
        problems: every problem found, in file order within each kind.
        raw_label_pixels: pixel count per raw mask value (or RGB colour), before remapping.
        notes: things worth knowing that are not problems (e.g. labels not checked).
        channels: what the images are read as, 1 (grey) or 3 (RGB): the spec's, derived from the images'
            headers for a folder without a ``dataset.yaml``; a model trained on the dataset takes as many.
    """

    dataset: str
    root: Path | None
    split_sizes: Mapping[str, int]
    files_checked: int
    problems: tuple[Problem, ...]
    raw_label_pixels: Mapping[RawValue, int] = field(default_factory=dict)
    label_map: Mapping[int, int] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    channels: int | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def by_fault(self) -> dict[Fault, list[Problem]]:
        out: dict[Fault, list[Problem]] = {}
        for p in self.problems:
            out.setdefault(p.fault, []).append(p)
        return out

    def format(self) -> str:
        """A human-readable report listing every problem, grouped by kind."""
        splits = ", ".join(f"{name} {n}" for name, n in self.split_sizes.items())
        where = f"at {self.root}" if self.root is not None else "(generated, no files)"
        lines = [f"dataset {self.dataset} {where}", f"samples per split: {splits}",
                 f"files checked: {self.files_checked}"]  # fmt: skip
        if self.channels is not None:
            lines.append(f"channels: {self.channels} ({'grey' if self.channels == 1 else 'RGB'})")
        if self.raw_label_pixels:
            lines.append(f"raw label values (% of mask pixels): {self._label_summary()}")
        lines += [f"note: {n}" for n in self.notes]
        if self.ok:
            lines.append("OK: no problems found")
            return "\n".join(lines)
        lines.append(f"FAILED: {len(self.problems)} problem(s)")
        for fault, problems in self.by_fault().items():
            lines.append(f"  {fault.value} ({len(problems)}):")
            lines += [f"    {p.path}: {p.detail}" for p in problems]
        return "\n".join(lines)

    def _label_summary(self, limit: int = 24) -> str:
        total = sum(self.raw_label_pixels.values()) or 1
        items = sorted(self.raw_label_pixels.items(), key=lambda kv: (isinstance(kv[0], tuple), kv[0]))
        parts = []
        for value, n in items[:limit]:
            mapped = self.label_map.get(value) if isinstance(value, int) else None
            shown = f"{value}->{mapped}" if mapped is not None else str(value)
            parts.append(f"{shown} {100.0 * n / total:.2f}%")
        more = f" ... ({len(items) - limit} more)" if len(items) > limit else ""
        return " | ".join(parts) + more


def _detail(exc: Exception, path: Path) -> str:
    """The error message without its leading ``<path>: `` (the report prints the path)."""
    msg = str(exc)
    prefix = f"{path}: "
    return msg[len(prefix) :] if msg.startswith(prefix) else msg


def _dedupe(problems: list[Problem]) -> tuple[Problem, ...]:
    """One problem per (kind, file): a split list and a folder scan may find the same orphan."""
    seen: dict[tuple[Fault, Path], Problem] = {}
    for p in problems:
        seen.setdefault((p.fault, p.path), p)
    return tuple(seen.values())


def _count_raw(raw: np.ndarray, counts: Counter) -> None:
    if raw.ndim == 3:
        colours, n = np.unique(raw.reshape(-1, 3), axis=0, return_counts=True)
        counts.update({tuple(int(v) for v in c): int(k) for c, k in zip(colours, n)})
    elif raw.dtype == np.uint8:
        hist = np.bincount(raw.ravel(), minlength=256)
        counts.update({int(v): int(hist[v]) for v in np.flatnonzero(hist)})
    else:
        values, n = np.unique(raw, return_counts=True)
        counts.update({int(v): int(k) for v, k in zip(values, n)})


def _check_sample(sample: Sample, spec: DatasetSpec, mapper: LabelMapper, counts: Counter) -> list[Problem]:
    """Read one image (and its mask) and return what is wrong with them."""
    problems = []
    image = mask = None
    try:
        image = read_image(sample.image, channels=spec.channels)
    except SegsvcError as exc:
        problems.append(Problem(Fault.UNREADABLE, sample.image, _detail(exc, sample.image)))
    if sample.mask is None:
        return problems
    try:
        raw = read_label_file(sample.mask, spec.mask_encoding)
        _count_raw(raw, counts)
        mask = mapper.apply(raw, sample.mask)
    except SegsvcError as exc:
        problems.append(Problem(Fault.UNREADABLE, sample.mask, _detail(exc, sample.mask)))
    if mask is not None and mask.unknown and mapper.check_classes:
        detail = f"{mapper.describe(mask.unknown)} in {mask.unknown_pixels} pixel(s)"
        problems.append(Problem(Fault.BAD_LABELS, sample.mask, detail))
    if image is not None and mask is not None and image.shape[:2] != mask.labels.shape:
        (ih, iw), (mh, mw) = image.shape[:2], mask.labels.shape
        detail = f"mask is {mw}x{mh} but image {sample.image.name} is {iw}x{ih} (width x height)"
        problems.append(Problem(Fault.SIZE_MISMATCH, sample.mask, detail))
    return problems


def _check_synthetic(spec: DatasetSpec, progress: Progress) -> CheckReport:
    """Generate every sample once: catches options or splits the generator rejects."""
    config = SyntheticConfig.from_spec(spec)
    mapper, counts, problems = LabelMapper(spec), Counter(), []
    sizes: dict[str, int] = {}
    for name, split in spec.splits.items():
        if split.count is None or split.count < 1 or split.seed is None:
            problems.append(Problem(Fault.LAYOUT, Path(name), "a synthetic split needs a positive count and a seed"))
        else:
            sizes[name] = split.count
    items = [(name, spec.splits[name].seed, i) for name, n in sizes.items() for i in range(n)]
    for name, seed, i in progress(items, len(items)):
        _, labels = generate_sample(seed, i, config)
        _count_raw(labels, counts)
        mapped = mapper.apply(labels)
        if mapped.unknown:
            problems.append(Problem(Fault.BAD_LABELS, Path(f"{name}-{i:06d}"), mapper.describe(mapped.unknown)))
    return CheckReport(
        dataset=spec.name,
        root=None,
        split_sizes=sizes,
        files_checked=0,
        problems=tuple(problems),
        raw_label_pixels=dict(counts),
        channels=spec.channels,
    )


def check_dataset(spec_or_path: DatasetSpec | str | Path, progress: Progress | None = None,
                  skip: Collection[Path] = ()) -> CheckReport:
    """Check a whole dataset and report every problem (never stops at the first).

    Args:
        spec_or_path: a ``DatasetSpec``, or what ``load_dataset_spec`` accepts
            (a YAML file, a built-in name, a folder in the generic layout).
        progress: wraps the iteration over samples, called as
            ``progress(items, total)`` (the CLI passes a tqdm bar).
        skip: files not to decode, whose samples are left out of the per-sample checks (the caller has
            already refused them from their headers and reports that itself).

    Example:
        >>> report = check_dataset("synthetic")
        >>> report.ok, report.format().splitlines()[-1]
        (True, 'OK: no problems found')
    """
    spec = spec_or_path if isinstance(spec_or_path, DatasetSpec) else load_dataset_spec(spec_or_path)
    progress = progress or _no_progress
    if spec.format == "synthetic":
        return _check_synthetic(spec, progress)
    folders = FolderCache(spec)
    problems: list[Problem] = []
    samples: dict[tuple[Path, Path | None], Sample] = {}
    split_sizes: dict[str, int] = {}
    for name in spec.splits:
        index = index_split(spec, name, folders)
        problems += index.problems
        split_sizes[name] = len(index.samples)
        samples.update({(s.image, s.mask): s for s in index.samples})
    problems += orphan_problems(spec, folders)
    mapper, counts = LabelMapper(spec), Counter()
    skipped = set(skip)
    for key in [k for k in samples if k[0] in skipped or k[1] in skipped]:
        del samples[key]
    for sample in progress(list(samples.values()), len(samples)):
        problems += _check_sample(sample, spec, mapper, counts)
    notes = () if spec.num_classes else ("no class list (no dataset.yaml): label values were not checked",)
    return CheckReport(
        dataset=spec.name,
        root=spec.root,
        split_sizes=split_sizes,
        files_checked=sum(1 + (s.mask is not None) for s in samples.values()),
        problems=_dedupe(problems),
        raw_label_pixels=dict(counts),
        label_map=dict(spec.label_map),
        notes=notes,
        channels=spec.channels,
    )
