"""Backends: what runs a model version's network (``torch`` eager, ``onnxruntime``) behind one ``forward``.

``open_backend`` builds the one a version is served with: the server's
per-model or global ``--backend``, else the manifest's ``inference.backend``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from segsvc.errors import SegsvcError
from segsvc.inference.backends.base import PRECISIONS, Backend, EngineConfig, amp_dtype, manifest_geometry
from segsvc.inference.backends.eager import TorchBackend
from segsvc.inference.backends.ort import OnnxRuntimeBackend
from segsvc.inference.repository import ModelRepository, check_manifest
from segsvc.models.artifact import Manifest, load_artifact, read_manifest

__all__ = ["PRECISIONS", "Backend", "EngineConfig", "OnnxRuntimeBackend", "TorchBackend", "amp_dtype",
           "manifest_geometry", "open_backend", "open_version_dir"]


def open_backend(repository: ModelRepository, name: str, version: int, device: torch.device,
                 config: EngineConfig) -> tuple[Backend, Manifest]:
    """Load ``name:version`` from ``repository`` into the backend ``config`` chooses for it.

    Raises:
        ArtifactError: unreadable files, a manifest naming another version, or a
            missing or stale ONNX export for the onnxruntime backend.
        PathOutsideRoot: a symlink out of the repository root.
    """
    manifest = repository.read_manifest(name, version)
    kind = config.backend_for(name, manifest.inference.backend)
    if kind == OnnxRuntimeBackend.name:
        check_manifest(name, version, manifest)
        try:
            backend = OnnxRuntimeBackend.for_manifest(repository.version_dir(name, version), manifest, device, config,
                                                      root=repository.root)
        except SegsvcError as exc:  # paths relative to the root, as the repository's own loads name them
            raise type(exc)(repository.redact(str(exc))) from None
        return backend, manifest
    model, manifest = repository.load(name, version, device=device)
    return TorchBackend.for_manifest(model, manifest, device, config), manifest


def open_version_dir(version_dir: Path, device: torch.device, config: EngineConfig) -> tuple[Backend, Manifest]:
    """Load a version directory given directly (``segsvc eval``, the benches) into its backend.

    The directory is ``<root>/<model>/<version>``, and is confined to that root as the server's loads are
    (``ModelRepository.confine``, then files opened beneath the root): a symlink of the model or version
    directory, or of a file in it, that leads out of the root is refused. Messages name paths relative to the
    root.

    Raises:
        PathOutsideRoot: a symlink out of the repository root.
        ArtifactError: unreadable or damaged files, or a missing or stale ONNX export for onnxruntime.
    """
    given = Path(os.path.abspath(version_dir))  # as named: the root is two levels up the path, not up a link's target
    repository = ModelRepository(given.parent.parent)
    path = repository.confine(repository.root / given.parent.name / given.name)
    try:
        manifest = read_manifest(path, repository.root)
        if config.backend_for(manifest.name, manifest.inference.backend) == OnnxRuntimeBackend.name:
            return OnnxRuntimeBackend.for_manifest(path, manifest, device, config, root=repository.root), manifest
        model, manifest = load_artifact(path, device=device, root=repository.root)
    except SegsvcError as exc:
        raise type(exc)(repository.redact(str(exc))) from None
    return TorchBackend.for_manifest(model, manifest, device, config), manifest
