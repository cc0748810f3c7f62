"""Review 3: a user's own recipe and data, refused in one line naming the problem, never with a traceback.

``segsvc train`` once answered these with a ValueError or FloatingPointError traceback (a loss's cell class
that the dataset does not have, images of different sizes without a crop, a diverging run), accepted a
negative or infinite loss-term weight, and silently ignored the ``--server`` flags given without ``--server``
(``--epochs 1`` trained the recipe's epochs, ``--device cuda`` trained on the CPU).
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from segsvc.cli import main as segsvc_main
from training.config import ConfigError, load_config
from training.events import EVENTS_FILE, read_events
from training.train import cli

QUICK = ["--set", "data.train_limit=4", "--set", "data.val_limit=3"]


def one_line(err: str, prefix: str, needle: str) -> None:
    assert "Traceback" not in err and err.startswith(prefix) and err.count("\n") == 1, err
    assert needle in err, err


def ends_with_one_error_line(err: str, needle: str) -> None:
    """The run's log lines, then the error: one line, no traceback."""
    assert "Traceback" not in err and err.endswith("\n"), err
    last = err.splitlines()[-1]
    assert last.startswith("training: error: ") and needle in last, err


def nothing_published(root: Path) -> bool:
    return not (root / "repo").exists()


def test_a_border_weight_cell_class_the_dataset_lacks_is_one_line(tiny_recipe, capsys):
    args = ["--config", str(tiny_recipe), *QUICK, "--set", "loss.terms=[{name: weighted_ce}]",
            "--set", "loss.border_weight={cell_class: 7}"]
    assert cli(args) == 2
    one_line(capsys.readouterr().err, "training: error: ",
             "loss.border_weight.cell_class 7 is not a class of tiny (3 classes: 0..2)")
    assert nothing_published(tiny_recipe.parent)
    assert not (tiny_recipe.parent / "runs").exists()  # refused before a run directory is made


def test_class_weights_for_another_class_count_are_refused_before_a_run_directory_is_made(tiny_recipe, capsys):
    """A recipe written for a dataset with another class count: one line, and no empty run directory left."""
    assert cli(["--config", str(tiny_recipe), *QUICK, "--set", "loss.class_weights=[1, 2]"]) == 2
    one_line(capsys.readouterr().err, "training: error: ", "loss.class_weights lists 2 weights for 3 classes")
    assert not (tiny_recipe.parent / "runs").exists()


@pytest.mark.parametrize("weight", ["-1", ".inf", ".nan"])
def test_a_loss_term_weight_must_be_a_finite_number_at_least_zero(tiny_recipe, weight):
    with pytest.raises(ConfigError, match=r"loss\.terms\.0\.weight must be a finite number >= 0"):
        load_config(tiny_recipe, [f"loss.terms=[{{name: ce, weight: {weight}}}]"])


@pytest.mark.parametrize("key", ["sigma", "w0"])
def test_border_weight_sigma_and_w0_must_be_finite(tiny_recipe, key):
    with pytest.raises(ConfigError, match="border_weight needs"):
        load_config(tiny_recipe, ["loss.terms=[{name: weighted_ce}]",
                                  f"loss.border_weight={{cell_class: 1, {key}: .nan}}"])


