"""Run directories: a fresh name is claimed atomically, --resume accepts only a run's own files, and a resumed
run that was killed after publishing does not publish the same model again."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest
import torch

import training.rundir as rundir
from segsvc.models.artifact import read_manifest
from training.checkpoint import CheckpointError, RunState
from training.config import load_config
from training.distributed import DistEnv
from training.events import read_events
from training.rundir import CHECKPOINT, fresh_run_name, prepare_run
from training.train import main

ENV = DistEnv(0, 1, torch.device("cpu"))


class FrozenClock(datetime):
    """``datetime.now()`` stuck in one second: every run started "at the same time"."""

    @classmethod
    def now(cls, tz=None):  # type: ignore[no-untyped-def, override]
        return datetime(2024, 5, 6, 7, 8, 9, tzinfo=timezone.utc)


@pytest.fixture
def same_second(monkeypatch) -> None:
    monkeypatch.setattr(rundir, "datetime", FrozenClock)


# -- 2. a fresh run name is claimed, not only chosen --------------------------------------------------------
def test_two_claims_in_the_same_second_get_two_directories(tmp_path, same_second):
    a, b = fresh_run_name(tmp_path / "recipe"), fresh_run_name(tmp_path / "recipe")
    assert (a, b) == ("20240506-070809", "20240506-070809-2")
    assert (tmp_path / "recipe" / a).is_dir() and (tmp_path / "recipe" / b).is_dir()


def test_a_run_starting_between_another_runs_naming_and_mkdir_gets_its_own_directory(tmp_path, same_second,
                                                                                        monkeypatch):
    """The race of two runs started in the same second: run B names and creates its directory while run A is
    between choosing the same name and creating it; both then wrote into one directory."""
    cfg = load_config(Path("training/recipes/synthetic-quick.yaml"), [f"output.runs_dir={tmp_path}"])
    real, raced = rundir.fresh_run_name, []

    def name_then_let_the_other_run_start(parent: Path) -> str:
        name = real(parent)
        if not raced:
            raced.append(None)
            raced[0] = prepare_run(cfg, None, ENV)[0]  # run B, complete, in the same second
        return name

    monkeypatch.setattr(rundir, "fresh_run_name", name_then_let_the_other_run_start)
    run_a, _ = prepare_run(cfg, None, ENV)
    assert run_a != raced[0] and {run_a.name, raced[0].name} == {"20240506-070809", "20240506-070809-2"}
    assert (run_a / "config.yaml").is_file() and (raced[0] / "config.yaml").is_file()


# -- 3. --resume takes a run directory or a checkpoint inside one, nothing else --------------------------------
def fake_run(run_dir: Path) -> Path:
    """A run directory as prepare_run leaves it, with a checkpoint (what prepare_run reads: every key a
    trainer's checkpoint has, since load_checkpoint refuses other files)."""
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("name: x\n")
    torch.save(CHECKPOINT_SHAPE, run_dir / CHECKPOINT)
    return run_dir


CHECKPOINT_SHAPE = {**RunState().to_dict(), "model": {}, "optimizer": {}, "scheduler": {}, "scaler": {}, "rng": {},
                    "config": {}}


def test_resume_accepts_a_run_directory_and_a_checkpoint_inside_it(tmp_path):
    cfg = load_config(Path("training/recipes/synthetic-quick.yaml"))
    run = fake_run(tmp_path / "runs" / "r")
    assert prepare_run(cfg, str(run), ENV)[0] == run
    assert prepare_run(cfg, str(run / CHECKPOINT), ENV)[0] == run
    torch.save(CHECKPOINT_SHAPE, run / "checkpoints" / "epoch3.pt")
    assert prepare_run(cfg, str(run / "checkpoints" / "epoch3.pt"), ENV)[0] == run


def test_resume_from_a_checkpoint_copied_elsewhere_is_refused_and_touches_nothing(tmp_path):
    """``ckpt.parent.parent`` was taken as the run directory: the run then wrote metrics, events and checkpoints
    into whatever folder lay two levels above the copy."""
    cfg = load_config(Path("training/recipes/synthetic-quick.yaml"))
    run = fake_run(tmp_path / "runs" / "r")
    unrelated = tmp_path / "home" / "docs"
    (unrelated / "backup").mkdir(parents=True)
    (unrelated / "metrics.jsonl").write_text("precious\n")
    copy = unrelated / "backup" / "last.pt"
    copy.write_bytes((run / CHECKPOINT).read_bytes())
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for bad in (copy, unrelated, unrelated / "backup"):
        with pytest.raises(CheckpointError, match=r"a run directory \(holding config\.yaml\) or "
                                                  r"<run>/checkpoints/<name>\.pt"):
            prepare_run(cfg, str(bad), ENV)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert (unrelated / "metrics.jsonl").read_text() == "precious\n"


def test_resume_from_a_checkpoints_folder_of_no_run_is_refused(tmp_path):
    cfg = load_config(Path("training/recipes/synthetic-quick.yaml"))
    run = fake_run(tmp_path / "r")
    (run / "config.yaml").unlink()
    with pytest.raises(CheckpointError, match="config.yaml"):
        prepare_run(cfg, str(run / CHECKPOINT), ENV)
    with pytest.raises(CheckpointError, match="does not exist"):
        prepare_run(cfg, str(tmp_path / "nope"), ENV)


# -- 5. a kill -9 between publishing and recording it does not publish twice --------------------------------
class Killed(BaseException):
    """Stands in for kill -9: nothing after the point it is raised runs."""


def killed_after_publishing(monkeypatch) -> None:
    real = rundir.save_artifact

    def save_then_die(*args, **kwargs):  # type: ignore[no-untyped-def]
        real(*args, **kwargs)
        raise Killed

    monkeypatch.setattr(rundir, "save_artifact", save_then_die)


def versions(repo: Path, name: str = "tiny") -> list[int]:
    return sorted(int(p.name) for p in (repo / name).iterdir() if p.name.isdigit())


def test_resume_after_a_kill_between_publishing_and_recording_it_publishes_no_second_version(tiny_recipe,
                                                                                               monkeypatch):
    cfg = load_config(tiny_recipe, ["data.train_limit=4", "output.run_name=killed"])
    repo, run_dir = tiny_recipe.parent / "repo", tiny_recipe.parent / "runs" / "tiny" / "killed"
    killed_after_publishing(monkeypatch)
    with pytest.raises(Killed):
        main(cfg)
    monkeypatch.undo()
    assert versions(repo) == [1] and not (run_dir / "artifact.txt").exists()

    artifact = main(cfg, resume=str(run_dir))
    assert versions(repo) == [1] and artifact == repo / "tiny" / "1"
    assert (run_dir / "artifact.txt").read_text() == f"{artifact}\n"
    published = [e for e in read_events(run_dir / "events.jsonl")[0] if e["event"] == "published"]
    assert [(e["version"], e["path"]) for e in published] == [(1, str(artifact))]

    # a resume that trains further is a new model: it is published as a new version
    more = main(load_config(tiny_recipe, ["data.train_limit=4", "output.run_name=killed", "train.epochs=2"]),
                resume=str(run_dir))
    assert versions(repo) == [1, 2] and more == repo / "tiny" / "2"
    assert read_manifest(more).training["run_id"] == read_manifest(artifact).training["run_id"]


def test_another_run_with_the_same_run_directory_name_is_not_mistaken_for_this_one(tiny_recipe):
    cfg = load_config(tiny_recipe, ["data.train_limit=4", "output.run_name=same"])
    first = main(cfg)
    run_dir = tiny_recipe.parent / "runs" / "tiny" / "same"
    for p in sorted(run_dir.rglob("*"), reverse=True):  # the user deletes the run directory and starts again
        p.unlink() if p.is_file() else p.rmdir()
    second = main(cfg)
    assert second != first and versions(tiny_recipe.parent / "repo") == [1, 2]
    assert read_manifest(second).training["run_id"] != read_manifest(first).training["run_id"]
