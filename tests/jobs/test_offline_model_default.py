"""``segsvc batch`` without ``--model``: the repository's only model, as its help says; with several models it
is refused at once, naming them, before any input is listed or any model loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from segsvc.cli import build_parser, main
from segsvc.errors import InvalidArgument
from segsvc.jobs import offline
from segsvc.jobs.offline import run_batch
from tests.server.conftest import encode, make_image, publish


@pytest.fixture
def inputs(tmp_path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(2):
        (folder / f"{i}.png").write_bytes(encode(make_image(24, 24, seed=i)))
    return folder


def _batch(repo: Path, out: Path, *args: str) -> int:
    return main(["batch", *args, "--model-repo", str(repo), "--out", str(out), "--device", "cpu", "--no-progress"])


def test_the_only_model_of_the_repository_is_used(tmp_path, inputs, capsys) -> None:
    publish(tmp_path / "repo", "solo", seed=1, version=3)
    assert _batch(tmp_path / "repo", tmp_path / "out", str(inputs)) == 0
    assert "with solo:3 into" in capsys.readouterr().out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (summary["model"], summary["version"], summary["counts"]["done"]) == ("solo", 3, 2)


def test_run_batch_takes_the_only_model_too(tmp_path, inputs) -> None:
    publish(tmp_path / "repo", "solo", seed=1)
    summary = run_batch([str(inputs)], model_repo=tmp_path / "repo", model=None, out=tmp_path / "out", device="cpu")
    assert summary["model"] == "solo" and summary["counts"]["done"] == 2


def test_several_models_are_refused_at_once_naming_them(tmp_path, inputs, monkeypatch, capsys) -> None:
    publish(tmp_path / "repo", "alpha", seed=1)
    publish(tmp_path / "repo", "beta", seed=2)

    def never(*args, **kwargs):
        raise AssertionError("nothing may be listed or loaded before the refusal")

    monkeypatch.setattr(offline, "open_backend", never)
    monkeypatch.setattr(offline, "batch_inputs", never)
    assert _batch(tmp_path / "repo", tmp_path / "out", str(inputs)) == 2
    err = capsys.readouterr().err
    assert err.startswith("segsvc: error:") and len(err.strip().splitlines()) == 1
    assert "holds 2 models (alpha, beta)" in err and "--model NAME or NAME:VERSION" in err
    assert not (tmp_path / "out").exists()  # refused runs leave nothing behind
    # naming one works
    monkeypatch.undo()
    assert _batch(tmp_path / "repo", tmp_path / "out", str(inputs), "--model", "beta") == 0


def test_an_empty_repository_is_refused(tmp_path, inputs) -> None:
    (tmp_path / "repo").mkdir()
    with pytest.raises(InvalidArgument, match="holds no model"):
        run_batch([str(inputs)], model_repo=tmp_path / "repo", model=None, out=tmp_path / "out", device="cpu")
    with pytest.raises(InvalidArgument, match="is not a folder"):
        run_batch([str(inputs)], model_repo=tmp_path / "missing", model=None, out=tmp_path / "out", device="cpu")


def test_resume_without_model_keeps_the_stored_one_even_with_several(tmp_path, inputs) -> None:
    publish(tmp_path / "repo", "alpha", seed=1)
    publish(tmp_path / "repo", "beta", seed=2)
    assert _batch(tmp_path / "repo", tmp_path / "out", str(inputs), "--model", "beta") == 0
    assert _batch(tmp_path / "repo", tmp_path / "out", "--resume") == 0
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["model"] == "beta"


def test_the_help_says_what_happens() -> None:
    parser = build_parser()
    batch = parser._subparsers._group_actions[0].choices["batch"]  # type: ignore[union-attr]
    [model] = [a for a in batch._actions if "--model" in a.option_strings]
    assert "the repository's only model" in model.help and "refused at once when it holds several" in model.help
    assert "with --resume: the stored one" in model.help
