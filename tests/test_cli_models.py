import json

from segsvc.cli import main
from segsvc.config import ModelSpec
from segsvc.models import build_model
from segsvc.models.artifact import save_artifact


def test_models_list_without_repo_lists_architectures(capsys) -> None:
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "fcn8s" in out and "smp/DeepLabV3Plus" in out


def test_models_list_and_show_read_a_repository(tmp_path, capsys) -> None:
    spec = ModelSpec("unet", 2, 1, {"base_channels": 4, "depth": 2})
    for _ in range(2):
        save_artifact(build_model(spec), tmp_path, "membrane", spec=spec, metrics={"miou": 0.75})
    assert main(["models", "list", "--repo", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "membrane" in out and "1,2" in out and "0.7500" in out
    assert main(["models", "show", "membrane:1", "--repo", str(tmp_path)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["version"] == 1 and shown["model"]["arch"] == "unet"


def test_models_show_unknown_model_is_a_clear_error(tmp_path, capsys) -> None:
    assert main(["models", "show", "nope", "--repo", str(tmp_path)]) == 2
    assert "no model named 'nope'" in capsys.readouterr().err
