"""The meaning of a dataset spec's values, checked once: every problem listed, none left for the readers.

``DatasetSpec.__post_init__`` calls ``value_problems`` with its fields by name (the YAML's structure and
types are pydantic's, in ``spec.py``). Each check here stands for a spec that used to load and then fail
late, or read labels wrongly without a word: normalisation of the wrong length, colours two classes (or a
class and the ignore colour) share, labels past 16 bits, options of the wrong kind, unbounded synthetic splits.
"""

from __future__ import annotations

from typing import Any, Mapping

from segsvc.config import InputSpec
from segsvc.data.io import MASK_ENCODINGS
from segsvc.errors import SegsvcError
from segsvc.palette import default_palette

FORMATS = ("folder", "camvid", "membrane", "voc", "synthetic")
UNKNOWN_LABEL_POLICIES = ("error", "ignore")
MAX_LABEL = 65535  # masks hold 8- or 16-bit values, and training pads masks with the ignore index
MAX_SYNTHETIC_SAMPLES = 1_000_000  # per split: the dataset lists every sample's name when it is built


def value_problems(fields: Mapping[str, Any]) -> list[str]:
    """Every problem with the values of ``DatasetSpec`` fields (by name), in the order of the fields."""
    names, ignore, label_map = tuple(fields["class_names"]), fields["ignore_index"], fields["label_map"]
    problems = []
    if fields["format"] not in FORMATS:
        problems.append(f"unknown dataset format {fields['format']!r}; valid: {', '.join(FORMATS)}")
    if fields["channels"] not in (1, 3):
        problems.append(f"channels must be 1 or 3, got {fields['channels']!r}")
    if len(set(names)) != len(names):
        problems.append(f"class names must be unique, got {list(names)}")
    palette = fields["palette"] or default_palette(len(names))
    if len(palette) != len(names):
        problems.append(f"palette has {len(palette)} colours for {len(names)} classes")
    if ignore is not None and (not isinstance(ignore, int) or ignore < len(names)):
        problems.append(f"ignore_index must be an int outside the class ids, got {ignore!r}")
    elif ignore is not None and ignore > MAX_LABEL:
        problems.append(f"ignore_index must be at most {MAX_LABEL} (masks hold 16-bit values), got {ignore!r}")
    if fields["options"].get("mask_encoding", "auto") != "ids":  # id masks: the palette only draws the classes
        problems += _colour_problems(palette, fields["ignore_color"], names)
    valid_targets = set(range(len(names))) | ({ignore} if ignore is not None else set())
    for raw, target in label_map.items():
        if not isinstance(raw, int) or not isinstance(target, int) or not 0 <= raw <= MAX_LABEL or target < 0:
            problems.append(f"label_map entries must be int: int within 0..{MAX_LABEL} (mask values), "
                            f"got {raw!r}: {target!r}")
        elif names and target not in valid_targets:
            problems.append(f"label_map sends {raw} to {target}: neither a class nor ignore_index")
    if fields["unknown_labels"] not in UNKNOWN_LABEL_POLICIES:
        problems.append(f"unknown_labels must be 'error' or 'ignore', got {fields['unknown_labels']!r}")
    if not fields["splits"]:
        problems.append("the dataset defines no splits")
    if fields["format"] == "synthetic":
        for name, split in fields["splits"].items():
            if not (isinstance(split.count, int) and 1 <= split.count <= MAX_SYNTHETIC_SAMPLES
                    and isinstance(split.seed, int) and split.seed >= 0):
                problems.append(f"synthetic split {name!r} needs a count within 1..{MAX_SYNTHETIC_SAMPLES} and a "
                                f"non-negative seed, got count {split.count!r}, seed {split.seed!r}")
    if fields["options"].get("mask_encoding", "auto") not in MASK_ENCODINGS:
        problems.append(f"options.mask_encoding must be one of {', '.join(MASK_ENCODINGS)}")
    if not isinstance(suffix := fields["options"].get("mask_suffix", ""), str) or "/" in suffix or "\\" in suffix:
        problems.append(f"options.mask_suffix must be text added to a mask's file stem, got {suffix!r}")
    if fields["options"].get("images_without_masks", "allowed") != "allowed":
        problems.append(f"options.images_without_masks can only be 'allowed' (or left out), "
                        f"got {fields['options']['images_without_masks']!r}")
    if fields["ignore_color"] is not None and ignore is None:
        problems.append("ignore_color needs an ignore_index: its pixels are given that label")
    problems += _normalisation_problems(fields["mean"], fields["std"], fields["channels"])
    return problems


def _colour_problems(palette: Any, ignore_color: Any, names: tuple[str, ...]) -> list[str]:
    """Colours that make RGB masks ambiguous: two classes alike, or the ignore colour also a class's."""
    colours = [tuple(c) for c in palette]
    problems = []
    for i, colour in enumerate(colours):
        if colour in colours[:i]:
            first = colours.index(colour)
            problems.append(f"palette colour {list(colour)} is both class {first} and class {i}: colour masks "
                            f"cannot tell them apart")
    if ignore_color is not None and tuple(ignore_color) in colours:
        i = colours.index(tuple(ignore_color))
        shown = f"class {i} ({names[i]!r})" if i < len(names) else f"class {i}"
        problems.append(f"ignore_color {list(ignore_color)} is also the colour of {shown}; give the class "
                        f"another palette colour or the ignore colour another value")
    return problems


def _normalisation_problems(mean: Any, std: Any, channels: Any) -> list[str]:
    """``mean`` and ``std`` are given together, one value per channel (what ``input_spec`` builds from)."""
    if mean is None and std is None:
        return []
    if mean is None or std is None:
        return [f"give mean and std together (only {'mean' if std is None else 'std'} is given)"]
    if channels not in (1, 3):
        return []  # reported above
    try:
        InputSpec(channels, tuple(mean), tuple(std))
    except SegsvcError as exc:
        return [str(exc).removeprefix("input ")]
    return []
