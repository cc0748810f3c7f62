"""What ingest reads of an upload's description and masks, as ``segsvc.data`` reads a spec."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from segsvc import errors
from segsvc.data.check import CheckReport
from segsvc.data.spec import spec_from_dict
from segsvc.datasets.ingest import class_shares
from tests.datasets.helpers import assert_nothing_left, flat, tar_of
from tests.datasets.test_registry import data_root, registry, upload  # noqa: F401  (fixtures)

TWICE = """format: folder
root: /somewhere/on/the/uploaders/machine
classes: [bg, fg]
splits:
  train: {images: images, masks: masks}
  train: {images: nowhere, masks: nowhere}
"""


def test_a_metadata_yaml_with_a_key_given_twice_is_refused_not_rewritten_without_it(registry, tmp_path):  # noqa: F811
    """Its ``root`` is rewritten to ``.``: PyYAML's safe_load kept the second ``train`` silently, and the
    rewritten text no longer showed the key twice to the spec's own check."""
    folder = flat(tmp_path / "bare", ["a", "b", "c"], yaml_file=False)
    with pytest.raises(errors.DatasetError, match="invalid YAML.*train"):
        upload(registry, tar_of(folder), "tar", "twice", dataset_yaml=TWICE)
    assert_nothing_left(registry)


def test_class_shares_of_colour_masks_leave_the_ignore_colour_out_of_the_label_map() -> None:
    """As ``LabelMapper`` reads colour masks: the palette's classes go through ``label_map``, the ignore colour
    does not (its ``{255: 1}`` made the ignored pixels a class)."""
    spec = spec_from_dict({"format": "folder", "root": ".", "classes": ["membrane", "cell"],
                           "palette": [[0, 0, 0], [200, 0, 0]], "ignore_color": [255, 255, 255],
                           "label_map": {255: 1, 0: 1, 1: 0}}, base=Path("."))
    report = CheckReport("d", None, {"train": 1}, 2, (),
                         raw_label_pixels={(0, 0, 0): 3, (200, 0, 0): 1, (255, 255, 255): 4})
    assert class_shares(report, spec) == {"membrane": 0.25, "cell": 0.75}


DEEP = "classes: " + "[" * 5000 + "]" * 5000  # 5,000 levels: PyYAML's composer recursed into a RecursionError


def test_a_dataset_yaml_nested_too_deeply_is_refused_not_an_internal_error(registry, data_root, tmp_path):  # noqa: F811
    """Sent as the upload's metadata or found in a registered folder, a deeply nested dataset.yaml raised
    RecursionError (INTERNAL for the client); a recipe nested so was already refused by name."""
    folder = flat(tmp_path / "bare", ["a", "b", "c"], yaml_file=False)
    with pytest.raises(errors.DatasetError, match="^the metadata's dataset.yaml: invalid YAML: nested too deeply"):
        upload(registry, tar_of(folder), "tar", "deep", dataset_yaml=DEEP)
    assert_nothing_left(registry)
    on_server = flat(data_root / "deep", ["a", "b"])
    (on_server / "dataset.yaml").write_text(DEEP)
    with pytest.raises(errors.DatasetError, match="dataset.yaml: invalid YAML: nested too deeply"):
        registry.register("deep")


def test_a_registered_folder_path_too_long_for_the_filesystem_is_refused_by_name(registry) -> None:  # noqa: F811
    """'File name too long' from the filesystem was an internal error for the client."""
    with pytest.raises(errors.InvalidArgument, match=r"^folder 'bbbb.*' has a name of 300 bytes"):
        registry.register("b" * 300, name="long")
    with pytest.raises(errors.InvalidArgument, match=r"^folder 'x/x/.*' is 4199 bytes long"):
        registry.register("x/" * 2100, name="longer")


@pytest.mark.parametrize("images, problem", [("i" * 300, "has a name of 300 bytes"),
                                             ("d/" * 2100 + "images", r"is 4206 bytes long")])
def test_a_split_path_too_long_for_the_filesystem_is_refused_by_name(registry, data_root, images, problem):  # noqa: F811
    """A dataset.yaml's split folder of a 300-byte name or 4 KB reached the filesystem ('File name too long', an
    internal error for the client), past the check of the registered folder's own path (a reviewer's find)."""
    folder = flat(data_root / "long", ["a", "b"], yaml_file=False)
    (folder / "dataset.yaml").write_text(yaml.safe_dump({"format": "folder", "root": ".", "classes": ["bg", "fg"],
                                                         "splits": {"train": {"images": images, "masks": "masks"}}}))
    with pytest.raises(errors.InvalidArgument, match=rf"^dataset.yaml: split 'train' images '.*' {problem}"):
        registry.register("long")
