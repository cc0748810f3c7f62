"""Review 3: ``segsvc eval`` and the trainer on splits that are missing or have no labels, model folders
holding an unfinished version, ``--curves`` on a folder without validated runs.

An unlabelled split (``masks: null``) reads as masks that are void everywhere: eval reported every metric
as "-" (NaN) and exited 0, and the trainer validated on it, never wrote a best checkpoint and published
without metrics. A missing split left an empty output folder behind; ``--curves DIR`` without a validated
run failed only after the whole evaluation; ``--model <repo>/<name>`` took the highest numbered folder even
when it was a copy still in progress.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

import training.evaluate
from segsvc.cli import main as segsvc_main
from segsvc.config import ModelSpec
from segsvc.models import build_model
from segsvc.models.artifact import save_artifact
from training.train import cli

CLASSES = ["background", "thing"]


@pytest.fixture(scope="module")
def labelled_and_not(tmp_path_factory) -> Path:
    """A two-class folder dataset: ``train`` and ``val`` labelled, ``test`` not (``masks: null``)."""
    root = tmp_path_factory.mktemp("partly-labelled")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    for i in range(4):
        rng = np.random.default_rng(i)
        cv2.imwrite(str(root / "images" / f"s{i}.png"), rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
        cv2.imwrite(str(root / "masks" / f"s{i}.png"), (rng.random((32, 32)) > 0.5).astype(np.uint8))
    (root / "dataset.yaml").write_text(
        "name: partly\nformat: folder\nroot: .\nclasses: [background, thing]\nsplits:\n"
        "  train: {images: images, masks: masks}\n  val: {images: images, masks: masks}\n"
        "  test: {images: images, masks: null}\n")
    return root


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    """An untrained two-class model: what is refused here needs no training."""
    spec = ModelSpec("unet", 2, 3, {"base_channels": 4, "depth": 2})
    return save_artifact(build_model(spec), tmp_path_factory.mktemp("repo"), "partly", spec=spec,
                         class_names=CLASSES)


def eval_args(artifact: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["eval", "--model", str(artifact), "--data", str(data), "--out", str(out), "--no-progress",
            "--device", "cpu", "--samples", "0", *extra]


def one_line(err: str, prefix: str, needle: str) -> None:
    assert "Traceback" not in err and err.startswith(prefix) and err.count("\n") == 1, err
    assert needle in err, err


def test_eval_of_an_unlabelled_split_is_refused_before_anything_is_written(artifact, labelled_and_not, tmp_path,
                                                                         capsys):
    out = tmp_path / "out"
    assert segsvc_main(eval_args(artifact, labelled_and_not, out, "--split", "test")) == 2
    one_line(capsys.readouterr().err, "segsvc: error: ",
             "split 'test' of partly has no labels (masks: null): nothing to measure")
    assert not out.exists()


def test_eval_of_a_missing_split_names_the_splits_and_leaves_no_folder(artifact, labelled_and_not, tmp_path,
                                                                      capsys):
    out = tmp_path / "out"
    assert segsvc_main(eval_args(artifact, labelled_and_not, out, "--split", "tset")) == 2
    one_line(capsys.readouterr().err, "segsvc: error: ", "has no split 'tset'; splits: train, val, test")
    assert not out.exists()


def test_training_that_would_validate_on_an_unlabelled_split_is_refused(tiny_recipe, labelled_and_not, capsys):
    for split_key in ("data.val_split", "data.train_split"):
        args = ["--config", str(tiny_recipe), "--set", f"data.spec={labelled_and_not}", "--set", "data.crop=null",
                "--set", f"{split_key}=test"]
        assert cli(args) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.count("\n") == 1, err
        assert f"{split_key} 'test' of partly has no labels (masks: null)" in err, err
    assert not (tiny_recipe.parent / "repo").exists() and not (tiny_recipe.parent / "runs").exists()


def test_eval_of_a_model_folder_skips_a_version_still_being_copied(artifact, labelled_and_not, tmp_path, capsys):
    model_dir = artifact.parent
    (model_dir / "7").mkdir()  # a copy in progress: no manifest yet (the repository does not count it)
    try:
        out = tmp_path / "out"
        assert segsvc_main(eval_args(model_dir, labelled_and_not, out, "--split", "val")) == 0
        assert json.loads((out / "metrics.json").read_text())["version"] == int(artifact.name)
    finally:
        (model_dir / "7").rmdir()


def test_curves_without_a_validated_run_are_refused_before_evaluating(artifact, labelled_and_not, tmp_path, capsys,
                                                                      monkeypatch):
    def evaluate(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("evaluated although --curves names a folder without a validated run")

    monkeypatch.setattr(training.evaluate, "evaluate_artifact", evaluate)
    runs = tmp_path / "runs"
    (runs / "r" / "a").mkdir(parents=True)
    (runs / "r" / "a" / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "train_loss": 1.0}) + "\n")
    out = tmp_path / "out"
    assert segsvc_main(eval_args(artifact, labelled_and_not, out, "--curves", str(runs))) == 2
    one_line(capsys.readouterr().err, "segsvc: error: ", "no training run with a validated epoch under")
    assert not out.exists()


def test_eval_of_a_run_folder_or_a_repository_names_the_model_to_give(artifact, labelled_and_not, tmp_path, capsys):
    """``--model runs/<recipe>/<run>`` (a training run) and ``--model <repo>`` (several models) said only
    "neither a model version directory nor a model directory"."""
    run_dir = tmp_path / "runs" / "tiny" / "20240101-000000"
    run_dir.mkdir(parents=True)
    (run_dir / "artifact.txt").write_text(f"{artifact}\n")
    assert segsvc_main(eval_args(run_dir, labelled_and_not, tmp_path / "o")) == 2
    one_line(capsys.readouterr().err, "segsvc: error: ",
             f"{run_dir} is a training run's folder; the model it published is {artifact}: pass --model {artifact}")
    repo = artifact.parent.parent
    assert segsvc_main(eval_args(repo, labelled_and_not, tmp_path / "o")) == 2
    one_line(capsys.readouterr().err, "segsvc: error: ",
             f"{repo} is a model repository (models: partly): pass --model {repo / 'partly'}")
    assert not (tmp_path / "o").exists()
