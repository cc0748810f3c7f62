"""``python -m training --check`` refuses a ``model.init_from`` the run would refuse (another architecture, other
parameters, other input channels), with the run's own message, from the artifact's manifest only; also when the
server sets it from a job's ``base_model`` (``trainspec.check_argv``)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from segsvc.config import ModelSpec
from segsvc.inference.repository import ModelRepository
from segsvc.models.artifact import WEIGHTS_FILE, save_artifact
from segsvc.models.registry import build_model
from training.config import load_config
from training.finetune import IncompatibleInit
from training.train import cli, main

CLASSES = ["background", "circle", "rectangle"]
RECIPE_PARAMS = {"depth": 2, "base_channels": 4, "dropout": 0.2}  # conftest's tiny recipe
OTHER_PARAMS = {"depth": 2, "base_channels": 8, "dropout": 0.2}
REFUSAL = "fine-tuning needs the same architecture parameters"


def publish(root: Path, params: dict, name: str = "base") -> Path:
    """An untrained version of the tiny recipe's U-Net with ``params`` (refusals need no training)."""
    spec = ModelSpec("unet", 3, 3, params)
    return save_artifact(build_model(spec), root, name, spec=spec, class_names=CLASSES)


def check(recipe: Path, *sets: str) -> int:
    argv = ["--config", str(recipe)]
    for text in sets:
        argv += ["--set", text]
    return cli([*argv, "--check"])


def test_check_refuses_an_init_from_of_other_params_as_the_run_does(tiny_recipe, tmp_path, capsys):
    base = publish(tmp_path / "bases", OTHER_PARAMS)
    assert check(tiny_recipe, f"model.init_from={base}") == 2
    err = capsys.readouterr().err
    assert err.startswith("training: error: ") and REFUSAL in err
    assert f"model.init_from {str(base)!r} was built with params" in err
    said = err.removeprefix("training: error: ").strip()
    with pytest.raises(IncompatibleInit) as run:  # the run's refusal: the same message
        main(load_config(tiny_recipe, [f"model.init_from={base}"]))
    assert str(run.value) == said


def test_check_refuses_another_architecture(tiny_recipe, tmp_path, capsys):
    spec = ModelSpec("segnet", 3, 3, {"variant": "basic", "base_channels": 8})
    base = save_artifact(build_model(spec), tmp_path / "bases", "segnet", spec=spec, class_names=CLASSES)
    assert check(tiny_recipe, f"model.init_from={base}") == 2
    assert "holds a 'segnet' model, but the recipe trains 'unet'" in capsys.readouterr().err


def test_check_reads_the_manifest_only(tiny_recipe, tmp_path, capsys):
    """The weights are not read: a compatible version passes, a refused one is refused, without them."""
    same = publish(tmp_path / "bases", RECIPE_PARAMS, "same")
    other = publish(tmp_path / "bases", OTHER_PARAMS, "other")
    for version in (same, other):
        (version / WEIGHTS_FILE).unlink()
    assert check(tiny_recipe, f"model.init_from={same}") == 0
    assert "training: the recipe is valid" in capsys.readouterr().out
    assert check(tiny_recipe, f"model.init_from={other}") == 2
    assert REFUSAL in capsys.readouterr().err


def test_check_refuses_a_folder_that_is_no_model_version(tiny_recipe, tmp_path, capsys):
    assert check(tiny_recipe, f"model.init_from={tmp_path / 'nothing'}") == 2
    assert "not a model version directory" in capsys.readouterr().err


def test_the_servers_check_of_a_base_model_refuses_other_params(tmp_path, tiny_spec, capsys):
    """A job's ``base_model`` reaches the trainer's check as ``model.init_from`` (``trainspec.check_argv``)."""
    from segsvc.jobs import trainspec

    repository = ModelRepository(tmp_path / "repo")
    publish(tmp_path / "repo", OTHER_PARAMS, "base")
    record = SimpleNamespace(name="tiny", sha256="f" * 64, spec_path=tiny_spec)
    datasets = SimpleNamespace(get=lambda name: record)
    config = trainspec.TrainingConfig(state_dir=tmp_path / "state")
    recipe = ("model: {arch: unet, params: {depth: 2, base_channels: 4, dropout: 0.2}}\n"
              "data: {preset: synthetic, crop: [32, 32]}\ntrain: {threads: 1, epochs: 1}\n")
    request = trainspec.TrainingRequest(dataset="tiny", recipe_yaml=recipe, base_model="base", device="cpu")
    spec = trainspec.resolve_submission(request, datasets, repository, config)  # type: ignore[arg-type]
    root = tmp_path / "check"
    root.mkdir()
    (root / "recipe.yaml").write_text(spec["recipe_text"])
    argv = trainspec.check_argv(spec, root, config)
    assert argv[1:3] == ["-m", "training"] and argv[-1] == "--check"
    assert cli(argv[3:]) == 2
    err = capsys.readouterr().err
    assert REFUSAL in err and str(repository.version_dir("base", 1)) in err
