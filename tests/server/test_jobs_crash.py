"""kill -9 of a real `segsvc serve` mid-job, a restart on the same state: the job resumes and ends whole."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from segsvc.client import SegmentationClient
from segsvc.wire import decode_png_labels
from tests.holds import Hold
from tests.server.conftest import encode, make_image, publish

ROOT = Path(__file__).resolve().parents[2]
IMAGES = 120


def _serve(tmp_path: Path, log_name: str, hold: Hold | None = None) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_ALBUMENTATIONS_UPDATE": "1"}
    if hold is not None:
        env = hold.env(env)
    log = open(tmp_path / log_name, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "segsvc", "serve", "--model-repo", str(tmp_path / "repo"), "--host", "127.0.0.1",
         "--port", "0", "--metrics-port", "-1", "--torch-threads", "1", "--io-threads", "2", "--no-warmup",
         "--max-batch-size", "1", "--grace-s", "0", "--state-dir", str(tmp_path / "state"),
         "--data-root", str(tmp_path / "data"), "--output-root", str(tmp_path / "out")],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True,
    )
    line = proc.stdout.readline()
    assert "serving on" in line, (tmp_path / log_name).read_text()
    return proc, line.split("serving on ")[1].split(",")[0].strip()


@pytest.mark.slow
def test_kill_9_mid_job_then_restart_resumes_with_exactly_one_output_per_input(tmp_path):
    publish(tmp_path / "repo", "m", seed=5)
    for i in range(IMAGES):
        (tmp_path / "data" / f"d{i % 3}").mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / f"d{i % 3}" / f"{i:03d}.png").write_bytes(encode(make_image(96, 128, seed=i)))
    # The server holds the job's label writes after the third, each with its temporary file written and not yet
    # renamed (every I/O thread ends up there): 3 images are done, the others are not, until the kill.
    hold = Hold.rename(tmp_path, glob.escape(str(tmp_path / "out")) + "/*/labels/*", after=3)
    proc, address = _serve(tmp_path, "first.log", hold)
    try:
        with SegmentationClient(address, timeout_s=30) as c:
            job = c.submit_job(["."], model="m", color=True)
            hold.wait(proc)
            deadline = time.monotonic() + 120
            while (status := job.status()).done < 3:  # the three written images' DONE is not held
                assert time.monotonic() < deadline, "the written images were not recorded"
                time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert status.done < IMAGES - 10, "the job finished before the kill; the test would prove nothing"
    assert [p.name for p in (tmp_path / "out").rglob("*") if ".tmp-" in p.name], "the kill left no half write"

    proc, address = _serve(tmp_path, "second.log")
    try:
        with SegmentationClient(address, timeout_s=60) as c:
            resumed = c.job(job.name)
            final = resumed.wait(timeout_s=120)
            result = resumed.result()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    assert final.state == "SUCCEEDED" and (result.done, result.failed, result.skipped) == (IMAGES, 0, 0)
    out = tmp_path / "out" / job.id
    labels = sorted(p.relative_to(out / "labels").as_posix() for p in (out / "labels").rglob("*") if p.is_file())
    inputs = sorted(p.relative_to(tmp_path / "data").as_posix() + ".png"
                    for p in (tmp_path / "data").rglob("*.png"))
    assert labels == inputs  # exactly one label map per input, nothing else
    assert len(list((out / "color").rglob("*.png"))) == IMAGES
    leftovers = [p.name for p in out.rglob("*") if ".tmp-" in p.name]
    assert leftovers == []
    for name in labels[:: IMAGES // 12]:
        assert decode_png_labels((out / "labels" / name).read_bytes()).shape == (96, 128)
    records = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["input"] for r in records) == [n.removesuffix(".png") for n in inputs]
