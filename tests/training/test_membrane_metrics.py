"""The ISBI 2012 figures (wrong pixels, the challenge's pixel error, membrane IoU), the membrane recipe's loss and tiles."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from segsvc.cli import main as segsvc_main
from segsvc.config import InputSpec, ModelSpec
from segsvc.data.spec import load_dataset_spec
from segsvc.models.artifact import read_manifest, save_artifact
from segsvc.models.registry import build_model
from training.config import ConfigError, load_config
from training.metrics import ConfusionMatrix, format_table, isbi_metrics, isbi_pixel_error, membrane_class
from training.train import main as train_main

RECIPE = Path(__file__).resolve().parents[2] / "training" / "recipes" / "membrane-unet.yaml"

# 2 x 5 labels, 255 = void: 8 labelled pixels, 2 of them wrong
TARGET = torch.tensor([[0, 0, 0, 1, 255], [1, 1, 1, 0, 255]])
PRED = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])


def test_pixel_error_counts_only_labelled_pixels_and_membrane_iou_is_its_class_iou():
    cm = ConfusionMatrix(2, ignore_index=255)
    cm.update(TARGET, PRED)
    m = cm.compute()
    assert m.pixel_error == pytest.approx(2 / 8)
    # membrane (0): 2 right, 2 target pixels missed, none wrongly predicted -> IoU 2 / 4
    assert isbi_metrics(m, ["membrane", "cell"]) == {"pixel_error": 0.25, "isbi_pixel_error": 0.2,
                                                     "membrane_class": "membrane", "membrane_iou": 0.5}
    assert isbi_metrics(m, ["cell", "Membranes"])["membrane_iou"] == pytest.approx(4 / 6, abs=1e-6)
    assert isbi_metrics(m, ["background", "cell"]) == {"pixel_error": 0.25}  # no membrane class: no IoU


def test_a_class_named_like_membrane_is_found_once_or_not_at_all():
    assert membrane_class(["membrane", "cell"]) == 0
    assert membrane_class(["cell", "Cell_Membrane"]) == 1
    assert membrane_class(["sky", "road"]) is None
    assert membrane_class(["inner membrane", "outer membrane"]) is None  # ambiguous: report none
    empty = ConfusionMatrix(2).compute()
    assert isbi_metrics(empty, ["membrane", "cell"]) == {"pixel_error": None, "isbi_pixel_error": None,
                                                         "membrane_class": "membrane", "membrane_iou": None}


def test_the_challenge_pixel_error_is_one_minus_the_f_score_of_the_non_membrane_pixels():
    # The ISBI 2012 script counts a pixel as positive where the label is non-zero (cell interior) and scores
    # 1 - F = 1 - 2TP / (2TP + FP + FN); here TP 4, FP 2 (membrane taken for cell), FN 0.
    cm = ConfusionMatrix(2, ignore_index=255)
    cm.update(TARGET, PRED)
    m = cm.compute()
    cell = (TARGET != 255)
    tp = int(((TARGET == 1) & (PRED == 1) & cell).sum())
    fp = int(((TARGET == 0) & (PRED == 1) & cell).sum())
    fn = int(((TARGET == 1) & (PRED == 0) & cell).sum())
    assert (tp, fp, fn) == (4, 2, 0)
    assert isbi_pixel_error(m, ["membrane", "cell"]) == pytest.approx(1 - 2 * tp / (2 * tp + fp + fn))
    # the membrane class may come second: the positive class is still the other one
    flipped = ConfusionMatrix(2, ignore_index=255)
    flipped.update(torch.where(TARGET == 255, TARGET, 1 - TARGET), 1 - PRED)
    assert isbi_pixel_error(flipped.compute(), ["cell", "membrane"]) == pytest.approx(0.2)
    assert isbi_pixel_error(m, ["background", "cell"]) is None  # no membrane class
    three = ConfusionMatrix(3).compute()
    assert isbi_pixel_error(three, ["membrane", "cell", "mitochondria"]) is None  # the challenge is binary
    assert "isbi_pixel_error" not in isbi_metrics(three, ["membrane", "cell", "mitochondria"])


def test_the_table_adds_pixel_error_and_membrane_iou_when_asked():
    cm = ConfusionMatrix(2, ignore_index=255)
    cm.update(TARGET, PRED)
    lines = format_table(cm.compute(), ["membrane", "cell"], isbi=True).split("\n")
    assert lines[-4:] == ["pixel error (wrong pixels)    25.00",
                          "ISBI pixel error (1 - F)      20.00",
                          "membrane IoU (membrane)       50.00",
                          "pixels counted               8"]
    assert "pixel error" not in format_table(cm.compute(), ["membrane", "cell"])  # the default table is as it was
    other = format_table(cm.compute(), ["a", "b"], isbi=True)
    assert "pixel error" in other and "membrane IoU" not in other and "ISBI" not in other


@pytest.fixture(scope="module")
def membrane_like(tmp_path_factory) -> tuple[Path, Path]:
    """A 4-image grey data set with classes [membrane, cell] (a few void pixels) and a tiny U-Net artifact."""
    root = tmp_path_factory.mktemp("membrane-like")
    rng = np.random.default_rng(0)
    for folder in ("images", "masks"):
        (root / "data" / folder).mkdir(parents=True)
    for i in range(4):
        mask = np.ones((40, 48), np.uint8)
        mask[:, 10 + i : 13 + i] = 0  # a vertical membrane
        mask[25:28, :] = 0  # a horizontal one
        mask[:2, :4] = 255  # void
        image = np.where(mask == 0, 40, 200).astype(np.int16) + rng.integers(-20, 20, mask.shape)
        cv2.imwrite(str(root / "data" / "images" / f"{i}.png"), np.clip(image, 0, 255).astype(np.uint8))
        cv2.imwrite(str(root / "data" / "masks" / f"{i}.png"), mask)
    spec = root / "membrane-like.yaml"
    spec.write_text(f"name: membrane-like\nformat: folder\nroot: {root / 'data'}\nchannels: 1\n"
                    "classes: [membrane, cell]\npalette: [[0, 0, 0], [255, 255, 255]]\nignore_index: 255\n"
                    "splits:\n  val: {images: images, masks: masks}\n")
    model_spec = ModelSpec("unet", num_classes=2, in_channels=1, params={"base_channels": 4, "depth": 2})
    torch.manual_seed(0)
    artifact = save_artifact(build_model(model_spec).eval(), root / "repo", "membrane-like", spec=model_spec,
                             input_spec=InputSpec.default_for(1), class_names=["membrane", "cell"],
                             palette=[(0, 0, 0), (255, 255, 255)], ignore_index=255)
    return artifact, spec


def test_eval_reports_pixel_error_and_membrane_iou_in_the_table_and_metrics_json(membrane_like, tmp_path, capsys):
    artifact, spec = membrane_like
    out = tmp_path / "eval"
    assert segsvc_main(["eval", "--model", str(artifact), "--data", str(spec), "--split", "val", "--out", str(out),
                        "--no-progress", "--device", "cpu", "--samples", "0"]) == 0
    result = json.loads((out / "metrics.json").read_text())
    metrics, counts = result["metrics"], np.array(result["confusion_matrix"]["counts"])
    assert counts.sum() == metrics["pixels"] == 4 * (40 * 48 - 8)  # void pixels are not counted
    assert metrics["pixel_error"] == pytest.approx(1 - np.trace(counts) / counts.sum(), abs=1e-6)
    assert metrics["membrane_class"] == "membrane"
    assert metrics["membrane_iou"] == metrics["per_class_iou"]["membrane"]
    table = capsys.readouterr().out
    lines = {line[:28].strip(): line[28:].strip() for line in table.splitlines()}
    assert float(lines["pixel error (wrong pixels)"]) == pytest.approx(100 * metrics["pixel_error"], abs=0.006)
    cell = counts[1, 1] / (counts[1, 1] + (counts[0, 1] + counts[1, 0]) / 2)  # F-score of the cell pixels
    assert metrics["isbi_pixel_error"] == pytest.approx(1 - cell, abs=1e-6)
    assert float(lines["ISBI pixel error (1 - F)"]) == pytest.approx(100 * metrics["isbi_pixel_error"], abs=0.006)
    assert float(lines["membrane IoU (membrane)"]) == pytest.approx(100 * metrics["membrane_iou"], abs=0.006)


# -- the recipe ------------------------------------------------------------------------------


@pytest.mark.parametrize("profile", [None, "gpu"])
def test_the_membrane_recipe_has_the_border_weight_loss_and_the_overlap_tile_contract_with_flip(profile):
    from segsvc.models.registry import build_model as build
    from training.rundir import val_contract

    cfg = load_config(RECIPE, profile=profile)
    data = load_dataset_spec(cfg.data.spec)
    assert [t.name for t in cfg.loss.terms] == ["weighted_ce", "dice"]
    assert cfg.loss.border_weight is not None and data.class_names[cfg.loss.border_weight.cell_class] == "cell"
    model = build(ModelSpec(cfg.model.arch, data.num_classes, data.channels, dict(cfg.model.params)))
    contract = val_contract(cfg, model)
    assert (contract.tile_padding, contract.tile_size, contract.tile_overlap) == ("reflect", 256, 0.25)
    assert contract.flip_tta  # each tile also mirrored: 0.0717 against 0.0740 pixel error (training/RESULTS.md)
    assert cfg.data.register == "membrane" and data.class_names.index(cfg.data.register) == 0  # the 0.6 px offset
    assert contract.tile_size % contract.stride == 0 and all(c % model.output_stride == 0 for c in cfg.data.crop)
    if profile == "gpu":
        assert cfg.train.amp == "bf16" and cfg.model.params["base_channels"] == 64


def test_a_bad_validation_tiling_fails_when_the_run_starts(tiny_recipe):
    from training.rundir import val_contract

    cfg = load_config(tiny_recipe, ["data.val_tile_size=8"])
    with pytest.raises(ConfigError, match="data.val_scale/val_tile_.*tile_size must be 0"):
        val_contract(cfg, build_model(ModelSpec("unet", 3, 3, {"depth": 2, "base_channels": 4})))
    with pytest.raises(ConfigError, match="val_tile_padding"):
        load_config(tiny_recipe, ["data.val_tile_padding=mirror"])


@pytest.mark.parametrize("flip, scales", [(False, ()), (True, (0.75, 1.0))])
def test_validation_with_reflect_tiles_is_published_and_eval_reproduces_it(tmp_path, make_recipe, tiny_spec, capsys,
                                                                           flip, scales):
    """A 1-epoch run validated with overlap tiles (and flip and multi-scale TTA): the manifest records them,
    `segsvc eval` measures the same."""
    recipe = make_recipe(tmp_path)
    artifact = train_main(load_config(recipe, ["data.train_limit=8", "data.val_tile_size=32",
                                               "data.val_tile_overlap=0.25", "data.val_tile_padding=reflect",
                                               f"data.val_flip={str(flip).lower()}",
                                               f"data.val_tta_scales={list(scales)}"]))
    manifest = read_manifest(artifact)
    assert (manifest.inference.tile_size, manifest.inference.tile_padding) == (32, "reflect")
    assert manifest.inference.flip_tta is flip and manifest.inference.tta_scales == scales
    out = tmp_path / "eval"
    assert segsvc_main(["eval", "--model", str(artifact), "--data", str(tiny_spec), "--out", str(out),
                        "--no-progress", "--device", "cpu", "--samples", "0"]) == 0
    result = json.loads((out / "metrics.json").read_text())
    assert result["options"]["tile_padding"] == "reflect" and result["options"]["hflip"] is flip
    assert (f"tiles 32 overlap 0.25 (manifest), mirrored borders (manifest), flip TTA {'on' if flip else 'off'} "
            "(manifest)") in capsys.readouterr().out
    for key in ("miou", "pixel_accuracy", "mean_dice"):
        assert result["metrics"][key] == pytest.approx(manifest.metrics[key], abs=1e-6), key
    run_dir = Path(manifest.training["run_dir"])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # recipe threads: 1, so CPU-minutes are wall minutes (a 1-epoch run can take under 0.03 s: no "> 0")
    assert rows[-1]["cpu_threads"] == 1 and rows[-1]["cpu_minutes"] == pytest.approx(rows[-1]["elapsed_s"] / 60,
                                                                                      abs=1e-3)
