"""Raw mask values -> training labels, through one lookup table per dataset.

Datasets store labels their own way (CamVid's void is 11, ISBI's cells are
255, VOC's boundaries are 255, some datasets use colours). ``LabelMapper``
turns whatever a mask file holds into class ids ``0..K-1`` plus the ignore
index, and says which raw values fit neither, so that ``check`` can report
them and the readers can refuse (or, if the spec says so, ignore) them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segsvc.data.io import colors_to_ids, unique_colors
from segsvc.data.spec import DatasetSpec
from segsvc.errors import DatasetError

RawValue = int | tuple[int, int, int]


@dataclass(frozen=True)
class MappedMask:
    """A mask after mapping: ``labels`` (H x W) and the raw values outside the classes.

    Pixels with such values hold ``ignore_index`` in ``labels`` (or 0 when the
    dataset has none); whether that is acceptable is the caller's decision.
    """

    labels: np.ndarray
    unknown: tuple[RawValue, ...]
    unknown_pixels: int


class LabelMapper:
    """Map raw mask values to class ids with a lookup table built once from the spec.

    Args:
        spec: supplies ``label_map``, the number of classes, ``ignore_index``,
            and for RGB masks ``palette`` and ``ignore_color``.

    Example:
        >>> from segsvc.data.spec import load_dataset_spec
        >>> m = LabelMapper(load_dataset_spec("membrane"))
        >>> m.apply(np.array([[0, 255]], np.uint8)).labels.tolist()
        [[0, 1]]
    """

    def __init__(self, spec: DatasetSpec) -> None:
        self.num_classes = spec.num_classes
        self.ignore_index = spec.ignore_index
        self.check_classes = spec.num_classes > 0
        self.label_map = dict(spec.label_map)
        colours = {c: i for i, c in enumerate(spec.palette)}
        if spec.ignore_color is not None and spec.ignore_index is not None:
            colours[spec.ignore_color] = spec.ignore_index
        self.colour_table = colours
        top = max([self.num_classes - 1, self.ignore_index or 0, *self.label_map.values(), 0])
        self.dtype = np.uint8 if top <= 255 else np.uint16 if top <= 65535 else np.int32
        self._tables: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _table(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """(mapped value, is-valid) for every raw value below ``size``."""
        if size not in self._tables:
            raw = np.arange(size, dtype=np.int64)
            mapped = raw.copy()
            for src, dst in self.label_map.items():
                if src < size:
                    mapped[src] = dst
            if self.check_classes:
                valid = mapped < self.num_classes
                if self.ignore_index is not None:
                    valid |= mapped == self.ignore_index
            else:
                valid = np.ones(size, dtype=bool)
            fill = self.ignore_index if self.ignore_index is not None else 0
            mapped = np.where(valid, mapped, fill)
            # without a class list every value is kept: a 16-bit mask keeps its 16-bit values
            dtype = np.promote_types(self.dtype, np.uint16) if not self.check_classes and size > 256 else self.dtype
            if mapped.max(initial=0) > np.iinfo(dtype).max:
                raise DatasetError(f"labels up to {mapped.max()} do not fit the label type {np.dtype(dtype).name}")
            self._tables[size] = (mapped.astype(dtype), valid)
        return self._tables[size]

    def apply(self, raw: np.ndarray, path: Path | str = "<mask>") -> MappedMask:
        """Map a mask as read by ``read_label_file`` (ids H x W or RGB H x W x 3).

        A colour mask's palette gives class ids (colour ``i`` is class ``i``), which ``label_map`` then maps as it
        maps an id mask's values (``{11: 255}`` ignores a palette's void class); ``ignore_color``'s pixels are the
        ignore index, which ``label_map`` does not remap (``{255: 1}`` is for id masks' 255).
        """
        if raw.ndim == 3:
            return self._apply_colours(raw, path)
        if raw.dtype not in (np.uint8, np.uint16):
            if raw.min(initial=0) < 0 or raw.max(initial=0) > 65535:
                raise DatasetError(f"{path}: mask values must be within 0..65535")
            raw = raw.astype(np.uint16)
        table, valid = self._table(256 if raw.dtype == np.uint8 else 65536)
        labels = table[raw]
        bad = ~valid[raw]
        unknown = tuple(int(v) for v in np.unique(raw[bad])) if bad.any() else ()
        return MappedMask(labels=labels, unknown=unknown, unknown_pixels=int(np.count_nonzero(bad)))

    def _apply_colours(self, raw: np.ndarray, path: Path | str) -> MappedMask:
        if not self.colour_table:
            raise DatasetError(f"{path}: mask is an RGB colour image but the dataset has no palette")
        ids, known = colors_to_ids(raw, self.colour_table)
        fill = self.ignore_index if self.ignore_index is not None else 0
        classes = known if self.ignore_index is None else known & (ids != self.ignore_index)
        table, _ = self._table(256 if self.num_classes <= 256 else 65536)  # palette ids are class ids
        labels = np.full(ids.shape, fill, dtype=table.dtype)  # the ignore colour, and colours of no class
        labels[classes] = table[ids[classes]]
        if known.all():
            return MappedMask(labels=labels, unknown=(), unknown_pixels=0)
        return MappedMask(labels=labels, unknown=tuple(unique_colors(raw[~known])),
                          unknown_pixels=int(np.count_nonzero(~known)))

    def describe(self, unknown: tuple[RawValue, ...], limit: int = 8) -> str:
        """``"values 12, 40"`` / ``"colours (1, 2, 3)"`` for error messages."""
        shown = ", ".join(str(v) for v in unknown[:limit]) + (" ..." if len(unknown) > limit else "")
        kind = "colours" if unknown and isinstance(unknown[0], tuple) else "values"
        valid = f"0..{self.num_classes - 1}" + (f" or {self.ignore_index}" if self.ignore_index is not None else "")
        return f"{kind} {shown} outside the classes (valid labels after mapping: {valid})"

