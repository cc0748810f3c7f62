"""Served quality is what ``segsvc eval`` measured (issue #12): the inference contract lives in the artifact.

A model trained and validated at ``data.val_scale: 0.5`` is published with that
scale in its manifest; the label maps a real server returns over gRPC give
exactly the confusion matrix ``segsvc eval`` computes for the same images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from segsvc.data.datasets import build_dataset
from segsvc.data.spec import load_dataset_spec
from segsvc.inference.predictor import Predictor
from segsvc.models.artifact import load_artifact, read_manifest
from training.config import load_config
from training.evaluate import EvalOptions, evaluate_artifact
from training.metrics import ConfusionMatrix
from training.train import main as train_main

# odd sizes: 45 x 53 at 0.5 is 22 x 26 (rounding), padded to 24 x 28 for the U-Net's stride 4
SPEC = """\
name: halfscale
format: synthetic
channels: 3
classes: [background, circle, rectangle]
ignore_index: 255
splits:
  train: {count: 32, seed: 0}
  val: {count: 6, seed: 1}
options: {size: [45, 53], max_shapes: 2}
"""

RECIPE = """\
name: halfscale
model:
  arch: unet
  params: {{depth: 2, base_channels: 4}}
data:
  spec: {spec}
  preset: synthetic
  crop: [32, 32]
  val_scale: 0.5
loss:
  terms: [{{name: ce}}, {{name: dice, weight: 0.5}}]
optim: {{name: adamw, lr: 0.01}}
train:
  epochs: 12
  batch_size: 4
  val_batch_size: 1
  threads: 1
  seed: 0
  progress: false
output:
  runs_dir: {root}/runs
  repo: {root}/repo
  model_name: halfscale
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny U-Net trained for a few seconds with ``val_scale: 0.5``: (artifact, dataset spec)."""
    root = tmp_path_factory.mktemp("halfscale")
    spec = root / "halfscale.yaml"
    spec.write_text(SPEC)
    recipe = root / "recipe.yaml"
    recipe.write_text(RECIPE.format(spec=spec, root=root))
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        artifact = train_main(load_config(recipe, []))
    finally:  # the trainer sets process-wide torch state; later tests in this process must not inherit it
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    return artifact, spec


def eval_confusion(artifact: Path, spec: Path, **options) -> tuple[np.ndarray, float]:
    model, manifest = load_artifact(artifact)
    result = evaluate_artifact(Predictor(model, manifest), load_dataset_spec(spec),
                               EvalOptions(split="val", progress=False, samples_in_report=0, **options))
    return np.array(result.confusion, dtype=np.int64), result.metrics.miou


def test_published_artifact_records_the_validation_scale(trained):
    artifact, _ = trained
    manifest = read_manifest(artifact)
    assert manifest.inference.scale == 0.5 and manifest.metrics["val_scale"] == 0.5
    assert (manifest.inference.stride, manifest.inference.min_input_size) == (4, 1)
    assert manifest.inference.tile_size == 0 and manifest.inference.flip_tta is False


def test_served_label_maps_give_exactly_the_confusion_matrix_of_segsvc_eval(trained, start_server):
    artifact, spec = trained
    server = start_server(artifact.parent.parent)  # sets the process's torch threads: evaluate after it
    data = load_dataset_spec(spec)
    val = build_dataset(data, "val")
    served = ConfusionMatrix(data.num_classes, data.ignore_index)
    with server.client(timeout_s=60) as client:
        for i in range(len(val)):
            image, mask = val.read(i)
            result = client.segment(image, model="halfscale")  # one at a time: a batch of one, as eval runs
            assert result.mask.shape == image.shape[:2] == (45, 53)
            served.update(torch.from_numpy(np.asarray(mask, dtype=np.int64)),
                          torch.from_numpy(result.mask.astype(np.int64)))
    served_cm = served.mat.numpy().astype(np.int64)
    assert (served_cm.sum(0) > 0).sum() >= 2  # the model predicts more than one class: a real comparison

    eval_cm, eval_miou = eval_confusion(artifact, spec)  # --scale not given: the manifest's 0.5
    assert served_cm.sum() == eval_cm.sum() == len(val) * 45 * 53
    assert np.array_equal(served_cm, eval_cm)
    assert eval_miou == pytest.approx(read_manifest(artifact).metrics["miou"], abs=1e-6)  # = the trainer's val

    full_cm, _ = eval_confusion(artifact, spec, scale=1.0)  # an explicit --scale overrides the manifest
    assert not np.array_equal(full_cm, served_cm)  # so the equality above is not true of any scale
