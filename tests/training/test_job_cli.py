"""``python -m training`` as the job runner drives it: budget and output overrides, kill -9, ``--resume``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from segsvc.models.artifact import read_manifest
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


def wait_for(path: Path, done, proc: subprocess.Popen, timeout_s: float = 120) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        events, _ = read_events(path)
        if any(done(e) for e in events):
            return events
        if proc.poll() is not None:
            pytest.fail(f"the run ended early with status {proc.returncode}: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"no matching event in {timeout_s} s")


@pytest.mark.timeout(300)
def test_kill_9_then_resume_continues_from_the_last_checkpoint(tiny_recipe):
    root = tiny_recipe.parent
    run_dir = root / "job-runs" / "tiny" / "job"
    proc = subprocess.Popen(job_args(tiny_recipe, root), cwd=REPO, env=ENV, stderr=subprocess.PIPE, text=True)
    wait_for(run_dir / EVENTS_FILE, lambda e: e["event"] == "checkpoint", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(60)
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
    proc = subprocess.Popen(job_args(tiny_recipe, root, "train.epochs=50"), cwd=REPO, env=ENV,
                            stderr=subprocess.PIPE, text=True)
    wait_for(run_dir / EVENTS_FILE, lambda e: e["event"] == "step", proc)
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
