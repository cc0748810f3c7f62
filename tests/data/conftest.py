"""Fixtures for the data tests: the shared real datasets (skipped when absent) and tiny generated ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from segsvc.data.spec import DatasetSpec, load_dataset_spec
from tests.data.helpers import make_folder_dataset, make_voc_dataset


def _shared(name: str) -> DatasetSpec:
    """The built-in spec of a shared dataset, or skip when the data is not on this machine."""
    spec = load_dataset_spec(name)
    if not spec.root.is_dir():
        pytest.skip(f"shared dataset {name!r} absent at {spec.root} (set SEGSVC_DATASETS or add ../shared/datasets)")
    return spec


@pytest.fixture
def camvid() -> DatasetSpec:
    return _shared("camvid")


@pytest.fixture
def membrane() -> DatasetSpec:
    return _shared("membrane")


@pytest.fixture
def folder_dataset(tmp_path: Path) -> Path:
    return make_folder_dataset(tmp_path / "tiny")


@pytest.fixture
def voc_dataset(tmp_path: Path) -> DatasetSpec:
    return make_voc_dataset(tmp_path / "VOC2012")
