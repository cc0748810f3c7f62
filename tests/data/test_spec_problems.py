"""A dataset.yaml is validated with its whole problem list, value checks included."""

from __future__ import annotations

from pathlib import Path

import pytest

from segsvc.data.spec import load_dataset_spec
from segsvc.errors import DatasetError


def test_every_value_problem_is_listed_at_once(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("format: folder\nroot: .\nchannels: 5\nclasses: [a, a]\nignore_index: 0\nunknown_labels: x\n"
                    "label_map: {3: 9}\noptions: {mask_encoding: hex}\n")
    with pytest.raises(DatasetError) as info:
        load_dataset_spec(path)
    message = str(info.value)
    for part in ("channels must be 1 or 3, got 5", "class names must be unique",
                 "ignore_index must be an int outside the class ids, got 0", "label_map sends 3 to 9",
                 "unknown_labels must be 'error' or 'ignore', got 'x'", "mask_encoding must be one of"):
        assert part in message, part
    assert message.startswith(f"{path}: ") and message.count(str(path)) == 1


def test_a_missing_root_is_listed_with_the_other_problems(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("format: folder\nchannels: 2\n")
    with pytest.raises(DatasetError, match="'root' .* is required; channels must be 1 or 3"):
        load_dataset_spec(path)
