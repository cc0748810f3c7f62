"""Review 4: ``segsvc eval`` and the trainer on a split whose masks are all void, a stale ``curves.png`` in
``--out``, ``--model <repo>/<name>`` and the repository's ``DEFAULT`` version, a damaged ``config.yaml`` under
``segsvc curves``.

A labelled split whose masks hold only the ignored label counts no pixel: eval printed every metric as "-"
(NaN), wrote a metrics.json of nulls and exited 0, and the trainer validated on it every epoch, never wrote a
best checkpoint and published its last weights without metrics as its "best epoch". ``--out DIR`` of an
earlier evaluation with ``--curves`` kept that run's curves.png and curves.csv beside a new report made
without them. ``--model <repo>/<name>`` evaluated the highest numbered version while the server (and
``segsvc train --from NAME``) use the model's default (``<name>/DEFAULT``, else the newest).
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from segsvc.cli import main as segsvc_main
from segsvc.config import ModelSpec
from segsvc.errors import InvalidArgument
from segsvc.inference.repository import ModelRepository
from segsvc.models import build_model
from segsvc.models.artifact import save_artifact
from tests.training.test_review3_eval import eval_args, one_line
from training.curves import write_curves
from training.metrics import ConfusionMatrix
from training.train import cli

CLASSES = ["background", "thing"]


@pytest.fixture(scope="module")
def void_val(tmp_path_factory) -> Path:
    """A two-class folder dataset: ``train`` labelled, ``val`` labelled with the ignored label only."""
    root = tmp_path_factory.mktemp("void-val")
    for folder in ("images", "masks", "void"):
        (root / folder).mkdir()
    for i in range(4):
        rng = np.random.default_rng(i)
        cv2.imwrite(str(root / "images" / f"s{i}.png"), rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
        cv2.imwrite(str(root / "masks" / f"s{i}.png"), (rng.random((32, 32)) > 0.5).astype(np.uint8))
        cv2.imwrite(str(root / "void" / f"s{i}.png"), np.full((32, 32), 255, dtype=np.uint8))
    (root / "dataset.yaml").write_text(
        "name: voidval\nformat: folder\nroot: .\nclasses: [background, thing]\nignore_index: 255\nsplits:\n"
        "  train: {images: images, masks: masks}\n  val: {images: images, masks: void}\n")
    return root


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    """An untrained two-class model: nothing checked here needs a trained one."""
    spec = ModelSpec("unet", 2, 3, {"base_channels": 4, "depth": 2})
    return save_artifact(build_model(spec), tmp_path_factory.mktemp("repo"), "voidval", spec=spec,
                         class_names=CLASSES)


def test_eval_of_a_split_whose_masks_are_all_void_is_refused(artifact, void_val, tmp_path, capsys):
    out = tmp_path / "out"
    assert segsvc_main(eval_args(artifact, void_val, out, "--split", "val")) == 2
    one_line(capsys.readouterr().err, "segsvc: error: ",
             "split 'val' of voidval counted no pixel: every mask pixel is void (ignore_index 255)")
    assert not out.exists()  # the folder it made for the results is not left behind, empty
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    assert segsvc_main(eval_args(artifact, void_val, kept, "--split", "val")) == 2
    assert sorted(p.name for p in kept.iterdir()) == ["notes.txt"]  # a folder that was there stays
    assert segsvc_main(eval_args(artifact, void_val, out, "--split", "train")) == 0  # a labelled split is measured


def test_require_counted_names_the_split_and_passes_counted_metrics():
    from training.metrics import require_counted

    cm = ConfusionMatrix(2, ignore_index=255)
    cm.update(torch.full((2, 2), 255), torch.zeros((2, 2), dtype=torch.int64))
    with pytest.raises(InvalidArgument, match="split 'val' of d counted no pixel: every mask pixel is void"):
        require_counted(cm.compute(), "split 'val' of d", 255)
    cm.update(torch.tensor([[0, 1]]), torch.tensor([[0, 1]]))
    assert require_counted(cm.compute(), "split 'val' of d", 255).pixels == 2


def test_training_with_an_all_void_validation_split_publishes_no_best_epoch_from_nan(tiny_recipe, void_val, capsys):
    args = ["--config", str(tiny_recipe), "--set", f"data.spec={void_val}", "--set", "data.crop=null",
            "--set", "output.run_name=void", "--set", "train.epochs=3"]
    assert cli(args) == 2
    err = capsys.readouterr().err
    last = err.splitlines()[-1]
    assert "Traceback" not in err and last.startswith("training: error: data.val_split 'val' of voidval counted "
                                                       "no pixel: every mask pixel is void (ignore_index 255)"), err
    assert not list((tiny_recipe.parent / "repo").glob("*/*/manifest.json"))  # nothing published
    # It stops at its first validation, not after every epoch has run for nothing.
    rows = [json.loads(line) for path in (tiny_recipe.parent / "runs").rglob("metrics.jsonl")
            for line in path.read_text().splitlines()]
    assert [row["epoch"] for row in rows if row.get("epoch", 0) > 1] == []


def validated_runs(root: Path) -> Path:
    run = root / "runs" / "tiny" / "r1"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "val_miou": 0.5, "elapsed_s": 60.0,
                                                   "cpu_minutes": 1.0, "cpu_threads": 1}) + "\n")
    return root / "runs"


def test_eval_without_curves_removes_the_curves_an_earlier_evaluation_left_in_out(artifact, void_val, tmp_path):
    out = tmp_path / "out"
    runs = validated_runs(tmp_path)
    assert segsvc_main(eval_args(artifact, void_val, out, "--split", "train", "--curves", str(runs))) == 0
    assert (out / "curves.png").is_file() and (out / "curves.csv").is_file()
    assert segsvc_main(eval_args(artifact, void_val, out, "--split", "train")) == 0
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "report.png"]


def test_eval_of_a_model_folder_takes_its_default_version_as_the_server_does(artifact, void_val, tmp_path):
    spec = ModelSpec("unet", 2, 3, {"base_channels": 4, "depth": 2})
    repo = tmp_path / "repo"
    for _ in range(2):
        save_artifact(build_model(spec), repo, "twice", spec=spec, class_names=CLASSES)
    ModelRepository(repo).set_default("twice", 1)
    out = tmp_path / "out"
    assert segsvc_main(eval_args(repo / "twice", void_val, out, "--split", "train", "--limit", "1")) == 0
    assert json.loads((out / "metrics.json").read_text())["version"] == 1
    ModelRepository(repo).set_default("twice", None)  # no pointer: the newest complete version
    assert segsvc_main(eval_args(repo / "twice", void_val, out, "--split", "train", "--limit", "1")) == 0
    assert json.loads((out / "metrics.json").read_text())["version"] == 2


def test_curves_read_past_a_config_yaml_that_is_not_utf8(tmp_path):
    runs = validated_runs(tmp_path)
    (runs / "tiny" / "r1" / "config.yaml").write_bytes(b"name: \xff\xfe\n")
    curves = write_curves(runs, tmp_path / "c.png")
    assert [c.name for c in curves] == ["tiny/r1"] and curves[0].recipe == "tiny"


def test_curves_never_take_a_file_of_the_users_beside_the_picture_as_their_temporary(tmp_path):
    """The picture and CSV were written as ``<stem>.tmp.png`` and ``<name>.csv.tmp`` and renamed: a file of
    that name in the output folder was overwritten, then renamed away."""
    runs = validated_runs(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    mine = {out / "a.tmp.png": b"my picture", out / "a.csv.tmp": b"my table"}
    for path, data in mine.items():
        path.write_bytes(data)
    write_curves(runs, out / "a.png")
    assert {path: path.read_bytes() for path in mine} == mine
    assert sorted(p.name for p in out.iterdir()) == ["a.csv", "a.csv.tmp", "a.png", "a.tmp.png"]
    assert (out / "a.png").read_bytes().startswith(b"\x89PNG") and (out / "a.csv").read_text().count("\n") == 2

