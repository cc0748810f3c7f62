"""The dataset.yaml the server writes for an upload that sends only class names: channels and identity.

Two QA reports on ``segsvc datasets upload FOLDER --name em --classes membrane cell`` of grey slices:
the description said ``channels: 3`` (so the grey membrane model could not be fine-tuned on it), and it
held the upload's name, so the same 48 files uploaded under four names (folder, tar, zip, again) became
four datasets with four hashes, although the hash is the content's identity.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from segsvc import errors
from segsvc.config import InputSpec
from segsvc.data.io import write_png
from segsvc.datasets.content import local_files, tar_stream
from segsvc.datasets.registry import Dataset, DatasetRegistry, DatasetsConfig
from tests.datasets.helpers import assert_nothing_left, tar_of, zip_of

CLASSES = ["membrane", "cell"]


@pytest.fixture
def registry(tmp_path: Path):
    reg = DatasetRegistry(DatasetsConfig(tmp_path / "state"))
    yield reg
    reg.close()


def slices(folder: Path, count: int = 4, colour: tuple[str, ...] = ()) -> Path:
    """Grey 8-bit slices (images/) with 0/255 masks (masks/), no dataset.yaml; the stems in ``colour`` RGB."""
    rng = np.random.default_rng(0)
    for i in range(count):
        stem = str(i)
        shape = (16, 16, 3) if stem in colour else (16, 16)
        write_png(folder / "images" / f"{stem}.png", rng.integers(0, 256, shape, dtype=np.uint8))
        write_png(folder / "masks" / f"{stem}.png", (rng.integers(0, 2, (16, 16)) * 255).astype(np.uint8))
    return folder


def upload(registry: DatasetRegistry, folder: Path, route: str, name: str, **meta) -> Dataset:
    """``folder`` sent one of the ways ``segsvc datasets upload`` sends it."""
    fmt = {"stream": "tar", "tar": "tar", "zip": "zip", "pairs": "pairs"}[route]
    up = registry.open_upload(name, fmt, **meta)
    if route == "stream":  # the client's own tar, streamed in chunks
        for chunk in tar_stream(local_files(folder), chunk_bytes=1000):
            up.write(chunk)
    elif route == "tar":
        up.write(tar_of(folder, prefix=f"{folder.name}/"))
    elif route == "zip":
        up.write(zip_of(folder))
    else:
        for rel, path in local_files(folder):
            up.write(path.read_bytes(), rel, last=True)
    return up.commit()


def stored_description(registry: DatasetRegistry, dataset: Dataset) -> dict:
    """The dataset.yaml stored with the files (in the archive's only folder, if it had one)."""
    (path,) = (registry.root / dataset.sha256 / "data").rglob("dataset.yaml")
    return yaml.safe_load(path.read_text())


def test_grey_slices_with_class_names_are_a_grey_dataset(registry: DatasetRegistry, tmp_path: Path) -> None:
    d = upload(registry, slices(tmp_path / "em"), "tar", "em", class_names=CLASSES)
    assert stored_description(registry, d)["channels"] == 1
    spec = d.load_spec()  # what training reads: model.init_from checks its channels against the model's
    assert spec.channels == 1 and spec.input_spec() == InputSpec.default_for(1)
    assert spec.class_names == tuple(CLASSES) and spec.name == "em"


def test_colour_images_with_class_names_stay_rgb(registry: DatasetRegistry, tmp_path: Path) -> None:
    folder = slices(tmp_path / "rgb", colour=("0", "1", "2", "3"))
    d = upload(registry, folder, "pairs", "rgb", class_names=CLASSES)
    assert stored_description(registry, d)["channels"] == 3 and d.load_spec().channels == 3


def test_grey_and_colour_images_with_class_names_are_refused(registry: DatasetRegistry, tmp_path: Path) -> None:
    folder = slices(tmp_path / "mixed", colour=("2",))
    with pytest.raises(errors.DatasetError) as info:
        upload(registry, folder, "tar", "mixed", class_names=CLASSES)
    message = str(info.value)
    assert "images/0.png is grey" in message and "images/2.png is colour" in message
    assert str(tmp_path) not in message and ".work-" not in message  # never the server's folders
    assert_nothing_left(registry)


def test_the_same_files_and_classes_are_one_dataset_whatever_the_name(tmp_path: Path) -> None:
    folder = slices(tmp_path / "em")
    hashes = set()
    for route, name in (("stream", "em"), ("tar", "em16"), ("zip", "slices"), ("pairs", "again")):
        registry = DatasetRegistry(DatasetsConfig(tmp_path / f"state-{name}"))
        d = upload(registry, folder, route, name, class_names=CLASSES)
        assert "name" not in stored_description(registry, d)  # the registered name is the registry's
        assert d.name == d.load_spec().name == name
        hashes.add(d.sha256)
        registry.close()
    assert len(hashes) == 1
    # other classes are another description, so another dataset
    registry = DatasetRegistry(DatasetsConfig(tmp_path / "state-other"))
    assert upload(registry, folder, "tar", "em", class_names=["membrane", "other"]).sha256 not in hashes


def test_the_same_content_under_a_second_name_is_refused_by_every_route(registry: DatasetRegistry,
                                                                          tmp_path: Path) -> None:
    folder = slices(tmp_path / "em")
    first = upload(registry, folder, "stream", "em", class_names=CLASSES)
    for route in ("stream", "tar", "zip", "pairs"):
        with pytest.raises(errors.AlreadyExists, match=rf"the same content is registered as 'em' "
                                                       rf"\({first.sha256[:12]}\)"):
            upload(registry, folder, route, f"em-{route}", class_names=CLASSES)
        assert upload(registry, folder, route, "em", class_names=CLASSES) == first  # a retry: the same dataset
    assert [d.name for d in registry.list()] == ["em"]
    assert_nothing_left(registry)
