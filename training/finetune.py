"""Fine-tuning: start a new model from a published artifact (``model.init_from``).

The artifact must hold the same architecture with the same parameters and
input channels. Its body is always loaded. Its classifier head (the layers the
model names in ``head_prefixes``) is loaded only when the dataset's classes are
the artifact's, in the same order; otherwise the head keeps its fresh random
initialisation, because a score channel trained for one class means nothing
for another.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from torch import nn

from segsvc.config import ModelSpec
from segsvc.errors import InvalidArgument
from segsvc.models.artifact import Manifest, load_artifact, read_manifest
from segsvc.models.base import in_head
from segsvc.models.registry import architecture_spec


class IncompatibleInit(InvalidArgument):
    """``model.init_from`` names an artifact that cannot initialise this model."""


def init_from_artifact(model: nn.Module, spec: ModelSpec, class_names: Sequence[str], version_dir: str | Path) -> dict[str, Any]:
    """Load an artifact's weights into ``model`` (built from ``spec``); returns what was loaded, for the log.

    Raises:
        IncompatibleInit: another architecture, other parameters or other input channels.
        ArtifactError: the directory is not a readable model version.
    """
    version_dir = Path(version_dir)
    manifest = check_init_from(spec, version_dir)
    base, _ = load_artifact(version_dir)
    same_classes = tuple(manifest.class_names) == tuple(class_names)
    prefixes = tuple(model.head_prefixes)
    state = base.state_dict()
    if not same_classes:
        state = {name: tensor for name, tensor in state.items() if not in_head(name, prefixes)}
    model.load_state_dict(state, strict=same_classes)
    return {
        "path": str(version_dir),
        "name": manifest.name,
        "version": manifest.version,
        "loaded_tensors": len(state),
        "head": "loaded" if same_classes else "reinitialised",
        "head_prefixes": list(prefixes),
        "artifact_classes": list(manifest.class_names),
    }


def check_init_from(spec: ModelSpec, version_dir: str | Path) -> Manifest:
    """Refuse an artifact that cannot initialise a model built from ``spec``, reading only its manifest (not its
    weights); returns the manifest. ``init_from_artifact`` runs it before loading, ``python -m training --check``
    (``training.train.check_recipe``) on its own.

    Raises:
        IncompatibleInit: another architecture, other parameters or other input channels.
        ArtifactError: the directory holds no readable manifest.
    """
    version_dir = Path(version_dir)
    manifest = read_manifest(version_dir)
    check_compatible(manifest.spec, spec, version_dir)
    return manifest


def check_compatible(base: ModelSpec, new: ModelSpec, where: Path) -> None:
    """Refuse an artifact whose body differs from the model being trained (the class count may differ)."""
    if base.arch != new.arch:
        raise IncompatibleInit(
            f"model.init_from {str(where)!r} holds a {base.arch!r} model, but the recipe trains {new.arch!r}: "
            f"set model.arch={base.arch} or choose an artifact of {new.arch!r}"
        )
    # init-only params (``*_path``: an encoder file) are no part of the architecture; artifacts do not record them
    base_params, new_params = dict(architecture_spec(base).params), dict(architecture_spec(new).params)
    if base_params != new_params:
        raise IncompatibleInit(
            f"model.init_from {str(where)!r} was built with params {base_params}, but the recipe "
            f"asks for {new_params}: fine-tuning needs the same architecture parameters"
        )
    if base.in_channels != new.in_channels:
        raise IncompatibleInit(
            f"model.init_from {str(where)!r} takes {base.in_channels} input channels, "
            f"the dataset has {new.in_channels}"
        )


def describe_init(report: dict[str, Any]) -> str:
    head = ("its classifier head too (same classes)" if report["head"] == "loaded"
            else f"the body only: the classifier head ({', '.join(report['head_prefixes'])}) starts afresh "
                 f"for the new classes (the artifact had {report['artifact_classes']})")
    return f"initialised from {report['name']} v{report['version']} ({report['path']}): {head}"
