"""`segsvc eval` refuses bad values and an unwritable --out with one line, before it evaluates anything."""

from __future__ import annotations

from pathlib import Path

import pytest

import training.evaluate
from segsvc.cli import main as segsvc_main
from segsvc.config import ModelSpec
from segsvc.errors import InvalidArgument
from segsvc.models import build_model
from segsvc.models.artifact import save_artifact
from training.data import select_indices


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    """An untrained tiny model for the tiny synthetic dataset (3 classes): refusals need no training."""
    spec = ModelSpec("unet", 3, 3, {"base_channels": 4, "depth": 2})
    return save_artifact(build_model(spec), tmp_path_factory.mktemp("repo"), "tiny", spec=spec,
                         class_names=["background", "circle", "rectangle"])


@pytest.fixture
def no_evaluation(monkeypatch) -> None:
    def evaluate(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("evaluated although the arguments are refused")

    monkeypatch.setattr(training.evaluate, "evaluate_artifact", evaluate)


def one_line_error(capsys, needle: str) -> None:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("segsvc: error: ") and err.count("\n") == 1, err
    assert needle in err, err


@pytest.mark.parametrize(("extra", "message"), [
    (["--threads", "0"], "--threads must be at least 1, got 0"),
    (["--device", "bogus"], "unknown device 'bogus'"),
    (["--indices", "2", "2"], "--indices START STOP needs 0 <= START < STOP, got 2 2"),
    (["--indices", "-1", "2"], "--indices START STOP needs 0 <= START < STOP, got -1 2"),
    (["--limit", "-1"], "--limit must be at least 1, got -1"),
    (["--limit", "0"], "--limit must be at least 1, got 0"),
    (["--samples", "-2"], "--samples must be at least 0, got -2"),  # was accepted and drew no sample rows
])
def test_eval_refuses_bad_values_before_evaluating(artifact, tiny_spec, tmp_path, capsys, no_evaluation, extra,
                                                   message) -> None:
    args = ["eval", "--model", str(artifact), "--data", str(tiny_spec), "--no-progress", "--out", str(tmp_path / "o")]
    assert segsvc_main([*args, *extra]) == 2
    one_line_error(capsys, message)
    assert not (tmp_path / "o").exists()


def test_eval_refuses_indices_beyond_the_split(artifact, tiny_spec, tmp_path, capsys) -> None:
    args = ["eval", "--model", str(artifact), "--data", str(tiny_spec), "--no-progress", "--out", str(tmp_path / "o"),
            "--device", "cpu"]
    assert segsvc_main([*args, "--indices", "0", "99"]) == 2
    one_line_error(capsys, "index range [0, 99) does not fit a split of 6 samples")


def test_select_indices_refuses_a_limit_below_one() -> None:
    assert select_indices(6, None, 2) == [0, 1]
    assert select_indices(6, (1, 4), None) == [1, 2, 3]
    for limit in (0, -1):
        with pytest.raises(InvalidArgument, match="at least 1"):
            select_indices(6, None, limit)  # -1 once quietly dropped the last sample
    with pytest.raises(InvalidArgument, match=r"index range \[2, 2\)"):
        select_indices(6, (2, 2), None)


def test_eval_checks_its_output_folder_before_evaluating(artifact, tiny_spec, tmp_path, capsys, no_evaluation) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    args = ["eval", "--model", str(artifact), "--data", str(tiny_spec), "--no-progress", "--device", "cpu"]
    assert segsvc_main([*args, "--out", str(blocker / "out")]) == 2
    one_line_error(capsys, f"cannot create the output folder {blocker / 'out'}: Not a directory")
