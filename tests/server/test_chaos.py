"""Chaos: a real `segsvc serve` under load gets a corrupt version dropped in, is killed -9 and restarted.

The repository sits on a "volume" with ``lost+found``. Clients keep sending
images the whole time. While the server is up every answer is OK; while it is
down the client sees UNAVAILABLE; never INTERNAL or UNKNOWN. After the restart
the corrupt newest version is reported as FAILED and the previous one serves.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from segsvc.v1 import segmentation_pb2 as pb
from segsvc.v1 import segmentation_pb2_grpc as pb_grpc
from tests.server.conftest import encode, make_image, publish, reference, wait_for

ROOT = Path(__file__).resolve().parents[2]
FAILED = pb.VERSION_STATE_FAILED


def _serve(repo: Path, port: int, log: Path) -> tuple[subprocess.Popen, str]:
    """Start ``segsvc serve`` on ``port`` (0: one the server picks) and return it with the address it listens on,
    once it listens (its "serving on" line: no port is picked here and bound later by another process)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "segsvc", "serve", "--model-repo", str(repo), "--host", "127.0.0.1",
         "--port", str(port), "--metrics-port", "-1", "--no-warmup", "--torch-threads", "1",
         "--poll-interval-s", "0.2", "--grace-s", "0", "--log-level", "WARNING"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=open(log, "a"), text=True,
    )
    line = proc.stdout.readline()  # the one line it prints; EOF if it exits first
    if "serving on" not in line:
        proc.kill()
        proc.wait()
        raise AssertionError(f"the server did not start: {log.read_text()}")
    return proc, line.split("serving on ")[1].split(",")[0].strip()


class Load:
    """Client threads sending Segment calls until stopped, recording every outcome."""

    def __init__(self, address: str, image: np.ndarray, threads: int = 3) -> None:
        self.outcomes: list[tuple[float, grpc.StatusCode, int, int]] = []  # when, code, version, client thread
        self.labels: list[tuple[int, np.ndarray]] = []
        self._stop = threading.Event()
        self._request = pb.SegmentRequest(model="m", image=encode(image))
        self._threads = [threading.Thread(target=self._run, args=(address, i), daemon=True) for i in range(threads)]
        for t in self._threads:
            t.start()

    def _run(self, address: str, client: int) -> None:
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.SegmentationServiceStub(channel)
            while not self._stop.is_set():
                try:
                    r = stub.Segment(self._request, timeout=120)  # only a hang reaches it: a loaded host is slow
                    self.outcomes.append((time.monotonic(), grpc.StatusCode.OK, r.model_version, client))
                    labels = np.frombuffer(r.labels.data, np.uint8).reshape(r.labels.height, r.labels.width)
                    self.labels.append((r.model_version, labels))
                except grpc.RpcError as exc:
                    self.outcomes.append((time.monotonic(), exc.code(), 0, client))
                    time.sleep(0.02)

    def count_ok_after(self, t: float) -> int:
        return sum(1 for when, code, _, _ in self.outcomes if when > t and code == grpc.StatusCode.OK)

    def all_answered_after(self, t: float) -> bool:
        """Whether every client thread has had an answer since ``t``."""
        answered = {c for when, code, _, c in self.outcomes if when > t and code == grpc.StatusCode.OK}
        return len(answered) == len(self._threads)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(150)  # longer than a call's deadline


@pytest.mark.slow
def test_corrupt_version_kill_9_and_restart_under_load(tmp_path):
    repo = tmp_path / "volume"
    (repo / "lost+found").mkdir(parents=True)
    v1 = publish(repo, "m", seed=21)
    image = make_image(48, 64, seed=3)
    expected_v1 = reference(v1).predict(image)
    log = tmp_path / "server.log"
    proc, address = _serve(repo, 0, log)
    port = int(address.rsplit(":", 1)[1])
    load = None
    try:
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.SegmentationServiceStub(channel)
            grpc.channel_ready_future(channel).result(timeout=60)
            wait_for(lambda: _ready(stub))
            load = Load(address, image)
            wait_for(lambda: load.count_ok_after(0) >= 5)

            # a corrupt version 2 arrives: the poller tries it, it fails, version 1 keeps serving
            shutil.copytree(v1, repo / "m" / ".incoming")
            (repo / "m" / ".incoming" / "weights.safetensors").write_bytes(b"\0garbage" * 100)
            manifest = (repo / "m" / ".incoming" / "manifest.json").read_text()
            (repo / "m" / ".incoming" / "manifest.json").write_text(manifest.replace('"version": 1', '"version": 2'))
            os.rename(repo / "m" / ".incoming", repo / "m" / "2")
            wait_for(lambda: _state(stub, 2) == FAILED)
            before_kill = time.monotonic()
            wait_for(lambda: load.count_ok_after(before_kill) >= 5)

            killed_at = time.monotonic()  # before the kill: no error of the outage can be recorded before this
            os.kill(proc.pid, signal.SIGKILL)  # under load
            proc.wait(60)
            proc, restarted = _serve(repo, port, log)  # the same port: the clients' channels reconnect to it
            assert restarted == address
            wait_for(lambda: _ready(stub))
            restarted_at = time.monotonic()
            # every client recovers (its channel out of gRPC's reconnect backoff), and ten answers come in all
            # (gRPC's backoff grows towards 120 s while the server is down: a guard far beyond it, for a hang only)
            wait_for(lambda: load.count_ok_after(restarted_at) >= 10 and load.all_answered_after(restarted_at),
                     timeout_s=300)
            info = stub.GetModel(pb.GetModelRequest(model="m"), timeout=60)
            assert info.version == 1 and _state(stub, 2) == FAILED
            assert "m/2/" in _reason(stub, 2) and str(tmp_path) not in _reason(stub, 2)
        load.stop()
    finally:
        if load is not None:
            load.stop()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    codes = {code for _, code, _, _ in load.outcomes}
    assert codes <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, codes
    down = [code for _, code, _, _ in load.outcomes if code != grpc.StatusCode.OK]
    # Each client's outage ends with its first answer after the restart, not at the test's own readiness check:
    # a client's channel may still be in gRPC's reconnect backoff (seconds, longer on a loaded host) by then.
    recovered = {client: min(when for when, code, _, c in load.outcomes if c == client and when > restarted_at
                             and code == grpc.StatusCode.OK)
                 for client in {c for _, _, _, c in load.outcomes}}
    outside = [(when - killed_at, code.name) for when, code, _, client in load.outcomes
               if code != grpc.StatusCode.OK and not killed_at <= when <= recovered[client]]
    assert not outside, f"errors outside the outage (seconds after the kill): {outside}"
    assert down, "the kill was not seen by any client: the test proved nothing"
    assert {v for v, _ in load.labels} == {1}
    assert all(np.array_equal(labels, expected_v1) for _, labels in load.labels)


def _ready(stub) -> bool:
    try:
        return stub.GetModel(pb.GetModelRequest(model="m"), timeout=60).ready  # a down server fails at once
    except grpc.RpcError:
        return False


def _state(stub, version: int) -> int:
    info = stub.GetModel(pb.GetModelRequest(model="m"), timeout=60)
    return next((s.state for s in info.version_status if s.version == version), 0)


def _reason(stub, version: int) -> str:
    info = stub.GetModel(pb.GetModelRequest(model="m"), timeout=60)
    return next((s.reason for s in info.version_status if s.version == version), "")