def folder_dataset(root: Path, sizes: list[tuple[int, int]]) -> Path:
    """A two-class folder dataset whose train split has images of the given (height, width) sizes."""
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        for i, (h, w) in enumerate(sizes):
            rng = np.random.default_rng(i)
            cv2.imwrite(str(root / "images" / split / f"s{i}.png"), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
            cv2.imwrite(str(root / "masks" / split / f"s{i}.png"), (rng.random((h, w)) > 0.5).astype(np.uint8))
    (root / "dataset.yaml").write_text("name: mixed\nformat: folder\nroot: .\nclasses: [background, thing]\n"
                                       "splits:\n  train: {images: images/train, masks: masks/train}\n"
                                       "  val: {images: images/val, masks: masks/val}\n")
    return root


def test_images_of_different_sizes_without_a_crop_are_one_line(tiny_recipe, tmp_path, capsys):
    data = folder_dataset(tmp_path / "mixed", [(32, 32), (48, 32), (32, 32), (32, 48)])
    args = ["--config", str(tiny_recipe), "--set", f"data.spec={data}", "--set", "data.crop=null",
            "--set", "train.batch_size=2"]
    assert cli(args) == 2
    ends_with_one_error_line(capsys.readouterr().err, "cannot batch images of different sizes")


def test_a_diverging_run_stops_with_one_line_and_a_failed_end_event(tiny_recipe, capsys):
    args = ["--config", str(tiny_recipe), "--set", "optim.lr=1e30", "--set", "optim.weight_decay=0",
            "--set", "schedule.warmup_epochs=0", "--set", "output.run_name=diverged"]
    assert cli(args) == 2
    ends_with_one_error_line(capsys.readouterr().err, "training loss became")
    events, _ = read_events(tiny_recipe.parent / "runs" / "tiny" / "diverged" / EVENTS_FILE)
    assert events[-1]["event"] == "end" and events[-1]["status"] == "failed"
    assert nothing_published(tiny_recipe.parent)


@pytest.mark.parametrize(("flags", "needle"), [
    (["--epochs", "1"], "--epochs is for a job on a server (--server); here use --set train.epochs=1"),
    (["--device", "cuda"], "--device is for a job on a server (--server); here use --set train.device=cuda"),
    (["--budget-min", "2"], "--budget-min is for a job on a server (--server); here use --set train.max_time_min=2"),
    (["--dataset", "cells"], "--dataset is for a job on a server (--server); here use --set data.spec=cells"),
    (["--wait"], "--wait is for a job on a server (--server)"),
])
def test_server_only_flags_without_server_are_refused_not_ignored(tiny_recipe, capsys, flags, needle):
    assert segsvc_main(["train", "--config", str(tiny_recipe), *QUICK, *flags]) == 2
    one_line(capsys.readouterr().err, "segsvc: error: ", needle)
    assert nothing_published(tiny_recipe.parent) and not (tiny_recipe.parent / "runs").exists()


def test_cuda_on_a_host_without_one_is_one_line(tiny_recipe, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has a CUDA device")
    assert segsvc_main(["train", "--config", str(tiny_recipe), "--set", "train.device=cuda"]) == 2
    one_line(capsys.readouterr().err, "segsvc: error: ", "no CUDA device is available; use train.device=cpu")


def test_metrics_jsonl_is_strict_json_when_a_class_is_absent(tmp_path):
    """A class absent from the validation labels and the predictions has no IoU (NaN in the history): the
    metrics file says null, as metrics.json and events.jsonl do, not a bare NaN that strict JSON readers refuse."""
    from training.rundir import append_metrics, write_metrics_file

    row = {"epoch": 1, "train_loss": 0.5, "val_miou": 0.25, "val_iou": [0.5, float("nan"), 0.0]}
    write_metrics_file(tmp_path, [row])
    append_metrics(tmp_path, {**row, "epoch": 2})

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    rows = [json.loads(line, parse_constant=refuse) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_iou"] for r in rows] == [[0.5, None, 0.0]] * 2
    assert row["val_iou"][1] != row["val_iou"][1]  # the history itself keeps its NaN


@pytest.mark.parametrize("name", ["''", ".", "..", "a/b", "../../elsewhere"])
def test_run_name_is_one_folder_name(tiny_recipe, name):
    """``..`` made the runs folder itself the run directory (its checkpoints/, metrics.jsonl, config.yaml)."""
    with pytest.raises(ConfigError, match=r"output.run_name must be one folder name \(no '/', not '.' or '..'\)"):
        load_config(tiny_recipe, [f"output.run_name={name}"])


def test_an_error_in_a_data_loader_worker_is_still_one_line(tiny_recipe, tmp_path, capsys):
    """With ``data.workers`` > 0 torch re-raises a worker's error with the worker's whole traceback as its
    message: the user read "Caught InvalidArgument in DataLoader worker process 0. Original Traceback ..."."""
    data = folder_dataset(tmp_path / "mixed", [(32, 32), (48, 32), (32, 32), (32, 48)])
    args = ["--config", str(tiny_recipe), "--set", f"data.spec={data}", "--set", "data.crop=null",
            "--set", "train.batch_size=2", "--set", "data.workers=1"]
    assert cli(args) == 2
    err = capsys.readouterr().err
    ends_with_one_error_line(err, "training: error: cannot batch images of different sizes")
    assert "Original Traceback" not in err and "worker process" not in err, err


def test_no_progress_without_server_turns_the_bars_off_locally(tiny_recipe):
    """``--no-progress`` means the same with and without ``--server``: it is honoured, not refused or ignored."""
    recipe = tiny_recipe.read_text().replace("progress: false", "progress: true")
    tiny_recipe.write_text(recipe)
    assert segsvc_main(["train", "--config", str(tiny_recipe), *QUICK, "--set", "output.run_name=quiet",
                        "--no-progress"]) == 0
    config = (tiny_recipe.parent / "runs" / "tiny" / "quiet" / "config.yaml").read_text()
    assert "progress: false" in config and "progress: true" not in config


@pytest.mark.parametrize(("override", "needle"), [
    ("model.arch=nope", "unknown model architecture 'nope'"),
    ("model.params.bogus=1", "got unknown parameters ['bogus']"),
    ("data.val_scale=-1", "data.val_scale/val_tile_*/val_tta_scales: inference scale must be in"),
    ("data.crop=[34, 34]", "use --set data.crop=[32,32]"),
])
def test_a_recipe_the_model_refuses_leaves_no_empty_run_directory(tiny_recipe, capsys, override, needle):
    """Each such attempt left a timestamped run directory holding only config.yaml and a failed events.jsonl."""
    assert cli(["--config", str(tiny_recipe), *QUICK, "--set", override]) == 2
    one_line(capsys.readouterr().err, "training: error: ", needle)
    assert not (tiny_recipe.parent / "runs").exists()
