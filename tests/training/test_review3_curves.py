"""Review 3: ``segsvc curves`` (and ``segsvc eval --curves``) on a folder holding a mix of runs.

One damaged or foreign ``metrics.jsonl`` among them (a null epoch, a thread count that is text, bytes that are
not UTF-8) stopped the whole picture with a TypeError, ValueError or UnicodeDecodeError traceback, and a
``val_miou`` of ``true`` was plotted as an mIoU of 1.0. Such rows are skipped; the valid runs are drawn.
"""

from __future__ import annotations

import json
from pathlib import Path

from segsvc.cli import main as segsvc_main
from training.curves import collect


def write_rows(run_dir: Path, text: str | bytes) -> None:
    run_dir.mkdir(parents=True)
    path = run_dir / "metrics.jsonl"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())


def test_damaged_runs_are_skipped_and_the_valid_ones_drawn(tmp_path, capsys):
    root = tmp_path / "runs"
    write_rows(root / "good" / "1", json.dumps({"epoch": 1, "elapsed_s": 60.0, "cpu_threads": 2, "cpu_minutes": 2.0,
                                                "val_miou": 0.5}) + "\n")
    write_rows(root / "null-epoch" / "1", '{"epoch": null, "val_miou": 0.5, "elapsed_s": 10}\n')
    write_rows(root / "not-utf8" / "1", b'\xff\xfe{"epoch": 1}\n{"epoch": 2, "val_miou": 0.25, "elapsed_s": 5}\n')
    write_rows(root / "text-threads" / "1", '{"epoch": 1, "val_miou": 0.5, "cpu_minutes": 3, "cpu_threads": "x"}\n')
    write_rows(root / "bool-miou" / "1", '{"epoch": 1, "val_miou": true, "elapsed_s": 5}\n')
    write_rows(root / "miou-out-of-range" / "1", '{"epoch": 1, "val_miou": 7.5, "elapsed_s": 5}\n')

    curves = {c.name: c for c in collect(root, default_threads=1)}
    assert sorted(curves) == ["good/1", "not-utf8/1"]
    assert [p.val_miou for p in curves["not-utf8/1"].points] == [0.25]

    assert segsvc_main(["curves", str(root), "--out", str(tmp_path / "c.png"), "--threads", "1"]) == 0
    assert (tmp_path / "c.png").stat().st_size > 0
    assert "Traceback" not in capsys.readouterr().err
