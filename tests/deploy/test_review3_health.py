"""``segsvc health`` finds the server's certificate where the server does, wherever the check runs.

A server started as ``segsvc serve --tls-cert certs/server.pem`` reads that path from its own working
directory. The check reads the path from the server's command line, so it must resolve it there too
(``/proc/PID/cwd``): ``--pid`` from a shell elsewhere, ``docker compose exec -w``, or a probe with
another working directory would otherwise look for the certificate in the wrong folder and report a
serving server unhealthy.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import segsvc.health
from segsvc.cli import build_parser
from segsvc.health import resolve_target
from tests.deploy.conftest import DEPLOY, ROOT

NO_OPENSSL = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl absent: no test certificate")


@pytest.fixture
def server_dir(tmp_path: Path) -> Path:
    """A server's working directory holding certs/server.pem (subject alternative name segsvc.test)."""
    certs = tmp_path / "srv" / "certs"
    certs.mkdir(parents=True)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(certs / "server.key"),
                    "-out", str(certs / "server.pem"), "-days", "1", "-subj", "/CN=segsvc.test",
                    "-addext", "subjectAltName=DNS:segsvc.test"], check=True, capture_output=True)
    return tmp_path / "srv"


@pytest.fixture
def stand_in(server_dir: Path):
    """A process running in ``server_dir`` whose command line is a TLS server's with a relative certificate.

    It says "ready" once its interpreter runs, and the fixture waits for that line: by then /proc shows
    the command line (right after Popen returns it may still show the parent's).
    """
    child = subprocess.Popen([sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(3600)",
                              "segsvc", "serve", "--model-repo", "/models", "--port", "50999",
                              "--tls-cert", "certs/server.pem", "--tls-key", "certs/server.key"],
                             cwd=server_dir, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "ready\n"
        yield child
    finally:
        child.kill()
        child.wait()
        child.stdout.close()


def _args(**given) -> argparse.Namespace:
    defaults = dict(address=None, pid=None, discover=True, tls=False, tls_ca=None, tls_server_name=None)
    return argparse.Namespace(**{**defaults, **given})


@NO_OPENSSL
def test_pid_relative_certificate_is_read_from_the_servers_directory(monkeypatch, tmp_path: Path, server_dir: Path,
                                                                      stand_in) -> None:
    monkeypatch.delenv("SEGSVC_TLS_CA", raising=False)
    monkeypatch.chdir(tmp_path)  # not the server's directory: certs/server.pem is not here
    target = resolve_target(_args(pid=stand_in.pid))
    assert target.tls and target.address == "127.0.0.1:50999"
    assert target.ca_file == str(server_dir / "certs" / "server.pem")
    assert target.server_name == "segsvc.test", "the name read from the server's certificate"


@NO_OPENSSL
def test_discovered_server_relative_certificate_too(monkeypatch, tmp_path: Path, server_dir: Path, stand_in) -> None:
    """With no flags (the container health check) the one server found is resolved the same way."""
    monkeypatch.delenv("SEGSVC_TLS_CA", raising=False)
    monkeypatch.chdir(tmp_path)
    real = segsvc.health.server_processes
    monkeypatch.setattr(segsvc.health, "server_processes",
                        lambda proc=Path("/proc"): {p: a for p, a in real(proc).items() if p == stand_in.pid})
    target = resolve_target(_args())
    assert target.ca_file == str(server_dir / "certs" / "server.pem") and target.server_name == "segsvc.test"


@NO_OPENSSL
def test_absolute_certificate_is_left_as_it_is(server_dir: Path) -> None:
    cert = str(server_dir / "certs" / "server.pem")
    target = segsvc.health.target_from_serve_arguments(["--tls-cert", cert], cwd=Path("/elsewhere"))
    assert target.ca_file == cert and target.server_name == "segsvc.test"


def test_container_checks_outlast_the_checks_own_deadline() -> None:
    """Docker kills a health check at its --timeout and counts a failure: the check's own deadline (default
    --timeout-s) plus a Python start (0.15-0.3 s measured, more on a busy host) must fit inside it, so a slow
    answer is reported as the check's error, not as a killed check."""
    deadline_s = build_parser().parse_args(["health"]).timeout_s
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    timeouts = [float(t) for t in re.findall(r"^HEALTHCHECK .*--timeout=(\d+(?:\.\d+)?)s", dockerfile, re.M)]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    timeouts += [float(s["healthcheck"]["timeout"].rstrip("s")) for s in compose["services"].values()
                 if "healthcheck" in s]
    assert len(timeouts) >= 3, timeouts  # the Dockerfile's and both compose servers'
    assert all(t >= deadline_s + 1.0 for t in timeouts), (deadline_s, timeouts)
