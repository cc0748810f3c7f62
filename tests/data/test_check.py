"""`segsvc data check`: each fault on a generated broken dataset, a clean pass, real data, the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from segsvc.cli import main
from segsvc.data.check import CheckReport, Fault, check_dataset
from segsvc.data.io import write_png
from segsvc.data.spec import DatasetSpec, load_dataset_spec
from tests.data.helpers import make_folder_dataset


def run_check(path: Path | str, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str]:
    """``segsvc data check PATH`` as a user runs it: exit code and printed report."""
    code = main(["data", "check", str(path), "--no-progress", *extra])
    return code, capsys.readouterr().out


def faults(report: CheckReport) -> dict[Fault, list[str]]:
    return {f: [p.path.name for p in ps] for f, ps in report.by_fault().items()}


def test_clean_folder_passes(folder_dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_png(folder_dataset / "masks" / "a.png", np.full((24, 32), 255, np.uint8))  # ignore is allowed
    code, out = run_check(folder_dataset, capsys)
    assert code == 0 and "OK: no problems found" in out
    assert "samples per split: all 3" in out and "files checked: 6" in out


def test_image_without_mask(folder_dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (folder_dataset / "masks" / "b.png").unlink()
    assert faults(check_dataset(folder_dataset)) == {Fault.IMAGE_WITHOUT_MASK: ["b.png"]}
    code, out = run_check(folder_dataset, capsys)
    assert code == 1 and "image without mask (1)" in out and "images/b.png" in out


def test_mask_without_image(folder_dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (folder_dataset / "images" / "c.png").unlink()
    assert faults(check_dataset(folder_dataset)) == {Fault.MASK_WITHOUT_IMAGE: ["c.png"]}
    code, out = run_check(folder_dataset, capsys)
    assert code == 1 and "mask without image (1)" in out and "masks/c.png" in out


def test_size_mismatch(folder_dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_png(folder_dataset / "masks" / "a.png", np.zeros((24, 30), np.uint8))
    report = check_dataset(folder_dataset)
    assert faults(report) == {Fault.SIZE_MISMATCH: ["a.png"]}
    assert "mask is 30x24 but image a.png is 32x24" in report.problems[0].detail
    code, out = run_check(folder_dataset, capsys)
    assert code == 1 and "image/mask size mismatch (1)" in out


def test_labels_outside_the_classes(folder_dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    labels = np.zeros((24, 32), np.uint8)
    labels[0, :5], labels[1, 0] = 7, 3
    write_png(folder_dataset / "masks" / "b.png", labels)
    report = check_dataset(folder_dataset)
    assert faults(report) == {Fault.BAD_LABELS: ["b.png"]}
    assert "values 3, 7 outside the classes" in report.problems[0].detail
    assert "in 6 pixel(s)" in report.problems[0].detail
    code, out = run_check(folder_dataset, capsys)
    assert code == 1 and "labels outside the classes (1)" in out


def test_labels_are_checked_after_remapping(folder_dataset: Path) -> None:
    write_png(folder_dataset / "masks" / "b.png", np.full((24, 32), 7, np.uint8))
    yaml_path = folder_dataset / "dataset.yaml"
    yaml_path.write_text(yaml_path.read_text() + "label_map: {7: 1}\n")
    report = check_dataset(folder_dataset)
    assert report.ok and report.raw_label_pixels[7] == 24 * 32
    assert "7->1" in report.format()


def test_truncated_image(folder_dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = folder_dataset / "images" / "a.png"
    path.write_bytes(path.read_bytes()[:200])
    report = check_dataset(folder_dataset)
    assert faults(report) == {Fault.UNREADABLE: ["a.png"]}
    assert report.problems[0].detail.startswith("truncated PNG")
    code, out = run_check(folder_dataset, capsys)  # the server's header check finds it first
    assert code == 1 and "unreadable file (1)" in out and "a.png: PNG chunk IDAT declares" in out


def test_undecodable_mask(folder_dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (folder_dataset / "masks" / "c.png").write_bytes(b"this is not a png")
    report = check_dataset(folder_dataset)
    assert faults(report) == {Fault.UNREADABLE: ["c.png"]}
    assert "not a decodable image" in report.problems[0].detail
    code, _ = run_check(folder_dataset, capsys)
    assert code == 1


def test_all_problems_in_one_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_folder_dataset(tmp_path / "broken", stems=("a", "b", "c", "d", "e", "f"))
    (root / "masks" / "a.png").unlink()
    (root / "images" / "b.png").unlink()
    write_png(root / "masks" / "c.png", np.zeros((5, 5), np.uint8))
    write_png(root / "masks" / "d.png", np.full((24, 32), 9, np.uint8))
    (root / "images" / "e.png").write_bytes((root / "images" / "e.png").read_bytes()[:100])
    report = check_dataset(root)
    assert faults(report) == {
        Fault.IMAGE_WITHOUT_MASK: ["a.png"],
        Fault.MASK_WITHOUT_IMAGE: ["b.png"],
        Fault.SIZE_MISMATCH: ["c.png"],
        Fault.BAD_LABELS: ["d.png"],
        Fault.UNREADABLE: ["e.png"],
    }
    code, out = run_check(root, capsys)
    assert code == 1 and "FAILED: 5 problem(s)" in out


def test_listed_sample_missing_and_missing_list(folder_dataset: Path) -> None:
    (folder_dataset / "val.txt").write_text("a\nghost\n")
    yaml_path = folder_dataset / "dataset.yaml"
    yaml_path.write_text(yaml_path.read_text() + "  val: {list: val.txt}\n  test: {list: test.txt}\n")
    report = check_dataset(folder_dataset)
    by = report.by_fault()
    assert [p.detail for p in by[Fault.MISSING_SAMPLE]] == ["sample 'ghost' is listed but its image is missing"]
    assert [p.path.name for p in by[Fault.LAYOUT]] == ["test.txt"]


def test_two_images_for_one_stem(folder_dataset: Path) -> None:
    (folder_dataset / "images" / "a.jpg").write_bytes((folder_dataset / "images" / "a.png").read_bytes())
    report = check_dataset(folder_dataset)
    assert faults(report) == {Fault.LAYOUT: ["a.jpg"]}
    assert "also has a.png" in report.problems[0].detail


def test_camvid_style_list_with_a_stray_mask(tmp_path: Path) -> None:
    root = tmp_path / "cv"
    rng = np.random.default_rng(0)
    for stem in ("x1", "x2"):
        write_png(root / "train" / f"{stem}.png", rng.integers(0, 255, (6, 8, 3), dtype=np.uint8))
        write_png(root / "trainannot" / f"{stem}.png", np.full((6, 8), 11, np.uint8))
    write_png(root / "trainannot" / "stray.png", np.zeros((6, 8), np.uint8))
    (root / "train.txt").write_text("/SegNet/CamVid/train/x1.png /SegNet/CamVid/trainannot/x1.png\n"
                                    "/SegNet/CamVid/train/x2.png /SegNet/CamVid/trainannot/x2.png\n")  # fmt: skip
    (root / "d.yaml").write_text(
        "format: camvid\nroot: .\nclasses: [a, b]\nlabel_map: {11: 255}\nsplits: {train: {}}\n"
    )
    report = check_dataset(root / "d.yaml")
    assert report.split_sizes == {"train": 2}
    assert faults(report) == {Fault.MASK_WITHOUT_IMAGE: ["stray.png"]}


def test_bare_folder_reports_labels_unchecked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_folder_dataset(tmp_path / "bare")
    (root / "dataset.yaml").unlink()
    code, out = run_check(root, capsys)
    assert code == 0 and "label values were not checked" in out
    write_png(root / "masks" / "a.png", np.full((24, 32), 2, np.uint8))
    code, out = run_check(root, capsys, "--num-classes", "2")
    assert code == 1 and "values 2 outside the classes" in out


def test_not_a_dataset_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["data", "check", str(tmp_path), "--no-progress"])
    assert code == 2 and "images/ and masks/" in capsys.readouterr().err


def test_voc_fixture_passes_despite_detection_only_images(voc_dataset: DatasetSpec) -> None:
    report = check_dataset(voc_dataset)
    assert report.ok, report.format()
    assert report.split_sizes == {"train": 2, "val": 1, "trainval": 3}
    assert set(report.raw_label_pixels) == {0, 15, 255}


def test_synthetic_builtin_passes() -> None:
    spec = load_dataset_spec("synthetic")
    small = DatasetSpec(**{**spec.__dict__, "options": {"size": [32, 32]},
                           "splits": {"val": spec.splits["val"]}})  # fmt: skip
    report = check_dataset(small)
    assert report.ok and report.split_sizes == {"val": spec.splits["val"].count}


@pytest.mark.dataset
def test_membrane_is_clean_and_labels_are_0_and_255(membrane: DatasetSpec) -> None:
    report = check_dataset(membrane)
    assert report.ok, report.format()
    assert set(report.raw_label_pixels) == {0, 255}
    assert report.split_sizes == {"train": 20, "val": 5, "test": 30}


@pytest.mark.dataset
@pytest.mark.slow
def test_camvid_builtin_is_clean_by_name(camvid: DatasetSpec, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run_check("camvid", capsys)
    assert code == 0, out
    assert "samples per split: train 367, val 101" in out and "| 11->255 " in out


# -- the server's container and pixel checks, run locally (``datasets.ingest.server_check``) ---------------
def _pages(frames: list[np.ndarray], fmt: str) -> bytes:
    """A multi-page TIFF or an animated PNG (APNG) of ``frames``."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    first, *rest = [Image.fromarray(f) for f in frames]
    first.save(buf, format=fmt, save_all=True, append_images=rest)
    return buf.getvalue()


