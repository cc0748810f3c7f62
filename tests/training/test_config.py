"""Recipes: YAML + dotted overrides, every key checked, every shipped recipe valid."""

from __future__ import annotations

from pathlib import Path

import pytest

from segsvc.config import ModelSpec
from segsvc.models.registry import build_model
from training.config import ConfigError, LossTerm, TrainConfig, build_dataclass, load_config

RECIPES = Path(__file__).resolve().parents[2] / "training" / "recipes"
MINIMAL = "model: {arch: unet}\ndata: {spec: synthetic}\n"


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_minimal_recipe_fills_defaults_and_takes_its_name_from_the_file(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL, "my-recipe.yaml"))
    assert cfg.name == "my-recipe" and cfg.model_name == "my-recipe"
    assert cfg.train.epochs == 10 and cfg.loss.terms == (LossTerm("ce", 1.0),)


def test_dotted_overrides_are_typed_and_nested(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), [
        "train.epochs=3", "optim.lr=1e-3", "data.crop=[64, 96]", "model.params.base_channels=8",
        "loss.terms=[{name: ce}, {name: dice, weight: 0.5}]", "train.max_time_min=null",
        "output.model_name=demo",
    ])
    assert cfg.train.epochs == 3 and cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.data.crop == (64, 96) and cfg.model.params["base_channels"] == 8
    assert cfg.loss.terms[1] == LossTerm("dice", 0.5) and cfg.model_name == "demo"


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epochz=3", "train.epochz: unknown key (did you mean 'epochs'?)"),
        ("bogus=1", "bogus: unknown key; valid keys here: name, model, data"),
        ("train.epochs=three", "train.epochs: expected an integer"),
        ("train.epochs=2.5", "train.epochs: expected an integer"),
        ("train.channels_last=maybe", "train.channels_last: expected true or false"),
        ("optim.name=adam", "optim.name: expected one of ['adamw', 'sgd']"),
        ("data.crop=[64]", "data.crop: expected 2 integers, got [64]"),
        ("loss.terms=[{name: hinge}]", "loss.terms[0].name: expected one of"),
        ("train.epochs", "must look like key.subkey=value"),
        ("train.epochs.x=1", "train.epochs: expected an integer"),
        ("data.crop=[64, a]", "data.crop[1]: expected an integer, got 'a'"),
        ("optim.lr=true", "optim.lr: expected a number"),
        ("loss.class_weights=[a]", "loss.class_weights: expected 'median_frequency', null or a list of numbers"),
        ("model.init_from=3", "model.init_from: expected a string"),
        ("data.class_uniform=1.5", "data.class_uniform is a fraction of the crops in [0, 1], got 1.5"),
        ("train.ema_decay=1.0", "train.ema_decay must lie in (0, 1), got 1.0"),
        ("loss.ohem_keep=0", "ohem_keep is a fraction of the pixels in (0, 1], got 0"),
    ],
)
def test_bad_overrides_name_the_key(tmp_path, override, message):
    with pytest.raises(ConfigError, match=None) as err:
        load_config(write(tmp_path, MINIMAL), [override])
    assert message in str(err.value)


def test_every_bad_key_is_reported_at_once(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, MINIMAL), ["train.epochs=x", "optim.nam=sgd"])
    assert "train.epochs: expected an integer" in str(err.value)
    assert "optim.nam: unknown key (did you mean 'name'?)" in str(err.value)


def test_yaml_1_1_exponent_strings_are_numbers_and_sections_are_frozen(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), ["optim.lr=3e-4", "model.params.depth=2"])
    assert cfg.optim.lr == pytest.approx(3e-4)
    with pytest.raises(TypeError):
        cfg.model.params["depth"] = 3  # type: ignore[index]
    with pytest.raises(AttributeError):
        cfg.train.epochs = 2  # type: ignore[misc]


def test_setting_below_a_scalar_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="'train.epochs' is not a mapping"):
        load_config(write(tmp_path, MINIMAL + "train: {epochs: 2}\n"), ["train.epochs.x=1"])


def test_missing_section_and_missing_file_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="model: missing required key"):
        load_config(write(tmp_path, "data: {spec: synthetic}\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_profiles_apply_before_the_command_line(tmp_path):
    text = MINIMAL + "profiles:\n  gpu: {train.amp: bf16, train.batch_size: 16}\n"
    cfg = load_config(write(tmp_path, text), ["train.batch_size=4"], profile="gpu")
    assert cfg.train.amp == "bf16" and cfg.train.batch_size == 4
    with pytest.raises(ConfigError, match="no profile 'tpu'"):
        load_config(write(tmp_path, text), profile="tpu")


def test_to_dict_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), ["model.params.depth=3", "loss.class_weights=[1, 2]"])
    assert build_dataclass(TrainConfig, cfg.to_dict()) == cfg


@pytest.mark.parametrize("recipe", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_recipes_are_valid_and_their_crops_fit_the_model(recipe):
    from segsvc.data.spec import load_dataset_spec

    profiles = [None, *load_config(recipe).profiles]
    for profile in profiles:
        cfg = load_config(recipe, profile=profile)
        data = load_dataset_spec(cfg.data.spec)
        model = build_model(ModelSpec(cfg.model.arch, data.num_classes, data.channels, dict(cfg.model.params)))
        if cfg.data.crop is not None:
            assert all(c % model.output_stride == 0 for c in cfg.data.crop), (profile, cfg.data.crop)


def test_the_issue_recipes_exist():
    names = {p.stem for p in RECIPES.glob("*.yaml")}
    assert {"camvid-unet", "camvid-segnet", "camvid-fcn8s", "camvid-smp-unet-r34", "membrane-unet",
            "synthetic-quick"} <= names
