"""Review 3: ``--resume`` from a checkpoint that is not the trainer's, and Ctrl-C in the middle of an epoch.

A run directory's ``checkpoints/`` may hold a file the trainer never wrote there (a tensor, a list, another
program's state, or ``best.pt``, which holds only the best weights). Resuming from one was an
``AttributeError``/``KeyError`` traceback, or a screenful of "the checkpoint was trained with None" warnings
before the error. Ctrl-C ended ``python -m training`` with a ``KeyboardInterrupt`` traceback and neither entry
point said which run directory to resume.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import training.train as train_module
from training.rundir import CHECKPOINT
from training.train import cli


def foreign_run(root: Path, payload: object, name: str = "last.pt") -> Path:
    """A run directory (it has config.yaml) whose checkpoint file holds ``payload``."""
    run_dir = root / "runs" / "tiny" / "foreign"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("name: tiny\n")
    torch.save(payload, run_dir / "checkpoints" / name)
    return run_dir


def one_line(err: str, needle: str) -> None:
    assert "Traceback" not in err and err.startswith("training: error: ") and err.count("\n") == 1, err
    assert needle in err, err


RUN_STATE = {"epoch": 1, "best_score": 0.5, "epochs_since_best": 0, "history": [], "elapsed_s": 1.0}


@pytest.mark.parametrize(("payload", "needle"), [
    (torch.zeros(3), "is not a checkpoint of the trainer (it holds a Tensor, not a mapping)"),
    ([1, 2, 3], "is not a checkpoint of the trainer (it holds a list, not a mapping)"),
    ({"state_dict": {"w": torch.zeros(1)}}, "is not a checkpoint of the trainer (it lacks "),
    ({**RUN_STATE, "model": {}, "optimizer": {}, "config": {}}, "lacks 'rng', 'scaler', 'scheduler'"),
])
def test_resume_from_a_foreign_checkpoint_is_one_line_naming_the_file(tiny_recipe, capsys, payload, needle):
    run_dir = foreign_run(tiny_recipe.parent, payload)
    assert cli(["--config", str(tiny_recipe), "--resume", str(run_dir)]) == 2
    err = capsys.readouterr().err
    one_line(err, needle)
    assert str(run_dir / CHECKPOINT) in err


def test_resume_from_best_pt_says_it_holds_only_the_best_weights(tiny_recipe, capsys):
    best = {"model": {"w": torch.zeros(1)}, "epoch": 3, "metrics": {"miou": 0.5}}
    run_dir = foreign_run(tiny_recipe.parent, best, name="best.pt")
    assert cli(["--config", str(tiny_recipe), "--resume", str(run_dir / "checkpoints" / "best.pt")]) == 2
    one_line(capsys.readouterr().err, f"holds only the best weights: resume from {run_dir}")


def test_ctrl_c_mid_epoch_keeps_the_checkpoint_says_how_to_resume_and_resumes(tiny_recipe, monkeypatch, capsys):
    real = train_module.train_one_epoch
    calls = {"n": 0}

    def ctrl_c_in_epoch_two(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # what Ctrl-C raises in the main thread
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_one_epoch", ctrl_c_in_epoch_two)
    args = ["--config", str(tiny_recipe), "--set", "train.epochs=3", "--set", "data.train_limit=8",
            "--set", "output.run_name=ctrl-c"]
    try:
        code = cli(args)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped `python -m training` as a KeyboardInterrupt traceback")
    assert code == 130
    run_dir = tiny_recipe.parent / "runs" / "tiny" / "ctrl-c"
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"continue with --resume {run_dir}" in err, err
    assert torch.load(run_dir / CHECKPOINT, weights_only=True)["epoch"] == 1

    monkeypatch.setattr(train_module, "train_one_epoch", real)
    assert cli([*args, "--resume", str(run_dir)]) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]


def test_ctrl_c_before_the_first_checkpoint_says_there_is_nothing_to_resume(tiny_recipe, monkeypatch, capsys):
    def ctrl_c(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "train_one_epoch", ctrl_c)
    args = ["--config", str(tiny_recipe), "--set", "output.run_name=early"]
    try:
        code = cli(args)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped `python -m training` as a KeyboardInterrupt traceback")
    assert code == 130
    err = capsys.readouterr().err
    assert "no epoch finished" in err and "--resume" not in err, err


def test_resume_with_another_model_is_one_error_line_not_every_missing_weight(tiny_recipe, capsys):
    args = ["--config", str(tiny_recipe), "--set", "data.train_limit=4", "--set", "output.run_name=other-model"]
    assert cli(args) == 0
    run_dir = tiny_recipe.parent / "runs" / "tiny" / "other-model"
    capsys.readouterr()
    assert cli([*args, "--set", "model.params.depth=3", "--resume", str(run_dir)]) == 2
    err = capsys.readouterr().err
    last = err.splitlines()[-1]
    assert "Traceback" not in err and last.startswith("training: error: checkpoint does not match this model"), err
    assert "\t" not in err and len(last) < 500, err


def test_resume_from_a_truncated_checkpoint_is_one_line(tiny_recipe, capsys):
    args = ["--config", str(tiny_recipe), "--set", "data.train_limit=4", "--set", "output.run_name=cut"]
    assert cli(args) == 0
    run_dir = tiny_recipe.parent / "runs" / "tiny" / "cut"
    data = (run_dir / CHECKPOINT).read_bytes()
    (run_dir / CHECKPOINT).write_bytes(data[: len(data) // 2])  # a disk that filled up, a copy cut short
    capsys.readouterr()
    assert cli([*args, "--resume", str(run_dir)]) == 2
    one_line(capsys.readouterr().err, f"cannot read checkpoint {str(run_dir / CHECKPOINT)!r}: ")
