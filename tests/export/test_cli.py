"""``segsvc export``: the command line prints the validation numbers and the written paths."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest

from segsvc.cli import main
from segsvc.config import ModelSpec
from segsvc.inference.repository import ModelRepository
from segsvc.models.artifact import read_manifest
from tests.export.conftest import TINY, publish

ROOT = Path(__file__).resolve().parents[2]


def test_onnx_exports_the_default_version_and_prints_the_numbers(repo: Path, capsys: pytest.CaptureFixture) -> None:
    v1 = publish(repo, "m", TINY["segnet"], seed=0)
    v2 = publish(repo, "m", TINY["segnet"], seed=1)
    ModelRepository(repo).set_default("m", 1)  # the DEFAULT pointer wins over the newest version

    assert main(["export", "m", "--repo", str(repo), "--checks", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert (v1 / "model.onnx").is_file() and not (v2 / "model.onnx").exists()
    entry = read_manifest(v1).exports["onnx"]
    assert "exported m:1 (segnet) to ONNX opset 18" in out
    assert f"max |Δlogit| {entry['validation']['max_abs_diff']:.3g}" in out
    assert "labels agree on 100.0000%" in out
    assert f"wrote {v1 / 'model.onnx'} (sha256 {entry['sha256']})" in out
    assert str(v1 / "manifest.json") in out


def test_triton_writes_beside_the_repository_by_default(repo: Path, capsys: pytest.CaptureFixture) -> None:
    publish(repo, "m", TINY["unet"])
    v2 = publish(repo, "m", TINY["unet"], seed=1)
    assert main(["export", "m", "--repo", str(repo), "--format", "triton", "--checks", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    model_dir = repo.resolve().parent / "model_repository-triton" / "m"
    assert (model_dir / "config.pbtxt").is_file() and (model_dir / "1" / "model.onnx").is_file()
    assert "exported it now" in out and "max |Δlogit|" in out
    for name in ("config.pbtxt", "labels.txt", "1/model.onnx"):
        assert f"wrote {model_dir / name}" in out
    assert (v2 / "model.onnx").is_file()  # the newest version, exported first


def test_a_refused_export_is_an_error_and_writes_nothing(repo: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    v1 = publish(repo, "m", TINY["unet"])
    real_run = ort.InferenceSession.run
    monkeypatch.setattr(ort.InferenceSession, "run", lambda self, *a, **k: [-o for o in real_run(self, *a, **k)])
    assert main(["export", "m:1", "--repo", str(repo), "--checks", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("segsvc: error: m:1 (unet): the ONNX export does not reproduce the model")
    assert not (v1 / "model.onnx").exists() and read_manifest(v1).exports == {}


@pytest.mark.parametrize(("argv", "words"), [
    (["nope"], "'nope'"),
    (["m:7"], "has no version 7"),
    (["m", "--checks", "0"], "--checks must be at least 1"),
    (["m", "--out", "x"], "--out is for --format triton"),
    (["m", "--format", "triton", "--max-batch-size", "0"], "--max-batch-size must be at least 1"),
])
def test_bad_arguments_are_errors(repo: Path, capsys: pytest.CaptureFixture, argv: list[str], words: str) -> None:
    publish(repo, "m", TINY["unet"])
    assert main(["export", *argv, "--repo", str(repo), "--no-progress"]) == 2
    assert words in capsys.readouterr().err


def test_the_command_reports_an_unexportable_architecture_in_one_line(repo: Path) -> None:
    """The real entry point: an architecture that cannot export gives its reason, not a traceback."""
    publish(repo, "psp", ModelSpec("smp/PSPNet", 3, 3, {"encoder_name": "resnet18"}))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "segsvc", "export", "psp", "--repo", str(repo), "--no-progress"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "segsvc: error: psp:1 (smp/PSPNet) cannot be exported to ONNX: its pyramid pooling uses AdaptiveAvgPool2d "
        "to 2x2, 3x3 and 6x6 bins, which ONNX has no operator for: the exporter computes the pooling windows (a "
        "fixed AveragePool kernel, or gather indices) from the traced input's size, so the graph is wrong or fails "
        "at any other size (dynamic height and width are impossible)"
    ]
    assert not list((repo / "psp" / "1").glob("*.onnx"))


def test_triton_says_whether_it_reused_the_recorded_export_or_made_a_new_one(
        repo: Path, capsys: pytest.CaptureFixture) -> None:
    v1 = publish(repo, "m", TINY["unet"])
    triton = ["export", "m", "--repo", str(repo), "--format", "triton", "--no-progress"]
    assert main(["export", "m", "--repo", str(repo), "--checks", "1", "--no-progress"]) == 0
    capsys.readouterr()

    assert main([*triton, "--checks", "1"]) == 0  # matches the recorded export
    out = capsys.readouterr().out
    assert "used the recorded export, SHA-256 verified" in out and "exported" not in out.split("\n")[0]
    assert read_manifest(v1).exports["onnx"]["opset"] == 18

    assert main([*triton, "--opset", "17", "--checks", "1"]) == 0
    out = capsys.readouterr().out
    entry = read_manifest(v1).exports["onnx"]
    assert entry["opset"] == 17
    assert "exported it anew" in out and "opset 18" in out and "17" in out
    assert "used the recorded export" not in out
    assert f"from {v1 / entry['file']}" in out


def test_the_opset_help_says_what_triton_does_with_it(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "recorded export" in help_text


def test_the_progress_bar_counts_the_checks_a_triton_re_export_runs(
        repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Triton re-export validates with the recorded checks (here 1), but its bar counted the default 4:
    it closed at 5 of 8 steps."""
    import tqdm

    bars: list[tqdm.tqdm] = []

    class Recorded(tqdm.tqdm):
        def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
            super().__init__(*args, **kwargs)
            bars.append(self)

    publish(repo, "m", TINY["unet"])
    assert main(["export", "m", "--repo", str(repo), "--checks", "1", "--no-progress"]) == 0
    monkeypatch.setattr(tqdm, "tqdm", Recorded)
    assert main(["export", "m", "--repo", str(repo), "--format", "triton", "--opset", "17"]) == 0
    [bar] = bars
    assert bar.n == bar.total == 5  # the export's four steps and its one check
