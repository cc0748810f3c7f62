"""``segsvc serve``'s start and stop: the stop's time budget, the state folder claimed before the port, a start
that fails part-way or is interrupted by SIGTERM leaving nothing behind.

Every wait on a process is on its own lines or its exit, with timeouts only a hang reaches.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from segsvc import errors
from segsvc.cli import main
from segsvc.datasets.registry import _WORK, DatasetsConfig
from segsvc.inference.manager import ManagerConfig
from segsvc.jobs.batch import LOCK_FILE, JobsConfig
from segsvc.jobs.staging import StagingArea
from segsvc.server.app import SegmentationServer
from tests.server.conftest import publish, reserved_port, server_config

ROOT = Path(__file__).resolve().parents[2]
HANG_S = 120
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONUNBUFFERED": "1"}


# -- the stop's time budget: --grace-s + --drain-timeout-s ------------------------------------------
def test_drain_timeout_flag_reaches_the_manager(serve_config) -> None:
    status, config = serve_config("--grace-s", "20", "--drain-timeout-s", "5")
    assert status == 0
    assert config.grace_s == 20 and config.manager.drain_timeout_s == 5
    status, config = serve_config()
    assert status == 0 and config.manager.drain_timeout_s == ManagerConfig().drain_timeout_s == 30.0


def test_drain_timeout_help_says_how_the_stop_adds_up(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--drain-timeout-s" in help_text and "--grace-s + --drain-timeout-s" in help_text


@pytest.mark.parametrize("flag, value", [
    ("--drain-timeout-s", "0"), ("--drain-timeout-s", "-1"), ("--drain-timeout-s", "nan"),
    ("--drain-timeout-s", "inf"), ("--grace-s", "nan"), ("--grace-s", "inf"), ("--grace-s", "-1"),
    ("--max-connection-age-s", "nan"), ("--max-connection-age-s", "inf"),
])
def test_stop_durations_that_are_not_finite_seconds_are_refused_by_flag(serve_config, capsys, flag, value) -> None:
    """NaN passes ``value < 0`` and infinity every bound, so the configuration took them; they broke the stop's
    deadlines (or the start's ``round``, with a traceback) instead of being named at the command line."""
    status, config = serve_config(flag, value)
    err = capsys.readouterr().err
    assert status == 2 and config is None
    assert f"segsvc: error: {flag} must be a finite number of seconds" in err, err


@pytest.mark.parametrize("flag", ["--max-connection-age-s", "--grace-s"])
def test_connection_age_and_grace_beyond_what_grpc_can_hold_are_refused_by_flag(serve_config, capsys, flag) -> None:
    """gRPC takes both (``grpc.max_connection_age_ms``, ``..._grace_ms``) as a 32-bit count of milliseconds:
    30 days failed the start with an OverflowError and its traceback."""
    status, config = serve_config("--max-connection-age-s", "300", flag, str(30 * 86400))
    err = capsys.readouterr().err
    assert status == 2 and config is None
    assert f"segsvc: error: {flag} must be at most 2147483 s" in err, err


# -- the state folder is claimed before anything else -----------------------------------------------
def test_a_second_server_on_the_state_folder_fails_on_the_lock_before_binding_its_port(start_server, tmp_path):
    """The second server's port is held here (bound, not listening), so nothing ever accepts a connection on it and
    binding it fails: the server must fail on the lock first, before it binds a port or loads a model."""
    publish(tmp_path / "repo", "m", seed=1)
    state = tmp_path / "state"
    start_server(tmp_path / "repo", jobs=JobsConfig(state_dir=state, output_root=state / "outputs"))
    with reserved_port() as (port, _):
        proc = subprocess.run(
            [sys.executable, "-m", "segsvc", "serve", "--model-repo", str(tmp_path / "repo"), "--state-dir",
             str(state), "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "-1", "--device", "cpu",
             "--no-warmup", "--torch-threads", "1", "--io-threads", "2", "--log-format", "text"],
            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 2, proc.stderr
    assert f"segsvc: error: another segsvc server already runs the jobs of state folder {state}" in proc.stderr
    assert "cannot listen" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert "loaded model" not in proc.stderr and "serving on" not in proc.stdout, proc.stderr


def test_a_second_server_leaves_the_first_ones_dataset_uploads_alone(start_server, tmp_path):
    """The registry removes work folders as a crash's leftovers when it opens: on a folder another server runs
    they are that server's datasets being received, so the lock must come first."""
    publish(tmp_path / "repo", "m", seed=1)
    state = tmp_path / "state"
    jobs, datasets = JobsConfig(state_dir=state, output_root=state / "outputs"), DatasetsConfig(state_dir=state)
    start_server(tmp_path / "repo", jobs=jobs, datasets=datasets)
    receiving = state / "datasets" / f"{_WORK}0123456789abcdef"  # the first server's upload in progress
    receiving.mkdir()
    (receiving / "part.png").write_bytes(b"half an image")
    with pytest.raises(errors.FailedPrecondition, match="state folder"):
        start_server(tmp_path / "repo", jobs=jobs, datasets=datasets)
    assert (receiving / "part.png").read_bytes() == b"half an image"


# -- a start that fails part-way leaves nothing behind ---------------------------------------------------
def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=30).close()
    except ConnectionRefusedError:
        return False
    return True


def _lock_is_free(state: Path) -> bool:
    fd = os.open(state / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def test_a_start_that_fails_after_loading_closes_its_ports_stops_its_models_and_frees_the_state(tmp_path,
                                                                                                 monkeypatch):
    publish(tmp_path / "repo", "m", seed=1)
    state = tmp_path / "state"

    def unreadable(self: StagingArea) -> None:
        raise PermissionError(13, "Permission denied", str(self.root))

    monkeypatch.setattr(StagingArea, "clean_partial", unreadable)  # the jobs' start, after the models loaded
    config = server_config(tmp_path / "repo", jobs=JobsConfig(state_dir=state, output_root=state / "outputs"))

    async def scenario() -> tuple[bool, bool, bool, bool]:
        server = SegmentationServer(config)
        try:
            with pytest.raises(PermissionError):
                await server.start()
            assert server.port and server.metrics_port  # it had bound both
            return (_accepts(server.port), _accepts(server.metrics_port), server.manager.ready,
                    _lock_is_free(state))
        finally:
            await server.stop(grace_s=0)  # what the start should have done itself

    grpc_open, metrics_open, models_loaded, lock_free = asyncio.run(scenario())
    assert not grpc_open and not metrics_open and not models_loaded and lock_free


def test_a_metrics_port_in_use_is_named_and_fails_the_start_before_the_grpc_port_is_bound(tmp_path):
    """An unstarted gRPC server already listens on its bound port, and its ``stop`` does not close it: bound
    before the metrics endpoint failed, the port stayed open for the life of the process."""

    async def scenario(metrics_port: int) -> int:
        server = SegmentationServer(server_config(tmp_path / "repo", metrics_port=metrics_port))
        try:
            with pytest.raises(errors.InvalidArgument, match=f"cannot serve the metrics on 127.0.0.1:{metrics_port}"):
                await server.start()
            return server.port
        finally:
            await server.stop(grace_s=0)

    with reserved_port() as (metrics_port, _):
        assert asyncio.run(scenario(metrics_port)) == 0  # never bound: nothing listened on it


# -- SIGTERM (or Ctrl-C) while the models load ------------------------------------------------------------
HELD_START = """
import logging, sys
from pathlib import Path
from segsvc.inference.loader import VersionLoader
from segsvc.server.app import run
from tests.server.conftest import server_config

build = VersionLoader._build_engine

def held(self, name, version):
    print(f"loading {name}", flush=True)
    sys.stdin.readline()  # the test closes stdin once the server has taken its signal
    return build(self, name, version)

VersionLoader._build_engine = held
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
run(server_config(Path(sys.argv[1]), metrics_port=None))
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_while_the_models_load_stops_the_start(tmp_path, sig):
    """Before, the signal only marked the stop: the server went on loading every model (minutes, until
    Kubernetes' SIGKILL; Ctrl-C did nothing), then served for an instant."""
    publish(tmp_path / "repo", "a", seed=1)
    publish(tmp_path / "repo", "b", seed=2)
    proc = subprocess.Popen([sys.executable, "-c", HELD_START, str(tmp_path / "repo")], cwd=ROOT, env=ENV,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    taken = threading.Event()

    def read_log() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if "while starting" in line:
                taken.set()

    reader = threading.Thread(target=read_log, daemon=True)
    reader.start()
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline().startswith("loading "), "".join(lines)
        proc.send_signal(sig)
        assert taken.wait(HANG_S), "".join(lines)  # only a hang (or no reaction to the signal) reaches this
        proc.stdin.close()  # the build in flight ends; its version is never installed
        assert proc.wait(HANG_S) == 0, "".join(lines)
        rest = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(HANG_S)
    assert "serving on" not in rest and "loading" not in rest, rest  # the second model was never tried
    assert not any("Traceback" in line for line in lines), "".join(lines)
