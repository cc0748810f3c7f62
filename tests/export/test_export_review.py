"""What a crash, or an infinite bound, did to exports: a Triton model directory renamed into place before its
files were on disk, a validation that infinite logits or ``--tolerance inf`` passed (and that wrote ``Infinity``,
which is not JSON, into the manifest), and a refusal that rounded the agreement it needed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from segsvc.cli import main
from segsvc.errors import InvalidArgument
from segsvc.export.compare import Validation
from segsvc.export.onnx import export_onnx
from segsvc.export.triton import export_triton
from segsvc.models.artifact import read_manifest
from tests.export.conftest import TINY, publish


def test_the_triton_model_directory_is_on_disk_before_it_is_renamed_into_the_repository(
        repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The model directory was written with plain writes and a copy, then renamed into ``out``: after a power cut
    the rename can be on disk while the files are not (empty config.pbtxt, a truncated model.onnx), a half model
    that a polling tritonserver loads. Every file and folder is fsynced before the rename (as ``write_atomic``
    does for one file), and ``out`` after it."""
    version_dir = publish(repo, "m", TINY["unet"])
    export_onnx(version_dir, checks=1)
    (tmp_path / "elsewhere").mkdir()
    out = tmp_path / "triton"
    out.symlink_to(tmp_path / "elsewhere")  # --out may be a symlink to a folder
    synced: list[Path] = []
    checked: list[Path] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(src, dst, *args, **kwargs):  # type: ignore[no-untyped-def]
        if Path(dst) in (out / "m", out.resolve() / "m"):
            unsynced = [p for p in (Path(src), *Path(src).rglob("*")) if p not in synced]
            assert not unsynced, f"renamed into the repository before they were on disk: {unsynced}"
            checked.append(Path(src))
        return real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    export_triton(version_dir, out)
    export_triton(version_dir, out)  # a replacement too
    assert len(checked) == 2
    assert synced.count(out.resolve()) >= 2  # the renames themselves


def _validation(**figures: float) -> Validation:
    values = dict(max_abs_diff=1e-6, max_abs_logit=5.0, agreement=1.0)
    return Validation(((1, 64, 64),), 4096, **{**values, **figures})


@pytest.mark.parametrize("figures", [
    dict(max_abs_diff=float("inf"), max_abs_logit=float("inf")),  # eager and ONNX Runtime both overflow somewhere
    dict(max_abs_logit=float("inf")),
    dict(max_abs_diff=float("nan")),
])
def test_non_finite_logits_never_pass(figures: dict[str, float]) -> None:
    """The bound is tolerance x max(1, max |logit|): an infinite logit made it infinite, and an infinite (or NaN)
    difference then passed, to be recorded as ``Infinity`` in manifest.json."""
    assert not _validation(**figures).passed
    assert _validation().passed


def test_a_tolerance_that_is_no_finite_number_is_refused(repo: Path, capsys: pytest.CaptureFixture) -> None:
    """``--tolerance inf`` turned the logit check off and wrote ``"tolerance": Infinity`` (not JSON: jq, JavaScript
    or Go then cannot read the manifest). It is refused, before anything is loaded."""
    version_dir = publish(repo, "m", TINY["unet"])
    for value in ("inf", "nan", "0", "-1"):
        assert main(["export", "m", "--repo", str(repo), "--tolerance", value, "--no-progress"]) == 2
        assert "--tolerance must be a positive finite number" in capsys.readouterr().err
    assert "onnx" not in read_manifest(version_dir).exports
    with pytest.raises(InvalidArgument, match="tolerance must be a positive finite number"):
        export_onnx(version_dir, tolerance=float("inf"), checks=1)
    assert "onnx" not in read_manifest(version_dir).exports
    export_onnx(version_dir, checks=1)
    json.loads((version_dir / "manifest.json").read_text(), parse_constant=_no_constant)  # strict JSON


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def test_a_refusal_states_the_agreement_it_needed_unrounded() -> None:
    """--min-agreement 0.9999 was stated as "need 100.0%", beside an agreement of 99.99% that fell short of it."""
    text = _validation(agreement=0.99985, min_agreement=0.9999).describe()
    assert "labels agree on 99.9850% of 4096 pixels (need 99.99%)" in text, text
    assert "(need 99.9%)" in _validation(agreement=0.99).describe()
