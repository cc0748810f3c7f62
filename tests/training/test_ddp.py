"""DistributedDataParallel smoke run: two gloo processes on the CPU under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from segsvc.cli import main as segsvc_main
from segsvc.models.artifact import read_manifest
from training.events import EVENTS_FILE, read_events

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)  # about 15 s on two CPU cores: not marked slow
def test_torchrun_two_cpu_processes_train_and_only_rank0_writes(tiny_recipe, tiny_spec):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_ALBUMENTATIONS_UPDATE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    probe = Path(__file__).with_name("ddp_validation_probe.py")  # python -m training, checking validation's model
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(probe), "--config", str(tiny_recipe), "--set", "train.epochs=2",
           "--set", "data.train_limit=16", "--set", "output.run_name=ddp", "--set", "train.deterministic=false"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]  # the probe: every rank validated rank 0's model

    root = tiny_recipe.parent
    assert [p.name for p in (root / "runs" / "tiny").iterdir()] == ["ddp"]
    assert [p.name for p in (root / "repo" / "tiny").iterdir()] == ["1"]  # one artifact, written by rank 0
    rows = [json.loads(x) for x in (root / "runs" / "tiny" / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    manifest = read_manifest(root / "repo" / "tiny" / "1")
    # each rank validated 3 of the 6 images: the reduced confusion matrix counts all of them
    assert manifest.metrics["pixels"] == 6 * 48 * 48
    assert proc.stderr.count("epoch 2/2:") == 1  # only rank 0 logs
    events, _ = read_events(root / "runs" / "tiny" / "ddp" / EVENTS_FILE)  # rank 0 only: one start, one end
    kinds = [e["event"] for e in events]
    assert kinds.count("start") == 1 and kinds.count("epoch") == 2 and kinds[-1] == "end"
    assert events[0]["world_size"] == 2 and events[-1]["status"] == "completed"
    # every rank scored rank 0's model (batch-norm statistics included): what was published measures the same
    out = root / "eval"
    assert segsvc_main(["eval", "--model", str(root / "repo" / "tiny" / "1"), "--data", str(tiny_spec),
                        "--out", str(out), "--no-progress", "--device", "cpu", "--samples", "0"]) == 0
    result = json.loads((out / "metrics.json").read_text())
    for key in ("miou", "pixel_accuracy", "mean_dice"):
        assert result["metrics"][key] == pytest.approx(manifest.metrics[key], abs=1e-6), key
