"""``segsvc health``: the container health check, against a real server, plaintext and TLS.

The Dockerfile's exec-form HEALTHCHECK runs ``segsvc health`` with no flags: it must find the
server's port and certificate from the server's own command line. Here a stand-in process carries
that command line (``--pid``), and a real in-process server answers.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from segsvc.health import Target, certificate_name, check, serve_arguments, target_from_serve_arguments
from segsvc.server.config import TLSConfig
from tests.deploy.conftest import ROOT
from tests.server.conftest import publish


def _health(*args: str, timeout_s: str = "60") -> subprocess.CompletedProcess:
    """``segsvc health`` with a check deadline only a hang reaches: its default, 3 s, is time a loaded host can
    take to answer, and the check would then fail for the wrong reason."""
    return subprocess.run([sys.executable, "-m", "segsvc", "health", *args, "--timeout-s", timeout_s],
                          capture_output=True, text=True, timeout=180, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("health-repo")
    publish(root, "tiny", seed=1)
    return root


def test_serving_server_exits_0(start_server, repo: Path) -> None:
    server = start_server(repo)
    out = _health("--address", server.address)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"{server.address} (plaintext) '': SERVING"
    assert _health("--address", server.address, "--service", "segsvc.model.tiny").returncode == 0


def test_not_serving_unknown_or_unreachable_exit_1(start_server, tmp_path: Path, repo: Path) -> None:
    empty = start_server(tmp_path)  # no model: health stays NOT_SERVING
    out = _health("--address", empty.address)
    assert out.returncode == 1 and "NOT_SERVING" in out.stderr
    server = start_server(repo)
    out = _health("--address", server.address, "--service", "segsvc.model.nope")
    assert out.returncode == 1 and "NOT_FOUND" in out.stderr
    port = server.server.port
    server.stop()
    out = _health("--address", f"127.0.0.1:{port}")  # refused at once: no deadline runs out
    assert out.returncode == 1 and "UNAVAILABLE" in out.stderr


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl absent: cannot make a test certificate")
def test_tls_server_found_from_its_command_line(start_server, tmp_path: Path, repo: Path) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=segsvc.test", "-addext", "subjectAltName=DNS:segsvc.test"],
                   check=True, capture_output=True)
    server = start_server(repo, tls=TLSConfig(cert, key))
    # A process whose command line is the server's, as PID 1 is in the container.
    # It lives until the test kills it (a sleep of a minute could end before a loaded host ran the check).
    stand_in = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)", "segsvc", "serve",
                                 "--model-repo", "/models", "--port", str(server.server.port),
                                 "--tls-cert", str(cert), "--tls-key", str(key)])
    try:
        # (exec has run when Popen returns; the wait only guards that, and a hang past it fails here, not below)
        deadline = time.monotonic() + 120
        while b"serve" not in Path(f"/proc/{stand_in.pid}/cmdline").read_bytes():
            assert time.monotonic() < deadline, "the stand-in never showed the server's command line"
            time.sleep(0.05)
        out = _health("--pid", str(stand_in.pid))
    finally:
        stand_in.kill()
        stand_in.wait()
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"127.0.0.1:{server.server.port} (TLS) '': SERVING"
    # Plaintext against the TLS port fails: the check really used TLS above.
    assert _health("--address", f"127.0.0.1:{server.server.port}", timeout_s="1").returncode == 1
    assert certificate_name(str(cert)) == "segsvc.test"


def test_serve_arguments_of_the_ways_the_server_is_started() -> None:
    assert serve_arguments(["/opt/segsvc/bin/python3", "/opt/segsvc/bin/segsvc", "serve", "--port", "1"]) == \
        ["--port", "1"]
    assert serve_arguments(["python", "-m", "segsvc", "serve"]) == []
    assert serve_arguments(["segsvc", "health"]) is None
    assert serve_arguments(["python", "serve"]) is None


def test_target_from_serve_arguments() -> None:
    assert target_from_serve_arguments(["--model-repo", "/m"]) == Target("127.0.0.1:50051")
    assert target_from_serve_arguments(["--host", "0.0.0.0", "--port=6000"]) == Target("127.0.0.1:6000")
    assert target_from_serve_arguments(["--host", "10.1.2.3", "--port", "7"]).address == "10.1.2.3:7"
    assert target_from_serve_arguments(["--host", "::1", "--port", "7"]).address == "[::1]:7"
    with pytest.raises(ValueError, match="--port 0"):
        target_from_serve_arguments(["--port", "0"])


def test_check_reports_connection_errors_without_raising() -> None:
    serving, status = check(Target("127.0.0.1:1"), timeout_s=0.5)
    assert not serving and status.startswith(("UNAVAILABLE", "DEADLINE_EXCEEDED"))


def test_health_loads_neither_torch_nor_the_server() -> None:
    """A check every 15 s must stay cheap: grpc and the health messages only."""
    code = ("import sys; from segsvc.cli import main\n"
            "try:\n    main(['health', '--no-discover', '--address', '127.0.0.1:1', '--timeout-s', '0.2'])\n"
            "finally:\n    print([m for m in ('torch', 'cv2', 'segsvc.server', 'segsvc.inference') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr
