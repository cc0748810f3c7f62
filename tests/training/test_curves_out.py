"""``segsvc curves --out``: a .png path, refused up front otherwise; an impossible one is a one-line error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from segsvc.cli import main as segsvc_main


@pytest.fixture
def runs(tmp_path) -> Path:
    run_dir = tmp_path / "runs" / "tiny" / "run"
    run_dir.mkdir(parents=True)
    rows = [{"epoch": 1, "elapsed_s": 60.0, "cpu_threads": 2, "cpu_minutes": 2.0, "val_miou": 0.5}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path / "runs"


def one_line_error(capsys, needle: str) -> None:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("segsvc: error: ") and err.count("\n") == 1, err
    assert needle in err, err


@pytest.mark.parametrize("name", ["curves", "curves.csv", "curves.svg"])
def test_curves_refuse_an_out_that_is_not_a_png_before_writing_anything(runs, tmp_path, capsys, name) -> None:
    out = tmp_path / "c" / name
    assert segsvc_main(["curves", str(runs), "--out", str(out)]) == 2
    one_line_error(capsys, f"{out}: the curves picture is a PNG, its name must end in .png")
    assert not (tmp_path / "c").exists()  # no curves.csv left behind


def test_curves_accept_an_upper_case_png_suffix(runs, tmp_path) -> None:
    assert segsvc_main(["curves", str(runs), "--out", str(tmp_path / "C.PNG")]) == 0
    assert (tmp_path / "C.PNG").stat().st_size > 1000 and (tmp_path / "C.csv").is_file()


def test_curves_into_an_impossible_folder_is_a_one_line_error(runs, tmp_path, capsys) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert segsvc_main(["curves", str(runs), "--out", str(blocker / "c.png")]) == 2
    one_line_error(capsys, str(blocker))  # "File exists" or "Not a directory", as the OS words it
