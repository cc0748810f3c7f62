import json

from segsvc.cli import main
from segsvc.config import ModelSpec
from segsvc.models import build_model
from segsvc.models.artifact import save_artifact
from tests.server.conftest import start_server  # noqa: F401  (a real server on 127.0.0.1:0)


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


def test_models_list_shows_every_model_and_marks_a_broken_version(tmp_path, capsys) -> None:
    spec = ModelSpec("unet", 2, 1, {"base_channels": 4, "depth": 2})
    for name in ("alpha", "alpha", "beta"):
        save_artifact(build_model(spec), tmp_path, name, spec=spec, metrics={"miou": 0.5})
    (tmp_path / "alpha" / "2" / "manifest.json").write_text("{half-copied")
    assert main(["models", "list", "--repo", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "beta" in out  # the other models are still listed
    alpha = next(line for line in out.splitlines() if line.startswith("alpha "))
    # the latest version (2) is unreadable: the server skips it and serves 1, which the columns describe
    assert alpha.split()[:3] == ["alpha", "1,2", "1"] and "unet" in alpha
    assert "alpha:2 is broken: cannot read alpha/2/manifest.json" in out


def test_models_list_of_a_missing_repository_is_an_error(tmp_path, capsys) -> None:
    missing = tmp_path / "nonexistent"
    assert main(["models", "list", "--repo", str(missing)]) == 2
    assert f"model repository {missing} does not exist" in capsys.readouterr().err
    # show said "no model named 'm' in the repository; available: none"
    assert main(["models", "show", "m", "--repo", str(missing)]) == 2
    assert f"model repository {missing} does not exist" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("")
    assert main(["models", "list", "--repo", str(tmp_path / "a-file")]) == 2
    assert f"model repository {tmp_path / 'a-file'} is not a directory" in capsys.readouterr().err
    assert main(["models", "list", "--repo", str(tmp_path)]) == 0  # an empty one is just empty
    assert f"no models in {tmp_path}" in capsys.readouterr().out


def _row(out: str, name: str) -> list[str]:
    return next(line for line in out.splitlines() if line.startswith(f"{name} ")).split()


def test_models_list_describes_the_version_requests_get_not_the_newest(tmp_path, capsys) -> None:
    """After a gate rejection, DEFAULT stays on v1 while a worse v2 is the newest: the listing shows v1's mIoU."""
    from segsvc.inference.repository import ModelRepository

    spec = ModelSpec("unet", 2, 1, {"base_channels": 4, "depth": 2})
    for miou in (0.75, 0.40):
        save_artifact(build_model(spec), tmp_path, "membrane", spec=spec, metrics={"miou": miou})
    assert main(["models", "list", "--repo", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["MODEL", "VERSIONS", "DEFAULT", "ARCH", "CLASSES", "mIoU"]
    assert _row(out, "membrane") == ["membrane", "1,2", "2", "unet", "2", "0.4000"]  # no pointer: the newest
    ModelRepository(tmp_path).set_default("membrane", 1)
    assert main(["models", "list", "--repo", str(tmp_path)]) == 0
    assert _row(capsys.readouterr().out, "membrane") == ["membrane", "1,2", "1", "unet", "2", "0.7500"]
    (tmp_path / "membrane" / "DEFAULT").write_text("7\n")  # a pointer to no version: the server serves the newest
    assert main(["models", "list", "--repo", str(tmp_path)]) == 0
    assert _row(capsys.readouterr().out, "membrane")[2:] == ["2", "unet", "2", "0.4000"]


def test_models_load_unload_and_default_on_a_running_server(tmp_path, start_server, capsys) -> None:
    """After a retrain unloaded the older versions, pinning one needed Python: the CLI has LoadModel,
    UnloadModel and SetDefaultVersion, each printing the model's loaded versions and default."""
    from tests.server.conftest import publish

    for seed in (1, 2):
        publish(tmp_path / "repo", "m", seed=seed)
    server = start_server(tmp_path / "repo", models=("m",))
    address = ["--server", server.address]
    assert main(["models", "load", "m:1", *address]) == 0  # the server loaded the newest only
    assert capsys.readouterr().out == "loaded m:1; m: loaded versions 1,2; default 2 (the newest loaded)\n"
    assert main(["models", "default", "m:1", *address]) == 0
    assert capsys.readouterr().out == "default of m set to 1; m: loaded versions 1,2; default 1 (pinned)\n"
    assert (tmp_path / "repo" / "m" / "DEFAULT").read_text().strip() == "1"
    assert main(["models", "unload", "m:2", *address]) == 0
    assert capsys.readouterr().out == "unloaded m:2; m: loaded versions 1; default 1 (pinned)\n"
    assert main(["models", "unload", "m", *address]) == 0
    assert capsys.readouterr().out == "unloaded m:1; m: loaded versions none; default none\n"


def test_models_default_needs_a_version_and_the_manage_commands_name_a_missing_server(tmp_path, monkeypatch,
                                                                                     capsys) -> None:
    import segsvc.cli_client

    monkeypatch.setattr(segsvc.cli_client, "CONNECT_TIMEOUT_S", 0.5)
    assert main(["models", "default", "m", "--server", "127.0.0.1:1"]) == 2
    assert "segsvc models default needs NAME:VERSION" in capsys.readouterr().err
    assert main(["models", "load", "m:1", "--server", "127.0.0.1:1"]) == 2
    assert "no server answered at 127.0.0.1:1" in capsys.readouterr().err
