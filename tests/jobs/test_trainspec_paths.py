"""A training request may not name files on the server: ``model.init_from`` and weight paths come from the service.

The check is on the configuration the client's part produces (its inline recipe
and its overrides, merged as the trainer merges them), not on the override
strings alone: a whole-``model`` override or an inline recipe is checked too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from segsvc.errors import InvalidArgument
from segsvc.jobs.trainspec import PROJECT_ROOT, TrainingConfig, TrainingRequest, resolve_submission, trainer_argv
from training.config import load_config

RECIPES = sorted((PROJECT_ROOT / "training" / "recipes").glob("*.yaml"))
INLINE = "name: x\nmodel: {arch: unet, params: {depth: 2, base_channels: 4}%s}\ndata: {spec: synthetic}\n"


class _Record:
    name, sha256, spec_path = "shapes", "ab" * 32, "/srv/datasets/shapes/spec.yaml"


class _Datasets:
    def get(self, query: str) -> _Record:
        if query != "shapes":
            from segsvc.errors import NotFound
            raise NotFound(query)
        return _Record()


class _Manifest:
    def __init__(self, config: dict) -> None:
        self.training = {"config": config}


class _Repository:
    """A model repository holding one version, ``base:3``, trained with ``config``."""

    def __init__(self, root: Path, config: dict | None = None) -> None:
        self.root, self.config = root, config or {}

    def resolve_version(self, name: str, version: int | None) -> int:
        return version or 3

    def version_dir(self, name: str, version: int) -> Path:
        return self.root / name / str(version)

    def read_manifest(self, name: str, version: int) -> _Manifest:
        return _Manifest(self.config)


def _trainer_config(tmp_path: Path, request: TrainingRequest, repository: _Repository | None = None):
    """What the trainer would run with: the stored recipe plus every ``--set`` of the command line."""
    config = TrainingConfig(state_dir=tmp_path / "state")
    spec = resolve_submission(request, _Datasets(), repository or _Repository(tmp_path / "repo"), config)
    root = tmp_path / "job"
    root.mkdir(exist_ok=True)
    (root / "recipe.yaml").write_text(spec["recipe_text"])
    argv = trainer_argv(spec, root, config, resume=False)
    sets = [argv[i + 1] for i, arg in enumerate(argv) if arg == "--set"]
    return load_config(root / "recipe.yaml", sets), root


@pytest.mark.parametrize("extra, key", [
    (", init_from: /elsewhere/secret/1", "model.init_from"),
    (", init_from: ../../../elsewhere/secret/1", "model.init_from"),
    (", params: {depth: 2, encoder_weights_path: /etc/enc.safetensors}", "model.params.encoder_weights_path"),
])
def test_an_inline_recipe_cannot_name_a_file_on_the_server(extra, key):
    text = (INLINE % extra).replace("params: {depth: 2, base_channels: 4}, params:", "params:")
    with pytest.raises(InvalidArgument, match=key.replace(".", r"\.")):
        TrainingRequest(dataset="shapes", recipe_yaml=text)


@pytest.mark.parametrize("override, key", [
    ("model={arch: unet, params: {depth: 2, base_channels: 4}, init_from: /elsewhere/secret/1}", "model.init_from"),
    ("model.params={encoder_weights_path: /etc/enc.safetensors}", "model.params.encoder_weights_path"),
    ("model.params.encoder_weights_path=/etc/enc.safetensors", "model.params.encoder_weights_path"),
])
def test_an_override_cannot_name_a_file_on_the_server_whatever_key_it_sets(override, key):
    with pytest.raises(InvalidArgument, match=key.replace(".", r"\.")):
        TrainingRequest(dataset="shapes", recipe="synthetic-quick", overrides=(override,))


def test_a_stored_request_from_before_the_check_is_refused_when_its_trainer_starts(tmp_path):
    """A job queued with such a request does not run it after an upgrade: the command line refuses it."""
    request = TrainingRequest(dataset="shapes", recipe="synthetic-quick")
    stored = {**request.to_dict(), "overrides": ["model={arch: unet, init_from: /elsewhere/secret/1}"]}
    spec = {"request": stored, "dataset": {"spec_path": "/d.yaml"}, "base": None, "model_name": "m", "run_dir": "r/run"}
    with pytest.raises(InvalidArgument, match=r"model\.init_from"):
        trainer_argv(spec, tmp_path, TrainingConfig(state_dir=tmp_path), resume=False)


def test_the_error_names_the_key_but_not_the_path():
    with pytest.raises(InvalidArgument) as info:
        TrainingRequest(dataset="shapes", recipe_yaml=INLINE % ", init_from: /elsewhere/secret/1")
    assert "model.init_from" in str(info.value) and "/elsewhere" not in str(info.value)


def test_harmless_model_overrides_and_nulls_still_pass(tmp_path):
    request = TrainingRequest(dataset="shapes", recipe="synthetic-quick", overrides=(
        "model={arch: unet, params: {depth: 2, base_channels: 4}}", "model.params.depth=2"))
    cfg, _ = _trainer_config(tmp_path, request)
    assert cfg.model.init_from is None and dict(cfg.model.params) == {"depth": 2, "base_channels": 4}
    TrainingRequest(dataset="shapes", recipe_yaml=INLINE % ", init_from: null")


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_shipped_recipe_still_runs_with_the_service_paths_only(tmp_path, recipe):
    cfg, root = _trainer_config(tmp_path, TrainingRequest(dataset="shapes", recipe=recipe.stem, epochs=1))
    assert cfg.model.init_from is None
    assert not any(k.endswith("_path") for k in cfg.model.params)
    assert cfg.data.spec == _Record.spec_path
    assert (cfg.output.runs_dir, cfg.output.repo) == (str(root), str(root / "candidate"))


def test_paths_an_inline_recipe_gives_for_service_keys_are_replaced_by_the_service(tmp_path):
    """data.spec and output.* are always set by the service, last: the client's values never reach the trainer."""
    text = (INLINE % "").replace("spec: synthetic", "spec: /etc/passwd") + \
        "output: {runs_dir: /elsewhere, repo: /elsewhere/repo, run_name: ../../x, model_name: evil}\n"
    cfg, root = _trainer_config(tmp_path, TrainingRequest(dataset="shapes", recipe_yaml=text, epochs=1))
    assert cfg.data.spec == _Record.spec_path
    assert (cfg.output.runs_dir, cfg.output.repo, cfg.output.run_name) == (str(root), str(root / "candidate"), "run")
    assert cfg.output.model_name == "evil"  # a model name (checked by check_name), not a path


