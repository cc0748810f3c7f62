"""``python -m training`` as the job runner drives it: budget and output overrides, kill -9, ``--resume``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from segsvc.models.artifact import read_manifest
from tests.holds import Hold
from training.events import EVENTS_FILE, read_events
from training.rundir import CHECKPOINT

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "NO_ALBUMENTATIONS_UPDATE": "1",
       "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def job_args(recipe: Path, root: Path, *extra: str) -> list[str]:
    """The flags the job runner passes (see the training section of README.md)."""
    sets = ["train.epochs=4", "data.repeat=6", "train.device=cpu", f"output.runs_dir={root}/job-runs",
            "output.run_name=job", f"output.repo={root}/job-repo", "output.model_name=tiny-job", *extra]
    return [sys.executable, "-m", "training", "--config", str(recipe), *[a for s in sets for a in ("--set", s)]]


@pytest.mark.timeout(300)
def test_kill_9_then_resume_continues_from_the_last_checkpoint(tiny_recipe):
    root = tiny_recipe.parent
    run_dir = root / "job-runs" / "tiny" / "job"
    # The run holds in epoch 2, at its first step line: epoch 1's checkpoint is written, epoch 2's training is
    # what the kill loses. It stays there until killed, however slow the host (no race with the run's end).
    hold = Hold.event(root / "hold", "step", epoch=2)
    proc = subprocess.Popen(job_args(tiny_recipe, root), cwd=REPO, env=hold.env(ENV), stderr=subprocess.PIPE,
                            text=True)
    try:
        hold.wait(proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)
    assert proc.returncode == -signal.SIGKILL
    done = torch.load(run_dir / CHECKPOINT, weights_only=True)["epoch"]  # kill -9 never leaves half a file
    assert 1 <= done < 4, "the run must be killed mid-way for this test to mean anything"
    assert not list((run_dir / "checkpoints").glob("*.tmp"))

    resumed = subprocess.run([*job_args(tiny_recipe, root), "--resume", str(run_dir)], cwd=REPO, env=ENV,
                             capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    events, _ = read_events(run_dir / EVENTS_FILE)
    starts = [e for e in events if e["event"] == "start"]
    assert [s["start_epoch"] for s in starts] == [0, done]  # the killed run wrote no end line
    assert events[-1]["event"] == "end" and events[-1]["status"] == "completed"
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    manifest = read_manifest(root / "job-repo" / "tiny-job" / "1")
    assert manifest.training["epochs_run"] == 4 and manifest.training["run_dir"] == str(run_dir)


@pytest.mark.timeout(300)
def test_sigterm_cancels_with_a_terminated_end_line_and_time_budgets_apply(tiny_recipe):
    root = tiny_recipe.parent
    run_dir = root / "job-runs" / "tiny" / "job"
    hold = Hold.event(root / "hold", "step", epoch=1)  # SIGTERM mid-epoch, whenever it arrives
    proc = subprocess.Popen(job_args(tiny_recipe, root, "train.epochs=50"), cwd=REPO, env=hold.env(ENV),
                            stderr=subprocess.PIPE, text=True)
    try:
        hold.wait(proc)
    except BaseException:
        proc.kill()
        raise
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 143
    events, _ = read_events(run_dir / EVENTS_FILE)
    assert (events[-1]["event"], events[-1]["status"], events[-1]["reason"]) == ("end", "failed", "terminated")

    budget = subprocess.run(job_args(tiny_recipe, root, "train.epochs=50", "output.run_name=budget",
                                     "train.max_time_min=0.0001", "schedule.horizon=time"),
                            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=240)
    assert budget.returncode == 0, budget.stderr[-3000:]
    events, _ = read_events(root / "job-runs" / "tiny" / "budget" / EVENTS_FILE)
    assert [e["epoch"] for e in events if e["event"] == "epoch"] == [1]
    assert events[-1]["status"] == "completed" and "time budget" in events[-1]["reason"]
