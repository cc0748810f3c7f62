"""The batch output layout: names, atomic writes, results.jsonl, failures.jsonl, summary.json and the chart."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from segsvc.errors import InvalidArgument
from segsvc.inference.codec import colorize
from segsvc.jobs import outputs
from segsvc.jobs.outputs import RECORD_KEYS, JobOutputs, clean_temporaries, output_relpath

PALETTE = [(0, 0, 0), (255, 0, 0), (0, 255, 0)]
NAMES = ["sky", "road", "car"]


def labels_of(seed: int, h: int = 12, w: int = 16, k: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, k, (h, w)).astype(np.uint8)


def all_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def read_png(path: Path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


def test_output_names_keep_folders_and_append_png() -> None:
    assert output_relpath("a/b/img.jpg") == "labels/a/b/img.jpg.png"
    assert output_relpath("x.png") != output_relpath("x.jpg")
    assert output_relpath("x.png", "overlay") == "overlay/x.png.png"


@pytest.mark.parametrize("rel", ["/etc/passwd", "../x.png", "a/../../x.png", "a//b.png", "", "./a.png", "a\\b.png"])
def test_unsafe_names_are_refused(tmp_path: Path, rel: str) -> None:
    with pytest.raises(InvalidArgument):
        output_relpath(rel)
    with pytest.raises(InvalidArgument):
        JobOutputs(tmp_path).write_item(rel, labels_of(0), palette=PALETTE)
    assert not any(tmp_path.iterdir())


def test_write_item_writes_every_kind_and_no_temporaries(tmp_path: Path) -> None:
    out = JobOutputs(tmp_path / "job")
    image = np.full((12, 16, 3), 200, np.uint8)
    conf = np.full((12, 16), 128, np.uint8)
    files = {}
    for rel in ("a/b/x.png", "a/b/x.jpg"):
        files[rel] = out.write_item(rel, labels_of(1), palette=PALETTE, image=image, confidence=conf,
                                    color=True, overlay=True, alpha=0.25)
    assert files["a/b/x.jpg"] == {"labels": "labels/a/b/x.jpg.png", "color": "color/a/b/x.jpg.png",
                                  "overlay": "overlay/a/b/x.jpg.png", "confidence": "confidence/a/b/x.jpg.png"}
    assert len(all_files(tmp_path / "job")) == 8  # x.png and x.jpg do not collide
    labels = read_png(tmp_path / "job/labels/a/b/x.jpg.png")
    assert labels.dtype == np.uint8 and labels.ndim == 2 and (labels == labels_of(1)).all()
    color = cv2.cvtColor(read_png(tmp_path / "job/color/a/b/x.jpg.png"), cv2.COLOR_BGR2RGB)
    assert (color == colorize(labels_of(1), PALETTE)).all()
    blended = cv2.cvtColor(read_png(tmp_path / "job/overlay/a/b/x.jpg.png"), cv2.COLOR_BGR2RGB)
    red = labels_of(1) == 1
    assert np.abs(blended[red].astype(int) - [214, 150, 150]).max() <= 1  # 0.75 * 200 + 0.25 * (255, 0, 0)
    assert (read_png(tmp_path / "job/confidence/a/b/x.jpg.png") == 128).all()
    assert not [n for n in all_files(tmp_path) if ".tmp-" in n]


def test_labels_above_256_classes_are_16_bit(tmp_path: Path) -> None:
    labels = np.array([[0, 299], [256, 1]], np.uint16)
    JobOutputs(tmp_path).write_item("w.png", labels, palette=[(i % 256, 0, 0) for i in range(300)], color=True)
    back = read_png(tmp_path / "labels/w.png.png")
    assert back.dtype == np.uint16 and (back == labels).all()


def test_a_failed_write_leaves_no_temporary_and_keeps_the_old_file(tmp_path: Path, monkeypatch) -> None:
    out = JobOutputs(tmp_path)
    out.write_item("a.png", labels_of(1), palette=PALETTE)
    before = (tmp_path / "labels/a.png.png").read_bytes()

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(outputs.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        out.write_item("a.png", labels_of(2), palette=PALETTE)
    assert all_files(tmp_path) == ["labels/a.png.png"]
    assert (tmp_path / "labels/a.png.png").read_bytes() == before


def test_clean_temporaries_removes_only_leftovers(tmp_path: Path) -> None:
    (tmp_path / "labels/a").mkdir(parents=True)
    keep = ["labels/a/x.png.png", ".segsvc-batch.sqlite", ".segsvc-batch.sqlite-wal", "labels/a/.hidden.png"]
    stray = ["labels/a/.x.png.png.tmp-0123456789ab", ".summary.json.tmp-abcdefabcdef"]
    for name in keep + stray:
        (tmp_path / name).write_bytes(b"x")
    assert clean_temporaries(tmp_path) == 2
    assert all_files(tmp_path) == sorted(keep)
    assert clean_temporaries(tmp_path) == 0


def test_item_record() -> None:
    labels = np.zeros((4, 5), np.uint8)
    labels[0, :3] = 2
    conf = np.full((4, 5), 51, np.uint8)
    record = JobOutputs.item_record("d/i.jpg", labels, class_names=NAMES, model="m", version=3, ms=1.23456,
                                    confidence=conf)
    assert record == {"input": "d/i.jpg", "output": "labels/d/i.jpg.png", "height": 4, "width": 5,
                      "class_counts": {"sky": 17, "car": 3}, "mean_confidence": 0.2, "model": "m", "version": 3,
                      "ms": 1.235}
    assert JobOutputs.item_record("i.png", labels, class_names=NAMES, model="m", version=1, ms=0)["mean_confidence"] is None


def test_finalize_writes_sorted_results_summary_and_chart(tmp_path: Path) -> None:
    out = JobOutputs(tmp_path)
    a = np.zeros((2, 5), np.uint8)  # 10 sky
    b = np.ones((3, 10), np.uint8)  # 30 road
    rec_b = out.item_record("z/b.png", b, class_names=NAMES, model="m", version=2, ms=5)
    rec_a = out.item_record("a.png", a, class_names=NAMES, model="m", version=2, ms=5)
    rec_b_shuffled = dict(sorted(rec_b.items()))  # as a store gives it back
    summary = out.finalize([rec_b_shuffled, rec_a], [{"input": "bad.jpg", "reason": "corrupt"}], class_names=NAMES,
                           palette=PALETTE, summary_fields={"job_id": "j1", "model": "m", "version": 2,
                                                            "total": 4, "skipped": 1, "elapsed_s": 2.0, "note": "x"})
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [rec_a, rec_b]
    assert list(json.loads(lines[1])) == list(RECORD_KEYS)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == summary
    assert summary["job_id"] == "j1" and summary["model"] == "m" and summary["version"] == 2
    assert summary["counts"] == {"total": 4, "done": 2, "failed": 1, "skipped": 1}
    assert summary["class_pixels"] == {"sky": 10, "road": 30, "car": 0}
    assert summary["class_shares"] == {"sky": 0.25, "road": 0.75, "car": 0.0}
    assert summary["failures"] == [{"input": "bad.jpg", "reason": "corrupt"}]
    assert summary["failures_truncated"] is False and summary["failures_file"] == "failures.jsonl"
    assert (tmp_path / "failures.jsonl").read_text() == '{"input": "bad.jpg", "reason": "corrupt"}\n'
    assert summary["elapsed_s"] == 2.0 and summary["images_per_s"] == 1.0 and summary["note"] == "x"
    assert summary["created"].startswith("20")
    chart = (tmp_path / "class_shares.png").read_bytes()
    assert chart.startswith(b"\x89PNG\r\n\x1a\n")
    picture = cv2.imdecode(np.frombuffer(chart, np.uint8), cv2.IMREAD_COLOR)
    assert picture is not None and picture.shape[0] > 50 and picture.shape[1] > 200
    road_red = (picture[:, :, 2] > 200) & (picture[:, :, 1] < 40) & (picture[:, :, 0] < 40)
    assert road_red.sum() > 500  # the road bar is drawn in its palette colour
    assert all_files(tmp_path) == ["class_shares.png", "failures.jsonl", "results.jsonl", "summary.json"]


def test_importing_outputs_does_not_load_matplotlib() -> None:
    code = "import sys, segsvc.jobs.outputs; assert 'matplotlib' not in sys.modules, 'matplotlib imported'"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": os.getcwd()})

