"""Small datasets and archives for the dataset tests: a synthetic folder, a broken one, hostile archives."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import yaml

from segsvc.data.io import write_png
from segsvc.data.synthetic import SyntheticConfig, write_synthetic_dataset
from segsvc.datasets.content import local_files
from segsvc.datasets.registry import DatasetRegistry


def synth(folder: Path, count: int = 8) -> Path:
    """``segsvc data synth``'s layout: images/{train,val}, masks/{train,val}, dataset.yaml."""
    write_synthetic_dataset(folder, count, SyntheticConfig(size_hw=(32, 32)), seed=0)
    return folder


def flat(folder: Path, stems: list[str], classes: tuple[str, ...] = ("bg", "fg"), yaml_file: bool = True) -> Path:
    """A generic folder with one split (images/ + masks/, no subfolders): the server assigns train/val."""
    rng = np.random.default_rng(0)
    for stem in stems:
        write_png(folder / "images" / f"{stem}.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        write_png(folder / "masks" / f"{stem}.png", rng.integers(0, len(classes), (8, 8), dtype=np.uint8))
    if yaml_file:
        (folder / "dataset.yaml").write_text(yaml.safe_dump({"format": "folder", "root": ".",
                                                             "classes": list(classes)}))
    return folder


def broken(folder: Path) -> Path:
    """Three problems: labels outside the classes, an image without mask, a mask without image."""
    flat(folder, ["a", "b"])
    write_png(folder / "masks" / "b.png", np.full((8, 8), 7, np.uint8))  # classes are 0..1 (255 ignored)
    write_png(folder / "images" / "lonely.png", np.zeros((8, 8, 3), np.uint8))
    write_png(folder / "masks" / "orphan.png", np.zeros((8, 8), np.uint8))
    return folder


def tar_of(folder: Path, prefix: str = "", mode: str = "w") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for rel, path in local_files(folder):
            tar.add(path, arcname=prefix + rel)
    return buf.getvalue()


def zip_of(folder: Path, prefix: str = "") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for rel, path in local_files(folder):
            zf.write(path, prefix + rel)
    return buf.getvalue()


def tar_with(members: list[tuple[tarfile.TarInfo, bytes]], mode: str = "w") -> bytes:
    """A tar of hand-made members (links, devices, odd names) with their data."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


def assert_nothing_left(registry: DatasetRegistry) -> None:
    """Only the folders of registered datasets remain: no work folder, no orphan."""
    names = {p.name for p in registry.root.iterdir()}
    assert names == {d.sha256 for d in registry.list()}, names
