"""`segsvc serve` as a real process: start, serve with a token, log JSON with request ids, stop on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from segsvc import errors
from segsvc.client import SegmentationClient
from tests.server.conftest import assert_labels_match, make_image, publish, reference

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_serve_command_end_to_end(tmp_path):
    v1 = publish(tmp_path / "repo", "m", seed=31)
    token_file = tmp_path / "token"
    token_file.write_text("cli-token\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_ALBUMENTATIONS_UPDATE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "segsvc", "serve", "--model-repo", str(tmp_path / "repo"), "--host", "127.0.0.1",
         "--port", "0", "--metrics-port", "-1", "--torch-threads", "1", "--io-threads", "2", "--no-warmup",
         "--grace-s", "5", "--token-file", str(token_file)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = proc.stdout.readline()  # "segsvc: serving on 127.0.0.1:PORT"
        assert "serving on" in line, line + proc.stderr.read()
        address = line.split("serving on ")[1].split(",")[0].strip()
        image = make_image(36, 44, seed=5)
        with SegmentationClient(address, token="cli-token") as c:
            assert c.health(timeout_s=60) == "SERVING"  # not the default 5 s: the server has just started
            result = c.segment(image, request_id="cli-req-1")
            assert_labels_match(result.mask, reference(v1), image)
        with SegmentationClient(address) as anonymous, pytest.raises(errors.Unauthenticated):
            anonymous.segment(image)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    logs = [json.loads(x) for x in proc.stderr.read().splitlines() if x.startswith("{")]
    done = [e for e in logs if e.get("request_id") == "cli-req-1"]
    assert done and done[0]["method"] == "Segment" and done[0]["code"] == "OK" and done[0]["model"] == "m"
    assert any("draining" in e["msg"] for e in logs) and logs[-1]["msg"] == "stopped"
    assert any("kept out of garbage collection" in e["msg"] for e in logs)  # freeze_startup_heap ran


def test_max_batch_pixels_flag() -> None:
    from segsvc.cli_serve import CUDA_BATCH_PIXELS, batch_pixels as _batch_pixels
    from segsvc.errors import InvalidArgument

    assert _batch_pixels("auto", "cpu") is None  # on CPU the memory budget bounds batches
    assert _batch_pixels("auto", "cuda") == CUDA_BATCH_PIXELS
    assert _batch_pixels("0", "cpu") is None
    assert _batch_pixels("1000000", "cuda") == 1_000_000
    with pytest.raises(InvalidArgument, match="max-batch-pixels"):
        _batch_pixels("lots", "cpu")
    with pytest.raises(InvalidArgument, match=">= 0"):
        _batch_pixels("-5", "cpu")


def test_max_batch_mb_flag() -> None:
    from segsvc.cli_serve import CPU_BATCH_MB, _batch_bytes
    from segsvc.errors import InvalidArgument

    assert _batch_bytes("auto", "cpu") == CPU_BATCH_MB << 20
    assert _batch_bytes("auto", "cuda") is None
    assert _batch_bytes("0", "cpu") is None
    assert _batch_bytes("64", "cuda") == 64 << 20
    with pytest.raises(InvalidArgument, match="--max-batch-mb must be 'auto' or an integer, got '1.5'"):
        _batch_bytes("1.5", "cpu")
    with pytest.raises(InvalidArgument, match="--max-batch-mb must be >= 0, got -1"):
        _batch_bytes("-1", "cpu")


def test_job_limits_flags(tmp_path) -> None:
    from segsvc.cli import build_parser
    from segsvc.cli_serve import _jobs_config

    args = build_parser().parse_args(["serve", "--model-repo", str(tmp_path), "--state-dir", str(tmp_path / "s"),
                                      "--max-job-images", "50", "--max-job-paths", "7"])
    config = _jobs_config(args)
    assert (config.max_inputs, config.max_input_specs) == (50, 7)
    default = _jobs_config(build_parser().parse_args(["serve", "--model-repo", str(tmp_path),
                                                      "--state-dir", str(tmp_path / "s")]))
    assert default.max_input_specs == 1_000


def test_training_time_limit_flag(tmp_path) -> None:
    """``--max-train-min`` is the server's cap on a trainer's time (``TrainingConfig.max_time_min``)."""
    from segsvc.cli import build_parser
    from segsvc.cli_train import training_config
    from segsvc.errors import InvalidArgument
    from segsvc.jobs.trainspec import MAX_TIME_MIN, TrainingConfig

    def config(*flags: str):  # type: ignore[no-untyped-def]
        return training_config(build_parser().parse_args(
            ["serve", "--model-repo", str(tmp_path), "--state-dir", str(tmp_path / "s"), *flags]))

    assert config("--max-train-min", "90").max_time_min == 90
    assert config().max_time_min == MAX_TIME_MIN
    with pytest.raises(SystemExit):  # refused by the flag's name while parsing (tests/test_cli_errors.py)
        config("--max-train-min", "0")
    with pytest.raises(InvalidArgument, match="max_time_min must be in"):  # the configuration's own check stays
        TrainingConfig(state_dir=tmp_path, max_time_min=0)
