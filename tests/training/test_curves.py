"""``segsvc curves``: validation mIoU against CPU-minutes for the runs under a folder (PNG + CSV)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from segsvc.cli import main as segsvc_main
from training.curves import DPI, FIGSIZE_IN, by_dataset, collect, cpu_time_row, line_styles


def write_run(run_dir: Path, rows: list[dict], threads: int | None = None, world_size: int | None = None,
              tail: str = "", dataset: str | None = None) -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    config = {"name": run_dir.parent.name, "train": {"threads": threads}}
    if dataset is not None:
        config["data"] = {"spec": dataset}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    if world_size is not None:
        (run_dir / "events.jsonl").write_text(json.dumps({"event": "start", "world_size": world_size}) + "\n")
    return run_dir


@pytest.fixture
def runs(tmp_path) -> Path:
    root = tmp_path / "runs"
    # a new run: cpu_minutes recorded by the trainer (validated every other epoch)
    write_run(root / "camvid-unet" / "new", [
        {"epoch": 1, "elapsed_s": 60.0, "cpu_threads": 2, "cpu_minutes": 2.0},
        {"epoch": 2, "elapsed_s": 120.0, "cpu_threads": 2, "cpu_minutes": 4.0, "val_miou": 0.25},
        {"epoch": 3, "elapsed_s": 180.0, "cpu_threads": 2, "cpu_minutes": 6.0},
        {"epoch": 4, "elapsed_s": 240.0, "cpu_threads": 2, "cpu_minutes": 8.0, "val_miou": 0.5},
    ])
    # an old run: wall time only, train.threads 3 in its config, 2 DDP ranks; its last line is being written
    write_run(root / "camvid-segnet" / "old", [
        {"epoch": 1, "elapsed_s": 30.0, "val_miou": 0.125},
        {"epoch": 2, "elapsed_s": 90.0, "val_miou": 0.375},
    ], threads=3, world_size=2, tail='{"epoch": 3, "elapsed')
    return root


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_cpu_minutes_accumulate_per_epoch_and_continue_an_old_run():
    first = cpu_time_row([], 90.0, 2)
    assert first == {"cpu_threads": 2, "cpu_minutes": 3.0}
    assert cpu_time_row([{"elapsed_s": 90.0, **first}], 30.0, 4) == {"cpu_threads": 4, "cpu_minutes": 5.0}
    assert cpu_time_row([{"elapsed_s": 120.0}], 60.0, 2)["cpu_minutes"] == 6.0  # resumed from an old checkpoint


def test_curves_write_a_png_of_the_right_size_and_a_csv_with_every_runs_points(runs, tmp_path, capsys):
    png = tmp_path / "out" / "curves.png"
    assert segsvc_main(["curves", str(runs), "--out", str(png), "--title", "two runs"]) == 0
    import matplotlib.image

    height, width = matplotlib.image.imread(png).shape[:2]
    assert (width, height) == (FIGSIZE_IN[0] * DPI, FIGSIZE_IN[1] * DPI) == (900, 550)
    rows = read_csv(png.with_suffix(".csv"))
    points = [(r["run"], r["recipe"], int(r["epoch"]), float(r["cpu_minutes"]), r["cpu_minutes_source"],
               float(r["val_miou"])) for r in rows]
    assert points == [
        ("camvid-segnet/old", "camvid-segnet", 1, 0.5 * 3 * 2, "config threads", 0.125),
        ("camvid-segnet/old", "camvid-segnet", 2, 1.5 * 3 * 2, "config threads", 0.375),
        ("camvid-unet/new", "camvid-unet", 2, 4.0, "recorded", 0.25),
        ("camvid-unet/new", "camvid-unet", 4, 8.0, "recorded", 0.5),
    ]
    assert [r["wall_minutes"] for r in rows] == ["0.500", "1.500", "2.000", "4.000"]
    out = capsys.readouterr().out
    assert "camvid-segnet/old (wall × 6 threads, from config.yaml): best val mIoU 37.50 at 9.0 CPU-min" in out
    assert "camvid-unet/new: best val mIoU 50.00 at 8.0 CPU-min (epoch 4)" in out


def test_runs_without_recorded_threads_assume_a_count_and_say_so(tmp_path):
    root = tmp_path / "runs"
    write_run(root / "membrane-unet" / "gpu", [{"epoch": 1, "elapsed_s": 120.0, "val_miou": 0.75}])
    write_run(root / "membrane-unet" / "no-val", [{"epoch": 1, "elapsed_s": 120.0}])  # never validated: left out
    [curve] = collect(root, default_threads=4)
    assert curve.points[0].cpu_minutes == 8.0 and curve.points[0].source == "assumed threads"
    assert curve.label == "membrane-unet/gpu (wall × 4 threads, assumed: --threads 4)"  # said torch's default
    [curve] = collect(root)
    here = torch.get_num_threads()
    assert curve.points[0].cpu_minutes == 2.0 * here
    assert curve.label == f"membrane-unet/gpu (wall × {here} thread{'s' if here != 1 else ''}, " \
                          "assumed: torch's default here)"
    assert segsvc_main(["curves", str(root / "membrane-unet" / "gpu"), "--threads", "1"]) == 0  # one run dir
    rows = read_csv(root / "membrane-unet" / "gpu" / "curves.csv")
    assert [(r["run"], r["cpu_minutes"]) for r in rows] == [("gpu", "2.000")]
    assert (root / "membrane-unet" / "gpu" / "curves.png").stat().st_size > 1000


def test_each_dataset_gets_its_own_panel_and_every_line_its_own_style(tmp_path):
    root = tmp_path / "runs"
    for i in range(22):  # more runs than tab20 has colours
        write_run(root / "camvid-fpn" / f"r{i:02d}", [{"epoch": 1, "cpu_minutes": 1.0 + i, "cpu_threads": 2,
                                                       "val_miou": 0.5}], dataset="camvid")
    write_run(root / "membrane-unet" / "m", [{"epoch": 1, "cpu_minutes": 3.0, "cpu_threads": 2, "val_miou": 0.8}],
              dataset="/data/specs/membrane.yaml")
    panels = by_dataset(collect(root))
    assert {k: len(v) for k, v in panels.items()} == {"camvid": 22, "membrane": 1}
    styles = line_styles(22)
    assert len(set(styles)) == 22 and styles[0][0] == styles[20][0] and styles[0][1] != styles[20][1]
    png = tmp_path / "curves.png"
    assert segsvc_main(["curves", str(root), "--out", str(png)]) == 0
    rows = read_csv(png.with_suffix(".csv"))
    assert {r["dataset"] for r in rows} == {"camvid", "membrane"} and len(rows) == 23
    import matplotlib.image

    assert matplotlib.image.imread(png).shape[:2] == (550 + 16 * 22, 900)  # one legend row per run under the panels


def test_a_folder_without_validated_runs_is_an_error(tmp_path, capsys):
    assert segsvc_main(["curves", str(tmp_path)]) == 2
    assert "no training run with a validated epoch under" in capsys.readouterr().err
    assert segsvc_main(["curves", str(tmp_path / "missing")]) == 2


@pytest.mark.parametrize("threads", ["-4", "0"])
def test_threads_below_one_are_refused_in_one_line_before_anything_is_written(runs, tmp_path, capsys, threads):
    """--threads -4 once plotted negative CPU-minutes."""
    png = tmp_path / "out" / "curves.png"
    assert segsvc_main(["curves", str(runs), "--out", str(png), "--threads", threads]) == 2
    err = capsys.readouterr().err
    assert err == f"segsvc: error: --threads must be at least 1, got {threads}\n", err
    assert not (tmp_path / "out").exists()


def test_registered_datasets_stored_as_spec_yaml_get_a_panel_per_spec_name(tmp_path):
    # the training service stores every dataset as <store>/<sha256>/spec.yaml: the file's stem names none of them
    root, store = tmp_path / "runs", tmp_path / "datasets"
    for sha, name in (("a1" * 32, "CamVid"), ("b2" * 32, "membrane")):
        (store / sha).mkdir(parents=True)
        (store / sha / "spec.yaml").write_text(yaml.safe_dump({"name": name, "root": "."}))
        write_run(root / f"job-{name}" / "run", [{"epoch": 1, "cpu_minutes": 2.0, "cpu_threads": 2, "val_miou": 0.5}],
                  dataset=str(store / sha / "spec.yaml"))
    write_run(root / "gone" / "run", [{"epoch": 1, "cpu_minutes": 1.0, "cpu_threads": 2, "val_miou": 0.4}],
              dataset=str(store / "deleted" / "other.yaml"))  # unreadable: the stem, as before
    folder = tmp_path / "mydata"  # a folder spec: named by its dataset.yaml, as the same spec given as a file
    folder.mkdir()
    (folder / "dataset.yaml").write_text(yaml.safe_dump({"name": "CamVid", "root": "."}))
    write_run(root / "folder" / "run", [{"epoch": 1, "cpu_minutes": 1.0, "cpu_threads": 2, "val_miou": 0.3}],
              dataset=str(folder))
    panels = by_dataset(collect(root))
    assert {k: len(v) for k, v in panels.items()} == {"CamVid": 2, "membrane": 1, "other": 1}