def test_fine_tuning_takes_init_from_from_the_service_even_when_the_base_recorded_another(tmp_path):
    recorded = {"name": "base", "model": {"arch": "unet", "params": {"depth": 2}, "init_from": "/old/parent/1"},
                "data": {"spec": "/old/data.yaml"}, "output": {"repo": "/old/repo"}}
    repository = _Repository(tmp_path / "repo", recorded)
    cfg, _ = _trainer_config(tmp_path, TrainingRequest(dataset="shapes", base_model="base:3", epochs=1), repository)
    assert cfg.model.init_from == str(tmp_path / "repo" / "base" / "3")
    assert json.dumps(cfg.to_dict()).count("/old/") == 0


def test_the_reviewers_repro_is_refused_both_ways():
    outside = "/tmp/review-sec/elsewhere/secret/1"
    with pytest.raises(InvalidArgument, match=r"model\.init_from"):
        TrainingRequest(dataset="shapes", recipe_yaml=f"name: x\nmodel: {{arch: unet, init_from: {outside}}}\n"
                                                     "data: {spec: synthetic}\n")
    with pytest.raises(InvalidArgument, match=r"model\.init_from"):
        TrainingRequest(dataset="shapes", recipe="synthetic-quick",
                        overrides=(f"model={{arch: unet, init_from: {outside}}}",))
