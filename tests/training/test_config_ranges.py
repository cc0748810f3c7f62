"""Recipes with values out of range, malformed profiles and unreadable files: one ConfigError naming the key or file."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.config import ConfigError, load_config
from training.train import cli

MINIMAL = "model: {arch: unet}\ndata: {spec: synthetic}\n"


def write(tmp_path: Path, text: str | bytes, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epochs=0", "train.epochs must be >= 1, got 0"),
        ("train.batch_size=0", "train.batch_size must be >= 1, got 0"),
        ("train.val_batch_size=0", "train.val_batch_size must be >= 1, got 0"),
        ("train.accumulate_steps=0", "train.accumulate_steps must be >= 1, got 0"),
        ("train.val_every_epochs=0", "train.val_every_epochs must be >= 1, got 0"),
        ("train.threads=0", "train.threads must be >= 1 or null, got 0"),
        ("train.seed=-1", "train.seed must be >= 0, got -1"),
        ("train.max_time_min=-1", "train.max_time_min must be > 0 or null, got -1.0"),
        ("train.max_time_min=0", "train.max_time_min must be > 0 or null, got 0.0"),
        ("train.max_time_min=.nan", "train.max_time_min must be > 0 or null, got nan"),
        ("train.early_stopping_patience=-1", "train.early_stopping_patience must be >= 0 or null, got -1"),
        ("train.grad_clip_norm=-1", "train.grad_clip_norm must be > 0 or null, got -1.0"),
        ("optim.lr=-1", "optim.lr must be >= 0, got -1.0"),
        ("optim.lr=.inf", "optim.lr must be >= 0, got inf"),
        ("optim.weight_decay=-0.1", "optim.weight_decay must be >= 0, got -0.1"),
        ("optim.momentum=-0.5", "optim.momentum must be >= 0, got -0.5"),
        ("data.workers=-1", "data.workers must be >= 0, got -1"),
        ("data.repeat=0", "data.repeat must be >= 1, got 0"),
        ("data.scale=[2, 1]", "data.scale must be [lo, hi] with 0 < lo <= hi, got [2.0, 1.0]"),
        ("data.scale=[0, 1]", "data.scale must be [lo, hi] with 0 < lo <= hi, got [0.0, 1.0]"),
        ("loss.terms=[]", "loss.terms must list at least one term"),
        ("loss.label_smoothing=2", "loss.label_smoothing must be in [0, 1), got 2.0"),
        ("loss.label_smoothing=-0.1", "loss.label_smoothing must be in [0, 1), got -0.1"),
        ("loss.focal_gamma=-1", "loss.focal_gamma must be >= 0, got -1.0"),
        ("schedule.warmup_epochs=-1", "schedule.warmup_epochs must be >= 0, got -1.0"),
        ("schedule.warmup_factor=0", "schedule.warmup_factor must be in (0, 1], got 0.0"),
        ("schedule.power=0", "schedule.power must be > 0, got 0.0"),
        ("schedule.min_lr_ratio=1.5", "schedule.min_lr_ratio must be in [0, 1], got 1.5"),
        ("output.samples_in_report=-1", "output.samples_in_report must be >= 0, got -1"),
    ],
)
def test_out_of_range_values_are_config_errors_naming_the_key(tmp_path, override, message):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, MINIMAL), [override])
    assert message in str(err.value)
    assert str(err.value).startswith(message.split(" ")[0])  # the key leads the line, once


@pytest.mark.parametrize(
    "override",
    ["train.threads=null", "train.threads=1", "train.max_time_min=null", "train.max_time_min=0.5",
     "train.early_stopping_patience=0", "train.early_stopping_patience=null", "data.workers=0",
     "schedule.warmup_epochs=0", "loss.label_smoothing=0", "loss.label_smoothing=0.1", "data.scale=[0.5, 0.5]",
     "data.scale=[0.5, 2.0]", "optim.lr=0",  # lr 0: a control run whose weights never move (tests/server uses it)
     "train.grad_clip_norm=null", "train.seed=0"],
)
def test_boundary_values_are_accepted(tmp_path, override):
    load_config(write(tmp_path, MINIMAL), [override])


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.accumulate_steps=0", "train.accumulate_steps must be >= 1, got 0"),
        ("train.epochs=0", "train.epochs must be >= 1, got 0"),  # once published an untrained model with rc 0
        ("train.val_every_epochs=0", "train.val_every_epochs must be >= 1, got 0"),
    ],
)
def test_the_trainer_cli_refuses_them_with_one_line_and_publishes_nothing(tiny_recipe, capsys, override, message):
    assert cli(["--config", str(tiny_recipe), "--set", override]) == 2
    err = capsys.readouterr().err
    assert err == f"training: error: {message}\n", err
    assert not (tiny_recipe.parent / "repo").exists() and not (tiny_recipe.parent / "runs").exists()


# -- profiles and unreadable recipe files (bug: AttributeError/TypeError/UnicodeDecodeError tracebacks) ---------
@pytest.mark.parametrize(
    "profiles, message",
    [
        ("profiles: 3", "profiles must be a mapping of profile names to overrides, got 3"),
        ("profiles: [fast]", "profiles must be a mapping of profile names to overrides, got ['fast']"),
        ("profiles:\n  fast: [train.epochs, 1]",
         "profiles.fast must be a mapping of dotted keys to values (e.g. {train.epochs: 1}), got ['train.epochs', 1]"),
        ("profiles:\n  fast:", "profiles.fast must be a mapping of dotted keys to values"),
        ("profiles:\n  fast: {1: 2}", "profiles.fast: key 1 is not a dotted key such as train.epochs"),
        ("profiles:\n  fast: {train..epochs: 2}", "profiles.fast: key 'train..epochs' is not a dotted key"),
    ],
)
def test_malformed_profiles_are_config_errors(tmp_path, profiles, message):
    path = write(tmp_path, MINIMAL + profiles + "\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, profile="fast")
    assert message in str(err.value)


def test_profiles_that_are_not_a_mapping_are_refused_without_a_profile_too(tmp_path):
    with pytest.raises(ConfigError, match="profiles"):
        load_config(write(tmp_path, MINIMAL + "profiles: 3\n"))


def test_a_recipe_that_is_not_utf8_or_not_a_file_is_a_config_error_naming_it(tmp_path):
    path = write(tmp_path, b"\xff\xfe bad: \xe9\n", "latin.yaml")
    with pytest.raises(ConfigError, match=r"recipe '.*latin\.yaml' is not UTF-8 text"):
        load_config(path)
    with pytest.raises(ConfigError, match=rf"recipe '{tmp_path}' cannot be read: .*directory"):
        load_config(tmp_path)


def test_the_trainer_cli_reports_a_directory_recipe_in_one_line(tmp_path, capsys):
    assert cli(["--config", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"training: error: recipe '{tmp_path}' cannot be read") and err.count("\n") == 1, err
