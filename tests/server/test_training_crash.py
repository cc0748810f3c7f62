"""kill -9 of a real `segsvc serve` during training: the trainer it left behind is stopped, the job resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from segsvc.client import SegmentationClient
from segsvc.data.synthetic import SyntheticConfig, write_synthetic_dataset
from segsvc.inference.repository import ModelRepository
from segsvc.jobs.procgroup import group_alive
from segsvc.jobs.store import JobStore
from tests.holds import Hold
from tests.server.conftest import encode, make_image
from tests.server.test_training import JOB_TIMEOUT_S, TINY

ROOT = Path(__file__).resolve().parents[2]


def _serve(tmp_path: Path, log_name: str, hold: Hold | None = None) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_ALBUMENTATIONS_UPDATE": "1"}
    if hold is not None:
        env = hold.env(env)  # the server passes it on to its trainer
    log = open(tmp_path / log_name, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "segsvc", "serve", "--model-repo", str(tmp_path / "repo"), "--host", "127.0.0.1",
         "--port", "0", "--metrics-port", "-1", "--torch-threads", "1", "--io-threads", "2", "--no-warmup",
         "--grace-s", "0", "--state-dir", str(tmp_path / "state"), "--poll-interval-s", "0"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True,
    )
    line = proc.stdout.readline()
    assert "serving on" in line, (tmp_path / log_name).read_text()
    return proc, line.split("serving on ")[1].split(",")[0].strip()


def _progress(tmp_path: Path, job_id: str) -> dict:
    store = JobStore(tmp_path / "state" / "jobs.sqlite")  # WAL: readable while the server writes
    try:
        return store.get(job_id).progress
    finally:
        store.close()


@pytest.mark.slow
def test_kill_9_during_training_then_restart_stops_the_orphan_and_resumes_to_completion(tmp_path):
    write_synthetic_dataset(tmp_path / "shapes", 48, SyntheticConfig(size_hw=(32, 32)), seed=0, val_fraction=0.25)
    epochs = 40
    # The first server's trainer holds in epoch 4, at its first step line (epoch 3 is checkpointed), until it is
    # killed: it cannot finish before the server is killed, nor before the next server is up.
    hold = Hold.event(tmp_path, "step", epoch=4)
    proc, address = _serve(tmp_path, "first.log", hold)
    try:
        with SegmentationClient(address, timeout_s=60) as client:
            client.upload_dataset(tmp_path / "shapes", "shapes")
            job = client.submit_training_job("shapes", recipe="synthetic-quick", overrides=TINY, epochs=epochs,
                                             device="cpu")

            def running() -> None:
                status = job.status()
                assert not status.done_flag, status

            hold.wait(proc, timeout_s=JOB_TIMEOUT_S, check=running)
            deadline = time.monotonic() + JOB_TIMEOUT_S
            while (status := job.status()).epoch < 3:  # the server has read epoch 3's line
                assert time.monotonic() < deadline and not status.done_flag, status
                time.sleep(0.05)
        progress = _progress(tmp_path, job.id)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    orphan = int(progress["pgid"])
    assert status.epoch < epochs - 5, "training finished before the kill; the test would prove nothing"
    assert group_alive(orphan), "the trainer should have outlived the killed server (its own process group)"
    # The orphan holds already; it is also frozen, as it was before the hold: the next server stops a group that
    # SIGTERM alone does not end.
    os.killpg(orphan, signal.SIGSTOP)

    proc, address = _serve(tmp_path, "second.log")
    try:
        with SegmentationClient(address, timeout_s=60) as client:
            resumed = client.job(job.name)
            deadline = time.monotonic() + 120
            while group_alive(orphan):  # the new server stops the orphan before it resumes the job
                assert time.monotonic() < deadline, "the orphaned trainer was not stopped"
                time.sleep(0.05)
            final = resumed.wait(timeout_s=JOB_TIMEOUT_S)
            result = resumed.result()
            served = client.segment(encode(make_image(32, 32, seed=1)), model="synthetic-quick")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    assert final.state == "SUCCEEDED" and final.attempts == 2 and final.epoch == epochs
    assert (result.version, result.promoted) == (1, True) and served.version == 1
    run_dir = tmp_path / "state" / "training" / job.id / "synthetic-quick" / "run"
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    starts = [e for e in events if e["event"] == "start"]
    assert len(starts) == 2 and starts[0]["start_epoch"] == 0 and starts[1]["start_epoch"] >= 3  # resumed
    assert events[-1]["event"] == "end" and events[-1]["status"] == "completed"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == list(range(1, epochs + 1))  # every epoch once
    assert ModelRepository(tmp_path / "repo").versions("synthetic-quick") == [1]
