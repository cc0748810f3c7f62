"""`segsvc eval`: same numbers as the trainer's validation, table + JSON + report, tiles and flip TTA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from segsvc.cli import main as segsvc_main
from segsvc.models.artifact import read_manifest
from training.config import load_config
from training.train import main as train_main


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, make_recipe) -> Path:
    recipe = make_recipe(tmp_path_factory.mktemp("eval"))
    return train_main(load_config(recipe, ["train.epochs=2", "data.train_limit=12"]))


def run_eval(artifact: Path, spec: Path, out: Path, *extra: str) -> dict:
    args = ["eval", "--model", str(artifact), "--data", str(spec), "--split", "val", "--out", str(out),
            "--no-progress", "--device", "cpu", *extra]
    assert segsvc_main(args) == 0
    return json.loads((out / "metrics.json").read_text())


def test_eval_reproduces_the_trainers_validation_metrics(artifact, tiny_spec, tmp_path, capsys):
    result = run_eval(artifact, tiny_spec, tmp_path / "plain")
    manifest = read_manifest(artifact)
    for key in ("miou", "pixel_accuracy", "mean_class_accuracy", "mean_dice"):
        assert result["metrics"][key] == pytest.approx(manifest.metrics[key], abs=1e-6), key
    assert result["metrics"]["pixels"] == 6 * 48 * 48
    counts = result["confusion_matrix"]["counts"]
    assert sum(map(sum, counts)) == 6 * 48 * 48
    assert sum(counts[i][i] for i in range(3)) / (6 * 48 * 48) == pytest.approx(result["metrics"]["pixel_accuracy"], abs=1e-6)
    assert set(result["metrics"]["per_class_iou"]) == {"background", "circle", "rectangle"}
    assert (tmp_path / "plain" / "report.png").stat().st_size > 1000
    table = capsys.readouterr().out
    assert "mIoU" in table and "rectangle" in table and "mean Dice" in table
    # the wrong pixels split into those near a label boundary and those off it, consistently with the accuracy
    b, pixels = result["boundary_errors"], 6 * 48 * 48
    wrong = (1 - result["metrics"]["pixel_accuracy"]) * pixels
    assert b["band_px"] == 1 and 0 < b["band_pixels"] < 1 and wrong > 0
    assert wrong * (1 - b["errors_in_band"]) == pytest.approx(b["pixel_error_off_band"] * (1 - b["band_pixels"]) * pixels,
                                                             abs=0.01)
    assert "wrong pixels within 1 px of a label boundary: " in table


def test_eval_renames_its_metrics_and_report_into_place(artifact, tiny_spec, tmp_path, renames):
    """An evaluation killed while it writes leaves the previous metrics.json and report.png, never half of one:
    both are written under a temporary name in their folder and renamed into place."""
    out = tmp_path / "atomic"
    run_eval(artifact, tiny_spec, out, "--limit", "2")
    assert sorted(dst.name for _, dst in renames if dst.parent == out) == ["metrics.json", "report.png"]
    assert all(src.parent == out and src.name.startswith(".tmp-") for src, dst in renames if dst.parent == out)
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "report.png"]  # no temporary file is left


def test_eval_with_sliding_windows_and_flip_tta(artifact, tiny_spec, tmp_path):
    result = run_eval(artifact, tiny_spec, tmp_path / "tta", "--tile", "32", "32", "--overlap", "0.5", "--hflip")
    assert result["options"]["tile"] == [32, 32] and result["options"]["hflip"] is True
    assert 0.0 <= result["metrics"]["miou"] <= 1.0
    assert result["metrics"]["pixels"] == 6 * 48 * 48


def test_eval_with_multiscale_tta_records_the_scales_and_refuses_bad_ones(artifact, tiny_spec, tmp_path, capsys):
    plain = run_eval(artifact, tiny_spec, tmp_path / "plain", "--limit", "2", "--samples", "0")
    multi = run_eval(artifact, tiny_spec, tmp_path / "multi", "--limit", "2", "--samples", "0", "--tta-scales", "0.5,1")
    assert multi["options"]["tta_scales"] == [0.5, 1.0] and multi["inference"]["tta_scales"] == [0.5, 1.0]
    assert multi["inference_source"]["tta_scales"] == "flag" and "tta_scales" not in plain["inference"]
    assert "scales 0.5, 1 (flag)]" in capsys.readouterr().out
    assert multi["metrics"]["pixels"] == plain["metrics"]["pixels"] == 2 * 48 * 48
    args = ["eval", "--model", str(artifact), "--data", str(tiny_spec), "--no-progress", "--out", str(tmp_path)]
    with pytest.raises(SystemExit) as refused:  # argparse's, by the flag: a factor must be > 0
        segsvc_main([*args, "--tta-scales", "0,1"])
    assert refused.value.code == 2
    assert "argument --tta-scales: expected distinct factors > 0 such as 0.75,1,1.25, got 0,1" in capsys.readouterr().err
    assert segsvc_main([*args, "--tta-scales", "9,1"]) == 2  # the contract's: the factor times the model's scale
    assert "tta_scales factor 9.0 times scale 1.0 must be in (0, 8.0]" in capsys.readouterr().err


def test_eval_writes_the_learning_curves_of_the_runs_beside_its_report(artifact, tiny_spec, tmp_path, capsys):
    run_dir = Path(read_manifest(artifact).training["run_dir"])
    out = tmp_path / "with-curves"
    run_eval(artifact, tiny_spec, out, "--limit", "1", "--samples", "0", "--curves", str(run_dir.parent))
    assert (out / "curves.png").stat().st_size > 1000
    assert "wrote " + str(out / "curves.png") + " (1 runs)" in capsys.readouterr().out
    assert (out / "curves.csv").read_text().count("\n") == 1 + 2  # header + the run's two validated epochs
    args = ["eval", "--model", str(artifact), "--data", str(tiny_spec), "--no-progress", "--out", str(tmp_path / "x")]
    assert segsvc_main([*args, "--curves", str(tmp_path / "missing")]) == 2
    assert "is not a directory of training runs" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_eval_at_reduced_scale_still_counts_full_size_labels(artifact, tiny_spec, tmp_path):
    result = run_eval(artifact, tiny_spec, tmp_path / "half", "--scale", "0.5", "--limit", "2", "--samples", "1")
    assert result["images"] == 2 and result["metrics"]["pixels"] == 2 * 48 * 48


def test_eval_accepts_a_model_directory_and_rejects_a_wrong_dataset(artifact, tiny_spec, tmp_path, capsys):
    run_eval(artifact.parent, tiny_spec, tmp_path / "latest", "--limit", "1")
    assert segsvc_main(["eval", "--model", str(artifact), "--data", "synthetic", "--no-progress"]) == 2
    assert "predicts 3 classes" in capsys.readouterr().err
    assert segsvc_main(["eval", "--model", str(tmp_path), "--data", "synthetic"]) == 2


def test_eval_scale_defaults_to_the_manifests_and_the_report_says_which_was_used(artifact, tiny_spec, tmp_path, capsys):
    assert read_manifest(artifact).inference.scale == 1.0  # the recipe's data.val_scale
    default = run_eval(artifact, tiny_spec, tmp_path / "default", "--limit", "2", "--samples", "0")
    assert default["options"]["scale"] == 1.0 and default["inference"]["scale"] == 1.0
    assert default["inference_source"] == {"scale": "manifest", "tile_size": "manifest", "tile_overlap": "manifest",
                                           "flip_tta": "manifest", "tta_scales": "manifest"}
    assert ("[scale 1.0 (manifest), no tiling (manifest), flip TTA off (manifest), no multi-scale TTA (manifest)]"
            in capsys.readouterr().out)
    half = run_eval(artifact, tiny_spec, tmp_path / "flag", "--limit", "2", "--samples", "0", "--scale", "0.5",
                    "--no-hflip")
    assert half["options"]["scale"] == 0.5 and half["inference_source"]["scale"] == "flag"
    assert ("[scale 0.5 (flag), no tiling (manifest), flip TTA off (flag), no multi-scale TTA (manifest)]"
            in capsys.readouterr().out)
    assert half["metrics"]["pixels"] == 2 * 48 * 48


def test_eval_refuses_tiles_the_server_cannot_run(artifact, tiny_spec, tmp_path, capsys):
    args = ["eval", "--model", str(artifact), "--data", str(tiny_spec), "--no-progress", "--out", str(tmp_path)]
    assert segsvc_main([*args, "--tile", "32", "48"]) == 2
    assert "tiles are square, as the server's tile_size is: use --tile 32 32" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:  # argparse's, by the flag
        segsvc_main([*args, "--tile", "32", "32", "--overlap", "0.9"])
    assert refused.value.code == 2
    assert "argument --overlap: must be a finite number in [0, 0.75], got 0.9" in capsys.readouterr().err


def test_eval_tunes_the_allocator_before_anything_else(tune_first) -> None:
    import training.evaluate as evaluate_module

    with pytest.raises(tune_first(evaluate_module)):
        segsvc_main(["eval", "--model", "no-such-model", "--data", "camvid"])
