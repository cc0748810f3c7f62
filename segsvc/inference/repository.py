"""A model repository on disk, in Triton's layout: ``<root>/<model>/<version>/``.

Every name a request gives is checked and resolved inside the root, so no
request can read outside it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from segsvc.errors import InvalidArgument, PathOutsideRoot, UnknownModel, UnknownVersion
from segsvc.models.artifact import MANIFEST_FILE, Manifest, check_name, load_artifact, read_manifest


def parse_model_ref(ref: str) -> tuple[str, int | None]:
    """``"name"`` -> (name, None); ``"name:3"`` -> (name, 3)."""
    name, sep, version = ref.partition(":")
    if not sep:
        return check_name(name), None
    if not version.isdigit() or int(version) < 1:
        raise InvalidArgument(f"model reference {ref!r}: the version after ':' must be a positive integer")
    return check_name(name), int(version)


class ModelRepository:
    """Read access to the versions stored under one root directory.

    Args:
        root: the repository root; it need not exist yet (it is then empty).

    Example:
        >>> repo = ModelRepository("runs/model_repository")  # doctest: +SKIP
        >>> model, manifest = repo.load("camvid-unet")  # latest version  # doctest: +SKIP
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()

    def _model_dir(self, name: str) -> Path:
        path = (self.root / check_name(name)).resolve()
        if path.parent != self.root:
            raise PathOutsideRoot(f"model name {name!r} resolves outside the repository root")
        return path

    def versions(self, name: str) -> list[int]:
        model_dir = self._model_dir(name)
        if not model_dir.is_dir():
            raise UnknownModel(f"no model named {name!r} in {self.root}; available: {sorted(self.list_models()) or 'none'}")
        return sorted(
            int(p.name) for p in model_dir.iterdir()
            if p.name.isdigit() and (p / MANIFEST_FILE).is_file()
        )

    def list_models(self) -> dict[str, list[int]]:
        if not self.root.is_dir():
            return {}
        out = {}
        for p in sorted(self.root.iterdir()):
            if p.is_dir() and not p.name.startswith("."):
                versions = self.versions(p.name)
                if versions:
                    out[p.name] = versions
        return out

    def resolve_version(self, name: str, version: int | None = None) -> int:
        versions = self.versions(name)
        if not versions:
            raise UnknownModel(f"model {name!r} has no complete versions in {self.root}")
        if version is None:
            return versions[-1]
        if version not in versions:
            raise UnknownVersion(f"model {name!r} has no version {version}; versions: {versions}")
        return version

    def version_dir(self, name: str, version: int | None = None) -> Path:
        return self._model_dir(name) / str(self.resolve_version(name, version))

    def read_manifest(self, name: str, version: int | None = None) -> Manifest:
        return read_manifest(self.version_dir(name, version))

    def load(self, name: str, version: int | None = None, device: str | torch.device = "cpu") -> tuple[nn.Module, Manifest]:
        return load_artifact(self.version_dir(name, version), device=device)
