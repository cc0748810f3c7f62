"""Fine-tuning from an artifact (``model.init_from``): the body always, the head only for the same classes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from segsvc.config import ModelSpec
from segsvc.models.artifact import load_artifact
from segsvc.models.base import in_head
from segsvc.models.registry import build_model
from training.config import load_config
from training.events import EVENTS_FILE, read_events
from training.finetune import IncompatibleInit, check_compatible, init_from_artifact
from training.train import main

from tests.training.conftest import TINY_SPEC

PARAMS = {"depth": 2, "base_channels": 4, "dropout": 0.2}  # the tiny recipe's U-Net
CLASSES = ("background", "circle", "rectangle")


@pytest.fixture(scope="module")
def base_artifact(make_recipe, tmp_path_factory) -> Path:
    recipe = make_recipe(tmp_path_factory.mktemp("base"))
    return main(load_config(recipe, ["data.train_limit=8", "output.run_name=base"]))


def fresh(num_classes: int, arch: str = "unet", params: dict | None = None) -> tuple[torch.nn.Module, ModelSpec]:
    spec = ModelSpec(arch, num_classes, 3, PARAMS if params is None else params)
    return build_model(spec), spec


def test_same_classes_load_every_tensor(base_artifact):
    model, spec = fresh(3)
    report = init_from_artifact(model, spec, CLASSES, base_artifact)
    base, _ = load_artifact(base_artifact)
    for name, value in base.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    assert report["head"] == "loaded" and report["version"] == 1


@pytest.mark.parametrize("classes", [("background", "rectangle", "circle"),  # same count, other order
                                     ("background", "circle", "rectangle", "triangle")])
def test_other_classes_load_the_body_and_keep_a_fresh_head(base_artifact, classes):
    model, spec = fresh(len(classes))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = init_from_artifact(model, spec, classes, base_artifact)
    base = load_artifact(base_artifact)[0].state_dict()
    after = model.state_dict()
    assert report["head"] == "reinitialised" and report["head_prefixes"] == ["classifier"]
    head = [k for k in after if in_head(k, model.head_prefixes)]
    body = [k for k in after if not in_head(k, model.head_prefixes)]
    assert head == ["classifier.weight", "classifier.bias"]
    for name in body:
        assert torch.equal(after[name], base[name]), name
    for name in head:
        assert torch.equal(after[name], before[name]), name  # the random initialisation, untouched
        assert after[name].shape != base[name].shape or not torch.equal(after[name], base[name])


def test_another_architecture_or_other_params_are_refused(base_artifact):
    model, spec = fresh(3, "segnet", {"variant": "basic", "base_channels": 8})
    with pytest.raises(IncompatibleInit, match="holds a 'unet' model, but the recipe trains 'segnet'"):
        init_from_artifact(model, spec, CLASSES, base_artifact)
    model, spec = fresh(3, params={**PARAMS, "base_channels": 8})
    with pytest.raises(IncompatibleInit, match="same architecture parameters"):
        init_from_artifact(model, spec, CLASSES, base_artifact)


def test_a_recipe_fine_tunes_on_new_classes_and_says_so(base_artifact, tmp_path):
    spec = tmp_path / "four.yaml"
    spec.write_text(TINY_SPEC.replace("[background, circle, rectangle]", "[background, circle, rectangle, triangle]"))
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(f"""\
name: tuned
model: {{arch: unet, params: {{depth: 2, base_channels: 4, dropout: 0.2}}, init_from: {base_artifact}}}
data: {{spec: {spec}, preset: synthetic, crop: [32, 32], train_limit: 8}}
train: {{epochs: 1, batch_size: 4, threads: 1, progress: false}}
output: {{runs_dir: {tmp_path}/runs, repo: {tmp_path}/repo, run_name: ft}}
""")
    artifact = main(load_config(recipe))
    start = read_events(tmp_path / "runs" / "tuned" / "ft" / EVENTS_FILE)[0][0]
    assert start["init_from"]["path"] == str(base_artifact) and start["init_from"]["head"] == "reinitialised"
    assert load_artifact(artifact)[1].class_names[-1] == "triangle"


def test_a_missing_artifact_is_a_clear_error(tiny_recipe, tmp_path):
    from segsvc.errors import ArtifactError

    with pytest.raises(ArtifactError, match="not a model version directory"):
        main(load_config(tiny_recipe, [f"model.init_from={tmp_path / 'nope'}"]))


def test_an_encoder_file_in_the_recipe_does_not_make_its_own_artifact_incompatible(tmp_path: Path) -> None:
    """Artifacts leave out init-only ``*_path`` params; the recipe that made one still has them (a fine-tune
    from an smp model trained with ``encoder_weights_path`` was refused as built with other params)."""
    recipe = ModelSpec("smp/Unet", 2, params={"encoder_name": "resnet18", "encoder_weights_path": "/data/enc.st"})
    artifact = ModelSpec("smp/Unet", 2, params={"encoder_name": "resnet18"})
    check_compatible(artifact, recipe, tmp_path)
    with pytest.raises(IncompatibleInit, match="same architecture parameters"):
        check_compatible(artifact, ModelSpec("smp/Unet", 2, params={"encoder_name": "resnet34"}), tmp_path)
