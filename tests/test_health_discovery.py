"""``segsvc health`` with no flags: which local ``segsvc serve`` it checks, and that it never guesses.

The processes are real (sleeping children of this test, so /proc lists them as ours); their command
lines are the server's through a stand-in ``process_command_line``, so other servers of this user on
the machine do not count.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

import segsvc.health
from segsvc.cli import main
from tests.server.conftest import reserved_port


@pytest.fixture
def fake_servers(monkeypatch):
    """Factory: ``fake_servers(port, ...)`` starts one stand-in 'segsvc serve --port PORT' per port; their pids."""
    children: list[subprocess.Popen] = []
    cmdlines: dict[int, list[str]] = {}

    def start(*ports: int) -> list[int]:
        for port in ports:
            # lives until the teardown kills it: a sleep that ended while a loaded host ran the test would hide it
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
            children.append(child)
            cmdlines[child.pid] = ["/venv/bin/python", "/venv/bin/segsvc", "serve", "--model-repo", "/m",
                                   "--port", str(port)]
        return [c.pid for c in children[-len(ports):]]

    monkeypatch.setattr(segsvc.health, "process_command_line", lambda pid: cmdlines.get(pid, ["bash"]))
    yield start
    for child in children:
        child.kill()
        child.wait()


def test_several_local_servers_are_named_not_guessed(fake_servers, capsys) -> None:
    # Ports held here (bound, not listening): nothing can listen there, so each check is refused (a fixed port
    # could be another program's on a shared machine, and it might answer).
    with reserved_port() as (port_a, _), reserved_port() as (port_b, _):
        ports = dict(zip(fake_servers(port_a, port_b), (port_a, port_b)))
        (a, pa), (b, pb) = sorted(ports.items())  # listed by pid
        assert main(["health", "--timeout-s", "0.5"]) == 1  # 1, not 2: Docker's HEALTHCHECK reserves 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.count("\n") == 1, err
        assert err == (f"segsvc health: 2 'segsvc serve' processes are running: pid {a} (port {pa}), "
                       f"pid {b} (port {pb}); pass --address HOST:PORT or --pid PID to choose one\n")
        # choosing one works as before (nothing listens there: UNAVAILABLE, but the port is the chosen server's)
        assert main(["health", "--pid", str(b), "--timeout-s", "0.5"]) == 1
        assert capsys.readouterr().err.startswith(f"127.0.0.1:{pb} (plaintext) '': ")


def test_the_one_local_server_is_found_from_its_command_line(fake_servers, capsys) -> None:
    with reserved_port() as (port, _):
        fake_servers(port)
        assert main(["health", "--timeout-s", "0.5"]) == 1
        assert capsys.readouterr().err.startswith(f"127.0.0.1:{port} (plaintext) '': ")


def test_pid_1_is_the_server_in_a_container_even_beside_others(monkeypatch) -> None:
    found = {1: ["--port", "7000"], 40: ["--port", "7001"], 41: ["--port", "7002"]}
    monkeypatch.setattr(segsvc.health, "server_processes", lambda proc=None: found)
    assert segsvc.health.find_server() == ["--port", "7000"]
    monkeypatch.setattr(segsvc.health, "server_processes", lambda proc=None: {})
    assert segsvc.health.find_server() is None