def _refused_by_the_server(root: Path) -> Path:
    """A folder dataset OpenCV decodes happily (first frames) that the server refuses from the headers."""
    folder = make_folder_dataset(root)
    image = np.zeros((24, 32, 3), np.uint8)
    (folder / "images" / "a.png").write_bytes(_pages([image, image], "TIFF"))  # a 2-page TIFF, whatever its name
    mask = np.zeros((24, 32), np.uint8)
    (folder / "masks" / "b.png").write_bytes(_pages([mask, mask], "PNG"))  # APNG, 2 frames
    write_png(folder / "images" / "c.png", np.zeros((40, 40, 3), np.uint8))  # 1600 pixels
    write_png(folder / "masks" / "c.png", np.zeros((40, 40), np.uint8))
    (folder / "dataset.yaml").write_text("format: folder\nroot: .\nclasses: [a, b, c]\n")
    return folder


def test_the_local_check_runs_the_servers_container_and_pixel_checks(tmp_path: Path) -> None:
    from segsvc.datasets.ingest import server_check
    from segsvc.datasets.registry import DatasetRegistry, DatasetsConfig
    from segsvc.datasets.archive import ExtractLimits
    from segsvc.errors import DatasetInvalid
    from tests.datasets.helpers import tar_of

    folder = _refused_by_the_server(tmp_path / "tiny")
    spec = load_dataset_spec(folder)
    assert check_dataset(spec).ok  # OpenCV reads the first frame of each: the decoding check alone passes
    report = server_check(spec, max_pixels=1000)
    details = {p.path.relative_to(folder).as_posix(): p.detail for p in report.problems}
    assert sorted(details) == ["images/a.png", "images/c.png", "masks/b.png", "masks/c.png"]
    assert "more than one page" in details["images/a.png"] and "animated" in details["masks/b.png"]
    assert details["images/c.png"].startswith("40x40 = 1600 pixels, over the server's limit of 1000")
    assert "FAILED: 4 problem(s)" in report.format()
    # One function: the server refuses exactly what the local check found.
    registry = DatasetRegistry(DatasetsConfig(tmp_path / "state", limits=ExtractLimits(max_pixels=1000)))
    upload = registry.open_upload("tiny", "tar")
    upload.write(tar_of(folder))
    with pytest.raises(DatasetInvalid) as info:
        upload.commit()
    assert {(path, detail) for _, path, detail in info.value.problems} == set(details.items())


def test_segsvc_data_check_refuses_what_the_server_refuses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run_check(_refused_by_the_server(tmp_path / "tiny"), capsys)
    assert code == 1 and "more than one page" in out and "animated" in out
