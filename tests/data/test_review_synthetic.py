"""Synthetic specs: generator options checked when the spec is loaded, and the cost of a sample bounded."""

from __future__ import annotations

from pathlib import Path

import pytest

from segsvc.data.check import check_dataset
from segsvc.data.spec import load_dataset_spec
from segsvc.errors import DatasetError

SPEC = """\
format: synthetic
classes: [background, circle]
splits:
  train: {count: 4, seed: 0}
"""


def _write(tmp_path: Path, extra: str = "", splits: str = "") -> Path:
    path = tmp_path / "synthetic.yaml"
    text = SPEC.replace("  train: {count: 4, seed: 0}\n", splits) if splits else SPEC
    path.write_text(text + extra)
    return path


@pytest.mark.parametrize(("options", "message"), [
    # ValueError / TypeError tracebacks when the dataset was built (int("abc"), float([1]))
    ("{min_shapes: abc}", "options.min_shapes must be an integer, got 'abc'"),
    ("{pixel_noise: [1]}", r"options.pixel_noise must be a number, got \[1\]"),
    ("{size: [a, 64]}", r"options.size must be \[height, width\] integers"),
    ("{shape_texture: .nan}", "shape_texture must be a non-negative number"),
    # unbounded: 100000 x 100000 float textures, or a billion shapes per sample, before any work
    ("{size: [100000, 100000]}", "at most 4096 on a side"),
    ("{max_shapes: 1000000000}", "max_shapes <= 64"),
])
def test_bad_generator_options_are_refused_when_loaded(tmp_path: Path, options: str, message: str) -> None:
    path = _write(tmp_path, f"options: {options}\n")
    with pytest.raises(DatasetError, match=message) as info:
        load_dataset_spec(path)
    assert str(info.value).startswith(str(path))


@pytest.mark.parametrize("split", ["{count: 1000000000000, seed: 0}", "{count: 0, seed: 0}", "{count: 4, seed: -1}"])
def test_split_counts_and_seeds_are_bounded_when_loaded(tmp_path: Path, split: str) -> None:
    # a trillion samples built a list of a trillion names (and `data check` generated them all)
    path = _write(tmp_path, splits=f"  train: {split}\n")
    with pytest.raises(DatasetError, match="synthetic split 'train' needs a count within 1..1000000"):
        load_dataset_spec(path)


def test_a_valid_synthetic_spec_still_checks(tmp_path: Path) -> None:
    report = check_dataset(_write(tmp_path, "options: {size: [32, 40], max_shapes: 2, pixel_noise: 2}\n"))
    assert report.ok and report.split_sizes == {"train": 4}
